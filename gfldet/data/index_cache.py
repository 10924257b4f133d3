"""A split's checked index, stored beside its check cache (``gfldet.data.checks``).

When the annotation file and every image file are unchanged since the check that stored it
(sizes and modification times), and the dataset options are the same, ``load_checked_split``
loads the index and the check's report from here instead of parsing the JSON and checking it
again: a resumed COCO run starts without reading its 450 MB annotation file.

The file is a numpy ``.npz`` (no pickle): the index arrays, every image file's name, size and
modification time, and a JSON record of the key, the report and the dataset's class metadata.
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from gfldet.data.checks import DatasetReport, file_stamp, write_atomic
from gfldet.data.index import CheckedSplit, ImageIndex, decode_name, encode_names

VERSION = 1
MISSING = -1  # size and time of a file that did not exist when the index was stored

# What a stored report keeps; the rest (decode counts, the annotation dicts) is the check's own.
_REPORT_FIELDS = ("fixed", "fix_examples", "warnings", "num_images", "num_annotations", "kept",
                  "categories")


def index_cache_path(check_cache: Path) -> Path:
    return check_cache.with_name(f"{check_cache.stem}.index.npz")


def store(path: Path, key: dict[str, Any], split: CheckedSplit,
          file_stamps: dict[str, tuple[int, int] | None]) -> None:
    """Write ``split`` with the stamps its check took of every image file (atomic: a temporary
    file renamed over the old one). An error is left to the caller."""
    names = sorted(file_stamps)
    stamps = [file_stamps[n] or (MISSING, MISSING) for n in names]
    name_bytes, name_offsets = encode_names(names)
    report = split.report
    record = {
        "version": VERSION,
        "key": key,
        "report": {**{name: getattr(report, name) for name in _REPORT_FIELDS},
                   "ann_file": str(report.ann_file), "image_dir": str(report.image_dir),
                   "raw_orientation_ids": sorted(report.raw_orientation_ids),
                   "unreadable": {str(k): v for k, v in report.unreadable.items()}},
        "left_out": split.left_out,
        "label_to_cat_id": split.label_to_cat_id,
        "class_names": split.class_names,
        "num_images_in_file": split.num_images_in_file,
    }
    arrays = {f"index_{f.name}": getattr(split.index, f.name) for f in fields(ImageIndex)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, file_names=name_bytes, file_name_offsets=name_offsets,
             file_stamps=np.array(stamps, dtype=np.int64).reshape(-1, 2),
             record=np.frombuffer(json.dumps(record).encode(), dtype=np.uint8))
    write_atomic(path, buffer.getvalue())


def _report_from(record: dict[str, Any]) -> DatasetReport:
    report = DatasetReport(Path(record["ann_file"]), Path(record["image_dir"]),
                           **{name: record[name] for name in _REPORT_FIELDS})
    report.fixed = Counter(report.fixed)
    report.fix_examples = defaultdict(list, report.fix_examples)
    report.kept = tuple(report.kept) if report.kept is not None else None
    report.raw_orientation_ids = frozenset(record["raw_orientation_ids"])
    report.unreadable = {int(k): v for k, v in record["unreadable"].items()}
    return report


def load(path: Path, key: dict[str, Any], image_dir: Path) -> tuple[CheckedSplit | None, str]:
    """The stored split if ``key`` matches and every image file under ``image_dir`` has the size
    and modification time it had; else None. The text says what was found."""
    if not path.is_file():
        return None, ""
    try:
        with np.load(path, allow_pickle=False) as data:
            record = json.loads(data["record"].tobytes())
            if record.get("version") != VERSION or record.get("key") != key:
                return None, f"{path} is for another annotation file or other dataset options"
            arrays = {f.name: data[f"index_{f.name}"] for f in fields(ImageIndex)}
            names, offsets = data["file_names"], data["file_name_offsets"]
            stamps = data["file_stamps"]
    except (OSError, ValueError, KeyError) as err:
        return None, f"{path} unreadable ({type(err).__name__}: {err})"
    for i, stamp in enumerate(stamps.tolist()):
        name = decode_name(names, offsets, i)
        if (file_stamp(image_dir / name) or (MISSING, MISSING)) != tuple(stamp):
            return None, f"{name} changed since {path} was stored"
    try:
        report = _report_from(record["report"])
        split = CheckedSplit(ImageIndex(**arrays), report, record["left_out"],
                             record["label_to_cat_id"], record["class_names"],
                             record["num_images_in_file"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # not this version's record
        return None, f"{path} unreadable ({type(err).__name__}: {err})"
    report.images_from_cache = len(stamps)
    report.cache_note = (f"checked index {path}: the annotation file and all {len(stamps)} image "
                         "files are unchanged since it was stored")
    return split, ""
