"""torchvision's FCOS and RetinaNet on gfldet's own backbone + FPN, behind gfldet's calling
convention, so that gfldet's trainer and evaluator train and score them unchanged (used by
`accuracy.py`).

- Same trunk: `build_model(cfg.model)` builds the GFL detector and its `.backbone` and `.neck`
  (ResNet + FPN, P3-P7) become torchvision's backbone through `PyramidAdapter`; built from the
  same seed, they start from the same weights as the GFL entrants' backbone and FPN.
- Same head size: `stacked_convs` conv layers per tower (FCOSHead `num_convs`; RetinaNet's towers
  cut to their first `stacked_convs` blocks). torchvision's towers are `fpn.out_channels` wide,
  gfldet's `head.feat_channels` (equal in the demo config: 128). Every head normalises its towers
  with GroupNorm(32): gfldet's, FCOSHead, and RetinaNet's v2 head (GIoU box loss, as
  `retinanet_resnet50_fpn_v2`).
- Same test settings as gfldet's `model.test`: score > `score_thr`, top `nms_pre` (anchor, class)
  pairs per level, class-wise NMS at `nms_iou`, best `max_per_img`.
- Labels: gfldet's are 0..C-1 and torchvision's FCOS and RetinaNet reserve none (their
  `compute_loss` one-hot encodes `labels` straight into the C sigmoid channels and marks
  background anchors by a matched index of -1), so they get `num_classes=C` and the same labels.
- torchvision's transform is a no-op: mean 0 / std 1 (the loader already normalised the images),
  no resize in training (`_skip_resize`, as torchvision's detection references use with their
  own resizing augmentations) and, at test time, `min_size`/`max_size` equal to the loader's
  `data.test_short_side`/`data.max_size`: the loader's keep-ratio resize puts one side exactly at
  one of them and the other within its bound, so torchvision's scale factor is exactly 1.0.
  `check_no_resize` asserts it for every test image.

Shape legend: `B` images, `Hp`/`Wp` the padded batch size, `h`/`w` an image's size before padding,
`G` boxes per image, `N` detections per image, `C` classes, `F` FPN channels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from gfldet.config import DataConfig, ModelConfig
from gfldet.engine.build import build_model

log = logging.getLogger("gfldet")

TORCHVISION_KINDS = ("fcos", "retinanet")
RETINANET_ANCHORS = ("torchvision", "one_square")


class PyramidAdapter(nn.Module):
    """gfldet's backbone + FPN as a torchvision detection backbone.

    forward: images [B, 3, Hp, Wp] -> OrderedDict "p3".."p7" of [B, F, Hp/s, Wp/s], s = 8..128,
    fp32.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.out_channels: int = neck.out_channels  # torchvision sizes its head from it

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        features = self.neck(self.backbone(images))
        # fp32 under autocast: torchvision's AnchorGenerator takes the feature maps' dtype (and
        # keeps its cell anchors in it), and bf16 anchors are rounded to 2 px above 256 px.
        # The head's convs still run in the autocast dtype, as gfldet's do.
        return OrderedDict((f"p{level}", f.float()) for level, f in enumerate(features, start=3))


def _fp32_outputs(module: nn.Module, inputs: tuple,
                  outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Forward hook on torchvision's head: its outputs in fp32, so that box decoding, losses and
    post-processing run in fp32 under autocast, as gfldet keeps its box regression in fp32."""
    return {name: value.float() for name, value in outputs.items()}


class TorchvisionDetector(nn.Module):
    """A torchvision FCOS / RetinaNet called like `gfldet.models.GFL`.

    - training: `model(images [B, 3, Hp, Wp] normalised + padded, targets)` -> torchvision's
      dict of scalar losses. Each image is cut to its target's `image_size` (h, w) and the targets
      become torchvision's {"boxes" [G, 4] xyxy, "labels" [G] int64 in [0, C)}.
    - eval: `model(images)` or `model(images, targets)` -> per image {"boxes" [N, 4], "scores"
      [N], "labels" [N]}; with `image_size` and `orig_size` in the targets, boxes are clipped to the
      former and rescaled to the latter exactly as `gfldet.postprocess` does.
    """

    def __init__(self, detector: FCOS | RetinaNet) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor, targets: list[dict] | None = None):
        sizes = image_sizes(images, targets)
        crops = [image[:, :h, :w] for image, (h, w) in zip(images, sizes, strict=True)]
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (a dict with boxes and labels per "
                                 "image)")
            tv_targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long()}
                          for t in targets]
            return self.detector(crops, tv_targets)
        check_no_resize(self.detector.transform, sizes, training=False)
        detections = self.detector(crops)
        has_orig = targets is not None and all("orig_size" in t for t in targets)
        orig_sizes = [tuple(t["orig_size"]) for t in targets] if has_orig else sizes
        return [
            to_original(det, size, orig)
            for det, size, orig in zip(detections, sizes, orig_sizes, strict=True)
        ]


def image_sizes(images: Tensor, targets: list[dict] | None) -> list[tuple[int, int]]:
    """(h, w) of each image before padding: the targets' `image_size`, else the padded size."""
    if targets is not None and all("image_size" in t for t in targets):
        return [(int(t["image_size"][0]), int(t["image_size"][1])) for t in targets]
    return [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]


def to_original(det: dict[str, Tensor], image_size: Sequence[int],
                orig_size: Sequence[int]) -> dict[str, Tensor]:
    """One image's detections in original-image pixels, as `gfldet.postprocess.postprocess`:
    boxes [N, 4] clipped to `image_size` (h, w), scaled by `orig_size` / `image_size` per axis,
    and boxes left with no width or height dropped (gfldet drops them before its NMS; a box of
    zero area overlaps nothing, so only the count kept per image can differ)."""
    boxes = det["boxes"].float()
    h, w = image_size
    orig_h, orig_w = orig_size
    boxes = torch.minimum(boxes.clamp(min=0), boxes.new_tensor([w, h, w, h]))
    boxes = boxes * boxes.new_tensor([orig_w / w, orig_h / h, orig_w / w, orig_h / h])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep], "scores": det["scores"][keep], "labels": det["labels"][keep]}


