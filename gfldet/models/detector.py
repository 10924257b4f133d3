"""The GFL detector: backbone -> FPN -> GFL head, with ATSS training targets and post-processing.

Calling convention (torchvision's detection contract, with batching done by the data loader):
- training: `model(images, targets)` with images [B, 3, H, W] (normalised, padded) and one dict
  per image with `boxes` [G, 4] float xyxy pixels of the input and `labels` [G] int64 in [0, C)
  (optionally `image_size` (h, w) of the unpadded image) -> dict of named scalar losses.
- eval: `model(images)` or `model(images, targets)` -> one dict per image with `boxes` [N, 4],
  `scores` [N], `labels` [N]. When the target dicts carry `image_size` and `orig_size` (h, w),
  boxes are clipped to the former and rescaled to the latter; otherwise they are in input pixels
  (`orig_size` alone is refused: the rescale needs both).

Shape legend: `B` images, `A` priors, `C` classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gfldet.models.criterion import LossSettings, gfl_loss, pad_targets
from gfldet.models.head import GFLHead
from gfldet.models.priors import Priors, make_priors, valid_prior_mask
from gfldet.postprocess import PostProcessSettings, postprocess

STRIDES = (8, 16, 32, 64, 128)  # P3-P7


class GFL(nn.Module):
    """The detector. Besides its parts: `loss` and `test` (the config's `model.loss` and
    `model.test`), `octave_base_scale` (`model.priors`: prior side / stride), `topk`
    (`model.assigner`: ATSS candidates per level) and `size_divisor` (`data.size_divisor`: each
    image's padded extent, where its priors are valid); gfldet.engine.build.build_model passes them.

    `check_targets`: check the training targets' values (labels in [0, C), finite boxes with
    x2 > x1 and y2 > y1). Free on the CPU, a host sync on CUDA: the trainer, whose datasets are
    checked when built, turns it off. Shapes, dtypes and keys are always checked.
    """

    check_targets: bool = True

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        head: GFLHead,
        *,
        loss: LossSettings,
        test: PostProcessSettings,
        octave_base_scale: int,
        topk: int,
        size_divisor: int,
    ) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.loss_settings, self.test_settings = loss, test
        self.octave_base_scale, self.topk = octave_base_scale, topk
        self.size_divisor = size_divisor
        self._priors_cache: dict[tuple, Priors] = {}

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def priors_for(self, features: list[Tensor]) -> Priors:
        """Priors of these feature maps, cached per (sizes, device): input sizes repeat.

        While tracing (export) they are built afresh from the traced sizes: a cached entry would
        be recorded as constants of one input size."""
        sizes = tuple(tuple(f.shape[-2:]) for f in features)
        device = features[0].device
        if torch.jit.is_tracing():
            return make_priors(list(sizes), list(STRIDES), self.octave_base_scale, device)
        if (sizes, device) not in self._priors_cache:
            if len(self._priors_cache) > 64:
                self._priors_cache.clear()
            priors = make_priors(list(sizes), list(STRIDES), self.octave_base_scale, device)
            self._priors_cache[sizes, device] = priors
        return self._priors_cache[sizes, device]

    def head_outputs(self, images: Tensor,
                     image_sizes: Tensor) -> tuple[Tensor, Tensor, Priors, Tensor]:
        """cls_logits [B, A, C], reg_logits [B, A, 4(R+1)], the priors and valid [B, A] (False
        for priors outside each image's own padded extent) of a batch; image_sizes [B, 2] (h, w)
        of the resized, unpadded images. Training, evaluation and the exported graphs start here."""
        features = self.neck(self.backbone(images))
        assert len(features) == len(STRIDES), f"expected {len(STRIDES)} levels, got {len(features)}"
        cls_logits, reg_logits = self.head(features)  # [B, A, C], [B, A, 4(R+1)]
        priors = self.priors_for(features)
        valid = valid_prior_mask(priors, image_sizes, self.size_divisor)  # [B, A]
        return cls_logits, reg_logits, priors, valid

    def forward(self, images: Tensor, targets: list[dict] | None = None):
        check_inputs(images, targets, self.num_classes, self.training, self.check_targets,
                     next(self.parameters()).dtype)
        image_sizes = _sizes(targets, "image_size", images.device)
        if image_sizes is None:  # the padded input size
            image_sizes = torch.tensor(
                [images.shape[-2:]] * images.shape[0], device=images.device, dtype=torch.long
            )
        cls_logits, reg_logits, priors, valid = self.head_outputs(images, image_sizes)
        if self.training:
            gt_boxes, gt_labels, gt_mask = pad_targets(targets, images.device)
            reg_max = self.head.reg_max if self.head.box_repr == "distribution" else None
            # The loss decodes boxes at the positives only (no dense Integral in training).
            return gfl_loss(
                cls_logits, reg_logits, self.head.distances, priors, valid,
                gt_boxes, gt_labels, gt_mask, self.loss_settings, reg_max, self.topk,
            )
        distances = self.head.distances(reg_logits)  # [B, A, 4] stride units
        orig_sizes = _sizes(targets, "orig_size", images.device)
        if orig_sizes is None:
            orig_sizes = image_sizes
        return postprocess(
            cls_logits, distances, priors, valid, image_sizes, orig_sizes, self.test_settings
        )


def check_inputs(images: Tensor, targets: list[dict] | None, num_classes: int, training: bool,
                 values: bool, weight_dtype: torch.dtype | None = None) -> None:
    """A ValueError naming what a caller passed wrong, rather than a torch error deep inside or
    (labels >= C: the background sentinel) a silently wrong loss. `values`: check the targets'
    values too, which reads them on the host (a sync for CUDA tensors). `weight_dtype`: the
    model's, which images must have unless autocast casts them."""
    if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == 3):
        raise ValueError(f"images must be a tensor [B, 3, H, W], got {_got(images)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be normalised floats, got {images.dtype}: use "
                         "gfldet.data.normalize_batch(images, image_sizes) on the uint8 batch")
    if (weight_dtype is not None and images.dtype != weight_dtype
            and not torch.is_autocast_enabled(images.device.type)):
        raise ValueError(f"images are {images.dtype} but the model's weights {weight_dtype}: "
                         f"use images.to({weight_dtype}), or autocast")
    if targets is None:
        if training:
            raise ValueError("training mode needs targets: a dict with boxes and labels per image")
        return
    if not isinstance(targets, list | tuple) or len(targets) != len(images):
        got = f"{len(targets)}" if isinstance(targets, list | tuple) else type(targets).__name__
        raise ValueError(f"targets must be a list of one dict per image ({len(images)}), got {got}")
    for i, t in enumerate(targets if training else ()):
        name = f"targets[{i}]"
        if not (isinstance(t, dict) and "boxes" in t and "labels" in t):
            got = f"keys {list(t)}" if isinstance(t, dict) else _got(t)
            raise ValueError(f"{name} must be a dict with 'boxes' and 'labels', got {got}")
        boxes, labels = t["boxes"], t["labels"]
        if not (torch.is_tensor(boxes) and boxes.dim() == 2 and boxes.shape[1] == 4
                and boxes.is_floating_point()):
            raise ValueError(f'{name}["boxes"] must be a float tensor [G, 4] (x1, y1, x2, y2 '
                             f"pixels; torch.zeros(0, 4) for none), got {_got(boxes)}")
        if not (torch.is_tensor(labels) and labels.shape == boxes.shape[:1]
                and labels.dtype in (torch.int64, torch.int32, torch.int16, torch.int8)):
            raise ValueError(f'{name}["labels"] must be an int64 tensor [G] with G = '
                             f"{len(boxes)} (one per box), got {_got(labels)}")
        if not values or len(boxes) == 0:
            continue
        if (bad := (labels < 0) | (labels >= num_classes)).any():
            raise ValueError(f'{name}["labels"] must be in [0, {num_classes}), got '
                             f"{labels[bad][0].item()} (gfldet labels are 0-based; "
                             "torchvision's 1-based labels need -1)")
        wh = boxes[:, 2:] - boxes[:, :2]
        if (bad := ~((wh > 0).all(1) & boxes.isfinite().all(1))).any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f'{name}["boxes"][{row}] = {boxes[row].tolist()} must be finite '
                             "with x2 > x1 and y2 > y1 (x1, y1, x2, y2 pixels; drop empty boxes)")
    if bad := [i for i, t in enumerate(targets) if not isinstance(t, dict)]:  # eval mode
        raise ValueError(f"targets[{bad[0]}] must be a dict, got {_got(targets[bad[0]])} "
                         "(pass targets=None for none)")
    _check_sizes(images, targets)


