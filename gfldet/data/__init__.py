"""Data pipeline: COCO dataset, albumentations transforms, batching, synthetic dataset.

Only ``transforms`` imports albumentations, and it sets NO_ALBUMENTATIONS_UPDATE=1 first so the
import does not try to reach PyPI.
"""

from gfldet.data.coco import CocoDetection
from gfldet.data.images import load_image_rgb, pil_to_rgb_array
from gfldet.data.loader import (
    GroupedBatchSampler,
    SeededIndex,
    ShardSampler,
    build_dataloader,
    collate,
)
from gfldet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KeepRatioResize,
    build_transforms,
    detection_bbox_params,
    normalize_batch,
    rescale_size,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SYNTHETIC_CATEGORIES", "CocoDetection",
    "GroupedBatchSampler", "KeepRatioResize", "SeededIndex", "ShardSampler", "build_dataloader",
    "build_transforms", "collate", "detection_bbox_params", "ensure_synthetic_coco",
    "generate_synthetic_coco", "load_image_rgb", "normalize_batch", "pil_to_rgb_array",
    "rescale_size",
]

# The synthetic generator is loaded on first use, not here: ``python -m gfldet.data.synthetic``
# imports this package first, and an eager import would make runpy execute the module twice.
_LAZY = {"SYNTHETIC_CATEGORIES": "CATEGORIES", "ensure_synthetic_coco": "ensure_synthetic_coco",
         "generate_synthetic_coco": "generate_synthetic_coco"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from gfldet.data import synthetic

        return getattr(synthetic, _LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
