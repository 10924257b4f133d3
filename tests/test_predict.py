"""Detector (the Python one-liner) and tools/predict.py on a folder of generated images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import load_tool, training_checkpoint

from gfldet.config import config_to_dict
from gfldet.data import CocoDetection, build_transforms, collate, normalize_batch
from gfldet.data.synthetic import CATEGORIES
from gfldet.engine.checkpoint import CheckpointError
from gfldet.inference import Detector, draw_detections, split_config_argument, to_rgb_array


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_coco):
    """A tiny checkpoint and a config whose val split is the tiny dataset (for class names)."""
    folder = tmp_path_factory.mktemp("predict")
    cfg = config_to_dict(training_checkpoint(folder / "last.pth", num_classes=len(CATEGORIES)))
    cfg["data"]["val"] = {"images": str(tiny_coco["val_images"]),
                          "annotations": str(tiny_coco["val_ann"])}
    config_path = folder / "tiny.yaml"
    config_path.write_text(json.dumps(cfg))
    return folder, config_path


def test_detector_matches_the_evaluation_pipeline(run, tiny_coco):
    folder, config_path = run
    detector = Detector.from_checkpoint(folder / "last.pth", config=config_path, score_thr=0.2)
    assert detector.class_names == [name for _, name in CATEGORIES]
    assert detector.score_thr == 0.2
    dataset = CocoDetection(tiny_coco["val_images"], tiny_coco["val_ann"],
                            build_transforms(train=False, short_side=128, max_size=192),
                            filter_empty=False)
    paths = [tiny_coco["val_images"] / dataset.index.file_name(i) for i in range(len(dataset))]
    got = detector(paths)
    assert isinstance(got, list) and len(got) == len(paths)
    with torch.no_grad():
        for i, det in enumerate(got):
            images, targets = collate([dataset[i]], size_divisor=detector.model.size_divisor)
            (ref,) = detector.model(normalize_batch(images, [t["image_size"] for t in targets]),
                                    targets)
            assert np.allclose(det["boxes"], ref["boxes"].numpy()) and np.allclose(
                det["scores"], ref["scores"].numpy()
            )
            assert det["class_names"] == [detector.class_names[j] for j in det["labels"]]
            h, w = int(dataset.index.heights[i]), int(dataset.index.widths[i])
            # original pixels: clipped to the original image, not the resized one
            if len(det["boxes"]):
                assert det["boxes"][:, [0, 2]].max() <= w and det["boxes"][:, [1, 3]].max() <= h
    assert sum(len(d["scores"]) for d in got) > 0

    # A path, a PIL image and an RGB array of the same picture give the same detections.
    array = np.asarray(Image.open(paths[0]).convert("RGB"))
    for same in (detector(Image.open(paths[0])), detector(array)):
        assert np.array_equal(same["boxes"], got[0]["boxes"])
    with pytest.raises(ValueError, match="uint8"):
        detector(array.astype(np.float32))


def test_draw_detections_draws_boxes():
    image = np.full((100, 120, 3), 200, np.uint8)
    det = {"boxes": np.array([[10, 20, 60, 80]], np.float32), "scores": np.array([0.9], np.float32),
           "labels": np.array([1]), "class_names": ["square"]}
    drawn = np.asarray(draw_detections(image, det))
    assert drawn.shape == image.shape
    # edge drawn, inside untouched
    assert (drawn[50, 10] != 200).any() and (drawn[50, 35] == 200).all()
    assert (drawn[:20, 10:60] != 200).any()  # the label sits above the box


def test_predict_writes_drawn_images_and_json_for_a_folder(run, tiny_coco, tmp_path, capsys):
    folder, config_path = run
    out = tmp_path / "out"
    code = load_tool("predict").main([str(config_path), str(folder / "last.pth"),
                                      str(tiny_coco["val_images"]),
                                      "--out", str(out), "--score-thr", "0.3"])
    assert code == 0
    sources = sorted(tiny_coco["val_images"].iterdir())
    assert "4 image(s)" in capsys.readouterr().out
    for source in sources:
        drawn, record = out / source.name, json.loads((out / f"{source.stem}.json").read_text())
        with Image.open(source) as original, Image.open(drawn) as result:
            assert result.size == original.size == (record["width"], record["height"])
        assert record["image"] == str(source)
        for d in record["detections"]:
            assert d["score"] > 0.3 and d["class_name"] in {name for _, name in CATEGORIES}
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"]
    assert any(json.loads(p.read_text())["detections"] for p in out.glob("*.json"))

    # A glob works too, and an input matching nothing is a clear error.
    code = load_tool("predict").main([str(config_path), str(folder / "last.pth"),
                                      str(tiny_coco["val_images"] / "*.jpg"),
                                      "--out", str(tmp_path / "glob")])
    assert code == 0 and len(list((tmp_path / "glob").glob("*.json"))) == len(sources)
    assert load_tool("predict").main([str(config_path), str(folder / "last.pth"),
                                      str(tmp_path / "nothing*.png")]) == 2


def test_pil_input_is_made_upright_by_its_exif_orientation_like_a_path(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:5, :10] = 255  # a bright corner shows where the top-left went
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    from_path = to_rgb_array(path)
    with Image.open(path) as pil:
        from_pil = to_rgb_array(pil)
    assert from_path.shape == (40, 20, 3)  # upright: the stored 20x40 turned on its side
    assert np.array_equal(from_pil, from_path)


@pytest.mark.parametrize("override", ["model.num_classes=80", "model.head.reg_max=8"])
def test_a_config_that_does_not_fit_the_weights_says_so_without_training_advice(
    run, tiny_coco, tmp_path, capsys, override
):
    """Finding 7: inference cannot use partly loaded weights, so the error names the mismatch and
    says to drop the override, not to use training's --load-from."""
    folder, _ = run
    checkpoint = folder / "last.pth"
    with pytest.raises(CheckpointError) as exc:
        Detector.from_checkpoint(checkpoint, overrides=[override])
    msg = str(exc.value)
    assert "head.gfl_" in msg and "--load-from" not in msg and "strict=False" not in msg
    assert f"does not describe the model of {checkpoint}" in msg and "drop the override" in msg

    out = tmp_path / "out"
    code = load_tool("predict").main([str(checkpoint), str(tiny_coco["val_images"]), "--out",
                                      str(out), "--cfg-options", override])
    err = capsys.readouterr().err
    assert code == 2 and "drop the override" in err and "--load-from" not in err
    assert "Traceback" not in err and not out.exists()


