"""COCO-format detection dataset (pycocotools) and robust RGB image decoding.

Shape legend: H, W = image height/width in pixels; G = number of ground-truth boxes; C = classes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch.utils.data import Dataset

# MMDetection keeps a box only if its width and height are both >= 1 pixel.
MIN_BOX_SIDE = 1.0


def load_image_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8, EXIF orientation applied.

    Returns: uint8 array [H, W, 3].
    Grayscale, palette, alpha, CMYK and 16-bit inputs are all mapped to 8-bit RGB; alpha is
    dropped (like cv2.IMREAD_COLOR, which MMDetection uses) rather than composited.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # annotations refer to the upright image
        return pil_to_rgb_array(img)


def pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert any PIL image mode to an RGB uint8 array [H, W, 3]."""
    mode = img.mode
    if mode.startswith(("I", "F")):
        # High-bit-depth single channel: PIL's convert("RGB") would clip at 255 instead of
        # rescaling, turning most of a 16-bit image white.
        gray = _high_depth_to_uint8(np.asarray(img), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        # Going through RGBA avoids PIL's "palette with transparency" warning; the alpha
        # channel is then dropped like every other alpha channel.
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel integer/float image to uint8 [H, W]."""
    arr = arr.astype(np.float64)
    if mode.startswith("I;16"):
        full_scale = 65535.0  # genuine 16-bit data: scale the full range
    elif mode == "F" and arr.size and arr.max() <= 1.0:
        full_scale = 1.0  # float images in [0, 1]
    else:
        # Mode "I" (32-bit) / "F": the bit depth is not recorded, so infer it. Values that fit in
        # 8 bits are taken as-is; anything larger is assumed to be 16-bit data.
        full_scale = 255.0 if (arr.size == 0 or arr.max() <= 255.0) else 65535.0
    scaled = np.clip(arr, 0.0, full_scale) * (255.0 / full_scale)
    return np.rint(scaled).astype(np.uint8)


def clip_and_filter_boxes(
    boxes: np.ndarray, labels: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes [G, 4] to the image and drop boxes with clipped w < 1 or h < 1.

    Returns (boxes float32 [G', 4], labels int64 [G']).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & (
        (boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE
    )
    return boxes[keep], labels[keep]


@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # float32 [G, 4] xyxy in original pixels, already clipped/filtered
    labels: np.ndarray  # int64 [G]


class CocoDetection(Dataset):
    """COCO-format detection dataset.

    ``dataset[i]`` -> ``(image, target)`` with
      image: FloatTensor [3, H, W] (normalised if ``transform`` normalises; raw 0..255 floats when
        ``transform`` is None), H/W after resizing, unpadded.
      target: ``boxes`` FloatTensor [G, 4] xyxy in the transformed image's pixels, ``labels``
        LongTensor [G] in [0, C), ``image_id`` int, ``image_size`` (h, w) after transform,
        ``orig_size`` (h, w) as decoded.

    ``transform`` is called as ``transform(image=uint8 [H, W, 3], bboxes=float32 [G, 4] xyxy,
    labels=int64 [G])`` and must return a dict with ``image``, ``bboxes`` and ``labels`` (the
    albumentations calling convention; see ``gfldet.data.transforms.build_transforms``).

    ``i`` may be a plain int or an int carrying a ``seed`` attribute (``SeededIndex`` from the
    loader); in the latter case the transform's RNG is reseeded first so that a sample's
    augmentation depends only on (seed, epoch, index), not on worker count or resume point.

    Filtering (``filter_empty=True``, for training) mirrors MMDetection's
    ``filter_cfg=dict(filter_empty_gt=True, min_size=min_size)``: images without any usable box,
    or whose short side is < ``min_size``, are dropped. With ``filter_empty=False`` (val/test)
    every image in the JSON is kept, including ones with no annotations.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transform: Callable[..., dict[str, Any]] | None = None,
        filter_empty: bool = True,
        min_size: int = 32,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.filter_empty = filter_empty
        self.min_size = min_size

        # pycocotools prints progress to stdout; keep library use quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(self.ann_file))

        self.label_to_cat_id: list[int] = sorted(int(c) for c in self.coco.getCatIds())
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.label_to_cat_id)}
        self.class_names: list[str] = [str(self.coco.cats[c]["name"]) for c in self.label_to_cat_id]

        self._records: list[_ImageRecord] = []
        for image_id in sorted(self.coco.getImgIds()):
            record = self._parse_image(image_id)
            if filter_empty and (
                len(record.boxes) == 0 or min(record.height, record.width) < min_size
            ):
                continue
            self._records.append(record)

        self.image_ids: list[int] = [r.image_id for r in self._records]
        # Read from the JSON so batching by aspect ratio never has to decode an image.
        self.aspect_ratios: list[float] = [r.width / r.height for r in self._records]
        self._warned_size_mismatch = False

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def __len__(self) -> int:
        return len(self._records)

    def _parse_image(self, image_id: int) -> _ImageRecord:
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            # Crowd regions are not instances; the detector never sees them as ground truth.
            if ann.get("iscrowd", 0) or ann.get("ignore", 0):
                continue
            label = self.cat_id_to_label.get(int(ann["category_id"]))
            if label is None:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.append((x, y, x + w, y + h))
            labels.append(label)
        kept_boxes, kept_labels = clip_and_filter_boxes(
            np.array(boxes, dtype=np.float32), np.array(labels, dtype=np.int64), height, width
        )
        return _ImageRecord(
            image_id, str(info["file_name"]), height, width, kept_boxes, kept_labels
        )

    def get_annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth of image ``index`` in original pixels: (boxes [G, 4] xyxy, labels [G])."""
        record = self._records[index]
        return record.boxes.copy(), record.labels.copy()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self._records[int(index)]
        image = load_image_rgb(self.image_dir / record.file_name)
        orig_h, orig_w = image.shape[:2]
        boxes, labels = record.boxes, record.labels
        if (orig_h, orig_w) != (record.height, record.width):
            # The JSON and the file disagree (e.g. EXIF rotation not reflected in the JSON).
            # Trust the pixels: re-clip so boxes never leave the image.
            if not self._warned_size_mismatch:
                warnings.warn(
                    f"{record.file_name}: decoded size {(orig_h, orig_w)} != JSON size "
                    f"{(record.height, record.width)}; boxes re-clipped (warning shown once)",
                    stacklevel=2,
                )
                self._warned_size_mismatch = True
            boxes, labels = clip_and_filter_boxes(boxes, labels, orig_h, orig_w)

        if self.transform is None:
            tensor = torch.from_numpy(image).permute(2, 0, 1).float()
        else:
            seed = getattr(index, "seed", None)
            if seed is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(int(seed))
            out = self.transform(image=image, bboxes=boxes.copy(), labels=labels.copy())
            tensor = torch.as_tensor(out["image"]).float().contiguous()
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)

        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "image_id": record.image_id,
            "image_size": (int(tensor.shape[1]), int(tensor.shape[2])),
            "orig_size": (orig_h, orig_w),
        }
        return tensor, target
