"""Albumentations pipelines: MMDetection-style keep-ratio resize, flip, to a uint8 tensor; and the
normalisation that follows on the training device (`normalize_batch`).

Shape legend: H, W = input image size; H', W' = resized size; N = number of boxes.
Boxes go in and come out as pascal_voc (absolute xyxy pixels).
"""

from __future__ import annotations

import os

# albumentations >= 1.4 queries PyPI on import unless told not to; training nodes are often
# offline and the check can stall start-up for seconds.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from typing import Any  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 pixel units (MMDetection defaults)
IMAGENET_STD = (58.395, 57.12, 57.375)


def rescale_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """Keep-ratio target size exactly as mmcv ``rescale_size(..., scale=(max_size, short_side))``.

    scale = min(max_size / long side, short_side / short side); each side rounds half up.
    Returns (new_h, new_w).
    """
    scale = min(max_size / max(height, width), short_side / min(height, width))
    # max(1, .): only matters for absurd aspect ratios, where cv2 would fail on a 0-pixel side.
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


class KeepRatioResize(A.DualTransform):
    """Resize keeping aspect ratio so short side <= ``short_side`` and long side <= ``max_size``.

    ``short_side`` may be an int or an inclusive range ``(lo, hi)``; with a range, the target short
    side is drawn uniformly as an integer per call (MMDetection ``multiscale_mode='range'``) from
    the transform's own RNG, so ``Compose.set_random_seed`` makes it reproducible.
    Bilinear interpolation (cv2, like mmcv). Boxes need no work here: albumentations carries them
    normalised to [0, 1] between transforms, and converts back with the *output* image size, which
    scales x by W'/W and y by H'/H exactly as MMDetection does.
    """

    def __init__(self, short_side: int | tuple[int, int], max_size: int,
                 interpolation: int = cv2.INTER_LINEAR, p: float = 1.0) -> None:
        super().__init__(p=p)
        if isinstance(short_side, (tuple, list)):
            lo, hi = (int(v) for v in short_side)
            if not 0 < lo <= hi:
                raise ValueError(f"short_side range must satisfy 0 < lo <= hi, got {short_side}")
            self.short_side: int | tuple[int, int] = (lo, hi)
        elif int(short_side) <= 0:
            raise ValueError(f"short_side must be positive, got {short_side}")
        else:
            self.short_side = int(short_side)
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self.max_size = int(max_size)
        self.interpolation = interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]
                                     ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        short = self.short_side
        if isinstance(short, tuple):
            short = self.py_random.randint(*short)  # inclusive on both ends
        return {"target_size": rescale_size(height, width, short, self.max_size)}

    def apply(self, img: np.ndarray, target_size: tuple[int, int], interpolation: int,
              **params: Any) -> np.ndarray:
        if img.shape[:2] == target_size:
            return img
        return cv2.resize(img, target_size[::-1], interpolation=interpolation)

    def apply_to_mask(self, mask: np.ndarray, target_size: tuple[int, int],
                      **params: Any) -> np.ndarray:
        return cv2.resize(mask, target_size[::-1], interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # normalised coordinates are resolution independent

    def apply_to_keypoints(self, keypoints: np.ndarray, target_size: tuple[int, int],
                           shape: tuple[int, ...], **params: Any) -> np.ndarray:
        # Keypoints are absolute pixels inside albumentations, unlike boxes.
        out = keypoints.copy()
        out[:, 0] *= target_size[1] / shape[1]
        out[:, 1] *= target_size[0] / shape[0]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("short_side", "max_size", "interpolation")


def build_transforms(train: bool, short_side: int | tuple[int, int], max_size: int,
                     flip_prob: float = 0.5) -> A.Compose:
    """Detection pipeline: resize -> (train: horizontal flip) -> CHW uint8 tensor.

    Call as ``t(image=uint8 [H, W, 3] RGB, bboxes=float [N, 4] xyxy pixels, labels=int [N])``;
    returns ``image`` uint8 tensor [3, H', W'], ``bboxes`` [N', 4] xyxy in resized pixels and
    ``labels``. Evaluation (``train=False``) must be deterministic: an int ``short_side`` only.

    Images stay uint8 until `normalize_batch` runs on the training device, as in MMDetection's
    data preprocessor: a quarter of the bytes through the worker queue and the host-to-GPU copy.
    The Compose's RNG starts unseeded; ``CocoDetection`` reseeds it per sample when the loader
    provides seeds, and the loader's worker_init_fn seeds it per worker otherwise.
    """
    if not train and isinstance(short_side, (tuple, list)):
        raise ValueError("evaluation transforms need a fixed short_side, got a range")
    ops: list[A.BasicTransform] = [KeepRatioResize(short_side, max_size)]
    if train and flip_prob > 0:
        ops.append(A.HorizontalFlip(p=flip_prob))
    ops.append(ToTensorV2())
    return A.Compose(ops, bbox_params=detection_bbox_params())


def normalize_batch(images: torch.Tensor, image_sizes: list[tuple[int, int]] | None = None,
                    mean: tuple[float, float, float] = IMAGENET_MEAN,
                    std: tuple[float, float, float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, 3, Hp, Wp] RGB batch (as `collate` pads it) -> float32 (x - mean) / std on its
    device, with the padding outside each image's (h, w) in `image_sizes` set to 0 (MMDetection
    pads after normalising, so the pad is the mean pixel). `mean`/`std` are in 0-255 units.

    The arithmetic is albumentations' `Normalize` for uint8 images, (x - mean) * float32(1 / std)
    in float32, so results are bit-identical to normalising in the workers.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects the loader's uint8 images, got {images.dtype}")
    denominator = np.reciprocal(np.asarray(std, np.float32))
    out = images.float()
    out.sub_(torch.from_numpy(np.asarray(mean, np.float32)).to(out.device).view(1, -1, 1, 1))
    out.mul_(torch.from_numpy(denominator).to(out.device).view(1, -1, 1, 1))
    if image_sizes is not None:
        sizes = torch.as_tensor(image_sizes, dtype=torch.long).to(out.device, non_blocking=True)
        rows = torch.arange(out.shape[-2], device=out.device) >= sizes[:, 0, None]  # [B, Hp]
        cols = torch.arange(out.shape[-1], device=out.device) >= sizes[:, 1, None]  # [B, Wp]
        out.masked_fill_((rows[:, :, None] | cols[:, None, :])[:, None], 0.0)
    return out


def detection_bbox_params() -> A.BboxParams:
    """Box handling for every gfldet pipeline: absolute xyxy boxes with a ``labels`` field.

    All thresholds are 0: resize and flip never make a valid box invalid, so only boxes that end
    up with zero area are dropped. ``clip=True`` absorbs float round-off at the image border.
    """
    return A.BboxParams(format="pascal_voc", label_fields=["labels"], min_area=0.0,
                        min_visibility=0.0, min_width=0.0, min_height=0.0, clip=True)
