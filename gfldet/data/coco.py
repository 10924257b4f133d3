"""COCO-format detection dataset (pycocotools) and robust RGB image decoding.

Shape legend: H, W = image height/width in pixels; G = number of ground-truth boxes; C = classes.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from pycocotools.coco import COCO
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from gfldet.data.checks import DatasetReport, ShardedCheck

log = logging.getLogger("gfldet")

# MMDetection keeps a box only if its width and height are both >= 1 pixel.
MIN_BOX_SIDE = 1.0

# Largest image (width * height) gfldet decodes. PIL's own guard is a process-global
# (Image.MAX_IMAGE_PIXELS) that warns above ~89 MP and refuses above ~179 MP with a message that
# names no file. gfldet replaces it with this per-dataset limit, checked from the header before
# any pixel is decoded, so that the error names the file and the knob. The default equals PIL's
# refusal threshold: nothing PIL would have decoded is refused, but 10000 x 8000 aerial images
# no longer warn. An RGB image at the limit takes ~540 MB once decoded.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
Image.MAX_IMAGE_PIXELS = None  # see above: enforced per file by `open_image` instead

# EXIF orientations whose transpose swaps width and height (5..8; 2..4 only flip/rotate 180).
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the files/ids and what to do."""


class ImageTooLargeError(DatasetError):
    """An image has more pixels than the configured ``max_image_pixels``."""


def open_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """``Image.open`` (lazy: header only) plus gfldet's size limit. Use as a context manager.

    Raises FileNotFoundError, PIL.UnidentifiedImageError (an OSError) for non-images, and
    ImageTooLargeError above ``max_pixels`` (None = no limit).
    """
    img = Image.open(path)
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (max_image_pixels). If the image is genuine, raise max_image_pixels "
            "(CocoDetection(max_image_pixels=...), tools/check_dataset.py --max-image-pixels); "
            "otherwise downscale it and its boxes, or tile it"
        )
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8; 1 = upright) exactly as ``ImageOps.exif_transpose`` reads it.

    Call after ``img.load()``: for PNG the eXIf chunk may follow the pixel data.
    """
    return int(img.getexif().get(ExifTags.Base.Orientation, 1))


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(w, h) of the image after ``exif_transpose`` given its stored (w, h) and orientation."""
    return (size[1], size[0]) if orientation in SWAPPING_ORIENTATIONS else size


