"""A split's per-image records in flat numpy arrays: what training and evaluation read per sample.

Per-image Python objects (a pycocotools ``COCO``, a list of dicts) are copied into every forked
DataLoader worker as soon as reference counting or a garbage collection touches their pages; a
handful of numpy arrays are not (the reason for Detectron2's ``DatasetFromList(serialize=True)``
and MMEngine's ``serialize_data``). benchmarks/coco_scale.py measures it.

Shape legend: N = images in the index, B = boxes of all images together.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gfldet.data.checks import DatasetReport

# MMDetection keeps a box only if its width and height are both >= 1 pixel.
MIN_BOX_SIDE = 1.0
MAX_NAMED = 10  # images named in a "left out" line before "... and N more"


@dataclass(frozen=True)
class ImageRecord:
    """One image of an ``ImageIndex``; ``boxes``/``labels`` are the caller's own copies."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # float32 [G, 4] xyxy in original pixels, clipped to the image, sides >= 1
    labels: np.ndarray  # int64 [G] in [0, C)
    apply_exif: bool  # False: the annotations were drawn on the un-rotated stored pixels


@dataclass(frozen=True)
class ImageIndex:
    """Images sorted by id, with their usable boxes, as flat arrays.

    Image ``i``'s file name is ``names[name_offsets[i]:name_offsets[i + 1]]`` (UTF-8), its boxes
    and labels rows ``box_offsets[i]:box_offsets[i + 1]``.
    """

    image_ids: np.ndarray  # int64 [N], ascending
    heights: np.ndarray  # int64 [N], as recorded in the JSON
    widths: np.ndarray  # int64 [N]
    apply_exif: np.ndarray  # bool [N]
    names: np.ndarray  # uint8 [sum of name lengths]
    name_offsets: np.ndarray  # int64 [N + 1]
    boxes: np.ndarray  # float32 [B, 4] xyxy
    labels: np.ndarray  # int64 [B]
    box_offsets: np.ndarray  # int64 [N + 1]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def aspect_ratios(self) -> np.ndarray:
        """width / height of each image, float64 [N] (from the JSON: no image is decoded)."""
        return self.widths / self.heights

    def file_name(self, i: int) -> str:
        return decode_name(self.names, self.name_offsets, i)

    def __getitem__(self, i: int) -> ImageRecord:
        start, end = self.box_offsets[i], self.box_offsets[i + 1]
        return ImageRecord(int(self.image_ids[i]), self.file_name(i), int(self.heights[i]),
                           int(self.widths[i]), self.boxes[start:end].copy(),
                           self.labels[start:end].copy(), bool(self.apply_exif[i]))

    def select(self, keep: np.ndarray) -> ImageIndex:
        """The images where ``keep`` (bool [N]) is True, with their boxes."""
        box_keep = np.repeat(keep, np.diff(self.box_offsets))
        name_keep = np.repeat(keep, np.diff(self.name_offsets))
        return ImageIndex(
            self.image_ids[keep], self.heights[keep], self.widths[keep], self.apply_exif[keep],
            self.names[name_keep], _offsets(np.diff(self.name_offsets)[keep]),
            self.boxes[box_keep], self.labels[box_keep], _offsets(np.diff(self.box_offsets)[keep]),
        )


