"""Bad data never costs a run: dataset checks, every image form, decode failures while training.

Everything is generated in tmp_path: corrupt files by truncating or overwriting bytes, broken
JSON by writing it so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, checked_dataset, run_in_process
from matplotlib.colors import to_rgba
from PIL import Image, ImageFile

from gfldet.data import CocoDetection, SeededIndex, build_dataloader, build_transforms, checks
from gfldet.data.checked_split import load_checked_split
from gfldet.data.checks import (
    FIX_BAD_IMAGE,
    FIX_BAD_IMAGE_ANNS,
    FIX_CLIPPED,
    FIX_EMPTY_BOX,
    FIX_OUTSIDE,
    FIX_RAW_ORIENTATION,
    DatasetError,
    ShardedCheck,
    check_dataset,
)
from gfldet.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    load_image_rgb,
    pil_to_rgb_array,
    upright_size,
)

CATS = [{"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
TOOL = str(ROOT / "tools" / "check_dataset.py")
BROWSE = str(ROOT / "tools" / "browse_dataset.py")
DEMO = str(ROOT / "configs" / "demo_synthetic_cpu.yaml")

# --------------------------------------------------------------------------- helpers


def _value(image_id: int) -> int:
    """The gray level image ``image_id`` is filled with, so a decoded tensor tells its image."""
    return (image_id * 20) % 250 + 5


def _img(image_id: int, w: int = 64, h: int = 48, name: str | None = None) -> dict:
    return {"id": image_id, "file_name": name or f"{image_id}.png", "width": w, "height": h}


def _ann(ann_id: int, image_id: int, bbox: list, cat: int = 3) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
            "area": 1.0, "iscrowd": 0}


def write_dataset(root: Path, images: list[dict], anns: list[dict],
                  cats: list[dict] | None = None, files: bool = True) -> tuple[Path, Path]:
    """Write ``images`` as PNGs of their recorded size (filled with ``_value(id)``) and the JSON."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    if files:
        for im in images:
            pixels = np.full((im["height"], im["width"], 3), _value(im["id"]), np.uint8)
            Image.fromarray(pixels).save(img_dir / im["file_name"])
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": CATS if cats is None else cats}))
    return img_dir, ann_file


def simple_dataset(root: Path, n: int = 3) -> tuple[Path, Path]:
    images = [_img(i) for i in range(1, n + 1)]
    anns = [_ann(i, i, [4, 4, 20, 16], cat=3 if i % 2 else 7) for i in range(1, n + 1)]
    return write_dataset(root, images, anns)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def overwrite(path: Path, offset: int, length: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + length] = b"\xff" * length
    path.write_bytes(bytes(data))