_RGB = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize(("array", "hint"), [
    (_RGB.astype(np.float32) / 255, "scale to 0..255 and cast to uint8"),
    (_RGB.astype(np.float32), "cast them to uint8"),
    (_RGB.transpose(2, 0, 1).copy(), "transpose it to [H, W, C]"),
    (_RGB[..., 0], "stack it to 3 channels"),
    (np.dstack([_RGB, _RGB[..., :1]]), "drop the alpha channel"),
    (_RGB[None], "pass a list of images"),
])
def test_a_numpy_image_of_another_form_gets_the_hint_that_fits(array, hint):
    """Finding 10: each problem gets its own fix; BGR (undetectable, accepted) is not one."""
    with pytest.raises(ValueError, match="must be uint8 \\[H, W, 3\\] RGB") as exc:
        to_rgb_array(array)
    assert hint in str(exc.value) and str(list(array.shape)) in str(exc.value)
    assert "BGR" not in str(exc.value)
    assert to_rgb_array(_RGB).shape == (40, 60, 3)  # the accepted form, for contrast


@pytest.mark.parametrize("image", [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 0, 3), np.uint8),
                                   Image.new("RGB", (0, 5))])
def test_an_empty_image_is_a_value_error_naming_it(image):
    with pytest.raises(ValueError, match=r"is empty: shape \[.*\] has no pixels"):
        to_rgb_array(image)


def test_detector_on_cuda_without_cuda_is_a_clear_error(run, monkeypatch):
    """Finding 18: the tools' --device check, for the Python API, before the file is read."""
    folder, _ = run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available here; use "
                                         r"device='cpu'"):
        Detector.from_checkpoint(folder / "last.pth", device="cuda")
    with pytest.raises(ValueError, match="'cuda:1'"):
        Detector.from_checkpoint(folder / "nonexistent.pth", device="cuda:1")
    assert Detector.from_checkpoint(folder / "last.pth", device="auto").device.type == "cpu"