def _check_sizes(images: Tensor, targets: list[dict] | tuple[dict, ...]) -> None:
    """`image_size` on all targets or none (a partial set used to be ignored for all), within
    the input, and present wherever `orig_size` is: boxes are rescaled from it (from the padded
    size without it, silently wrong). Values are read only from Python sequences (the loader's
    and preprocess's): a tensor would be a host sync."""
    has = [("image_size" in t) for t in targets]
    if any(has) and not all(has):
        raise ValueError(f"targets[{has.index(False)}] has no 'image_size' while "
                         f"targets[{has.index(True)}] has one: give it on every target or none")
    for i, t in enumerate(targets):
        if "orig_size" in t and "image_size" not in t:
            raise ValueError(f"targets[{i}] has 'orig_size' but no 'image_size': boxes are "
                             "rescaled from image_size (h, w) of the resized image before "
                             "padding to orig_size (h, w), so both are needed")
        size = t.get("image_size")
        if isinstance(size, list | tuple) and not (
                len(size) == 2 and 0 < size[0] <= images.shape[-2]
                and 0 < size[1] <= images.shape[-1]):
            raise ValueError(f"targets[{i}]['image_size'] = {tuple(size)} must be (h, w) of the "
                             "resized image before padding, within the input's (h, w) = "
                             f"{tuple(images.shape[-2:])}")


def _got(x: object) -> str:
    return f"{x.dtype} {list(x.shape)}" if torch.is_tensor(x) else type(x).__name__


def _sizes(targets: list[dict] | None, key: str, device: torch.device) -> Tensor | None:
    """[B, 2] (h, w) per image from the target dicts' `key`; None if they lack it
    (check_inputs: all or none)."""
    if targets is None or not all(key in t for t in targets):
        return None
    return torch.tensor([tuple(t[key]) for t in targets], device=device, dtype=torch.long)