def noisy_png(path: Path, w: int = 64, h: int = 48, seed: int = 0) -> None:
    """A PNG large enough that cutting it in half loses pixel data."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def exif_jpeg(path: Path, stored_wh: tuple[int, int], orientation: int) -> None:
    w, h = stored_wh
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[: h // 3, : w // 3] = 255  # a white block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def only_fatal(report: Any, needle: str) -> str:
    hits = [f for f in report.fatal if needle in f]
    assert hits, f"no fatal problem mentions {needle!r}: {report.fatal}"
    return hits[0]


# --------------------------------------------------------------------------- the annotation file


def test_clean_dataset_is_usable_and_unchanged(tmp_path: Path) -> None:
    img_dir, ann_file = simple_dataset(tmp_path)
    report = check_dataset(img_dir, ann_file)
    assert report.ok and not report.fixed and not report.warnings
    assert (report.num_images, report.num_annotations, report.images_decoded) == (3, 3, 3)
    assert report.annotations["annotations"] == json.loads(ann_file.read_text())["annotations"]
    assert "result: usable" in report.summary()
    report.raise_if_fatal()  # no-op


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    ann_file = tmp_path / "ann.json"
    ann_file.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    report = check_dataset(tmp_path, ann_file)
    msg = only_fatal(report, "invalid JSON")
    assert "line 3, column 19" in msg and str(ann_file) in msg
    with pytest.raises(DatasetError, match="invalid JSON at line 3"):
        report.raise_if_fatal()


def test_missing_annotation_file_and_top_level_keys(tmp_path: Path) -> None:
    assert "annotation file not found" in check_dataset(tmp_path, tmp_path / "nope.json").fatal[0]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": [], "annotations": {}}))
    msg = only_fatal(check_dataset(tmp_path, ann_file), "'categories' is missing")
    assert "'annotations' must be a list, got dict" in msg
    ann_file.write_text("[1, 2]")
    only_fatal(check_dataset(tmp_path, ann_file), "got a list")
    ann_file.write_text("null")
    only_fatal(check_dataset(tmp_path, ann_file), "got a NoneType")


def test_missing_fields_are_fatal_and_named(tmp_path: Path) -> None:
    images = [_img(1), {"id": 2, "file_name": "2.png", "height": 48}, {"file_name": "3.png"}]
    anns = [
        _ann(1, 1, [1, 1, 5, 5]),
        {"id": 2, "image_id": 1, "category_id": 3},  # no bbox
        _ann(3, 1, [1, 1, 5]),  # 3 numbers
        _ann(4, 1, [1, "2", 5, 5]),  # a string
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]},  # no id
        _ann(6, 1, [1, 1, float("nan"), 5]),
    ]
    img_dir, ann_file = write_dataset(tmp_path, images[:1], anns)
    data = json.loads(ann_file.read_text())
    data["images"] = images
    data["categories"].append({"id": 9})  # no name
    ann_file.write_text(json.dumps(data))
    report = check_dataset(img_dir, ann_file)
    assert "'width' must be a positive integer" in only_fatal(report, "image id 2")
    assert "'id' must be an integer" in only_fatal(report, "images[2]")
    assert "bbox" in only_fatal(report, "(annotation id 2)")
    assert "4 finite numbers" in only_fatal(report, "(annotation id 3)")
    only_fatal(report, "(annotation id 4)")
    assert "'id' must be an integer" in only_fatal(report, "annotations[4]")
    only_fatal(report, "(annotation id 6)")
    assert "'name'" in only_fatal(report, "categories[2]")
    assert report.annotations is None


def test_schema_messages_name_the_record_the_key_and_the_value(tmp_path: Path) -> None:
    # One message per bad record, with its JSON position, its id, each bad key and its value.
    images = [{**_img(1), "license": 4, "coco_url": "http://x"},  # extra keys are COCO's own
              {**_img(2), "width": 64.0},  # an integral float is a size
              {**_img(3), "id": True}, {**_img(4), "height": 0}, {**_img(5), "file_name": ""}, 7]
    anns = [_ann(1, 1, [1, 1, 5, 5]) | {"area": 25, "iscrowd": 0, "segmentation": [[1, 1]]},
            _ann(2, 1, [1, 1, 5, 5]) | {"category_id": "3"},
            _ann(3, 1, [1, 1, 5, float("inf")]) | {"image_id": 1.0}]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1), _img(2)], anns[:1])
    data = json.loads(ann_file.read_text())
    data.update(images=images, annotations=anns)
    ann_file.write_text(json.dumps(data))
    fatal = check_dataset(img_dir, ann_file, check_images=False).fatal
    assert fatal == [
        f"{ann_file}: images[2]: 'id' must be an integer, got true",
        f"{ann_file}: images[3] (image id 4): 'height' must be a positive integer, got 0",
        f"{ann_file}: images[4] (image id 5): 'file_name' must be a non-empty string, got \"\"",
        f"{ann_file}: images[5] must be a JSON object, got 7",
        f"{ann_file}: annotations[1] (annotation id 2): 'category_id' must be an integer, "
        "got \"3\"",
        f"{ann_file}: annotations[2] (annotation id 3): 'image_id' must be an integer, got 1.0; "
        "'bbox' must be [x, y, width, height] with 4 finite numbers, got [1, 1, 5, Infinity]",
    ]


@pytest.mark.parametrize(
    ("bbox", "kind", "kept"),
    [
        ([10, 10, 0, 5], FIX_EMPTY_BOX, None),
        ([10, 10, 5, -3], FIX_EMPTY_BOX, None),
        ([-4, 40, 20, 20], FIX_CLIPPED, [0.0, 40.0, 16.0, 8.0]),  # image is 64 x 48
        ([60, 2, 10, 10], FIX_CLIPPED, [60.0, 2.0, 4.0, 10.0]),
        ([70, 10, 5, 5], FIX_OUTSIDE, None),
        ([-20, -20, 10, 10], FIX_OUTSIDE, None),
    ],
)
def test_box_problems_are_fixed_or_fatal_when_strict(
    tmp_path: Path, bbox: list, kind: str, kept: list | None
) -> None:
    anns = [_ann(1, 1, [1, 1, 10, 10]), _ann(2, 1, bbox)]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], anns)
    report = check_dataset(img_dir, ann_file)
    assert report.ok and report.fixed == {kind: 1}
    assert "annotation id 2 (image id 1" in report.summary()
    boxes = {a["id"]: a["bbox"] for a in report.annotations["annotations"]}
    assert boxes.get(2) == kept and boxes[1] == [1, 1, 10, 10]
    assert json.loads(ann_file.read_text())["annotations"][1]["bbox"] == bbox  # file untouched

    strict = check_dataset(img_dir, ann_file, fix=False)
    assert not strict.fixed and "annotation id 2" in only_fatal(strict, "fix=False")


def test_many_broken_boxes_warn_about_the_box_format(tmp_path: Path) -> None:
    # [x1, y1, x2, y2] read as [x, y, w, h]: most boxes run off the image.
    anns = [_ann(i, 1, [30, 20, 60, 40]) for i in range(1, 5)]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], anns)
    report = check_dataset(img_dir, ann_file)
    assert report.ok and report.fixed[FIX_CLIPPED] == 4
    assert any("[x1, y1, x2, y2]" in w for w in report.warnings)


def test_unknown_category_is_fatal_with_ids(tmp_path: Path, caplog) -> None:
    anns = [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 1, [1, 1, 5, 5], cat=99),
            _ann(3, 1, [2, 2, 5, 5], cat=99)]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], anns)
    report = check_dataset(img_dir, ann_file)
    msg = only_fatal(report, "category_id 99")
    assert "2 annotations (ids 2, 3)" in msg and "ids: 3, 7" in msg
    with pytest.raises(DatasetError, match="category_id 99"):
        report.raise_if_fatal()
    with caplog.at_level(logging.INFO, logger="gfldet"), pytest.raises(DatasetError,
                                                                        match="category_id 99"):
        checked_dataset(img_dir, ann_file)
    # The summary of an unusable split is logged as an error (train.log), not as information.
    fatal = [r for r in caplog.records if "category_id 99" in r.getMessage()]
    assert fatal and all(r.levelno == logging.ERROR for r in fatal)


def test_duplicate_and_orphan_ids_are_fatal(tmp_path: Path) -> None:
    images = [_img(1), _img(2), _img(2, name="2b.png")]
    anns = [_ann(1, 1, [1, 1, 5, 5]), _ann(1, 1, [2, 2, 5, 5]), _ann(2, 42, [1, 1, 5, 5])]
    img_dir, ann_file = write_dataset(tmp_path, images, anns,
                                      cats=[*CATS, {"id": 3, "name": "again"}])
    report = check_dataset(img_dir, ann_file)
    assert "2.png, 2b.png" in only_fatal(report, "image id 2 appears 2 times")
    only_fatal(report, "annotation id 1 appears 2 times")
    assert "ids 2" in only_fatal(report, "image id 42, which is not in images")
    only_fatal(report, "category id 3 appears 2 times")


def test_error_lists_the_first_twenty_and_counts_the_rest(tmp_path: Path) -> None:
    anns = [_ann(i, 1, [1, 1, 5, 5], cat=100 + i) for i in range(1, 26)]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], anns)
    with pytest.raises(DatasetError) as err:
        check_dataset(img_dir, ann_file).raise_if_fatal()
    text = str(err.value)
    assert "25 fatal problems; nothing was trained" in text and "... and 5 more" in text
    assert text.count("category_id 1") == 20


def test_recorded_size_mismatch_is_fatal(tmp_path: Path) -> None:
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], [_ann(1, 1, [1, 1, 5, 5])])
    Image.new("RGB", (32, 24)).save(img_dir / "1.png")  # "resized after annotation"
    report = check_dataset(img_dir, ann_file)
    msg = only_fatal(report, "image id 1")
    assert len(report.fatal) == 1, report.fatal  # reported once
    assert "JSON says 64x48" in msg and "file is 32x24" in msg and "resized" in msg


# --------------------------------------------------------------------------- image files


def test_missing_and_corrupt_images_dropped_within_budget(tmp_path: Path, caplog) -> None:
    images = [_img(i, name=f"{i}.{'jpg' if i == 2 else 'png'}") for i in range(1, 5)]
    anns = [_ann(i, i, [2, 2, 10, 10]) for i in range(1, 5)]
    img_dir, ann_file = write_dataset(tmp_path, images, anns)
    noisy_png(img_dir / "1.png")
    noisy_png(img_dir / "2.jpg")  # noisy: most of the JPEG is entropy-coded data
    truncate(img_dir / "1.png")
    report = check_dataset(img_dir, ann_file, max_bad_image_fraction=0.5)  # 2 of 4 allowed
    assert report.ok and report.fixed[FIX_BAD_IMAGE] == 1 and report.fixed[FIX_BAD_IMAGE_ANNS] == 1
    assert "1.png (image id 1): OSError: image file is truncated" in report.summary()
    assert [im["id"] for im in report.annotations["images"]] == [2, 3, 4]
    assert all(a["image_id"] != 1 for a in report.annotations["annotations"])

    truncate(img_dir / "2.jpg", keep=0.6)  # truncated JPEG
    overwrite(img_dir / "3.png", 0)  # header destroyed
    (img_dir / "4.png").unlink()
    report = check_dataset(img_dir, ann_file, max_bad_image_fraction=0.5)
    msg = only_fatal(report, "4 of 4 image files are missing or unreadable")
    for piece in ("2.jpg (image id 2): OSError: image file is truncated",
                  "3.png (image id 3): UnidentifiedImageError",
                  "4.png' (image id 4): file not found"):  # quoted: whitespace would show
        assert piece in msg
    # Without decoding only the missing file is seen.
    fast = check_dataset(img_dir, ann_file, check_images=False, max_bad_image_fraction=0.5)
    assert fast.ok and fast.fixed[FIX_BAD_IMAGE] == 1 and fast.images_decoded == 0


def test_corrupt_png_data_detected(tmp_path: Path) -> None:
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], [_ann(1, 1, [1, 1, 5, 5])])
    noisy_png(img_dir / "1.png")
    overwrite(img_dir / "1.png", len((img_dir / "1.png").read_bytes()) // 2)  # mid-stream bytes
    report = check_dataset(img_dir, ann_file, max_bad_image_fraction=0.0)  # strict: none allowed
    assert "1.png (image id 1)" in only_fatal(report, "1 of 1 image files")


def test_wrong_image_dir_says_so(tmp_path: Path) -> None:
    img_dir, ann_file = simple_dataset(tmp_path)
    only_fatal(check_dataset(tmp_path / "elsewhere", ann_file), "image directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    only_fatal(check_dataset(empty, ann_file), "None of the files exists")


def test_truncation_detected_even_if_load_truncated_images_was_set(tmp_path: Path) -> None:
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], [_ann(1, 1, [1, 1, 5, 5])])
    noisy_png(img_dir / "1.png")
    truncate(img_dir / "1.png")
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        report = check_dataset(img_dir, ann_file, max_bad_image_fraction=0.0)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    only_fatal(report, "image file is truncated")
    assert any("LOAD_TRUNCATED_IMAGES" in w for w in report.warnings)


def test_very_large_images_allowed_up_to_the_limit(tmp_path: Path) -> None:
    # 10000 x 9000 = 90 MP: above PIL's warning threshold, below gfldet's default limit.
    img_dir, ann_file = write_dataset(tmp_path, [_img(1, 10000, 9000)],
                                      [_ann(1, 1, [1, 1, 50, 50])], files=False)
    Image.new("1", (10000, 9000)).save(img_dir / "1.png")  # 1-bit: a few KB, decodes fast
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        assert check_dataset(img_dir, ann_file).ok
    report = check_dataset(img_dir, ann_file, max_image_pixels=50_000_000)
    msg = only_fatal(report, "exceeds the limit of 50,000,000")
    assert "1.png" in msg and "max_image_pixels" in msg
    with pytest.raises(ImageTooLargeError, match=r"1\.png: 10000x9000"):
        load_image_rgb(img_dir / "1.png", max_pixels=50_000_000)


# --------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_decode_matches_the_check(tmp_path: Path, orientation: int) -> None:
    img_dir, ann_file = write_dataset(tmp_path, [], [], files=False)
    exif_jpeg(img_dir / "r.jpg", (30, 12), orientation)
    w, h = upright_size((30, 12), orientation)
    out = load_image_rgb(img_dir / "r.jpg")
    assert out.shape == (h, w, 3)
    ann_file.write_text(json.dumps({"images": [_img(1, w, h, "r.jpg")],
                                    "annotations": [_ann(1, 1, [0, 0, 5, 5])], "categories": CATS}))
    report = check_dataset(img_dir, ann_file)
    assert report.ok and not report.fixed
    assert any("orientation 2-4" in x for x in report.warnings) == (orientation in (2, 3, 4))
    if orientation == 6:  # rotate 90 degrees clockwise: the stored top-left goes top-right
        assert out[:3, -3:].mean() > 200 and out[:3, :3].mean() < 50


def test_exif_rotation_not_in_json_means_raw_pixels(tmp_path: Path) -> None:
    img_dir, ann_file = write_dataset(tmp_path, [], [], files=False)
    exif_jpeg(img_dir / "r.jpg", (30, 12), 6)
    # Recorded as stored (30 x 12), and a box only valid in that frame.
    ann_file.write_text(json.dumps({"images": [_img(1, 30, 12, "r.jpg")],
                                    "annotations": [_ann(1, 1, [0, 0, 10, 4])],
                                    "categories": CATS}))
    report = check_dataset(img_dir, ann_file)
    assert report.ok and report.fixed == {FIX_RAW_ORIENTATION: 1}
    assert report.raw_orientation_ids == {1}
    assert any("probably made on the stored pixels" in w for w in report.warnings)
    strict = check_dataset(img_dir, ann_file, fix=False)
    assert "un-rotated pixels" in only_fatal(strict, "EXIF orientation 6")

    ds = checked_dataset(img_dir, ann_file, filter_empty=False)
    image, target = ds[0]
    assert image.shape == (3, 12, 30)  # decoded as stored: the boxes stay on their objects
    assert image[:, :4, :10].float().mean() > 200
    assert target["boxes"].tolist() == [[0, 0, 10, 4]]
    with pytest.warns(UserWarning, match="decoded size"):  # check=False: old behaviour
        assert CocoDetection(img_dir, ann_file, None, False)[0][0].shape == (3, 30, 12)


# --------------------------------------------------------------------------- every image mode


def _png16_rgb(path: Path) -> None:
    """A 48-bit RGB PNG, written by hand (PIL cannot write one)."""
    px = np.zeros((2, 3, 3), ">u2")
    px[..., 0] = 65535
    px[0, 0] = [0, 32768, 65535]
    raw = b"".join(b"\x00" + px[i].tobytes() for i in range(2))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", 3, 2, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _write_mode(path_base: Path, mode: str, rgb: np.ndarray) -> Path:
    img = Image.fromarray(rgb)
    if mode == "P+transparency":
        img = img.convert("P")
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode == "I":
        img = Image.fromarray(rgb[..., 0].astype(np.int32) * 257)
    elif mode == "F":
        img = Image.fromarray(rgb[..., 0].astype(np.float32) / 255.0)
    elif mode == "L-jpeg":
        img = img.convert("L")
    elif mode != "RGB":
        img = img.convert(mode)
    ext = {"CMYK": ".jpg", "L-jpeg": ".jpg", "I": ".tif", "F": ".tif"}.get(mode, ".png")
    path = path_base.with_suffix(ext)
    img.save(path, **({"transparency": 0} if mode == "P+transparency" else {}))
    return path


@pytest.mark.parametrize(
    "mode", ["RGB", "L", "L-jpeg", "LA", "RGBA", "P", "P+transparency", "CMYK", "1",
             "I;16", "I", "F"],
)
def test_every_image_mode_decodes_to_rgb_and_passes_the_check(tmp_path: Path, mode: str) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    path = _write_mode(img_dir / "x", mode, rgb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "palette images with transparency" warning
        out = load_image_rgb(path)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if mode in ("L", "L-jpeg", "LA", "1", "I;16", "I", "F"):
        assert (out == out[..., :1]).all()  # gray replicated into three equal channels
    if mode in ("RGBA", "RGB"):
        assert np.array_equal(out, rgb)  # alpha dropped, colour untouched
    if mode in ("I;16", "I", "F"):
        assert np.abs(out[..., 0].astype(int) - rgb[..., 0]).max() <= 1  # rescaled, not clipped
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": [_img(1, 16, 12, path.name)],
                                    "annotations": [_ann(1, 1, [1, 1, 5, 5])], "categories": CATS}))
    assert check_dataset(img_dir, ann_file).ok


def test_16bit_rgb_png_and_in_memory_modes(tmp_path: Path) -> None:
    _png16_rgb(tmp_path / "rgb48.png")
    out = load_image_rgb(tmp_path / "rgb48.png")
    assert out[0, 0].tolist() == [0, 128, 255] and out[1, 2].tolist() == [255, 0, 0]
    # Modes PIL cannot write as PNG but readers hand over (TIFF, big-endian 16-bit, PA).
    arr = np.array([[0, 1000, 65535]], np.uint16)
    for img in (Image.fromarray(arr), Image.fromarray(arr.astype(np.int32)),
                Image.frombytes("I;16B", (3, 1), arr.astype(">u2").tobytes())):
        assert pil_to_rgb_array(img)[0, :, 0].tolist() == [0, 4, 255], img.mode
    rgb = np.random.default_rng(2).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    palette_alpha = Image.fromarray(rgb).convert("P").convert("PA")
    assert np.array_equal(pil_to_rgb_array(palette_alpha),
                          np.asarray(Image.fromarray(rgb).convert("P").convert("RGB")))


# -------------------------------------------------------------------------- a checked CocoDetection


def test_check_true_trains_on_the_fixed_annotations(tmp_path: Path) -> None:
    images = [_img(i) for i in range(1, 5)]
    anns = [_ann(1, 1, [-4, 2, 20, 10]), _ann(2, 1, [80, 2, 5, 5]), _ann(3, 2, [2, 2, 0, 5]),
            _ann(4, 2, [2, 2, 8, 8]), _ann(5, 3, [2, 2, 8, 8]), _ann(6, 4, [2, 2, 8, 8])]
    img_dir, ann_file = write_dataset(tmp_path, images, anns)
    (img_dir / "3.png").unlink()
    ds = checked_dataset(img_dir, ann_file, max_decode_failures=0.25)
    assert ds.image_ids.tolist() == [1, 2, 4]  # image 3 is gone, and so is its annotation
    assert ds.check_report.fixed == {FIX_CLIPPED: 1, FIX_OUTSIDE: 1, FIX_EMPTY_BOX: 1,
                                     FIX_BAD_IMAGE: 1, FIX_BAD_IMAGE_ANNS: 1}
    assert ds[0][1]["boxes"].tolist() == [[0, 2, 16, 12]]
    # What training reads is the fixed data: the clipped box, nothing of the dropped ones.
    assert [ds.get_annotations(i)[0].tolist() for i in range(len(ds))] == [
        [[0, 2, 16, 12]], [[2, 2, 10, 10]], [[2, 2, 10, 10]]
    ]
    assert ds.check_report.kept == (3, 3)  # annotations 1 (clipped), 4 and 6
    with pytest.raises(DatasetError, match="1 of 4 image files"):  # budget 0: strict
        checked_dataset(img_dir, ann_file, max_decode_failures=0.0)


# --------------------------------------------------------------------------- what the check says
# (trial B: a user's own COCO file)


def _without(anns: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in a.items() if k not in keys} for a in anns]


def test_annotations_without_area_and_iscrowd_are_noted_and_evaluate(tmp_path: Path) -> None:
    from pycocotools.cocoeval import COCOeval

    anns = _without([_ann(1, 1, [4, 4, 20, 16]), _ann(2, 2, [2, 2, 10, 8], cat=7)],
                    "area", "iscrowd")
    img_dir, ann_file = write_dataset(tmp_path, [_img(1), _img(2)], anns)
    written = ann_file.read_bytes()
    summary = check_dataset(img_dir, ann_file).summary()
    assert ("annotations without 'iscrowd': 2 (0 is used: not a crowd); without 'area': 2 "
            "(evaluation uses the box's width * height") in summary
    # Evaluation's ground truth gets COCO's values; COCOeval raised KeyError without them.
    ds = checked_dataset(img_dir, ann_file, as_written=True, filter_empty=False)
    gt = ds.ground_truth()
    assert [(a["iscrowd"], a["area"]) for a in gt.dataset["annotations"]] == [(0, 320), (0, 80)]
    assert gt.anns[1]["area"] == 320  # the index holds the same dicts
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0} for a in anns]
    coco_eval = COCOeval(gt, gt.loadRes(dets), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert coco_eval.stats[0] == pytest.approx(1.0)
    assert ann_file.read_bytes() == written  # filled in memory only


@pytest.mark.parametrize(("key", "value", "rule"), [
    ("iscrowd", "0", "0 or 1 (an integer"), ("iscrowd", 2, "0 or 1"), ("iscrowd", True, "0 or 1"),
    ("area", -1, "a finite number >= 0"), ("area", "25", "a finite number"),
    ("area", float("inf"), "a finite number"),
])
def test_iscrowd_and_area_when_present_are_validated(tmp_path: Path, key, value, rule) -> None:
    anns = [_ann(1, 1, [4, 4, 20, 16]) | {key: value}]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], anns)
    msg = only_fatal(check_dataset(img_dir, ann_file), "(annotation id 1)")
    assert f"'{key}' must be {rule}" in msg and f"got {json.dumps(value)}" in msg


def test_a_string_iscrowd_is_not_a_crowd_in_an_unchecked_index(tmp_path: Path) -> None:
    anns = [_ann(1, 1, [4, 4, 20, 16]) | {"iscrowd": "0"},
            _ann(2, 1, [2, 2, 8, 8]) | {"iscrowd": 1}]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], anns)
    ds = CocoDetection(img_dir, ann_file)  # indexed as read: no check refuses the "0"
    assert ds.get_annotations(0)[0].tolist() == [[4, 4, 24, 20]]


def test_crowd_boxes_are_counted_and_said(tmp_path: Path) -> None:
    anns = [_ann(1, 1, [4, 4, 20, 16]), _ann(2, 1, [2, 2, 8, 8]) | {"iscrowd": 1},
            _ann(3, 2, [2, 2, 8, 8]) | {"iscrowd": 1}, _ann(4, 2, [4, 4, 20, 16], cat=7)]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1), _img(2)], anns)
    for evaluation in (False, True):
        report = check_dataset(img_dir, ann_file, evaluation=evaluation)
        assert report.notes == [
            "crowd boxes (iscrowd: 1): 2 of 4 annotations; training ignores them and evaluation "
            "treats them as ignore regions (a detection on one is neither a hit nor a false "
            "positive)"]
        assert "notes:\n  - crowd boxes (iscrowd: 1): 2 of 4" in report.summary()


def test_missing_files_are_quoted_with_a_hint_about_the_name(tmp_path: Path) -> None:
    names = ["sub\\1.png", "2.png ", " 3.png", "4.PNG", "5.png", "6.png"]
    images = [_img(i + 1, name=name) for i, name in enumerate(names)]
    img_dir, ann_file = write_dataset(tmp_path, images, [_ann(1, 1, [1, 1, 5, 5])], files=False)
    # On disk: sub/1.png (the backslash meant a folder), 2.png, 3.png, 4.png, 6.png; no 5.png.
    (img_dir / "sub").mkdir()
    for on_disk in ("sub/1.png", "2.png", "3.png", "4.png", "6.png"):
        Image.new("RGB", (64, 48)).save(img_dir / on_disk)
    report = check_dataset(img_dir, ann_file, max_bad_image_fraction=0.9)
    summary = report.summary()
    for name, hint in [
        ("sub\\1.png", " (the name has a backslash: use / in file_name)"),
        ("2.png ", " (the name has leading or trailing whitespace)"),
        (" 3.png", " (the name has leading or trailing whitespace)"),
        ("4.PNG", " ('4.png' exists: the letter case differs)"),
        ("5.png", ""),
    ]:
        image_id = names.index(name) + 1
        assert f"{str(img_dir / name)!r} (image id {image_id}): file not found{hint}" in summary
    assert f"{str(img_dir / '5.png')!r} (image id 5): file not found (" not in summary
    # Only the file that exists was decoded.
    assert (report.images_decoded, report.images_missing) == (1, 5)
    assert "; 1 image files decoded, 5 not found;" in summary
    # Too many: the fatal message points at the names, not at the archive.
    strict = check_dataset(img_dir, ann_file)
    assert "The names of 4 missing files look wrong: see the hint after each" in only_fatal(
        strict, "5 of 6 image files")


def test_a_missing_annotation_file_names_its_key_and_where_it_was_looked_for(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("images").mkdir()
    report = check_dataset("images", "data/val.json", split="val", evaluation=True)
    assert report.fatal == [
        f"data/val.json: annotation file not found (looked for {tmp_path}/data/val.json: a "
        "relative path is taken from the current folder); check data.val.annotations (in the "
        "config, or --cfg-options data.val.annotations=PATH)"]
    _, ann_file = simple_dataset(tmp_path)
    msg = only_fatal(check_dataset("imgs", ann_file, split="train"), "imgs")
    assert f"image directory imgs not found (looked for {tmp_path}/imgs: " in msg
    assert "check data.train.images (in the config, or --cfg-options data.train.images=PATH)" in msg
    # Training says what was not done; an evaluation says its own.
    with pytest.raises(DatasetError) as err:
        report.raise_if_fatal()
    assert "has 1 fatal problem; nothing was trained:" in str(err.value)
    assert str(err.value).endswith("Run tools/check_dataset.py CONFIG for the full report.")
    with pytest.raises(DatasetError) as err:
        checked_dataset("images", "data/val.json", as_written=True, split="val",
                        not_done="nothing was evaluated", advice="Give --cfg-options data.val...")
    assert "has 1 fatal problem; nothing was evaluated:" in str(err.value)
    assert "check data.val.annotations" in str(err.value) and "trained" not in str(err.value)
    assert str(err.value).endswith("Give --cfg-options data.val...")


def test_an_evaluation_split_is_worded_as_scored(tmp_path: Path) -> None:
    img_dir, ann_file = write_dataset(tmp_path, [_img(1), _img(2)], [])
    for evaluation, said, not_said in [
        (True, "no boxes to score against (crowd boxes aside): AP cannot be computed, and "
               "evaluation reports -1", "a training split needs boxes"),
        (False, "no usable annotations remain: a training split needs boxes", "AP"),
    ]:
        summary = check_dataset(img_dir, ann_file, evaluation=evaluation).summary()
        assert said in summary and not_said not in summary

    anns = [_ann(1, 1, [1, 1, 10, 10]), _ann(2, 1, [60, 2, 10, 10]), _ann(3, 2, [2, 2, -4, 5]),
            _ann(4, 2, [1, 1, 10, 10], cat=7)]
    img_dir, ann_file = write_dataset(tmp_path / "b", [_img(1), _img(2)], anns)
    scored = check_dataset(img_dir, ann_file, evaluation=True).summary()
    assert "  - 1 box partly outside the image found, scored as written: annotation id 2" in scored
    assert ("  - 1 box with zero or negative width/height found, scored as written: annotation "
            "id 3") in scored
    assert "clipped" not in scored and "dropped" not in scored
    trained = check_dataset(img_dir, ann_file).summary()
    assert "  - 1 box partly outside the image clipped to it: annotation id 2" in trained


@pytest.mark.parametrize("evaluation", [False, True])
def test_normalised_boxes_get_the_box_format_hint(tmp_path: Path, evaluation: bool) -> None:
    anns = [_ann(i, 1, [0.1 * i, 0.2, 0.3, 0.25]) for i in range(1, 6)]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], anns, cats=CATS[:1])
    report = check_dataset(img_dir, ann_file, evaluation=evaluation)
    assert report.warnings == [
        "5 of 5 boxes are under 2 px wide and high: COCO boxes are [x, y, width, height] in "
        "pixels of the image as listed; if yours are [x1, y1, x2, y2] or normalised (0..1), "
        "convert them"]
    anns[0]["bbox"] = [1, 1, 20, 20]  # one real box among ten: still (nearly) all under 2 px
    anns += [_ann(i, 1, [0.1, 0.2, 0.3, 0.25]) for i in range(6, 11)]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1)], anns, cats=CATS[:1])
    assert "9 of 10 boxes are under 2 px" in check_dataset(img_dir, ann_file).warnings[0]


def test_lists_counts_and_categories_are_worded_right(tmp_path: Path) -> None:
    images = [_img(1), _img(2)]
    anns = [_ann(i, 1, [1, 1, 5, 5]) for i in (1, 2, 3)] + [_ann(4, 2, [1, 1, 5, 5])]
    cats = [*CATS, {"id": 9, "name": "unused"}]
    img_dir, ann_file = write_dataset(tmp_path, images, anns, cats=cats)
    (img_dir / "1.png").unlink()
    report = check_dataset(img_dir, ann_file, max_bad_image_fraction=0.5)
    summary = report.summary()
    # Every id is listed: no "..." after a complete list.
    assert "  - 3 annotations of dropped images removed: ids 1, 2, 3\n" in summary
    assert "  - 1 missing or unreadable image dropped (with its annotations): " in summary
    assert report.warnings == ["2 categories without a box (crowd aside): 7 'c7', 9 'unused'; "
                               "the model cannot learn them"]
    val = check_dataset(img_dir, ann_file, max_bad_image_fraction=0.5, evaluation=True)
    assert "no AP can be computed for them (nan in the per-class table" in val.warnings[0]
    strict = check_dataset(img_dir, ann_file, max_bad_image_fraction=0.0)
    assert "FATAL (1 problem; training would not start)" in strict.summary()
    with pytest.raises(DatasetError, match="has 1 fatal problem; nothing was trained"):
        strict.raise_if_fatal()


def test_tool_warns_when_val_is_the_train_file(tmp_path: Path, capsys) -> None:
    tool = _tool_module()
    good = simple_dataset(tmp_path / "a", n=2)
    other = simple_dataset(tmp_path / "b", n=2)
    assert tool.main(_tool_args(good, good)[2:]) == 0
    out = capsys.readouterr().out
    assert ("warnings (train vs val):\n  - val uses the train annotation file "
            f"({good[1]}): its AP measures images the model was trained on") in out
    assert "all checked splits are usable" in out
    assert tool.main(_tool_args(good, other)[2:]) == 0
    assert "train vs val" not in capsys.readouterr().out


def test_browse_dataset_counts_and_draws_crowd_boxes(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    anns = [_ann(1, 1, [4, 4, 30, 24]), _ann(2, 1, [2, 2, 10, 8]) | {"iscrowd": 1},
            _ann(3, 1, [30, 20, 20, 20]) | {"iscrowd": 1}, _ann(4, 2, [4, 4, 30, 24], cat=7)]
    img_dir, ann_file = write_dataset(tmp_path, [_img(1), _img(2)], anns)
    out = tmp_path / "browse"
    run_in_process(BROWSE, DEMO, "--out", str(out), "--images", "2", "--batches", "0",
                   "--cfg-options", "data.synthetic=null", "model.num_classes=2",
                   f"data.train.images={img_dir}", f"data.train.annotations={ann_file}",
                   "data.train_short_side=[64,64]", "data.test_short_side=64",
                   "data.max_size=96", "data.num_workers=0")
    annotated = json.loads((out / "browse.json").read_text())["annotated"]
    assert [a["title"] for a in annotated] == ["1.png (id 1), as annotated: 1 box + 2 crowd",
                                               "2.png (id 2), as annotated: 1 box"]
    assert annotated[0]["crowd"] == [[2, 2, 12, 10], [30, 20, 50, 40]]
    assert annotated[0]["boxes"] == [[4, 4, 34, 28]] and annotated[1]["crowd"] == []
    # Crowd boxes are drawn dashed in grey, the boxes training uses solid.
    ax = Figure().subplots()
    _load_tool(BROWSE).draw_panel(ax, np.zeros((48, 64, 3), np.uint8), np.array([[4, 4, 34, 28]]),
                                  ["c3"], "t", [([2, 2, 12, 10], "c3")])
    assert [(p.get_linestyle(), p.get_edgecolor()) for p in ax.patches] == [
        ("-", to_rgba("tab:green")), ("--", to_rgba("tab:gray"))]


def _slow_check(monkeypatch, seconds: float = 0.05) -> None:
    """Each decode takes `seconds` and progress comes every 10 ms: a COCO-scale check in small."""
    probe = checks._probe
    monkeypatch.setattr(checks, "_probe", lambda *a: (time.sleep(seconds), probe(*a))[1])
    monkeypatch.setattr(checks, "PROGRESS_INTERVAL", 0.01)


def _check_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("checking images")]


def test_a_long_decode_says_what_it_decodes_then_how_far_it_is(tmp_path: Path, caplog,
                                                               monkeypatch) -> None:
    """COCO's 118k images take minutes to decode: one line first (how many, from where, how to
    skip it), then every PROGRESS_INTERVAL seconds done/total, rate and time left; never a line
    per image, and none at all for a check shorter than the interval (trial E, finding 6)."""
    img_dir, ann_file = simple_dataset(tmp_path, n=12)
    caplog.set_level(logging.INFO, logger="gfldet")
    assert check_dataset(img_dir, ann_file).ok
    assert _check_lines(caplog) == [  # the default interval: no progress line in a short check
        f"checking images: decoding 12 image files in {img_dir}; tools/check_dataset.py "
        "--no-images checks the JSON and that the files exist, without decoding them"]
    caplog.clear()
    _slow_check(monkeypatch)
    assert check_dataset(img_dir, ann_file).ok
    progress = _check_lines(caplog)[1:]
    assert progress, "no progress line"
    for line in progress:
        assert re.fullmatch(r"checking images: \d+ of 12 decoded \(\d+/s(, about 0:00:\d\d "
                            r"left)?\)", line), line


def test_training_s_check_names_its_cache_and_only_rank_0_speaks(tmp_path: Path, caplog,
                                                                monkeypatch) -> None:
    img_dir, ann_file = simple_dataset(tmp_path, n=4)
    cache = tmp_path / "run" / "dataset_check" / "train.json"
    cache.parent.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="gfldet")
    load_checked_split(img_dir, ann_file, cache=cache)
    assert _check_lines(caplog) == [
        f"checking images: decoding 4 image files in {img_dir}; the results go to {cache}, so a "
        "--resume decodes only changed files"]
    caplog.clear()
    load_checked_split(img_dir, ann_file, cache=cache)  # nothing to decode: nothing said
    assert _check_lines(caplog) == []
    _slow_check(monkeypatch, seconds=0.1)
    # Two ranks in one process: each gets its own list twice over, as in a job of two.
    for rank in (1, 0):
        caplog.clear()
        check_dataset(img_dir, ann_file, shard=ShardedCheck(rank, 2, lambda mine: [mine, mine]))
        said = _check_lines(caplog)
        if rank:
            assert said == []
            continue
        assert said[0].endswith(", shared among 2 processes" + checks.NO_IMAGES_NOTE), said[0]
        assert len(said) > 1 and all(" decoded by rank 0, its 1/2 share of 4 (" in line
                                     for line in said[1:]), said


# --------------------------------------------------------------------------- decode failures


def test_decode_failure_is_replaced_logged_and_consistent(tmp_path: Path, caplog) -> None:
    img_dir, ann_file = simple_dataset(tmp_path, n=6)
    ds = CocoDetection(img_dir, ann_file, None, max_decode_failures=0.5)
    truncate(img_dir / "2.png", keep=0.3)  # corrupted after the dataset was built
    with caplog.at_level(logging.WARNING, logger="gfldet"):
        samples = [ds[i] for i in range(len(ds))]  # the run goes on
    image, target = samples[1]
    assert target["image_id"] == 3  # the next image ...
    assert image[0, 0, 0].item() == _value(3)  # ... with its own pixels ...
    assert torch.equal(target["boxes"], samples[2][1]["boxes"])  # ... and its own boxes
    assert target["decode_failed"] == [
        {"image_id": 2, "file": str(img_dir / "2.png"),
         "error": target["decode_failed"][0]["error"]}]
    assert target["decode_failed"][0]["error"]  # the exception type and message
    assert all("decode_failed" not in t for i, (_, t) in enumerate(samples) if i != 1)
    assert "2.png (image id 2)" in caplog.text
    assert (ds.decode_budget.failures, ds.decode_budget.attempts) == (1, 7)
    # Deterministic: the same slot gives the same replacement, with the slot's augmentation seed.
    aug = CocoDetection(img_dir, ann_file, build_transforms(True, (24, 40), 80, 0.5))
    a, ta = aug[SeededIndex(1, 1234)]
    b, tb = aug[SeededIndex(2, 1234)]
    assert ta["image_id"] == tb["image_id"] == 3
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


def test_replacement_prefers_the_same_aspect_group(tmp_path: Path) -> None:
    images = [_img(1), _img(2, w=40, h=70), _img(3), _img(4, w=40, h=70)]
    anns = [_ann(i, i, [2, 2, 10, 10]) for i in range(1, 5)]
    img_dir, ann_file = write_dataset(tmp_path, images, anns)
    (img_dir / "2.png").unlink()
    ds = CocoDetection(img_dir, ann_file, None, max_decode_failures=1.0)
    assert ds[1][1]["image_id"] == 4  # portrait replaced by portrait, skipping landscape 3


def test_too_many_decode_failures_stop_with_the_files(tmp_path: Path) -> None:
    img_dir, ann_file = simple_dataset(tmp_path, n=10)
    ds = CocoDetection(img_dir, ann_file, None)  # default budget: 1 %, at least 5 failures
    for i in (1, 3, 5, 7, 9):
        overwrite(img_dir / f"{i}.png", 0)
    with pytest.raises(DatasetError) as err:
        for i in range(len(ds)):
            ds[i]
    text = str(err.value)
    assert "5 of" in text and "max_decode_failures=0.01" in text
    for i in (1, 3, 5, 7, 9):
        assert f"{i}.png (image id {i})" in text
    assert "tools/check_dataset.py" in text
    strict = CocoDetection(img_dir, ann_file, None, max_decode_failures=0.0)
    with pytest.raises(DatasetError, match="1 of 1 image decodes"):
        strict[0]
    (img_dir / "2.png").unlink()
    # Everything gone (e.g. an unmounted drive) with an unlimited budget: still a clear stop.
    for p in img_dir.iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="still there"):
        CocoDetection(img_dir, ann_file, None, max_decode_failures=1.0)[0]


def test_decode_failures_in_loader_workers(tmp_path: Path) -> None:
    img_dir, ann_file = simple_dataset(tmp_path, n=8)
    ds = CocoDetection(img_dir, ann_file, build_transforms(True, (24, 40), 80, 0.5),
                       max_decode_failures=0.5)
    (img_dir / "4.png").unlink()
    loader = build_dataloader(ds, 2, num_workers=2, train=True, seed=0, distributed=False,
                              size_divisor=32)
    loader.batch_sampler.set_epoch(0)
    targets = [t for _, batch in loader for t in batch]
    assert len(targets) == 8 and 4 not in [t["image_id"] for t in targets]
    failed = [f["image_id"] for t in targets for f in t.get("decode_failed", [])]
    assert failed == [4]  # the main process can count failures across workers


# --------------------------------------------------------------------------- tools/check_dataset.py


def _tool_args(train: tuple[Path, Path], val: tuple[Path, Path], options: tuple[str, ...] = (),
               overrides: tuple[str, ...] = ()) -> list[str]:
    """Command line of the tool on the demo config pointed at (images, annotations) pairs."""
    return [sys.executable, TOOL, DEMO, *options,
            "--cfg-options", "data.synthetic=null", "model.num_classes=2",
            f"data.train.images={train[0]}", f"data.train.annotations={train[1]}",
            f"data.val.images={val[0]}", f"data.val.annotations={val[1]}", *overrides]


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """The tool on a good, a broken and a misconfigured setup, run concurrently (imports are
    slow)."""
    root = tmp_path_factory.mktemp("tool")
    good = simple_dataset(root / "good", n=4)
    bad_images = [_img(1), _img(2)]
    bad = write_dataset(root / "bad", bad_images,
                        [_ann(1, 1, [70, 2, 5, 5]), _ann(2, 2, [1, 1, 5, 5], cat=99)])
    noisy_png(bad[0] / "1.png")
    truncate(bad[0] / "1.png")
    commands = {
        "good": _tool_args(good, good),
        "bad": _tool_args(good, bad),
        "config": _tool_args(good, good, overrides=("data.batch_sise=2",)),
    }
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=ROOT)
             for k, c in commands.items()}
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[key] = subprocess.CompletedProcess(commands[key], proc.returncode, stdout, stderr)
    return out


def test_tool_exit_0_with_summary(tool_runs: dict) -> None:
    run = tool_runs["good"]
    assert run.returncode == 0, run.stdout + run.stderr
    assert "[train] dataset" in run.stdout and "[val] dataset" in run.stdout
    assert "4 images, 4 annotations" in run.stdout and "4 image files decoded" in run.stdout
    assert "all checked splits are usable" in run.stdout


def test_tool_exit_1_lists_fatal_problems(tool_runs: dict) -> None:
    run = tool_runs["bad"]
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FATAL" in run.stdout and "category_id 99" in run.stdout
    assert "1.png (image id 1): OSError: image file is truncated" in run.stdout
    assert "NOT usable" in run.stdout


def test_tool_exit_2_on_bad_config(tool_runs: dict) -> None:
    run = tool_runs["config"]
    assert run.returncode == 2 and "batch_sise" in run.stderr and "batch_size" in run.stderr


def test_tool_says_on_stderr_what_it_decodes_and_that_no_images_skips_it(tool_runs) -> None:
    run = tool_runs["good"]
    said = [line for line in run.stderr.splitlines() if line.startswith("checking images")]
    assert len(said) == 2 and all(  # train and val, the same files here
        "decoding 4 image files in" in line and "tools/check_dataset.py --no-images" in line
        for line in said), run.stderr


def _load_tool(path: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"{Path(path).stem}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool_module() -> Any:
    return _load_tool(TOOL)


def test_tool_no_images_skips_decoding(tmp_path: Path, capsys) -> None:
    tool = _tool_module()
    assert tool.DEFAULT_MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS
    bad = write_dataset(tmp_path, [_img(1), _img(2)],
                        [_ann(1, 1, [70, 2, 5, 5]), _ann(2, 2, [1, 1, 5, 5], cat=99)])
    noisy_png(bad[0] / "1.png")
    truncate(bad[0] / "1.png")
    assert tool.main(_tool_args(bad, bad, options=("--no-images", "--split", "train"))[2:]) == 1
    out = capsys.readouterr().out
    assert "category_id 99" in out  # the JSON is still checked ...
    assert "image files not decoded" in out and "truncated" not in out  # ... without decoding
    assert "[val]" not in out and "1 box wholly outside the image dropped" in out


def test_tool_cross_checks_classes_and_splits(tmp_path: Path, capsys) -> None:
    tool = _tool_module()
    good = simple_dataset(tmp_path / "a", n=2)
    other = write_dataset(tmp_path / "b", [_img(1)], [_ann(1, 1, [1, 1, 5, 5])],
                          cats=[{"id": 3, "name": "c3"}, {"id": 8, "name": "c8"}])
    args = _tool_args(good, other)[2:]
    assert tool.main(args) == 1
    out = capsys.readouterr().out
    assert "train and val categories differ" in out and "(8, 'c8')" in out
    assert tool.main(
        [*_tool_args(good, other, ("--split", "train"), ("model.num_classes=5",))[2:]]
    ) == 1
    assert "set model.num_classes: 2" in capsys.readouterr().out
    assert tool.main([*_tool_args(good, good)[2:], "--split", "train"]) == 0


def test_pil_png_reader_rejects_truncation_by_default() -> None:
    """Guard: the checks rely on PIL raising for truncated data (LOAD_TRUNCATED_IMAGES False)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(
        buf, "PNG"
    )
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(buf.getvalue()[:800])).load()


def test_an_error_with_loader_workers_alive_does_not_hang_the_exit(tmp_path: Path) -> None:
    # Workers ignore SIGTERM (scancel and Ctrl-C must not kill them before the main process's
    # checkpoint); multiprocessing's exit handler ends them with SIGTERM and waited forever when
    # an uncaught error's traceback still held the loader.
    script = tmp_path / "boom.py"
    script.write_text(
        "import torch\n"
        "from gfldet.data import build_dataloader\n"
        "class Images(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 8\n"
        "    def __getitem__(self, i):\n"
        "        return torch.zeros(3, 4, 4, dtype=torch.uint8), {'image_size': (4, 4)}\n"
        "loader = build_dataloader(Images(), 2, 2, train=False, seed=0, distributed=False,\n"
        "                          size_divisor=4)\n"
        "next(iter(loader))\n"
        "raise RuntimeError('the loop failed')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 1 and "RuntimeError: the loop failed" in proc.stderr