def load_image_rgb(
    path: str | Path,
    *,
    apply_exif: bool = True,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode an image file to RGB uint8, EXIF orientation applied unless ``apply_exif=False``.

    Returns: uint8 array [H, W, 3].
    Grayscale, palette, alpha, CMYK and 16-bit inputs are all mapped to 8-bit RGB; alpha is
    dropped (like cv2.IMREAD_COLOR, which MMDetection uses) rather than composited.
    ``apply_exif=False`` is for images whose annotations were drawn on the stored (un-rotated)
    pixels; ``gfldet.data.checks`` finds those. Truncated files raise (PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False: a gray-filled image would be silent).
    """
    with open_image(path, max_pixels) as img:
        if apply_exif:
            img = ImageOps.exif_transpose(img)  # annotations refer to the upright image
        else:
            img.load()
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


# ------------------------------------------------------------------ decode failures at run time

# The failure budget ignores the first few failures: with a fraction alone, the very first sample
# failing would be 100 % of the images seen so far and would stop the run.
MIN_DECODE_FAILURES_TO_STOP = 5
# A sample whose image fails is replaced by the next decodable one; give up after this many
# consecutive failures (the image folder has most likely gone, e.g. an unmounted network drive).
MAX_REPLACEMENT_ATTEMPTS = 64


@dataclass
class DecodeFailureBudget:
    """Counts image decodes and failures in one process; raises when failures exceed the budget.

    Rule: stop when ``failures >= MIN_DECODE_FAILURES_TO_STOP`` and
    ``failures > max_fraction * attempts``; ``max_fraction == 0`` stops at the first failure.
    Counts are per process: every DataLoader worker holds its own copy of the dataset, so each
    worker judges the images *it* decoded (the same fraction in expectation, as the sampler deals
    images to workers at random). The main process can count globally from the
    ``decode_failed`` entries of the targets.
    """

    max_fraction: float = 0.01
    attempts: int = 0
    failures: int = 0
    failed_files: dict[str, str] = field(default_factory=dict)  # "file (image id N)" -> error

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_decode_failures must be in [0, 1], got {self.max_fraction}")

    def record_success(self) -> None:
        self.attempts += 1

    def record_failure(self, where: str, error: str) -> bool:
        """Count a failure; True if this file had not failed before in this process."""
        self.attempts += 1
        self.failures += 1
        first = where not in self.failed_files
        self.failed_files.setdefault(where, error)
        return first

    def exceeded(self) -> bool:
        if self.failures == 0:
            return False
        if self.max_fraction == 0.0:
            return True
        return (
            self.failures >= MIN_DECODE_FAILURES_TO_STOP
            and self.failures > self.max_fraction * self.attempts
        )

    def error(self, image_dir: Path) -> DatasetError:
        listed = list(self.failed_files.items())
        lines = [f"  - {where}: {err}" for where, err in listed[:20]]
        if len(listed) > 20:
            lines.append(f"  ... and {len(listed) - 20} more files")
        return DatasetError(
            f"{self.failures} of {self.attempts} image decodes in this process failed "
            f"({len(listed)} distinct files under {image_dir}), more than max_decode_failures="
            f"{self.max_fraction:g} (train.max_decode_failures) allows:\n" + "\n".join(lines)
            + "\nRestore or re-download these files (run tools/check_dataset.py CONFIG to list "
            "every bad file before training), or raise train.max_decode_failures to accept them."
        )


# ------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # float32 [G, 4] xyxy in original pixels, already clipped/filtered
    labels: np.ndarray  # int64 [G]
    apply_exif: bool = True  # False: the annotations were drawn on the un-rotated stored pixels


class CocoDetection(Dataset):
    """COCO-format detection dataset.

    ``dataset[i]`` -> ``(image, target)`` with
      image: uint8 tensor [3, H, W] RGB, H/W after resizing, unpadded (normalised later, on the
        training device, by ``gfldet.data.normalize_batch``).
      target: ``boxes`` FloatTensor [G, 4] xyxy in the transformed image's pixels, ``labels``
        LongTensor [G] in [0, C), ``image_id`` int, ``image_size`` (h, w) after transform,
        ``orig_size`` (h, w) as decoded. Only when the requested image failed to decode and was
        replaced: ``decode_failed``, a list of ``{"image_id", "file", "error"}`` (every other
        key then describes the replacement image, so image and target always agree).

    ``transform`` is called as ``transform(image=uint8 [H, W, 3], bboxes=float32 [G, 4] xyxy,
    labels=int64 [G])`` and must return a dict with ``image`` (uint8 [3, H, W], as
    ``ToTensorV2`` gives it), ``bboxes`` and ``labels`` (the albumentations calling
    convention; see ``gfldet.data.transforms.build_transforms``).

    ``i`` may be a plain int or an int carrying a ``seed`` attribute (``SeededIndex`` from the
    loader); in the latter case the transform's RNG is reseeded first so that a sample's
    augmentation depends only on (seed, epoch, index), not on worker count or resume point.

    Filtering (``filter_empty=True``, for training) mirrors MMDetection's
    ``filter_cfg=dict(filter_empty_gt=True, min_size=min_size)``: images without any usable box,
    or whose short side is < ``min_size``, are dropped. With ``filter_empty=False`` (val/test)
    every image in the JSON is kept, including ones with no annotations.

    ``check=True`` runs ``gfldet.data.checks.check_dataset`` (every image decoded) first: fatal
    problems raise ``DatasetError`` before any compute is spent, fixable ones (boxes outside the
    image, a few unreadable images, annotations made on un-rotated pixels) are fixed in memory,
    and the fixed annotations are what ``coco`` (the evaluation ground truth) holds. The report
    is kept as ``check_report``. In a distributed job, ``check_shard`` splits the decoding among
    the processes (each decodes 1/world of the images; see ``ShardedCheck``).

    Decode failures in ``__getitem__`` (a file deleted or corrupted after the check) are logged
    and the sample is replaced by the next image of the same orientation group, decoded with the
    same augmentation seed; more than ``max_decode_failures`` of the decodes failing (see
    ``DecodeFailureBudget``) raises ``DatasetError``. ``max_image_pixels`` caps image size.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transform: Callable[..., dict[str, Any]] | None = None,
        filter_empty: bool = True,
        min_size: int = 32,
        *,
        check: bool = False,
        max_decode_failures: float = 0.01,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        check_shard: ShardedCheck | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.filter_empty = filter_empty
        self.min_size = min_size
        self.max_image_pixels = max_image_pixels
        self.decode_budget = DecodeFailureBudget(max_decode_failures)

        raw_orientation_ids: frozenset[int] = frozenset()
        self.check_report: DatasetReport | None = None
        if check:
            # Imported here: checks builds on this module's decoding helpers.
            from gfldet.data.checks import check_dataset

            report = check_dataset(
                self.image_dir,
                self.ann_file,
                fix=True,
                check_images=True,
                max_bad_image_fraction=max_decode_failures,
                max_image_pixels=max_image_pixels,
                shard=check_shard,
            )
            # Fixes and warnings change what is trained on: make them visible at WARNING.
            level = logging.WARNING if (report.fixed or report.warnings) else logging.INFO
            for line in report.summary().splitlines():
                log.log(level, "%s", line)
            report.raise_if_fatal()
            self.check_report = report
            raw_orientation_ids = report.raw_orientation_ids
            self.coco = _coco_from_dict(report.annotations)
        else:
            # pycocotools prints progress to stdout; keep library use quiet.
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(self.ann_file))

        self.label_to_cat_id: list[int] = sorted(int(c) for c in self.coco.getCatIds())
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.label_to_cat_id)}
        self.class_names: list[str] = [str(self.coco.cats[c]["name"]) for c in self.label_to_cat_id]

        self._records: list[_ImageRecord] = []
        for image_id in sorted(self.coco.getImgIds()):
            record = self._parse_image(image_id, apply_exif=image_id not in raw_orientation_ids)
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

    def _parse_image(self, image_id: int, apply_exif: bool = True) -> _ImageRecord:
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
            image_id, str(info["file_name"]), height, width, kept_boxes, kept_labels, apply_exif
        )

    def get_annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth of image ``index`` in original pixels: (boxes [G, 4] xyxy, labels [G])."""
        record = self._records[index]
        return record.boxes.copy(), record.labels.copy()

    def _try_decode(self, position: int) -> tuple[np.ndarray | None, str]:
        """Decode image ``position``: (RGB array, "") or (None, error text)."""
        record = self._records[position]
        try:
            image = load_image_rgb(
                self.image_dir / record.file_name,
                apply_exif=record.apply_exif,
                max_pixels=self.max_image_pixels,
            )
        except Exception as err:
            # Only the decode is inside the try, and PIL reports corrupt data with many types
            # (OSError, SyntaxError, ValueError, struct.error, zlib.error, ...).
            return None, f"{type(err).__name__}: {err}"
        return image, ""

    def _candidates(self, position: int) -> Iterator[int]:
        """``position``, then replacements: the following images (wrapping), those of the same
        aspect group first (keeps the grouped sampler's batches homogeneous). Lazy, as it is
        only walked past ``position`` when that image fails; depends only on ``position``."""
        yield position
        n = len(self._records)
        landscape = self.aspect_ratios[position] >= 1.0
        ring = [(position + k) % n for k in range(1, n)]
        yield from (j for j in ring if (self.aspect_ratios[j] >= 1.0) == landscape)
        yield from (j for j in ring if (self.aspect_ratios[j] >= 1.0) != landscape)

    def _decode_or_replace(self, position: int) -> tuple[int, np.ndarray, list[dict[str, Any]]]:
        """(position actually used, its RGB image, failures on the way)."""
        failures: list[dict[str, Any]] = []
        for candidate in itertools.islice(self._candidates(position), 1 + MAX_REPLACEMENT_ATTEMPTS):
            image, error = self._try_decode(candidate)
            if image is not None:
                self.decode_budget.record_success()
                if failures:
                    log.info(
                        "image id %d replaced by image id %d (decode failure)",
                        failures[0]["image_id"], self._records[candidate].image_id,
                    )
                return candidate, image, failures
            record = self._records[candidate]
            path = self.image_dir / record.file_name
            where = f"{path} (image id {record.image_id})"
            first = self.decode_budget.record_failure(where, error)
            # Warn once per file and process; repeats (every epoch) go to debug.
            log.log(logging.WARNING if first else logging.DEBUG,
                    "cannot decode %s: %s; using another image instead", where, error)
            failures.append({"image_id": record.image_id, "file": str(path), "error": error})
            if self.decode_budget.exceeded():
                raise self.decode_budget.error(self.image_dir)
        raise DatasetError(
            f"{len(failures)} consecutive images under {self.image_dir} failed to decode "
            f"(first: {failures[0]['file']}: {failures[0]['error']}); is the image folder "
            "still there (unmounted drive, deleted directory)?"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        position, image, failures = self._decode_or_replace(int(index))
        record = self._records[position]
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
            tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        else:
            # A replacement keeps the requested slot's seed: still a pure function of the index.
            seed = getattr(index, "seed", None)
            if seed is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(int(seed))
            out = self.transform(image=image, bboxes=boxes.copy(), labels=labels.copy())
            tensor = torch.as_tensor(out["image"]).contiguous()
            if tensor.dtype != torch.uint8 or tensor.dim() != 3 or tensor.shape[0] != 3:
                raise TypeError(
                    f"the transform returned a {tensor.dtype} image of shape {list(tensor.shape)}; gfldet "
                    "needs uint8 [3, H, W] (end the pipeline with ToTensorV2 and no Normalize: images "
                    "are normalised on the device by gfldet.data.normalize_batch)"
                )
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)

        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "image_id": record.image_id,
            "image_size": (int(tensor.shape[1]), int(tensor.shape[2])),
            "orig_size": (orig_h, orig_w),
        }
        if failures:
            target["decode_failed"] = failures
        return tensor, target


def _coco_from_dict(dataset: dict[str, Any] | None) -> COCO:
    """A pycocotools COCO index over an in-memory annotation dict (the checked, fixed one)."""
    if dataset is None:
        raise ValueError("no annotations to index (the dataset check found fatal problems)")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
