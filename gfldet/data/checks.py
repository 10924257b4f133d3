"""Checks of a COCO-format dataset before training: every problem at once, safe fixes applied.

``check_dataset(image_dir, ann_file)`` returns a ``DatasetReport``. Fatal (each message names the
file or id and what to do): an unreadable annotation file; a structure that breaks
``coco_schema.py``; duplicate image, annotation or category ids; annotations of an unlisted image
or category (a silent drop could hide a wrong categories list); a recorded width/height that
matches neither the file nor its EXIF-rotated view; images above ``max_image_pixels``; more bad
image files than ``max_bad_image_fraction`` allows. ``split_problems`` compares the splits.

Fixed in memory (``report.annotations``; the files are unchanged): empty boxes and boxes wholly
outside the image dropped, boxes partly outside clipped; a few unreadable images dropped with
their annotations; images whose recorded size is the stored pixels' but not the EXIF-rotated
view's are decoded un-rotated (``raw_orientation_ids``: their boxes were drawn on the stored
pixels). ``fix=False`` (a curated set used exactly as written) makes every fix fatal. An
evaluation split (``evaluation=True``) scores its file as written (``source``) minus the
unreadable images: its box problems are found, not fixed, and the summary says so.

Said, not fixed: crowd boxes (ignored in training, ignore regions in evaluation) and annotations
without ``iscrowd`` / ``area`` (evaluation fills in ``coco_schema.fill_optional_keys``' values) in
``notes``; in ``warnings``, among others, boxes that look like another box format, categories
without a box, and (``split_warnings``) a val split that is the train split.

Images are fully decoded in a thread pool (PIL releases the GIL) with
``ImageFile.LOAD_TRUNCATED_IMAGES`` held False, so truncated files raise. With ``cache=FILE`` each
file's result is stored with its size and modification time, and the next check decodes only the
changed files (all of them when the annotation file, image folder or ``max_image_pixels``
changed); training keeps one per split in its run folder, so ``--resume`` decodes nothing again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

from PIL import ExifTags, ImageFile

from gfldet.data.coco_schema import is_int, structure_problems
from gfldet.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DatasetError,
    ImageTooLargeError,
    open_image,
    upright_size,
)

__all__ = ["DatasetError", "DatasetReport", "ShardedCheck", "check_dataset", "split_problems",
           "split_warnings"]

MAX_LISTED = 20  # problems listed in an error before "... and N more"
MAX_EXAMPLES = 5  # examples shown per kind of fix

# Kinds of fix (keys of DatasetReport.fixed).
FIX_EMPTY_BOX = "boxes with zero or negative width/height dropped"
FIX_CLIPPED = "boxes partly outside the image clipped to it"
FIX_OUTSIDE = "boxes wholly outside the image dropped"
FIX_BAD_IMAGE = "missing or unreadable images dropped (with their annotations)"
FIX_BAD_IMAGE_ANNS = "annotations of dropped images removed"
FIX_RAW_ORIENTATION = "EXIF-rotated images decoded without rotation (boxes drawn on stored pixels)"

# A fix line of an evaluation split, which scores the boxes as written.
_AS_WRITTEN = {
    FIX_EMPTY_BOX: "boxes with zero or negative width/height found, scored as written",
    FIX_CLIPPED: "boxes partly outside the image found, scored as written",
    FIX_OUTSIDE: "boxes wholly outside the image found, scored as written",
}
# Kinds whose one example lists every item (ids), instead of one example per item.
_LISTS_ALL = {FIX_BAD_IMAGE_ANNS}

# What each box fix repairs, for the fatal message when fix=False.
_BOX_PROBLEM = {
    FIX_EMPTY_BOX: "the box has zero or negative width/height",
    FIX_CLIPPED: "the box extends outside the image",
    FIX_OUTSIDE: "the box lies wholly outside the image",
}

# More than this share of boxes needing a fix suggests a wrong box format, e.g. [x1, y1, x2, y2];
# this share of boxes under TINY_BOX_SIDE px wide and high, normalised (0..1) boxes.
SUSPICIOUS_BOX_FIX_SHARE = 0.05
TINY_BOX_SHARE = 0.9
TINY_BOX_SIDE = 2.0

# What a failed check says was not done, and where to look next (the caller may say otherwise).
NOT_TRAINED = "nothing was trained"
CHECK_ADVICE = "Run tools/check_dataset.py CONFIG for the full report."

_NOT_FOUND = "file not found"
_LOAD_TRUNCATED_LOCK = threading.Lock()

log = logging.getLogger("gfldet")
# A long decode (COCO's 118k images: minutes) says what it does, then how far it is, this often.
PROGRESS_INTERVAL = 15.0  # seconds
NO_IMAGES_NOTE = ("; tools/check_dataset.py --no-images checks the JSON and that the files "
                  "exist, without decoding them")


@dataclass(frozen=True)
class ShardedCheck:
    """Share the image decoding among the processes of a distributed job: process ``rank`` of
    ``world`` decodes every ``world``-th of the sorted files, ``all_gather`` (one object in, every
    rank's out in rank order, e.g. ``gfldet.distributed.all_gather_objects``) pools the results,
    and every process builds the same report. Every rank must check the same files."""

    rank: int
    world: int
    all_gather: Callable[[object], list[object]]


SINGLE_PROCESS = ShardedCheck(0, 1, lambda obj: [obj])


@dataclass
class DatasetReport:
    """Outcome of ``check_dataset``; ``num_images``/``num_annotations`` count the file as given."""

    ann_file: Path
    image_dir: Path
    fatal: list[str] = field(default_factory=list)
    fixed: Counter[str] = field(default_factory=Counter)
    fix_examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts worth knowing, nothing suspicious
    evaluation: bool = False  # checked as a split that is scored as written, not trained on
    num_images: int = 0
    num_annotations: int = 0
    images_decoded: int = 0  # image files read (missing ones aside)
    images_missing: int = 0
    images_from_cache: int = 0  # full-decode results reused from the check cache (files unchanged)
    cache_note: str = ""  # what the check cache gave, or why it was not used
    seconds: float = 0.0
    categories: list[dict[str, Any]] = field(default_factory=list)
    # What a checked training split indexes: the fixed COCO dict (None when fatal) and the image
    # ids to decode without EXIF rotation.
    annotations: dict[str, Any] | None = None
    kept: tuple[int, int] | None = None  # (images, annotations) of `annotations`
    raw_orientation_ids: frozenset[int] = frozenset()
    # What evaluation scores: the file as read (None when not a COCO mapping), and the unreadable
    # images dropped within the budget: image id -> "path (image id N): error".
    source: dict[str, Any] | None = None
    unreadable: dict[int, str] = field(default_factory=dict)
    # With a cache: every image file's (size, mtime_ns) as the check found it (None: missing).
    file_stamps: dict[str, list[int] | None] | None = None

    @property
    def ok(self) -> bool:
        return not self.fatal

    def add_fix(self, kind: str, example: str, count: int = 1,
                examples: int = MAX_EXAMPLES) -> None:
        self.fixed[kind] += count
        if len(self.fix_examples[kind]) < examples:
            self.fix_examples[kind].append(example)

    def summary(self, evaluation: bool | None = None) -> str:
        """The report as text. `evaluation` (default: as checked): for a split scored as written
        (only unreadable images are left out, nothing else is fixed)."""
        evaluation = self.evaluation if evaluation is None else evaluation
        kept = ""
        if self.kept is not None and not evaluation:
            kept = f" -> {self.kept[0]} images, {self.kept[1]} annotations after fixes"
        decoded = (f"; {self.images_decoded} image files decoded" if self.images_decoded
                   or self.images_from_cache else "; image files not decoded")
        if self.images_from_cache:
            decoded += f", {self.images_from_cache} unchanged since their last full decode"
        if self.images_missing:
            decoded += f", {self.images_missing} not found"
        if self.cache_note:
            decoded += f" ({self.cache_note})"
        lines = [
            f"dataset {self.ann_file} (images in {self.image_dir}): {self.num_images} images, "
            f"{self.num_annotations} annotations{kept}{decoded}; checked in {self.seconds:.1f} s"
        ]
        if self.fixed:
            lines.append("found (evaluation scores the file as written, leaving out the "
                         "unreadable images):" if evaluation else
                         "fixed in memory (training uses the fixed data; the files are unchanged):")
            for kind, count in self.fixed.items():
                shown = self.fix_examples[kind]
                more = ", ..." if count > len(shown) and kind not in _LISTS_ALL else ""
                what = _AS_WRITTEN.get(kind, kind) if evaluation else kind
                lines.append(f"  - {count} {_number(what, count)}: {'; '.join(shown)}{more}")
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {n}" for n in self.notes)
        if self.warnings:
            lines.append("warnings:")
            lines.extend(f"  - {w}" for w in self.warnings)
        if self.fatal:
            lines.append(f"FATAL ({_count(len(self.fatal), 'problem')}; training would not "
                         "start):")
            lines.extend(_listed(self.fatal))
        lines.append("result: " + ("usable" if self.ok else "NOT usable - fix the problems above"))
        return "\n".join(lines)

    def raise_if_fatal(self, not_done: str = NOT_TRAINED, advice: str = CHECK_ADVICE) -> None:
        """``DatasetError`` listing the fatal problems, then what was not done because of them
        and ``advice`` (an evaluation says its own)."""
        if self.fatal:
            raise DatasetError(
                f"dataset {self.ann_file} (images in {self.image_dir}) has "
                f"{_count(len(self.fatal), 'fatal problem')}; {not_done}:\n"
                + "\n".join(_listed(self.fatal)) + f"\n{advice}"
            )


def split_problems(num_classes: int, reports: dict[str, DatasetReport]) -> list[str]:
    """Problems between the config and the splits, which each split's own check cannot see:
    category counts against ``model.num_classes``, and train and val categories that differ
    (the same label would mean different classes in training and evaluation)."""
    problems = []
    cats = {split: sorted((c.get("id"), c.get("name")) for c in r.categories)
            for split, r in reports.items() if r.categories}
    for split, pairs in cats.items():
        if len(pairs) != num_classes:
            problems.append(f"model.num_classes is {num_classes} but the {split} annotations "
                            f"({reports[split].ann_file}) have {len(pairs)} categories; set "
                            f"model.num_classes: {len(pairs)}")
    if "train" in cats and "val" in cats and cats["train"] != cats["val"]:
        only_train = sorted(set(cats["train"]) - set(cats["val"]))
        only_val = sorted(set(cats["val"]) - set(cats["train"]))
        problems.append(f"train and val categories differ ({reports['train'].ann_file} vs "
                        f"{reports['val'].ann_file}; labels would not mean the same class): only "
                        f"in train {only_train}, only in val {only_val}; use one categories list")
    return problems


def split_warnings(reports: dict[str, DatasetReport]) -> list[str]:
    """Remarks on the splits together that do not stop training: a val split that is the train
    split (its AP would measure memory, not generalisation)."""
    train, val = reports.get("train"), reports.get("val")
    if train is None or val is None or not _same_file(train.ann_file, val.ann_file):
        return []
    return [f"val uses the train annotation file ({train.ann_file}): its AP measures images the "
            "model was trained on, not how well it does on new ones; give data.val a held-out "
            "split"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is missing (already fatal)
        return a.absolute() == b.absolute()


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _number(kind: str, count: int) -> str:
    """A kind of fix ("boxes with ...", "missing ... images dropped (with their annotations)")
    in the singular when ``count`` is 1."""
    if count != 1:
        return kind
    return re.sub(r"\b(box|image|annotation)(es|s)\b", r"\1", kind, count=1).replace(
        "their", "its")


def _listed(items: list[str]) -> list[str]:
    lines = [f"  - {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more")
    return lines


def _ids(values: Iterable[Any], limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


# ---------------------------------------------------------------------------- annotation file


def _config_key(split: str | None, key: str) -> str:
    """Where a split's path is set: ``data.val.images`` and how to override it, or (split not
    known) ``data.<split>.images``."""
    if split is None:
        return f"data.<split>.{key}"
    return f"data.{split}.{key} (in the config, or --cfg-options data.{split}.{key}=PATH)"


def _tried(path: Path) -> str:
    """Where a relative path was looked for: from the current folder."""
    if path.is_absolute():
        return ""
    return f" (looked for {path.absolute()}: a relative path is taken from the current folder)"


def _load_json(ann_file: Path, report: DatasetReport, split: str | None) -> Any:
    """The parsed file; a fatal problem when it cannot be read as JSON."""
    if not ann_file.is_file():
        what = "is a folder, not a file" if ann_file.is_dir() else "not found" + _tried(ann_file)
        report.fatal.append(f"{ann_file}: annotation file {what}; check "
                            f"{_config_key(split, 'annotations')}")
        return None
    try:
        return json.loads(ann_file.read_bytes())
    except OSError as err:
        report.fatal.append(f"{ann_file}: cannot read the annotation file ({err})")
    except json.JSONDecodeError as err:
        report.fatal.append(f"{ann_file}: invalid JSON at line {err.lineno}, column {err.colno}: "
                            f"{err.msg}; fix the file there (was it cut short while copying?)")
    except UnicodeDecodeError as err:
        report.fatal.append(f"{ann_file}: not UTF-8 text ({err}); save it as UTF-8 JSON")
    return None


def _duplicates(ids: Counter[int], what: str, ann_file: Path, report: DatasetReport) -> None:
    report.fatal.extend(f"{ann_file}: {what} id {i} appears {n} times; {what} ids must be unique "
                        "(renumber them)" for i, n in ids.items() if n > 1)


def _check_references(data: dict[str, Any], bad: dict[str, set[int]], ann_file: Path,
                      report: DatasetReport) -> tuple[dict[int, dict], list[dict]]:
    """What the structurally valid records mean together: unique ids, annotations of listed
    images and categories. Returns the usable images by id and their annotations."""
    cats = [c for i, c in enumerate(data["categories"]) if i not in bad["categories"]]
    cat_ids = Counter(c["id"] for c in cats)
    _duplicates(cat_ids, "category", ann_file, report)
    if not data["categories"]:
        report.fatal.append(f"{ann_file}: 'categories' is empty; list the classes as "
                            "{\"id\": int, \"name\": str}")
    report.categories = [c for c in data["categories"] if isinstance(c, dict)]

    by_id: dict[int, list[dict]] = defaultdict(list)
    for i, im in enumerate(data["images"]):
        if i not in bad["images"]:
            by_id[im["id"]].append(im)
    report.fatal.extend(
        f"{ann_file}: image id {image_id} appears {len(entries)} times in images "
        f"(file_names {_ids(e['file_name'] for e in entries)}); ids must be unique"
        for image_id, entries in by_id.items() if len(entries) > 1)
    images = {image_id: entries[0] for image_id, entries in by_id.items() if len(entries) == 1}
    files: dict[str, list[int]] = defaultdict(list)
    for image_id, im in images.items():
        files[im["file_name"]].append(image_id)
    shared = {f: ids for f, ids in files.items() if len(ids) > 1}
    if shared:
        name, ids = next(iter(shared.items()))
        report.warnings.append(f"{len(shared)} files are listed under several image ids "
                               f"(e.g. {name}: ids {_ids(ids)}); each is trained on once per id")

    # Image ids of every image record with an integer id, valid or not: an annotation of an
    # invalid image is not also reported as an orphan.
    all_image_ids = {im["id"] for im in data["images"]
                     if isinstance(im, dict) and is_int(im.get("id"))}
    anns = [a for i, a in enumerate(data["annotations"]) if i not in bad["annotations"]]
    _duplicates(Counter(a["id"] for a in anns), "annotation", ann_file, report)
    orphans: dict[int, list[int]] = defaultdict(list)
    unknown_cats: dict[int, list[int]] = defaultdict(list)
    valid = []
    for ann in anns:
        if ann["image_id"] not in all_image_ids:
            orphans[ann["image_id"]].append(ann["id"])
        elif ann["category_id"] not in cat_ids:
            unknown_cats[ann["category_id"]].append(ann["id"])
        elif ann["image_id"] in images:  # else: its image is invalid (already fatal)
            valid.append(ann)
    report.fatal.extend(
        f"{ann_file}: {len(ids)} annotations (ids {_ids(ids)}) refer to image id {image_id}, "
        "which is not in images; add the image or remove the annotations"
        for image_id, ids in orphans.items())
    known = _ids(sorted(cat_ids), limit=20)
    report.fatal.extend(
        f"{ann_file}: category_id {cat_id} is used by {len(ids)} annotations (ids {_ids(ids)}) "
        f"but is not in categories (ids: {known}); add it to categories or fix the annotations "
        "- is this the categories list the boxes were labelled with?"
        for cat_id, ids in sorted(unknown_cats.items()))
    return images, valid


def _check_boxes(anns: list[dict], images: dict[int, dict], fix: bool, ann_file: Path,
                 report: DatasetReport) -> tuple[list[dict], int]:
    """Drop / clip boxes against the recorded image size. Returns the kept annotations and the
    number of boxes that are not a crowd's (the ground truth evaluation scores against). Notes
    crowd boxes and missing optional keys; warns about a likely wrong box format and categories
    without a box."""
    kept = []
    crowd = no_iscrowd = no_area = tiny = 0
    box_cats: set[int] = set()  # categories with a box that is not a crowd's
    for ann in anns:
        x, y, w, h = (float(v) for v in ann["bbox"])
        # Counted in the one pass over the annotations (COCO: 860k).
        iscrowd = ann.get("iscrowd")  # 0 or 1 (coco_schema), None when missing
        no_iscrowd += iscrowd is None
        crowd += iscrowd == 1
        if iscrowd != 1:
            box_cats.add(ann["category_id"])
        no_area += "area" not in ann
        tiny += w < TINY_BOX_SIDE and h < TINY_BOX_SIDE
        im = images[ann["image_id"]]
        width, height = int(im["width"]), int(im["height"])
        if w <= 0 or h <= 0:
            _fixable(report, fix, FIX_EMPTY_BOX, _where(ann), ann_file)
            continue
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x2 <= x1 or y2 <= y1:
            _fixable(report, fix, FIX_OUTSIDE, f"{_where(ann)} vs image {width}x{height}",
                     ann_file)
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            _fixable(report, fix, FIX_CLIPPED, f"{_where(ann)} vs image {width}x{height}",
                     ann_file)
            ann = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1]}  # a copy: the caller's dict stays
        kept.append(ann)
    _note_boxes(len(anns), crowd, no_iscrowd, no_area, report)
    box_fixes = sum(report.fixed[k] for k in (FIX_EMPTY_BOX, FIX_CLIPPED, FIX_OUTSIDE))
    odd = []
    if anns and box_fixes > SUSPICIOUS_BOX_FIX_SHARE * len(anns):
        odd.append(f"{box_fixes} of {len(anns)} boxes " + (
            "are empty or (partly) outside the image" if report.evaluation
            else "had to be dropped or clipped"))
    if anns and tiny >= TINY_BOX_SHARE * len(anns):
        odd.append(f"{tiny} of {len(anns)} boxes are under {TINY_BOX_SIDE:g} px wide and high")
    if odd:
        report.warnings.append(
            "; ".join(odd) + ": COCO boxes are [x, y, width, height] in pixels of the image as "
            "listed; if yours are [x1, y1, x2, y2] or normalised (0..1), convert them")
    boxless = [f"{c.get('id')} {c.get('name')!r}" for c in report.categories
               if c.get("id") not in box_cats]
    # Not with no box at all (said elsewhere), nor beside fatal problems (which may explain it).
    if boxless and len(anns) > crowd and not report.fatal:
        them = "it" if len(boxless) == 1 else "them"
        report.warnings.append(
            f"{_count(len(boxless), 'category', 'categories')} without a box (crowd aside): "
            f"{_ids(boxless)}; "
            + (f"no AP can be computed for {them} (nan in the per-class table; the mean AP "
               f"leaves {them} out)" if report.evaluation else f"the model cannot learn {them}"))
    return kept, len(anns) - crowd


def _where(ann: dict) -> str:
    # Formatted only for a box that needs a fix: most boxes need none.
    return f"annotation id {ann['id']} (image id {ann['image_id']}, bbox {ann['bbox']})"


def _note_boxes(num: int, crowd: int, no_iscrowd: int, no_area: int,
                report: DatasetReport) -> None:
    if crowd:
        report.notes.append(
            f"crowd boxes (iscrowd: 1): {crowd} of {num} annotations; training ignores them and "
            "evaluation treats them as ignore regions (a detection on one is neither a hit nor a "
            "false positive)")
    lacking = [f"{key!r}: {count} ({used})" for key, count, used in (
        ("iscrowd", no_iscrowd, "0 is used: not a crowd"),
        ("area", no_area, "evaluation uses the box's width * height, as COCO converters write "
                          "it for a box without a mask")) if count]
    if lacking:
        report.notes.append("annotations without " + "; without ".join(lacking))


def _fixable(report: DatasetReport, fix: bool, kind: str, where: str, ann_file: Path) -> None:
    if fix:
        report.add_fix(kind, where)
    else:
        report.fatal.append(f"{ann_file}: {where}: {_BOX_PROBLEM[kind]} (fix=False makes "
                            "fixable problems fatal; correct the box in the JSON)")


# ---------------------------------------------------------------------------- image files


class _Probe(NamedTuple):
    """An image file as the check found it; a check cache entry is [size, mtime_ns, *probe]."""

    width: int | None = None  # as stored in the file; None: not decoded, or unreadable
    height: int | None = None
    orientation: int = 1
    error: str = ""  # "" = decoded fine
    too_large: bool = False


def _probe(path: Path, max_pixels: int | None) -> _Probe:
    try:
        with open_image(path, max_pixels) as img:
            img.load()  # full decode: truncation and corrupt data raise here
            # The orientation as ImageOps.exif_transpose reads it, after load(): a PNG's eXIf
            # chunk may follow the pixel data.
            return _Probe(*img.size, int(img.getexif().get(ExifTags.Base.Orientation, 1)))
    except FileNotFoundError:
        return _Probe(error=_NOT_FOUND)
    except ImageTooLargeError as err:
        return _Probe(error=str(err), too_large=True)
    except Exception as err:
        # Corrupt data surfaces as OSError, SyntaxError, ValueError, struct.error, zlib.error...
        return _Probe(error=f"{type(err).__name__}: {err}")


def _say(message: str) -> None:
    """A line about a long check: into the "gfldet" log where logging is set up (training, eval),
    else on stderr (tools/check_dataset.py, a notebook), which would drop an INFO record."""
    if log.hasHandlers():
        log.info("%s", message)
    else:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress(done: list, total: int, whose: str) -> Iterator[None]:
    """Every PROGRESS_INTERVAL seconds, `len(done)` of `total` decoded, the rate and the time
    left; a thread reads the list's length, so the decoding pays nothing per image."""
    stop, start = threading.Event(), time.monotonic()

    def report() -> None:
        while not stop.wait(PROGRESS_INTERVAL):
            n, seconds = len(done), time.monotonic() - start
            left = (f", about {timedelta(seconds=round((total - n) * seconds / n))} left"
                    if n else "")
            _say(f"checking images: {n:,} of {total:,} decoded{whose} ({n / seconds:.0f}/s{left})")

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _probe_all(paths: list[Path], max_pixels: int | None, shard: ShardedCheck) -> list[_Probe]:
    """Decode `paths` in a thread pool, dealt out round-robin over the processes of `shard`;
    rank 0 reports its progress."""
    threads = min(16, (os.cpu_count() or 1) * 2)  # I/O overlaps the decoding
    share = paths[shard.rank::shard.world]
    whose = f" by rank 0, its 1/{shard.world} share of {len(paths):,}" if shard.world > 1 else ""
    mine: list[_Probe] = []
    with (ThreadPoolExecutor(max_workers=threads) as pool,
          _progress(mine, len(share), whose) if shard.rank == 0 else contextlib.nullcontext()):
        for probe in pool.map(lambda p: _probe(p, max_pixels), share):
            mine.append(probe)
    pooled: list[_Probe] = [None] * len(paths)  # type: ignore[list-item]
    for rank, got in enumerate(shard.all_gather(mine)):
        pooled[rank::shard.world] = got
    return pooled