def resize_scale(transform: GeneralizedRCNNTransform, height: int, width: int) -> float:
    """The scale factor torchvision's test-time resize applies to an (h, w) image
    (`_resize_image_and_masks`, eager path)."""
    return min(transform.min_size[-1] / min(height, width), transform.max_size / max(height, width))


def check_no_resize(transform: GeneralizedRCNNTransform, sizes: Sequence[tuple[int, int]],
                    training: bool) -> None:
    """Raise if torchvision's transform would resize any of these (h, w) images, which would make
    the comparison with gfldet unfair (it sees the loader's images as they are)."""
    if training:
        if not transform._skip_resize:
            raise ValueError("torchvision's transform resizes training images; build it with "
                             "_skip_resize=True")
        return
    for h, w in sizes:
        scale = resize_scale(transform, h, w)
        if scale != 1.0:
            raise ValueError(
                f"torchvision's transform (min_size {transform.min_size}, max_size "
                f"{transform.max_size}) would rescale a {h}x{w} image by {scale}; the data "
                "loader's test_short_side and max_size must be the ones the detector was built "
                "with"
            )


def build_torchvision_detector(kind: str, model_cfg: ModelConfig, data_cfg: DataConfig,
                               retinanet_anchors: str = "torchvision") -> TorchvisionDetector:
    """torchvision's `kind` ("fcos" or "retinanet") on the backbone + FPN that
    `build_model(model_cfg)` builds, sized and set up as described in the module docstring.

    `retinanet_anchors`: "torchvision", its default 9 anchors per location (sizes 4, 5 and
    6.3 strides x aspect ratios 0.5, 1, 2); "one_square", only the first of them, a square of 4
    strides (a diagnostic: ATSS, Table 1 of its paper, compares RetinaNet with 1 and 9 anchors)."""
    if kind not in TORCHVISION_KINDS:
        raise ValueError(f"kind must be one of {TORCHVISION_KINDS}, got {kind!r}")
    if retinanet_anchors not in RETINANET_ANCHORS:
        raise ValueError(f"retinanet_anchors must be one of {RETINANET_ANCHORS}, got "
                         f"{retinanet_anchors!r}")
    # first, so that a seed gives the GFL entrants' trunk weights (only the trunk is used)
    gfl = build_model(model_cfg, size_divisor=DataConfig().size_divisor)
    pyramid = PyramidAdapter(gfl.backbone, gfl.neck)
    num_classes, convs, test = model_cfg.num_classes, model_cfg.head.stacked_convs, model_cfg.test
    if pyramid.out_channels != model_cfg.head.feat_channels:
        log.warning("torchvision's head towers are %d channels wide (the FPN's), gfldet's %d",
                    pyramid.out_channels, model_cfg.head.feat_channels)
    settings = {
        "min_size": data_cfg.test_short_side,
        "max_size": data_cfg.max_size,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "size_divisible": data_cfg.size_divisor,
        "_skip_resize": True,  # training images: the loader's augmentation already resized them
        "score_thresh": test.score_thr,
        "nms_thresh": test.nms_iou,
        "detections_per_img": test.max_per_img,
        "topk_candidates": test.nms_pre,
    }
    if kind == "fcos":
        head = FCOSHead(pyramid.out_channels, 1, num_classes, num_convs=convs)
        detector: FCOS | RetinaNet = FCOS(pyramid, num_classes, head=head, **settings)
    else:
        # torchvision's v2 head (retinanet_resnet50_fpn_v2): GroupNorm in the towers, as FCOS's and
        # gfldet's heads have, and GIoU box loss. The v1 head has no normalisation, and on this
        # budget its towers died: after 1,500 iterations the FPN outputs had std 20-1,200, every
        # tower ReLU was 0 on every val image, and both seeds scored 0.0 AP.
        anchor_generator = None  # torchvision's default: 3 sizes x 3 aspect ratios per location
        num_anchors = 9
        if retinanet_anchors == "one_square":
            anchor_generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)),
                                               ((1.0,),) * 5)
            num_anchors = 1
        head = RetinaNetHead(pyramid.out_channels, num_anchors, num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
        detector = RetinaNet(pyramid, num_classes, head=head, anchor_generator=anchor_generator,
                             **settings)
        for tower in (detector.head.classification_head, detector.head.regression_head):
            tower.conv = tower.conv[:convs]  # torchvision fixes 4 blocks; keep gfldet's count
    detector.head.register_forward_hook(_fp32_outputs)
    return TorchvisionDetector(detector)
