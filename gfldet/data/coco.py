"""COCO-format detection dataset: the checked index of a split, and its samples.

Shape legend: H, W = image height/width in pixels; G = number of ground-truth boxes; C = classes.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from gfldet.data.coco_schema import fill_optional_keys
from gfldet.data.images import DEFAULT_MAX_IMAGE_PIXELS, DatasetError, load_image_rgb
from gfldet.data.index import (
    CheckedSplit,
    ImageIndex,
    ImageRecord,
    clip_boxes,
    describe_left_out,
    index_split,
    no_training_images_left,
)

if TYPE_CHECKING:
    from gfldet.data.checks import DatasetReport

log = logging.getLogger("gfldet")


# The failure budget ignores the first few failures: with a fraction alone, the very first sample
# failing would be 100 % of the images seen so far and would stop the run.
MIN_DECODE_FAILURES_TO_STOP = 5
# A sample whose image fails is replaced by the next decodable one; give up after this many
# consecutive failures (the image folder has most likely gone, e.g. an unmounted network drive).
MAX_REPLACEMENT_ATTEMPTS = 64


@dataclass
class DecodeFailureBudget:
    """Counts image decodes and failures in one process (each DataLoader worker judges the images
    *it* decoded). Stop when ``failures >= MIN_DECODE_FAILURES_TO_STOP`` and
    ``failures > max_fraction * attempts``; ``max_fraction == 0`` stops at the first failure."""

    max_fraction: float = 0.01
    attempts: int = 0
    failures: int = 0
    failed_files: dict[str, str] = field(default_factory=dict)  # "file (image id N)" -> error

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_decode_failures must be in [0, 1], got {self.max_fraction}")

    def record_failure(self, where: str, error: str, image_dir: Path) -> None:
        """Count a failure of ``where`` ("file (image id N)"); past the budget, raise
        ``DatasetError`` naming the failed files."""
        self.attempts += 1
        self.failures += 1
        self.failed_files.setdefault(where, error)
        if self.max_fraction > 0.0 and (self.failures < MIN_DECODE_FAILURES_TO_STOP
                                        or self.failures <= self.max_fraction * self.attempts):
            return
        listed = list(self.failed_files.items())
        lines = [f"  - {where}: {err}" for where, err in listed[:20]]
        if len(listed) > 20:
            lines.append(f"  ... and {len(listed) - 20} more files")
        raise DatasetError(
            f"{self.failures} of {self.attempts} image decodes in this process failed "
            f"({len(listed)} distinct files under {image_dir}), more than max_decode_failures="
            f"{self.max_fraction:g} (train.max_decode_failures) allows:\n" + "\n".join(lines)
            + "\nRestore or re-download these files (run tools/check_dataset.py CONFIG to list "
            "every bad file before training), or raise train.max_decode_failures to accept them."
        )


class CocoDetection(Dataset):
    """COCO-format detection dataset: indexes a split and loads its samples (it checks nothing).

    ``dataset[i]`` -> ``(image uint8 [3, H, W] RGB resized and unpadded, target)``; target:
    ``boxes`` float32 [G, 4] xyxy in the transformed image's pixels, ``labels`` int64 [G] in
    [0, C), ``image_id``, ``image_size`` (h, w) after the transform, ``orig_size`` (h, w) as
    decoded, and when the image failed to decode and was replaced, ``decode_failed`` (a list of
    ``{"image_id", "file", "error"}``; the other keys describe the replacement).
    ``transform(image=uint8 [H, W, 3], bboxes=float32 [G, 4] xyxy, labels=int64 [G])`` returns
    albumentations' dict with ``image`` uint8 [3, H, W].

    ``split``: a checked split (``checked_split.load_checked_split``); without it the annotation
    file is indexed as read. ``filter_empty`` (training) drops images without a usable box or
    with a side below ``min_size`` (MMDetection's ``filter_cfg``), naming each in ``left_out``;
    a training set left empty raises ``DatasetError``. A ``SeededIndex`` reseeds the transform,
    so augmentation depends only on (seed, epoch, index). An image that fails to decode is
    replaced by the next one of the same orientation group, with the same seed, until
    ``max_decode_failures`` (``DecodeFailureBudget``) is exceeded.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transform: Callable[..., dict[str, Any]] | None = None,
        filter_empty: bool = True,
        min_size: int = 32,
        *,
        split: CheckedSplit | None = None,
        max_decode_failures: float = 0.01,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.max_image_pixels = max_image_pixels
        self.decode_budget = DecodeFailureBudget(max_decode_failures)
        if split is None:
            with self.ann_file.open("rb") as f:
                split = index_split(json.load(f), frozenset(), {}, filter_empty, min_size)
        self.check_report: DatasetReport | None = split.report
        self.label_to_cat_id: list[int] = split.label_to_cat_id
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.label_to_cat_id)}
        self.class_names: list[str] = split.class_names
        self.num_images_in_file: int = split.num_images_in_file
        # Named images that are not used: unreadable (val, as_written) or filtered (training).
        self.left_out: list[str] = split.left_out
        self.index: ImageIndex = split.index
        if filter_empty and self.left_out:
            log.info("%s", describe_left_out(self.left_out, self.num_images_in_file, "training"))
        if filter_empty and not len(self.index):
            raise DatasetError(no_training_images_left(self.ann_file, self.left_out,
                                                       self.num_images_in_file))
        self.image_ids: np.ndarray = self.index.image_ids  # int64 [N]
        # Read from the JSON so batching by aspect ratio never has to decode an image.
        self.aspect_ratios: np.ndarray = self.index.aspect_ratios  # float64 [N]
        self._warned_size_mismatch = False

    def ground_truth(self) -> COCO:
        """A pycocotools index of the annotation file as written: what evaluation scores against
        (built when asked, so that no process holds it for the whole run). A missing ``iscrowd``
        or ``area``, which COCOeval reads, is filled in (``fill_optional_keys``)."""
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(self.ann_file))
        fill_optional_keys(coco.dataset.get("annotations", []))  # the dicts in coco.anns too
        return coco

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat_id)

    def __len__(self) -> int:
        return len(self.index)

    def get_annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth of image ``index`` in original pixels: (boxes [G, 4] xyxy, labels [G])."""
        record = self.index[index]
        return record.boxes, record.labels

    def _candidates(self, position: int) -> Iterator[int]:
        """``position``, then replacements: the following images (wrapping), those of the same
        aspect group first (keeps the grouped sampler's batches homogeneous). Lazy, as it is
        only walked past ``position`` when that image fails; depends only on ``position``."""
        yield position
        landscape = self.aspect_ratios >= 1.0  # bool [N]
        ring = (position + np.arange(1, len(self.index))) % len(self.index)
        yield from ring[landscape[ring] == landscape[position]].tolist()
        yield from ring[landscape[ring] != landscape[position]].tolist()

    def _decode_or_replace(self, position: int
                           ) -> tuple[ImageRecord, np.ndarray, list[dict[str, Any]]]:
        """(record of the image actually used, its RGB image, failures on the way)."""
        failures: list[dict[str, Any]] = []
        for candidate in itertools.islice(self._candidates(position), 1 + MAX_REPLACEMENT_ATTEMPTS):
            record = self.index[candidate]
            path = self.image_dir / record.file_name
            try:
                image = load_image_rgb(path, apply_exif=record.apply_exif,
                                       max_pixels=self.max_image_pixels)
            except Exception as err:
                # Only the decode is inside the try, and PIL reports corrupt data with many types
                # (OSError, SyntaxError, ValueError, struct.error, zlib.error, ...).
                error = f"{type(err).__name__}: {err}"
            else:
                self.decode_budget.attempts += 1
                if failures:
                    log.info("image id %d replaced by image id %d (decode failure)",
                             failures[0]["image_id"], record.image_id)
                return record, image, failures
            where = f"{path} (image id {record.image_id})"
            # Warn once per file and process; repeats (every epoch) go to debug.
            first = where not in self.decode_budget.failed_files
            log.log(logging.WARNING if first else logging.DEBUG,
                    "cannot decode %s: %s; using another image instead", where, error)
            failures.append({"image_id": record.image_id, "file": str(path), "error": error})
            self.decode_budget.record_failure(where, error, self.image_dir)
        raise DatasetError(
            f"{len(failures)} consecutive images under {self.image_dir} failed to decode "
            f"(first: {failures[0]['file']}: {failures[0]['error']}); is the image folder "
            "still there (unmounted drive, deleted directory)?"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record, image, failures = self._decode_or_replace(int(index))
        orig_h, orig_w = image.shape[:2]
        boxes, labels = record.boxes, record.labels  # the record's own copies
        if (orig_h, orig_w) != (record.height, record.width):
            # The JSON and the file disagree (e.g. EXIF rotation not reflected in the JSON).
            # Trust the pixels: re-clip so boxes never leave the image.
            if not self._warned_size_mismatch:
                warnings.warn(f"{record.file_name}: decoded size {(orig_h, orig_w)} != JSON size "
                              f"{(record.height, record.width)}; boxes re-clipped (warning shown "
                              "once)", stacklevel=2)
                self._warned_size_mismatch = True
            keep = clip_boxes(boxes, orig_w, orig_h)
            boxes, labels = boxes[keep], labels[keep]

        if self.transform is None:
            tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        else:
            # A replacement keeps the requested slot's seed: still a pure function of the index.
            seed = getattr(index, "seed", None)
            if seed is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(int(seed))
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            tensor = torch.as_tensor(out["image"]).contiguous()
            if tensor.dtype != torch.uint8 or tensor.dim() != 3 or tensor.shape[0] != 3:
                raise TypeError(
                    f"the transform returned a {tensor.dtype} image of shape "
                    f"{list(tensor.shape)}; gfldet needs uint8 [3, H, W] (end the pipeline with "
                    "ToTensorV2 and no Normalize: images are normalised on the device by "
                    "gfldet.data.normalize_batch)"
                )
            boxes, labels = out["bboxes"], out["labels"]

        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, np.int64).reshape(-1)),
            "image_id": record.image_id,
            "image_size": (int(tensor.shape[1]), int(tensor.shape[2])),
            "orig_size": (orig_h, orig_w),
        }
        if failures:
            target["decode_failed"] = failures
        return tensor, target