@dataclass
class CheckedSplit:
    """A split indexed for ``CocoDetection(split=...)``, with its check report if it was checked."""

    index: ImageIndex
    report: DatasetReport | None  # None: indexed as read, not checked
    left_out: list[str]  # "file (image id N): reason" of each image not in the index
    label_to_cat_id: list[int]
    class_names: list[str]
    num_images_in_file: int


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def encode_names(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """File names as (UTF-8 bytes uint8 [total length], offsets int64 [len(names) + 1])."""
    encoded = [name.encode("utf-8", "surrogatepass") for name in names]
    names_arr = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return names_arr, _offsets(np.array([len(e) for e in encoded], dtype=np.int64))


def decode_name(names: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return names[offsets[i] : offsets[i + 1]].tobytes().decode("utf-8", "surrogatepass")


def clip_boxes(boxes: np.ndarray, width: Any, height: Any) -> np.ndarray:
    """Clip xyxy boxes float32 [G, 4] in place to the image (``width``/``height``: numbers or
    [G, 1] arrays); returns bool [G], True where both clipped sides are >= ``MIN_BOX_SIDE``."""
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & (
        (boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)


def build_index(
    coco: Mapping[str, Any],
    cat_id_to_label: Mapping[int, int],
    *,
    raw_orientation_ids: Collection[int] = frozenset(),
    skip: Collection[int] = frozenset(),
) -> tuple[ImageIndex, np.ndarray]:
    """The index of a COCO dict's images (those in ``skip`` left out), and each image's count of
    annotations of any kind (int64 [N]; for the message when an image has no usable box).

    The boxes are those training uses: crowd (``iscrowd``) and ``ignore`` annotations and
    categories outside ``cat_id_to_label`` are skipped; ``[x, y, w, h]`` becomes xyxy, is
    clipped to the recorded image size and dropped unless both sides are >= 1 px. An image's
    boxes keep their order in the file. An image id listed twice keeps its last entry (as
    pycocotools does; the dataset check makes it fatal).
    """
    by_id = {im["id"]: im for im in coco["images"]}
    ids = sorted(set(by_id) - set(skip))
    infos = [by_id[i] for i in ids]
    heights = np.array([int(im["height"]) for im in infos], dtype=np.int64).reshape(-1)
    widths = np.array([int(im["width"]) for im in infos], dtype=np.int64).reshape(-1)
    raw = set(raw_orientation_ids)
    apply_exif = np.array([i not in raw for i in ids], dtype=bool).reshape(-1)
    names, name_offsets = encode_names([str(im["file_name"]) for im in infos])

    # One pass over the annotations in file order: image position, label (-1: not a box used
    # for training) and [x, y, w, h].
    position_of = {image_id: p for p, image_id in enumerate(ids)}
    positions, labels, xywh = [], [], []
    for ann in coco["annotations"]:
        position = position_of.get(ann["image_id"])
        if position is None:
            continue
        positions.append(position)
        # Crowd regions are not instances; the detector never sees them as ground truth.
        # `== 1`: a string "0" (which the dataset check refuses) is not a crowd.
        crowd = ann.get("iscrowd", 0) == 1 or ann.get("ignore", 0)
        label = -1 if crowd else cat_id_to_label.get(int(ann["category_id"]), -1)
        labels.append(label)
        xywh.append([float(v) for v in ann["bbox"]] if label >= 0 else [0.0, 0.0, 0.0, 0.0])
    positions_arr = np.array(positions, dtype=np.int64).reshape(-1)
    labels_arr = np.array(labels, dtype=np.int64).reshape(-1)
    annotation_counts = np.bincount(positions_arr, minlength=len(ids)).astype(np.int64)

    used = labels_arr >= 0
    order = np.argsort(positions_arr[used], kind="stable")  # by image, file order within one
    box_positions = positions_arr[used][order]
    b = np.array(xywh, dtype=np.float64).reshape(-1, 4)[used][order]
    # x + w in float64, then float32: the arithmetic of the per-box Python code it replaces.
    boxes = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
    boxes = boxes.astype(np.float32)
    keep = clip_boxes(boxes, widths[box_positions].astype(np.float32)[:, None],
                      heights[box_positions].astype(np.float32)[:, None])
    box_offsets = _offsets(np.bincount(box_positions[keep], minlength=len(ids)))
    index = ImageIndex(
        np.array(ids, dtype=np.int64).reshape(-1), heights, widths, apply_exif, names,
        name_offsets, np.ascontiguousarray(boxes[keep]).reshape(-1, 4),
        labels_arr[used][order][keep], box_offsets,
    )
    return index, annotation_counts


def describe_left_out(left_out: list[str], total: int, purpose: str) -> str:
    """One line naming the images a split leaves out and why ("file (image id N): reason")."""
    named = "; ".join(left_out[:MAX_NAMED])
    more = f"; ... and {len(left_out) - MAX_NAMED} more" if len(left_out) > MAX_NAMED else ""
    return f"{len(left_out)} of {total} images left out of {purpose}: {named}{more}"


def no_training_images_left(ann_file: Path, left_out: list[str], total: int) -> str:
    return (f"no training images left in {ann_file}: every one of its {total} images is left out "
            "(data.filter_empty: images without a usable box; data.min_size: smaller images). "
            + describe_left_out(left_out, total, "training"))


def index_split(annotations: dict[str, Any], raw_orientation_ids: frozenset[int],
                unreadable: dict[int, str], filter_empty: bool, min_size: int) -> CheckedSplit:
    """Index a (checked) COCO dict: ``unreadable`` images left out and named, and with
    ``filter_empty`` the images training leaves out (MMDetection's filter_empty_gt and min_size:
    no usable box, or a side below ``min_size``), named with why, in id order."""
    label_to_cat_id = sorted(int(c["id"]) for c in annotations["categories"])
    names = {int(c["id"]): str(c["name"]) for c in annotations["categories"]}
    index, annotation_counts = build_index(
        annotations, {c: i for i, c in enumerate(label_to_cat_id)},
        raw_orientation_ids=raw_orientation_ids, skip=set(unreadable))
    left_out = [unreadable[i] for i in sorted(unreadable)]
    if filter_empty:
        small = np.minimum(index.heights, index.widths) < min_size
        empty = np.diff(index.box_offsets) == 0
        for i in np.flatnonzero(small | empty):
            count = int(annotation_counts[i])
            if small[i]:
                reason = (f"{int(index.widths[i])}x{int(index.heights[i])} px, a side below "
                          f"data.min_size={min_size}")
            elif count == 0:
                reason = "no annotations"
            else:
                its = "its annotation is" if count == 1 else f"its {count} annotations are"
                reason = (f"no usable box ({its} crowd/ignored, or under 1 px once clipped to "
                          "the image)")
            left_out.append(f"{index.file_name(i)} (image id {int(index.image_ids[i])}): {reason}")
        index = index.select(~(small | empty))
    return CheckedSplit(index, None, left_out, label_to_cat_id,
                        [names[c] for c in label_to_cat_id],
                        len({im["id"] for im in annotations["images"]}))


def images_left_out_of_training(annotations: dict[str, Any], min_size: int) -> list[str]:
    """What ``CocoDetection(filter_empty=True)`` leaves out of training from a (checked) COCO
    dict, by the same rules: "file (image id N): reason" per image."""
    return index_split(annotations, frozenset(), {}, True, min_size).left_out