def _probe_files(files: list[str], check_images: bool, max_pixels: int | None,
                 report: DatasetReport, shard: ShardedCheck, cache: Path | None,
                 decode_note: str) -> dict[str, _Probe]:
    """Each file's probe: whether it exists, or (`check_images`) its full decode, taken from
    `cache` when the file is unchanged. A decode is announced (with `decode_note` at the end)."""
    # Plain loops: a stat is microseconds, less than a thread pool spends handing out a task.
    paths = {name: report.image_dir / name for name in files}
    if not check_images:
        probes = {name: _Probe() if path.is_file() else _Probe(error=_NOT_FOUND)
                  for name, path in paths.items()}
        report.images_missing = sum(p.error == _NOT_FOUND for p in probes.values())
        return probes
    stamps = {name: file_stamp(path) for name, path in paths.items()}
    report.file_stamps = stamps if cache else None
    key = cache_key(report.ann_file, report.image_dir, max_pixels)
    cached = _read_cache(cache, key, stamps, report) if cache else {}
    # Every rank must decode the same list: a file any rank cannot take from the cache (a file
    # system that shows it changed, an unreadable cache) is decoded by all.
    stale = set().union(*shard.all_gather([f for f in files if f not in cached]))
    to_decode = [f for f in files if f in stale]
    if to_decode and shard.rank == 0:
        unchanged = len(files) - len(to_decode)
        _say(f"checking images: decoding {len(to_decode):,} image files in {report.image_dir}"
             + (f" ({unchanged:,} unchanged ones taken from {cache})" if unchanged else "")
             + (f", shared among {shard.world} processes" if shard.world > 1 else "")
             + (f"; the results go to {cache}, so a --resume decodes only changed files"
                if cache else "") + decode_note)
    # The flag is a PIL global; a library imported by the user may have set it, which would
    # make truncated files decode silently (gray-filled). Hold it False while checking.
    with _LOAD_TRUNCATED_LOCK:
        was = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            decoded = _probe_all([paths[f] for f in to_decode], max_pixels, shard)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = was
    probes = {**cached, **dict(zip(to_decode, decoded, strict=True))}
    if cache and to_decode and shard.rank == 0:  # else nothing new to store
        _write_cache(cache, key, stamps, probes, report)
    if was:
        report.warnings.append(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True in this process (some imported code "
            "set it); the check ignored it, but training would decode truncated files as "
            "gray: find and remove the line that sets it")
    # Missing files are never cached (_write_cache), so all of them are among the decoded.
    report.images_missing = sum(p.error == _NOT_FOUND for p in decoded)
    report.images_decoded = len(to_decode) - report.images_missing
    report.images_from_cache = len(files) - len(to_decode)
    return probes


def _check_files(images: dict[int, dict], probes: dict[str, _Probe], fix: bool,
                 max_bad_image_fraction: float, report: DatasetReport
                 ) -> tuple[dict[int, str], set[int]]:
    """Judge every image's probe. Returns (image ids to drop -> why, ids to decode un-rotated)."""
    bad: dict[int, str] = {}
    raw_orientation: set[int] = set()
    flips = 0
    listings: dict[Path, dict[str, str]] = {}  # folder -> lower-case name -> name
    misnamed = 0  # missing files whose name has a hint
    for image_id, im in sorted(images.items()):
        probe = probes[im["file_name"]]
        where = f"{report.image_dir / im['file_name']} (image id {image_id})"
        if probe.too_large:
            report.fatal.append(f"image id {image_id}: {probe.error}")
            continue
        if probe.error == _NOT_FOUND:  # quoted: a space at the end of the name shows
            path = report.image_dir / im["file_name"]
            hint = _not_found_hint(im["file_name"], path, listings)
            misnamed += bool(hint)
            bad[image_id] = f"{str(path)!r} (image id {image_id}): {_NOT_FOUND}{hint}"
            continue
        if probe.error:
            bad[image_id] = f"{where}: {probe.error}"
            continue
        if probe.width is None:  # existence checked only
            continue
        recorded = (int(im["width"]), int(im["height"]))
        w, h = stored = (probe.width, probe.height)
        upright = upright_size(stored, probe.orientation)
        if recorded == upright:
            flips += probe.orientation in (2, 3, 4)
            continue
        if recorded == stored:  # only a swap, explained by EXIF orientation 5..8
            if fix:
                raw_orientation.add(image_id)
                report.add_fix(FIX_RAW_ORIENTATION, where)
            else:
                report.fatal.append(
                    f"{where}: the JSON size {w}x{h} is the stored pixels', but EXIF orientation "
                    f"{probe.orientation} makes the decoded image {upright[0]}x{upright[1]}: "
                    "the boxes were probably drawn on the un-rotated pixels. Run with fix=True "
                    "(gfldet then decodes it un-rotated) or rotate the image and its boxes")
            continue
        rotated = (f" (EXIF orientation {probe.orientation}: {upright[0]}x{upright[1]} as decoded)"
                   if probe.orientation != 1 else "")
        report.fatal.append(
            f"{where}: the JSON says {recorded[0]}x{recorded[1]} (width x height) but the file is "
            f"{w}x{h}{rotated}; were the images resized or replaced after annotation? Fix width/"
            "height in the JSON and make sure the boxes refer to these pixels")
    if raw_orientation:
        report.warnings.append(
            f"{len(raw_orientation)} images carry an EXIF rotation that their JSON width/height do "
            "not reflect: the annotations were probably made on the stored pixels, so gfldet "
            "decodes them without the rotation. If your tool showed the rotated view when "
            "labelling, swap width/height in the JSON for these images instead "
            f"(ids {_ids(sorted(raw_orientation))})")
    if flips:
        report.warnings.append(
            f"{flips} images have an EXIF flip or 180-degree rotation (orientation 2-4), which "
            "sizes cannot verify; gfldet applies it, so boxes must be drawn on the upright view")
    return _judge_bad_images(bad, misnamed, len(images), fix, max_bad_image_fraction,
                             report), raw_orientation


def _not_found_hint(file_name: str, path: Path, listings: dict[Path, dict[str, str]]) -> str:
    """Why ``file_name`` may not be found: a Windows separator, whitespace around a part of the
    name, or another letter case on disk (one listing per folder, kept in ``listings``)."""
    if "\\" in file_name:
        return " (the name has a backslash: use / in file_name)"
    if any(part != part.strip() for part in file_name.split("/")):
        return " (the name has leading or trailing whitespace)"
    if path.parent not in listings:
        try:
            listings[path.parent] = {name.lower(): name for name in os.listdir(path.parent)}
        except OSError:
            listings[path.parent] = {}
    other = listings[path.parent].get(path.name.lower())
    return f" ({other!r} exists: the letter case differs)" if other else ""


def _judge_bad_images(bad: dict[int, str], misnamed: int, num_images: int, fix: bool,
                      max_fraction: float, report: DatasetReport) -> dict[int, str]:
    """The bad files to drop (each listed): all of them within the budget, else none and a fatal
    problem. ``misnamed``: missing files whose message has a hint about the name."""
    allowed = max(1, math.floor(max_fraction * num_images)) if fix and max_fraction > 0 else 0
    missing = sum(_NOT_FOUND in msg for msg in bad.values())
    if len(bad) <= allowed:
        for msg in bad.values():
            report.add_fix(FIX_BAD_IMAGE, msg, examples=MAX_LISTED)
        return bad
    hint = ""
    if misnamed:
        hint = (f" The names of {_count(misnamed, 'missing file')} look wrong: see the hint "
                "after each.")
    elif missing == num_images:
        hint = f" None of the files exists: is {report.image_dir} the right image folder?"
    elif missing > len(bad) / 2:
        hint = " Most are missing: was the image archive fully extracted?"
    report.fatal.append(
        f"{len(bad)} of {num_images} image files are missing or unreadable, more than "
        f"{allowed} (max_decode_failures={max_fraction:g}{'' if fix else ', fix=False'})."
        f"{hint} Restore or re-download them, or remove these images from the JSON; the first: "
        + "; ".join(list(bad.values())[:MAX_LISTED]))
    return {}


# ---------------------------------------------------------------------------- check cache

CACHE_VERSION = 1


def file_stamp(path: Path) -> list[int] | None:
    """[size in bytes, modification time in ns] of a file (a list, as JSON reads it back), None
    if it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file renamed over ``path``: no reader sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_key(ann_file: Path, image_dir: Path, max_pixels: int | None) -> dict[str, Any]:
    """What a check cache is valid for: the annotation file as it is now (path, size, time),
    the image folder and the size limit."""
    return {"version": CACHE_VERSION, "annotations": str(ann_file.resolve()),
            "annotations_stamp": file_stamp(ann_file) or [],
            "image_dir": str(image_dir.resolve()),
            "max_image_pixels": max_pixels}


def _read_cache(cache: Path, key: dict[str, Any], stamps: dict[str, list[int] | None],
                report: DatasetReport) -> dict[str, _Probe]:
    """The cached probes of the files whose size and modification time are unchanged; the
    whole cache is unused when it was made for another annotation file (or an earlier version
    of it), image folder or size limit. ``report.cache_note`` says which."""
    if not cache.is_file():
        report.cache_note = f"no check cache yet; writing {cache}"
        return {}
    try:
        data = json.loads(cache.read_bytes())
        found, entries = data["key"], data["files"]
        if found != key:
            changed = [name for name, value in key.items() if found.get(name) != value]
            report.cache_note = (f"check cache {cache} not used: made for another "
                                 f"{' / '.join(changed)} (the annotation file changed, or another "
                                 "folder or limit); rewriting it")
            return {}
        # _make raises unless the entry has every field.
        cached = {name: _Probe._make(entries[name][2:]) for name, stamp in stamps.items()
                  if stamp is not None and name in entries and entries[name][:2] == stamp}
    # Valid JSON that is not a cache's (a list, a wrong entry) raises the last three.
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        report.cache_note = (f"check cache {cache} unreadable ({type(err).__name__}: {err}); "
                             "rewriting it")
        return {}
    report.cache_note = f"check cache {cache}"
    return cached


def _write_cache(cache: Path, key: dict[str, Any], stamps: dict[str, list[int] | None],
                 probes: dict[str, _Probe], report: DatasetReport) -> None:
    """Write the probes of the files that exist, with the stamps taken before they were decoded
    (a file changed during the check is decoded again next time)."""
    entries = {name: [*stamps[name], *probe] for name, probe in probes.items()
               if stamps.get(name) is not None and probe.error != _NOT_FOUND}
    try:
        write_atomic(cache, json.dumps({"key": key, "files": entries}).encode())
    except OSError as err:
        report.warnings.append(f"could not write the check cache {cache} ({err}); the next start "
                               "decodes every image again")


# ---------------------------------------------------------------------------- entry point


def check_dataset(image_dir: str | Path, ann_file: str | Path, fix: bool = True,
                  check_images: bool = True, *, max_bad_image_fraction: float = 0.01,
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                  shard: ShardedCheck | None = None,
                  cache: str | Path | None = None, split: str | None = None,
                  evaluation: bool = False, decode_note: str = NO_IMAGES_NOTE) -> DatasetReport:
    """Check a COCO-format dataset (the module docstring says what is fatal and what is fixed).

    ``check_images=False``: files are only checked to exist, not decoded or measured.
    ``split`` ("train", "val"): named in messages about the config keys (``data.val.images``).
    ``evaluation``: the split is scored as written, not trained on (the messages say so).
    ``max_bad_image_fraction`` (``train.max_decode_failures``): the share of image files that may
    be missing/unreadable and dropped; one is always tolerated unless it is 0. ``shard``: see
    ``ShardedCheck``. ``cache``: a JSON file of each image's decode result (module docstring).
    Rank 0 says before decoding how many files, where from and where the results go (ended by
    ``decode_note``), then every ``PROGRESS_INTERVAL`` seconds how far it is.
    Never raises for bad data: call ``raise_if_fatal()`` on the report.
    """
    start = time.perf_counter()
    image_dir, ann_file = Path(image_dir), Path(ann_file)
    cache = Path(cache) if cache is not None else None
    shard = shard or SINGLE_PROCESS
    report = DatasetReport(ann_file=ann_file, image_dir=image_dir, evaluation=evaluation)
    data = _load_json(ann_file, report, split)
    problems, bad = structure_problems(data, ann_file) if not report.fatal else ([], None)
    report.fatal.extend(problems)
    if bad is None:
        report.seconds = time.perf_counter() - start
        return report
    report.source = data
    report.num_images, report.num_annotations = len(data["images"]), len(data["annotations"])

    images, anns = _check_references(data, bad, ann_file, report)
    if not images and not report.fatal:
        report.fatal.append(f"{ann_file}: 'images' is empty; there is nothing to train on")

    drop: dict[int, str] = {}
    raw_orientation: set[int] = set()
    if not image_dir.is_dir():
        report.fatal.append(f"image directory {image_dir} not found{_tried(image_dir)}; check "
                            f"{_config_key(split, 'images')}")
    else:
        files = sorted({im["file_name"] for im in images.values()})
        probes = _probe_files(files, check_images, max_image_pixels, report, shard, cache,
                              decode_note)
        drop, raw_orientation = _check_files(images, probes, fix, max_bad_image_fraction, report)
    dropped_anns = [a for a in anns if a["image_id"] in drop]
    if dropped_anns:
        ids = "id" if len(dropped_anns) == 1 else "ids"
        report.add_fix(FIX_BAD_IMAGE_ANNS, f"{ids} {_ids(a['id'] for a in dropped_anns)}",
                       count=len(dropped_anns))
    # Boxes are judged against the recorded size, which is the frame of the decoded pixels for
    # every image that passed (un-rotated decoding keeps the recorded frame too).
    anns, scored = _check_boxes([a for a in anns if a["image_id"] not in drop], images, fix,
                                ann_file, report)

    if not report.fatal:
        if evaluation and not scored:
            report.warnings.append("no boxes to score against (crowd boxes aside): AP cannot be "
                                   "computed, and evaluation reports -1; give the val split its "
                                   "annotations")
        elif not evaluation and not anns:
            report.warnings.append("no usable annotations remain: a training split needs boxes")
        report.annotations = {
            **data,  # keeps info / licenses, which pycocotools and evaluation may read
            "images": [im for im in data["images"] if im["id"] not in drop],
            "annotations": anns,
        }
        report.kept = (len(report.annotations["images"]), len(anns))
        report.raw_orientation_ids = frozenset(raw_orientation)
        report.unreadable = drop
    report.seconds = time.perf_counter() - start
    return report