def test_predict_takes_several_inputs_as_an_unquoted_glob_gives_them(run, tiny_coco, tmp_path,
                                                                     capsys):
    """Finding 6: every argument after the checkpoint is an INPUT (files, folders, globs), with
    or without a CONFIG first; an image named twice is predicted once."""
    folder, config_path = run
    images = sorted(tiny_coco["val_images"].glob("*.jpg"))
    assert len(images) >= 3
    predict = load_tool("predict")
    two = [str(p) for p in images[:2]]  # what the shell passes for an unquoted glob
    assert predict.main([str(folder / "last.pth"), *two, "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.stem for p in (tmp_path / "a").glob("*.json")) == [p.stem for p in images[:2]]
    assert "2 image(s)" in capsys.readouterr().out

    every = [str(config_path), str(folder / "last.pth"), *two, str(tiny_coco["val_images"])]
    assert predict.main([*every, "--out", str(tmp_path / "b")]) == 0
    assert len(list((tmp_path / "b").glob("*.json"))) == len(images)  # no NAME_1 duplicates
    assert f"{len(images)} image(s)" in capsys.readouterr().out


@pytest.mark.parametrize("misplaced", ["checkpoint_twice", "config_among_inputs"])
def test_predict_refuses_a_checkpoint_or_config_among_the_inputs(run, tiny_coco, tmp_path,
                                                                  capsys, misplaced):
    folder, config_path = run
    checkpoint, image = str(folder / "last.pth"), str(next(tiny_coco["val_images"].glob("*.jpg")))
    extra = checkpoint if misplaced == "checkpoint_twice" else str(config_path)
    with pytest.raises(SystemExit) as exit_info:
        load_tool("predict").main([checkpoint, extra, image, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    kind = "a checkpoint" if misplaced == "checkpoint_twice" else "a YAML config"
    assert exit_info.value.code == 2 and f"{extra} is {kind}, given as an INPUT" in err
    assert "[CONFIG] CHECKPOINT INPUT [INPUT ...]" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_where_the_config_goes_is_never_read_as_yaml(run, tmp_path):
    """Finding 6: `export.py A.pth B.pth` (fixed count) and a torch.save file without a .pth
    name are called checkpoints, not decoded as YAML."""
    folder, _ = run
    checkpoint = folder / "last.pth"
    with pytest.raises(ValueError, match=r"last.pth is a checkpoint, not a YAML config: "
                                         r"expected \[CONFIG\] CHECKPOINT, with one checkpoint"):
        split_config_argument([str(checkpoint), str(checkpoint)], ["CHECKPOINT"])
    renamed = tmp_path / "weights"  # no suffix: told by its first bytes
    renamed.write_bytes(checkpoint.read_bytes())
    with pytest.raises(ValueError, match="weights is a checkpoint, not a YAML config"):
        split_config_argument([str(renamed), str(checkpoint)], ["CHECKPOINT"])
    # Existing invocations keep their meaning.
    assert split_config_argument(["c.yaml", str(checkpoint)], ["CHECKPOINT"]) == (
        "c.yaml", [str(checkpoint)])
    assert split_config_argument(["c.txt", str(checkpoint), "img.jpg"], ["CHECKPOINT", "INPUT"],
                                 repeat_last=True) == ("c.txt", [str(checkpoint), "img.jpg"])
    assert split_config_argument([str(checkpoint), "a.jpg", "b.jpg"], ["CHECKPOINT", "INPUT"],
                                 repeat_last=True) == (None, [str(checkpoint), "a.jpg", "b.jpg"])


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_predict_score_thr_outside_0_1_is_an_argparse_error(value, capsys):
    """Finding 15: scores lie in [0, 1]; 1.5 used to give 0 detections without a word."""
    with pytest.raises(SystemExit) as exit_info:
        load_tool("predict").main(["any.pth", "any.jpg", "--score-thr", value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--score-thr: {value} is outside 0..1" in err


@pytest.mark.parametrize("option", ["train.amp=bf16", "train.ema=false"])
def test_predict_refuses_train_options_it_would_ignore(run, tiny_coco, tmp_path, capsys, option):
    """Trial E, finding 1: predict runs in fp32; train.amp=bf16 was accepted and did nothing."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        load_tool("predict").main([str(run[0] / "last.pth"), str(tiny_coco["val_images"]),
                                   "--out", str(out), "--cfg-options",
                                   "model.test.score_thr=0.1", option])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and not out.exists()
    assert (f"--cfg-options {option}: predict runs in fp32 and reads no train.* setting; "
            "train.amp applies to training and tools/eval.py") in err
