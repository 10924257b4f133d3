"""Tests for the synthetic COCO shapes generator."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gfldet.data import (
    CocoDetection,
    build_transforms,
    ensure_synthetic_coco,
    generate_synthetic_coco,
)
from gfldet.data.synthetic import CATEGORIES, SynthParams, _rasterize, _Scene, main, render_image

SMALL = {"num_train": 8, "num_val": 3, "image_size": (96, 144), "num_workers": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_synthetic_coco(tmp_path_factory.mktemp("a"), seed=0, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic_for_same_seed(small: dict[str, Path], tmp_path: Path) -> None:
    again = generate_synthetic_coco(tmp_path / "b", seed=0, **SMALL)
    assert _files(small["root"]) == _files(again["root"])  # JSON and image bytes
    other = generate_synthetic_coco(tmp_path / "c", seed=1, **SMALL)
    assert other["train_ann"].read_bytes() != small["train_ann"].read_bytes()


def test_worker_count_does_not_change_output(tmp_path: Path) -> None:
    kwargs = {
        "num_train": 64,
        "num_val": 0,
        "image_size": (64, 80),
        "seed": 4,
    }  # 64 -> process pool path
    serial = generate_synthetic_coco(tmp_path / "serial", num_workers=1, **kwargs)
    pooled = generate_synthetic_coco(tmp_path / "pooled", num_workers=2, **kwargs)
    assert _files(serial["root"]) == _files(pooled["root"])


def test_annotations_valid_and_inside_images(small: dict[str, Path]) -> None:
    for split in ("train", "val"):
        data = json.loads(small[f"{split}_ann"].read_text())
        cat_ids = [c["id"] for c in data["categories"]]
        assert cat_ids == [cid for cid, _ in CATEGORIES]
        assert cat_ids != list(range(len(cat_ids)))  # not 0..C-1: the id mapping gets exercised
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        for im in data["images"]:
            assert 96 <= im["width"] <= 144 and 96 <= im["height"] <= 144
            with Image.open(small[f"{split}_images"] / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) and img.mode == "RGB"
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert x >= 0 and y >= 0 and w >= 2 and h >= 2
            assert x + w <= width and y + h <= height
            assert 0 < ann["area"] <= w * h
            assert ann["iscrowd"] == 0 and ann["category_id"] in cat_ids
        per_image = np.bincount(
            [a["image_id"] for a in data["annotations"]], minlength=len(sizes) + 1
        )[1:]
        assert per_image.max() <= 10


def test_boxes_are_tight_and_occlusion_limited() -> None:
    scene = _Scene(np.zeros((64, 64, 3), np.float32))
    square = np.array([[10, 20], [30, 20], [30, 40], [10, 40]], np.float64)
    raster = _rasterize([square])
    total = int((raster.alpha >= 128).sum())
    assert scene.can_cover(raster, total)
    scene.draw(raster, np.full(3, 255, np.float32), total)
    assert scene.boxes() == [([10, 20, 20, 20], 400)]  # exactly the drawn pixels
    assert scene.canvas[20:40, 10:30].min() > 250 and scene.canvas[:, :10].max() == 0

    # A later object hiding > 60 % of the square is refused; one hiding its right half is fine
    # and the square's box shrinks to its visible part.
    big = _rasterize([np.array([[5, 15], [27, 15], [27, 45], [5, 45]], np.float64)])
    assert not scene.can_cover(big, int((big.alpha >= 128).sum()))
    half = _rasterize([np.array([[20, 10], [50, 10], [50, 50], [20, 50]], np.float64)])
    assert scene.can_cover(half, int((half.alpha >= 128).sum()))
    scene.draw(half, np.full(3, 128, np.float32), int((half.alpha >= 128).sum()))
    assert scene.boxes()[0] == ([10, 20, 10, 20], 200)


def test_render_image_annotations_in_bounds() -> None:
    image, anns = render_image(np.random.default_rng(123), 128, 100, SynthParams())
    assert image.shape == (128, 100, 3) and image.dtype == np.uint8 and anns
    for ann in anns:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and x + w <= 100 and y >= 0 and y + h <= 128 and 0 < ann["area"] <= w * h


def test_loads_through_coco_detection(small: dict[str, Path]) -> None:
    ds = CocoDetection(
        small["train_images"], small["train_ann"], build_transforms(True, (96, 128), 200, 0.5)
    )
    assert ds.num_classes == len(CATEGORIES)
    assert ds.label_to_cat_id == [cid for cid, _ in CATEGORIES]
    assert ds.class_names == [name for _, name in CATEGORIES]
    image, target = ds[0]
    assert image.shape[0] == 3 and target["boxes"].shape[1] == 4
    assert int(target["labels"].max()) < ds.num_classes
    val = CocoDetection(small["val_images"], small["val_ann"], None, filter_empty=False)
    assert len(val) == SMALL["num_val"]


def test_ensure_generates_once_and_regenerates_on_change(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    params = {k: v for k, v in SMALL.items() if k != "num_workers"}
    paths = ensure_synthetic_coco(out, **params)
    stamp = paths["train_ann"].stat().st_mtime_ns
    assert (
        ensure_synthetic_coco(out, **params)["train_ann"].stat().st_mtime_ns == stamp
    )  # up to date
    changed = ensure_synthetic_coco(out, **{**params, "num_train": 4})
    data = json.loads(changed["train_ann"].read_text())
    assert len(data["images"]) == 4
    assert (out / "keep.txt").read_text() == "not ours"  # nothing else touched
    (out / "train" / "000000.jpg").unlink()  # incomplete dataset -> regenerated
    ensure_synthetic_coco(out, **{**params, "num_train": 4})
    assert (out / "train" / "000000.jpg").is_file()
    with pytest.raises(TypeError):
        ensure_synthetic_coco(out, bogus=1)
    with pytest.raises(TypeError, match="generator_version"):  # the code's, not a parameter
        ensure_synthetic_coco(out, generator_version=0)


def test_a_caller_waiting_for_the_generating_process_says_it_is_generated(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Under torchrun the rank that takes the lock and generates may not be rank 0, the one that
    logs: the waiting callers say it too, while they wait (trial E, finding 5)."""
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "ds"
    out.mkdir()
    params = {k: v for k, v in SMALL.items() if k != "num_workers"}
    caplog.set_level(logging.INFO, logger="gfldet")
    with open(out / ".synthetic.lock", "w") as lock:  # another rank, generating
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=ensure_synthetic_coco, args=(out,), kwargs=params)
        waiting.start()
        deadline = time.monotonic() + 20
        while "generating the synthetic" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"generating the synthetic demo dataset into {out} (8 train / 3 val" in caplog.text
        assert waiting.is_alive()  # still waiting for the lock
        generate_synthetic_coco(out, **SMALL)
    waiting.join(60)
    assert not waiting.is_alive() and caplog.text.count("generating the synthetic") == 1
    caplog.clear()
    ensure_synthetic_coco(out, **params)  # complete: no line, no wait
    assert "generating" not in caplog.text


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2", "--seed", "7"]) == 0
    assert "train: 3 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "synthetic_meta.json").read_text())["params"]["seed"] == 7



def test_class_names_of_a_synthetic_config_come_from_its_generated_annotations(
    small: dict[str, Path], tmp_path: Path
) -> None:
    # Inference does not know the generator's classes: it reads them from the dataset's file,
    # as for any COCO-format data, and never generates the dataset to find them.
    from gfldet.config import load_config
    from gfldet.inference import class_names_for

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo_synthetic_cpu.yaml"
    cfg = load_config(demo, [f"data.synthetic.root={small['root']}"])
    assert class_names_for(cfg) == [name for _, name in CATEGORIES]
    original = small["val_ann"].read_bytes()
    data = json.loads(original)
    data["categories"][0]["name"] = "disc"
    small["val_ann"].write_text(json.dumps(data))
    try:
        assert class_names_for(cfg)[0] == "disc"
    finally:
        small["val_ann"].write_bytes(original)
    absent = load_config(demo, [f"data.synthetic.root={tmp_path / 'none'}"])
    assert class_names_for(absent) == [f"class_{i}" for i in range(6)]
    assert not (tmp_path / "none").exists()
