"""A split checked and indexed, ready for ``CocoDetection(split=...)``: ``gfldet.data.checks``
run with its fixes applied and the index built, or, when nothing changed since the last check,
the stored index (``gfldet.data.index_cache``). Fatal problems raise ``DatasetError``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gfldet.data import index_cache
from gfldet.data.checks import DatasetReport, ShardedCheck, cache_key, check_dataset
from gfldet.data.images import DEFAULT_MAX_IMAGE_PIXELS
from gfldet.data.index import CheckedSplit, index_split

log = logging.getLogger("gfldet")


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
) -> CheckedSplit:
    """Check a COCO split and index it; the summary is logged (at WARNING when something was
    fixed or is suspicious).

    Training data is fixed in memory. ``as_written=True`` (a split that is scored, not trained
    on) indexes the file as written minus the unreadable images, named in ``left_out``.
    ``filter_empty``/``min_size``: see ``gfldet.data.index.index_split``. ``shard``: see
    ``ShardedCheck``. ``cache`` (a JSON file) keeps each image's decode result, and beside it the
    checked index, loaded when the annotation file, every image file and these options are
    unchanged.
    """
    image_dir, ann_file = Path(image_dir), Path(ann_file)
    key = {"check": cache_key(ann_file, image_dir, max_image_pixels), "filter_empty": filter_empty,
           "min_size": min_size, "as_written": as_written,
           "max_decode_failures": max_decode_failures}
    stored = index_cache.index_cache_path(cache) if cache is not None else None
    split, why = (None, "") if stored is None else index_cache.load(stored, key, image_dir)
    # Under torchrun every rank checks, or none: the check's decoding is shared among them.
    if shard is not None and shard.world > 1 and not all(shard.all_gather(split is not None)):
        split = None
    if split is None:
        report = check_dataset(image_dir, ann_file, fix=True, check_images=True,
                               max_bad_image_fraction=max_decode_failures,
                               max_image_pixels=max_image_pixels,
                               shard=shard, cache=cache)
        _log_summary(report, as_written)
        report.raise_if_fatal()
        annotations = report.source if as_written else report.annotations
        # The index replaces the dicts; keeping them would keep the memory it saves.
        report.source = report.annotations = None
        unreadable = report.unreadable if as_written else {}
        split = index_split(annotations, report.raw_orientation_ids, unreadable, filter_empty,
                            min_size)
        split.report = report
        if why:
            log.info("checked index not used: %s", why)
        if stored is not None and report.file_stamps is not None:
            try:
                index_cache.store(stored, key, split, report.file_stamps)
            except OSError as err:
                log.warning("could not write the checked index %s (%s); the next start checks "
                            "the annotation file again", stored, err)
    else:
        _log_summary(split.report, as_written)
    split.report.file_stamps = None
    return split


def _log_summary(report: DatasetReport, as_written: bool) -> None:
    level = logging.WARNING if (report.fixed or report.warnings) else logging.INFO
    for line in report.summary(evaluation=as_written).splitlines():
        log.log(level, "%s", line)

