"""The compact dataset index (gfldet.data.index) and the dataset check's cache (gfldet.data.checks).

The reference below is the per-object code the index replaced: pycocotools' COCO index and one
Python loop per image. The index must give the same samples and targets, bit for bit, after the
same seeded augmentation.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import checked_dataset
from PIL import Image
from pycocotools.coco import COCO

from gfldet.data import build_transforms, generate_synthetic_coco
from gfldet.data.checks import check_dataset
from gfldet.data.coco import CocoDetection
from gfldet.data.images import load_image_rgb
from gfldet.data.index import clip_boxes


def reference_records(
    coco_dict: dict, raw_orientation_ids=frozenset(), min_size: int | None = 32
) -> list[dict]:
    """Per-image records exactly as the per-object implementation built them."""
    coco = COCO()
    coco.dataset = coco_dict
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    cat_id_to_label = {c: i for i, c in enumerate(sorted(int(c) for c in coco.getCatIds()))}
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        boxes, labels = [], []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0) or ann.get("ignore", 0):
                continue
            label = cat_id_to_label.get(int(ann["category_id"]))
            if label is None:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.append((x, y, x + w, y + h))
            labels.append(label)
        kept_boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        keep = clip_boxes(kept_boxes, width, height)
        kept_boxes, kept_labels = kept_boxes[keep], np.array(labels, dtype=np.int64)[keep]
        if min_size is not None and (min(height, width) < min_size or len(kept_boxes) == 0):
            continue
        records.append({"image_id": image_id, "file_name": info["file_name"], "height": height,
                        "width": width, "boxes": kept_boxes, "labels": kept_labels,
                        "apply_exif": image_id not in raw_orientation_ids})
    return records


def reference_sample(
    image_dir: Path, record: dict, transform, seed: int
) -> tuple[torch.Tensor, dict]:
    image = load_image_rgb(image_dir / record["file_name"], apply_exif=record["apply_exif"])
    transform.set_random_seed(seed)
    out = transform(image=image, bboxes=record["boxes"].copy(), labels=record["labels"].copy())
    return torch.as_tensor(out["image"]), {
        "boxes": torch.from_numpy(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)),
        "labels": torch.from_numpy(np.asarray(out["labels"], dtype=np.int64).reshape(-1))}


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> dict[str, Path]:
    """A synthetic split made awkward: images listed out of id order, shuffled annotations,
    non-contiguous category ids, crowd and ignored boxes, boxes partly and wholly outside their
    image, degenerate and sub-pixel boxes, an image without annotations, one below min_size,
    and a non-ASCII file name."""
    root = tmp_path_factory.mktemp("awkward")
    paths = generate_synthetic_coco(root, num_train=24, num_val=2, image_size=(96, 128), seed=11,
                                    num_workers=1)
    data = json.loads(Path(paths["train_ann"]).read_text())
    rng = np.random.default_rng(0)
    cat_map = {c["id"]: 10 * c["id"] + 3 for c in data["categories"]}
    for c in data["categories"]:
        c["id"] = cat_map[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = cat_map[a["category_id"]]
    images = data["images"]
    first, second, third = images[0], images[1], images[2]
    renamed = "bild_ä_1.png"
    os.rename(Path(paths["train_images"]) / first["file_name"],
              Path(paths["train_images"]) / renamed)
    first["file_name"] = renamed
    next_id = max(a["id"] for a in data["annotations"]) + 1
    cat = data["categories"][0]["id"]
    extra = [
        {"bbox": [5.3, 7.1, 20.25, 11.5], "iscrowd": 1},
        {"bbox": [5.0, 7.0, 20.0, 11.0], "ignore": 1},
        {"bbox": [-6.7, -3.2, 30.1, 22.9]},  # partly outside
        {"bbox": [first["width"] - 4.5, 10.0, 40.0, 12.0]},  # partly outside, right edge
        {"bbox": [first["width"] + 5.0, 3.0, 10.0, 10.0]},  # wholly outside
        {"bbox": [12.0, 12.0, 0.0, 5.0]},  # zero width
        {"bbox": [12.0, 12.0, 0.6, 5.0]},  # under 1 px
        {"bbox": [first["width"] - 0.5, 12.0, 3.0, 5.0]},  # under 1 px once clipped
    ]
    for a in extra:
        data["annotations"].append({"id": next_id, "image_id": first["id"], "category_id": cat,
                                    "area": 1.0, "iscrowd": 0, **a})
        next_id += 1
    # Only crowd boxes: left out of training with its reason.
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != second["id"]]
    data["annotations"].append({"id": next_id, "image_id": second["id"], "category_id": cat,
                                "area": 1.0, "bbox": [1.0, 1.0, 30.0, 30.0], "iscrowd": 1})
    # No annotations at all.
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != third["id"]]
    # A small image (below data.min_size=32).
    small = Path(paths["train_images"]) / "small.png"
    Image.new("RGB", (40, 24), (90, 30, 200)).save(small)
    data["images"].append({"id": 999, "file_name": "small.png", "width": 40, "height": 24})
    data["annotations"].append({"id": next_id + 1, "image_id": 999, "category_id": cat, "area": 1.0,
                                "bbox": [2.0, 2.0, 10.0, 10.0], "iscrowd": 0})
    data["images"] = [data["images"][i] for i in rng.permutation(len(data["images"]))]
    data["annotations"] = [data["annotations"][i]
                           for i in rng.permutation(len(data["annotations"]))]
    ann_file = root / "awkward.json"
    ann_file.write_text(json.dumps(data))
    return {"images": Path(paths["train_images"]), "ann": ann_file}


@pytest.mark.parametrize("check", [False, True], ids=["as_read", "checked_and_fixed"])
def test_index_gives_the_reference_samples_bit_for_bit(awkward, check: bool) -> None:
    transform = build_transforms(train=True, short_side=(80, 112), max_size=160, flip_prob=0.5)
    ds = (checked_dataset(awkward["images"], awkward["ann"], transform=transform) if check
          else CocoDetection(awkward["images"], awkward["ann"], transform))
    data = json.loads(awkward["ann"].read_text())
    if check:  # training reads the checked data, with its boxes clipped in the JSON's own terms
        data = check_dataset(awkward["images"], awkward["ann"], fix=True).annotations
    reference = reference_records(data)
    assert len(ds) == len(reference) > 10
    assert ds.image_ids.tolist() == [r["image_id"] for r in reference]
    assert ds.aspect_ratios.tolist() == [r["width"] / r["height"] for r in reference]
    assert ds.class_names == [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    reasons = "\n".join(ds.left_out)
    assert ("no annotations" in reasons and "crowd/ignored" in reasons
            and "below data.min_size=32" in reasons)
    for i, ref in enumerate(reference):
        boxes, labels = ds.get_annotations(i)
        assert boxes.dtype == np.float32 and boxes.tobytes() == ref["boxes"].tobytes()
        assert labels.dtype == np.int64 and labels.tobytes() == ref["labels"].tobytes()
        assert ds.index[i].file_name == ref["file_name"]
        for seed in (0, 7):
            image, target = ds[_seeded(i, seed)]
            ref_image, ref_target = reference_sample(awkward["images"], ref, transform, seed)
            assert torch.equal(image, ref_image)
            assert target["boxes"].numpy().tobytes() == ref_target["boxes"].numpy().tobytes()
            assert torch.equal(target["labels"], ref_target["labels"])
            assert target["image_id"] == ref["image_id"] and type(target["image_id"]) is int
    # The clipped box of the first image really is in the index (the case is not vacuous).
    first = next(i for i, r in enumerate(reference) if r["file_name"] == "bild_ä_1.png")
    assert (ds.get_annotations(first)[0][:, :2] == 0).any()


def _seeded(i: int, seed: int):
    from gfldet.data import SeededIndex

    return SeededIndex(i, seed)


def test_a_returned_target_does_not_alias_the_index(awkward) -> None:
    ds = CocoDetection(awkward["images"], awkward["ann"], None)
    before = ds.index.boxes.copy()
    _, target = ds[0]
    target["boxes"] += 1000.0
    boxes, _ = ds.get_annotations(0)
    boxes += 1000.0
    assert np.array_equal(ds.index.boxes, before)


def _objects_reachable(root: object) -> int:
    """GC-tracked objects reachable from `root` (its transform and modules excluded)."""
    seen, stack = set(), [o for o in gc.get_referents(root.__dict__) if o is not root.transform]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not gc.is_tracked(obj) or isinstance(obj, type | type(os)):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def test_dataset_keeps_no_python_object_per_image_or_box(tmp_path: Path) -> None:
    counts = {}
    for n in (8, 64):
        paths = generate_synthetic_coco(tmp_path / str(n), num_train=n, num_val=1,
                                        image_size=(64, 64), seed=1, num_workers=1)
        ds = checked_dataset(paths["train_images"], paths["train_ann"], min_size=0)
        assert len(ds) == n
        counts[n] = _objects_reachable(ds)
    assert counts[64] == counts[8], counts


# ------------------------------------------------------------------ the check cache


@pytest.fixture()
def split(tmp_path: Path, tiny_coco) -> dict[str, Path]:
    shutil.copytree(tiny_coco["train_images"], tmp_path / "images")
    shutil.copy(tiny_coco["train_ann"], tmp_path / "ann.json")
    return {"images": tmp_path / "images", "ann": tmp_path / "ann.json",
            "cache": tmp_path / "run" / "train.json"}


def _check(split) -> tuple:
    report = check_dataset(split["images"], split["ann"], cache=split["cache"])
    assert report.ok, report.summary()
    return report.images_decoded, report.images_from_cache


def test_cache_decodes_only_what_changed(split, monkeypatch) -> None:
    files = sorted(p.name for p in split["images"].iterdir())
    n = len(files)
    assert _check(split) == (n, 0) and split["cache"].is_file()
    with monkeypatch.context() as m:  # a witness: the cached check opens no image
        m.setattr("gfldet.data.checks.open_image",
                  lambda *a, **k: pytest.fail("an image was opened"))
        assert _check(split) == (0, n)
    # A rewritten image (same pixels, new modification time) and a changed one are decoded again.
    a, b = split["images"] / files[0], split["images"] / files[1]
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    img = Image.open(b).convert("RGB")
    (img.resize((img.width, img.height)).save(b, quality=50) if b.suffix == ".jpg"
     else img.rotate(180).save(b))
    assert _check(split) == (2, n - 2)
    assert _check(split) == (0, n)


def test_cache_is_not_used_for_a_changed_annotation_file(split) -> None:
    n = _check(split)[0]
    data = json.loads(split["ann"].read_text())
    data["annotations"] = data["annotations"][:-1]
    split["ann"].write_text(json.dumps(data))
    report = check_dataset(split["images"], split["ann"], cache=split["cache"])
    assert (report.images_decoded, report.images_from_cache) == (n, 0)
    assert "not used" in report.cache_note and "annotations_stamp" in report.cache_note
    assert _check(split) == (0, n)


def test_cache_results_equal_a_full_decode(split) -> None:
    """A broken file found by the first check is still reported from the cache, and the report
    from the cache equals the report of a full decode."""
    victim = sorted(split["images"].iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    first = check_dataset(split["images"], split["ann"], cache=split["cache"],
                          max_bad_image_fraction=0.2)
    cached = check_dataset(split["images"], split["ann"], cache=split["cache"],
                           max_bad_image_fraction=0.2)
    full = check_dataset(split["images"], split["ann"], max_bad_image_fraction=0.2)
    assert cached.images_decoded == 0 and full.images_from_cache == 0
    assert cached.unreadable == first.unreadable == full.unreadable and len(full.unreadable) == 1
    assert cached.annotations == full.annotations and cached.fixed == full.fixed


def test_an_unreadable_cache_is_said_and_rewritten(split) -> None:
    n = _check(split)[0]
    split["cache"].write_text("{not json")
    report = check_dataset(split["images"], split["ann"], cache=split["cache"])
    assert report.images_decoded == n and "unreadable" in report.cache_note
    assert _check(split) == (0, n)


# --------------------------------------------------------------- the checked index beside the cache


def _checked(split, **options) -> CocoDetection:
    return checked_dataset(split["images"], split["ann"], cache=split["cache"], **options)


def _same_split(a: CocoDetection, b: CocoDetection) -> bool:
    return (all(np.array_equal(getattr(a.index, f), getattr(b.index, f))
                for f in a.index.__dataclass_fields__)
            and a.left_out == b.left_out and a.class_names == b.class_names
            and a.label_to_cat_id == b.label_to_cat_id
            and a.num_images_in_file == b.num_images_in_file
            and a.check_report.fixed == b.check_report.fixed
            and a.check_report.warnings == b.check_report.warnings
            and a.check_report.notes == b.check_report.notes
            and a.check_report.evaluation == b.check_report.evaluation)


def test_an_unchanged_split_loads_its_checked_index_without_reading_the_json(
    split, monkeypatch
) -> None:
    data = json.loads(split["ann"].read_text())
    data["annotations"][0]["bbox"][0] = -3.0  # a fix (clipped): the report has something to keep
    data["annotations"][1]["iscrowd"] = 1  # and a note
    split["ann"].write_text(json.dumps(data))
    first = _checked(split)
    assert first.check_report.fixed and (split["cache"].parent / "train.index.npz").is_file()
    assert first.check_report.notes[0].startswith("crowd boxes (iscrowd: 1): 1 of ")
    with monkeypatch.context() as m:  # witnesses: neither the check nor the JSON parser runs
        m.setattr("gfldet.data.checked_split.check_dataset",
                  lambda *a, **k: pytest.fail("checked again"))
        m.setattr("gfldet.data.checked_split.index_split",
                  lambda *a, **k: pytest.fail("indexed again"))
        again = _checked(split)
    assert _same_split(first, again)
    assert ("checked index" in again.check_report.summary()
            and again.check_report.images_decoded == 0)
    assert [again[i][1]["boxes"].tolist() for i in range(len(again))] == [
        first[i][1]["boxes"].tolist() for i in range(len(first))
    ]


@pytest.mark.parametrize("change", ["image", "annotations", "option"])
def test_a_change_checks_the_split_again(split, change: str) -> None:
    first = _checked(split)
    options = {}
    if change == "image":
        image = sorted(split["images"].iterdir())[0]
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    elif change == "annotations":
        data = json.loads(split["ann"].read_text())
        data["annotations"] = data["annotations"][1:]
        split["ann"].write_text(json.dumps(data))
    else:
        options = {"min_size": 140}
    again = _checked(split, **options)
    decoded = again.check_report.images_decoded
    assert decoded == {"image": 1, "annotations": len(first), "option": 0}[change]
    assert "checked index" not in again.check_report.summary()
    if change == "option":
        assert len(again) < len(first)  # images below 140 px left out now
    else:
        assert _checked(split).check_report.images_decoded == 0  # and stored again


def test_a_cache_of_valid_json_but_wrong_entries_is_said_and_rewritten(split) -> None:
    n = _check(split)[0]
    data = json.loads(split["cache"].read_text())
    data["files"] = {name: 5 for name in data["files"]}  # not [size, mtime, w, h, ...]
    split["cache"].write_text(json.dumps(data))
    report = check_dataset(split["images"], split["ann"], cache=split["cache"])
    assert report.images_decoded == n and "unreadable" in report.cache_note
    assert _check(split) == (0, n)
