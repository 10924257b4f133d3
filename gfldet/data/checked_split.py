"""A split checked and indexed, ready for ``CocoDetection(split=...)``: ``gfldet.data.checks``
run with its fixes applied and the index built, or, when nothing changed since the last check,
the checked index stored beside the check cache. Fatal problems raise ``DatasetError``.

The stored index spares a resumed COCO run its 450 MB annotation file. It is a numpy ``.npz`` (no
pickle): the index arrays and a JSON record of the key, every image file's stamp (size and
modification time), the report and the dataset's class metadata.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter, defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from gfldet.data.checks import (
    CHECK_ADVICE,
    NOT_TRAINED,
    DatasetReport,
    ShardedCheck,
    cache_key,
    check_dataset,
    file_stamp,
    write_atomic,
)
from gfldet.data.images import DEFAULT_MAX_IMAGE_PIXELS
from gfldet.data.index import CheckedSplit, ImageIndex, index_split

log = logging.getLogger("gfldet")

INDEX_VERSION = 3  # 3: the report's notes and evaluation flag
# What a stored report keeps; the rest (decode counts, the annotation dicts) is the check's own.
_REPORT_FIELDS = ("fixed", "fix_examples", "warnings", "notes", "evaluation", "num_images",
                  "num_annotations", "kept", "categories", "unreadable")
_SPLIT_FIELDS = ("left_out", "label_to_cat_id", "class_names", "num_images_in_file")


def load_checked_split(
    image_dir: str | Path,
    ann_file: str | Path,
    *,
    filter_empty: bool = True,
    min_size: int = 32,
    as_written: bool = False,
    max_decode_failures: float = 0.01,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    shard: ShardedCheck | None = None,
    cache: Path | None = None,
    split: str | None = None,
    not_done: str = NOT_TRAINED,
    advice: str = CHECK_ADVICE,
) -> CheckedSplit:
    """Check a COCO split and index it; the summary is logged (at WARNING when something was
    fixed or is suspicious).

    Training data is fixed in memory. ``as_written=True`` (a split that is scored, not trained
    on) indexes the file as written minus the unreadable images, named in ``left_out``.
    ``filter_empty``/``min_size``: see ``gfldet.data.index.index_split``. ``shard``: see
    ``ShardedCheck``. ``cache`` (a JSON file) keeps each image's decode result, and beside it the
    checked index, loaded when the annotation file, every image file and these options are
    unchanged. ``split`` names the config keys in messages (``data.val.annotations``); a fatal
    problem raises ``DatasetError`` saying ``not_done`` and ``advice`` (``raise_if_fatal``).
    """
    image_dir, ann_file = Path(image_dir), Path(ann_file)
    key = {"check": cache_key(ann_file, image_dir, max_image_pixels), "filter_empty": filter_empty,
           "min_size": min_size, "as_written": as_written,
           "max_decode_failures": max_decode_failures}
    stored = cache.with_name(f"{cache.stem}.index.npz") if cache is not None else None
    checked, why = _load(stored, key, image_dir) if stored is not None else (None, "")
    # Under torchrun every rank checks, or none: the check's decoding is shared among them.
    if shard is not None and shard.world > 1 and not all(shard.all_gather(checked is not None)):
        checked = None
    if checked is None:
        report = check_dataset(image_dir, ann_file, fix=True, check_images=True,
                               max_bad_image_fraction=max_decode_failures,
                               max_image_pixels=max_image_pixels,
                               shard=shard, cache=cache, split=split, evaluation=as_written,
                               decode_note="")  # no --no-images here: every file is decoded
        _log_summary(report, as_written)
        report.raise_if_fatal(not_done, advice)
        annotations = report.source if as_written else report.annotations
        # The index replaces the dicts; keeping them would keep the memory it saves.
        report.source = report.annotations = None
        unreadable = report.unreadable if as_written else {}
        checked = index_split(annotations, report.raw_orientation_ids, unreadable,
                              filter_empty, min_size)
        checked.report = report
        if why:
            log.info("checked index not used: %s", why)
        if stored is not None and report.file_stamps is not None:
            try:
                _store(stored, key, checked, report.file_stamps)
            except OSError as err:
                log.warning("could not write the checked index %s (%s); the next start checks "
                            "the annotation file again", stored, err)
    else:
        _log_summary(checked.report, as_written)
    checked.report.file_stamps = None
    return checked


def _log_summary(report: DatasetReport, as_written: bool) -> None:
    level = (logging.ERROR if report.fatal else
             logging.WARNING if report.fixed or report.warnings else logging.INFO)
    for line in report.summary(evaluation=as_written).splitlines():
        log.log(level, "%s", line)


def _store(path: Path, key: dict[str, Any], split: CheckedSplit,
           file_stamps: dict[str, list[int] | None]) -> None:
    """Write ``split`` with the stamps its check took of every image file (atomic: a temporary
    file renamed over the old one). An error is left to the caller."""
    report = split.report
    record = {
        "version": INDEX_VERSION, "key": key, "files": file_stamps,
        "report": {**{name: getattr(report, name) for name in _REPORT_FIELDS},
                   "ann_file": str(report.ann_file), "image_dir": str(report.image_dir),
                   "raw_orientation_ids": sorted(report.raw_orientation_ids)},
        **{name: getattr(split, name) for name in _SPLIT_FIELDS},
    }
    arrays = {f"index_{f.name}": getattr(split.index, f.name) for f in fields(ImageIndex)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, record=np.frombuffer(json.dumps(record).encode(), dtype=np.uint8))
    write_atomic(path, buffer.getvalue())


def _load(path: Path, key: dict[str, Any], image_dir: Path) -> tuple[CheckedSplit | None, str]:
    """The split stored at ``path`` if ``key`` matches and every image file under ``image_dir``
    has the size and modification time it had; else None. The text says what was found."""
    if not path.is_file():
        return None, ""
    try:
        with np.load(path, allow_pickle=False) as data:
            record = json.loads(data["record"].tobytes())
            if record.get("version") != INDEX_VERSION or record.get("key") != key:
                return None, f"{path} is for another annotation file or other dataset options"
            index = ImageIndex(**{f.name: data[f"index_{f.name}"] for f in fields(ImageIndex)})
        for name, stamp in record["files"].items():
            if file_stamp(image_dir / name) != stamp:
                return None, f"{name} changed since {path} was stored"
        r = record["report"]
        # The fields _store wrote, then the four whose type JSON does not keep.
        report = DatasetReport(Path(r["ann_file"]), Path(r["image_dir"]),
                               **{name: r[name] for name in _REPORT_FIELDS})
        report.fixed = Counter(report.fixed)
        report.fix_examples = defaultdict(list, report.fix_examples)
        report.kept = tuple(report.kept) if report.kept is not None else None
        report.unreadable = {int(k): v for k, v in report.unreadable.items()}  # keys were text
        report.raw_orientation_ids = frozenset(r["raw_orientation_ids"])
        split = CheckedSplit(index, report, *(record[name] for name in _SPLIT_FIELDS))
    # Valid JSON that is not this version's record raises the last three.
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"{path} unreadable ({type(err).__name__}: {err})"
    report.images_from_cache = len(record["files"])
    report.cache_note = (f"checked index {path}: the annotation file and all "
                         f"{len(record['files'])} image files are unchanged since it was stored")
    return split, ""
