"""gfldet used from Python: what a caller passes to the model, edits of config objects, Detector's
and draw_detections' arguments (trial F findings 1, 4, 10, 12)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import build_from_options
from test_export import training_checkpoint

from gfldet.config import Config, ConfigError, DGQPConfig, config_from_dict, config_to_dict
from gfldet.engine.build import build_model
from gfldet.engine.trainer import train
from gfldet.inference import Detector, draw_detections


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_from_options(
        "model.num_classes=3", "model.backbone.depth=18", "model.fpn.out_channels=32",
        "model.head.feat_channels=64", "model.head.stacked_convs=1").train()


BOX, IMAGE = torch.tensor([[10.0, 20.0, 40.0, 50.0]]), torch.randn(1, 3, 64, 64)


def target(boxes=BOX, labels=(0,), **extra):
    return [{"boxes": boxes, "labels": torch.tensor(labels), **extra}]


@pytest.mark.parametrize("images, targets, message", [
    # num_classes (3) is gfldet's background sentinel: it used to train as background, silently
    (IMAGE, target(labels=(3,)), r'targets\[0\]\["labels"\] must be in \[0, 3\), got 3 '
     r"\(gfldet labels are 0-based; torchvision's 1-based labels need -1\)"),
    (IMAGE, target(labels=(-1,)), r'targets\[0\]\["labels"\] must be in \[0, 3\), got -1'),
    (IMAGE, target(labels=(0.0,)), r'targets\[0\]\["labels"\] must be an int64 tensor \[G\] '
     r"with G = 1 \(one per box\), got torch.float32 \[1\]"),
    (IMAGE, target(labels=(0, 1)), r'\["labels"\] must be an int64 tensor \[G\] with G = 1'),
    (IMAGE.to(torch.uint8), target(), "images must be normalised floats, got torch.uint8: use "
     r"gfldet.data.normalize_batch"),
    (IMAGE[0], target(),
     r"images must be a tensor \[B, 3, H, W\], got torch.float32 \[3, 64, 64\]"),
    (IMAGE, target() * 2, r"targets must be a list of one dict per image \(1\), got 2"),
    (IMAGE, None, "training mode needs targets"),
    (IMAGE, target(boxes=BOX[0]), r'targets\[0\]\["boxes"\] must be a float tensor \[G, 4\] '
     r".*got torch.float32 \[4\]"),
    (IMAGE, [{"boxes": BOX}], r"targets\[0\] must be a dict with 'boxes' and 'labels', got keys "
     r"\['boxes'\]"),
    (IMAGE, target(boxes=torch.tensor([[40.0, 20.0, 10.0, 50.0]])),
     r'targets\[0\]\["boxes"\]\[0\] = \[40.0, 20.0, 10.0, 50.0\] must be finite with x2 > x1 and '
     "y2 > y1"),
    (IMAGE, target(boxes=torch.tensor([[10.0, float("nan"), 40.0, 50.0]])),
     r'\["boxes"\]\[0\] = \[10.0, nan, 40.0, 50.0\] must be finite'),
])
def test_a_wrong_training_call_is_a_value_error_naming_what_to_fix(model, images, targets,
                                                                   message):
    with pytest.raises(ValueError, match=message):
        model(images, targets)


@pytest.mark.parametrize("images, targets, message", [
    # trial G finding 2: orig_size alone rescaled from the padded size (boxes silently off)
    (IMAGE, [{"orig_size": (480, 640)}], r"targets\[0\] has 'orig_size' but no 'image_size': "
     r"boxes are rescaled from image_size \(h, w\) of the resized image before padding"),
    (IMAGE.repeat(2, 1, 1, 1), [{"image_size": (64, 48)}, {}],
     r"targets\[1\] has no 'image_size' while targets\[0\] has one"),
    (IMAGE[..., :48], [{"image_size": (48, 64)}],  # (w, h) swapped: w > W
     r"targets\[0\]\['image_size'\] = \(48, 64\) must be \(h, w\) .* within the input's "
     r"\(h, w\) = \(64, 48\)"),
    (IMAGE, [{"image_size": (1000, 1500)}], r"= \(1000, 1500\) must be \(h, w\)"),
    (IMAGE.repeat(2, 1, 1, 1), [None, None], r"targets\[0\] must be a dict, got NoneType"),
    (IMAGE.double(), None, r"images are torch.float64 but the model's weights torch.float32: "
     r"use images.to\(torch.float32\), or autocast"),
])
def test_a_wrong_eval_call_is_a_value_error_not_silently_wrong_boxes(model, images, targets,
                                                                     message):
    model.eval()
    try:
        with pytest.raises(ValueError, match=message), torch.no_grad():
            model(images, targets)
        # the training call checks image_size too (it changes which priors are valid)
        if targets and isinstance(targets[0], dict) and "orig_size" not in targets[0]:
            model.train()
            with pytest.raises(ValueError, match=message):
                model(images, [{**t, **target()[0]} for t in targets])
    finally:
        model.train()


def test_eval_sizes_rescale_boxes_and_tensor_sizes_are_not_read(model):
    model.eval()
    try:
        with torch.no_grad():
            plain = model(IMAGE)[0]["boxes"]
            same = model(IMAGE, [{"image_size": (64, 64), "orig_size": (128, 64)}])[0]["boxes"]
            # tensors are not read on the host (a sync on CUDA): not checked, still used
            sizes = {"image_size": torch.tensor([64, 64]), "orig_size": torch.tensor([128, 64])}
            tensors = model(IMAGE, [sizes])[0]["boxes"]
    finally:
        model.train()
    torch.testing.assert_close(same, plain * torch.tensor([1.0, 2.0, 1.0, 2.0]))
    torch.testing.assert_close(tensors, same)


def test_valid_targets_train_and_the_value_checks_can_be_switched_off(model):
    losses = model(IMAGE, target(labels=(2,)))
    assert all(torch.isfinite(v) for v in losses.values())
    empty = model(IMAGE, target(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)))
    assert empty["loss_bbox"].item() == 0.0
    # The trainer's switch (its datasets are checked; on CUDA the value checks would sync):
    # shapes and dtypes are still checked, values not.
    model.check_targets = False
    try:
        model(IMAGE, target(labels=(3,)))
        with pytest.raises(ValueError, match="normalised floats"):
            model(IMAGE.to(torch.uint8), target())
    finally:
        model.check_targets = True


def demo_config() -> Config:
    return config_from_dict({}, overrides=["model.backbone.weights=null"])


def test_python_edits_are_checked_by_validate_as_yaml_would_be():
    cfg = demo_config()
    cfg.schedule.epoch = 2  # a typo: an attribute that is no key
    cfg.schedule.epochs = "1"
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    assert "unknown key 'schedule.epoch'; did you mean 'schedule.epochs'?" in text
    assert "schedule.epochs: expected int, got '1' (str)" in text
    assert sorted(key for key, _ in cfg.problems()) == ["schedule.epoch", "schedule.epochs"]


def test_python_values_are_taken_as_their_yaml_and_a_tensor_is_refused():
    """Trial G finding 8: a Path was refused for path keys, a numpy int for int keys, while a
    numpy float and a tensor (with torch's warning) were taken."""
    from pathlib import Path

    cfg = demo_config()
    cfg.data.val.annotations, cfg.train.work_dir = Path("val.json"), Path("work_dirs/x")
    cfg.model.backbone.weights = Path("r50.pth")
    cfg.train.seed, cfg.optim.lr = np.arange(3)[2], np.float32(0.5)
    checked = cfg.validate()
    assert (checked.data.val.annotations, checked.train.work_dir) == ("val.json", "work_dirs/x")
    assert checked.model.backbone.weights == "r50.pth"
    assert type(checked.train.seed) is int and checked.train.seed == 2
    assert type(checked.optim.lr) is float and checked.optim.lr == 0.5
    cfg.optim.lr = torch.tensor(0.01, requires_grad=True)
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got "
                       r"tensor\(0\.0100, requires_grad=True\) \(Tensor\)"):
        cfg.validate()


def test_a_partial_dict_for_a_required_section_is_refused_not_filled_from_defaults():
    """Trial G finding 9: `cfg.optim = {"lr": 0.01}` made the demo's adamw the schema's sgd."""
    cfg = config_from_dict({"optim": {"name": "adamw", "weight_decay": 0.05}})
    cfg.optim = {"lr": 0.01}
    with pytest.raises(ConfigError, match=r"optim: a dict replaces the whole section, and this "
                       r"one lacks name, reference_batch_size, .*grad_clip \(the schema's defaults "
                       r"would replace the config's values\): set keys one by one "
                       r"\(cfg\.optim\.lr = 0\.01\) or give all of them"):
        cfg.validate()
    assert [key for key, _ in cfg.problems()] == ["optim"]
    cfg.model = {**config_to_dict(cfg)["model"], "fpn": {}}  # nested sections are checked too
    assert "model: a dict replaces the whole section, and this one lacks fpn.out_channels" in (
        dict(cfg.problems())["model"])
    cfg.optim = config_to_dict(config_from_dict({}))["optim"]  # every key: taken as given
    cfg.model = config_to_dict(config_from_dict({}))["model"]
    assert cfg.validate().optim.name == "sgd"


def test_validate_returns_the_config_with_sections_given_as_dicts_converted():
    cfg = demo_config()
    cfg.model.head.dgqp = {}  # GFLv2 as the README's YAML writes it
    cfg.model.fpn = {"out_channels": 32}
    checked = cfg.validate()
    assert checked.model.head.dgqp == DGQPConfig() and checked.model.fpn.out_channels == 32
    assert isinstance(cfg.model.head.dgqp, dict)  # the caller's object is left as it was
    model = build_model(checked.model, size_divisor=checked.data.size_divisor)
    assert any(k.startswith("head.reg_conf.") for k in model.state_dict())  # GFLv2
    cfg.model.head.dgqp = {"topK": 3}
    with pytest.raises(ConfigError, match="unknown key 'model.head.dgqp.topK'; did you mean "
                       "'model.head.dgqp.topk'"):
        cfg.validate()


def test_train_validates_the_config_before_the_work_dir_exists(tmp_path):
    cfg = demo_config()
    cfg.optim.lr = -1.0
    with pytest.raises(ConfigError, match=r"optim.lr=-1.0 is invalid: must be > 0"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("score_thr", [30, -0.1, float("nan")])
def test_detector_score_thr_outside_0_1_is_refused_as_predict_does(tmp_path, score_thr):
    training_checkpoint(tmp_path / "last.pth")
    with pytest.raises(ValueError, match=rf"score_thr={score_thr} is outside 0..1"):
        Detector.from_checkpoint(tmp_path / "last.pth", score_thr=score_thr)
    assert Detector.from_checkpoint(tmp_path / "last.pth", score_thr=1.0).score_thr == 1.0


def test_detector_arguments_a_python_caller_gets_wrong_are_named(tmp_path):
    """Trial G finding 12: torch's RuntimeError for device="gpu", "image not found" for an
    existing folder, score_thr=True as 1.0, a checkpoint or a dict as config= read as YAML."""
    from gfldet.engine.evaluator import evaluate_checkpoint

    ck = tmp_path / "last.pth"
    training_checkpoint(ck)
    for device in ("gpu", "CPU"):
        with pytest.raises(ValueError, match=f"device '{device}': expected 'cpu', 'cuda', "
                           "'cuda:N' or 'auto'"):
            Detector.from_checkpoint(ck, device=device)
        with pytest.raises(ConfigError, match=f"device '{device}': expected 'cpu'"):
            evaluate_checkpoint(ck, device=device)
    with pytest.raises(ValueError, match=r"score_thr=True: expected a number in 0\.\.1"):
        Detector.from_checkpoint(ck, score_thr=True)
    for call in (Detector.from_checkpoint, evaluate_checkpoint):
        with pytest.raises(ConfigError, match=f"{ck} is a checkpoint, not a YAML config"):
            call(ck, config=ck)
        with pytest.raises(ConfigError, match="config= takes a YAML path, a Config or None, got "
                           r"dict: for a dict, pass gfldet\.config\.config_from_dict\(it\)"):
            call(ck, config={"model": {}})
    detector = Detector.from_checkpoint(ck)
    for source, kind in ((tmp_path, "folder"), (tmp_path / "*.jpg", "glob")):
        with pytest.raises(ValueError, match=f"is a {kind}: Detector takes image files, arrays "
                           r"or PIL images \(list_images\(source\)"):
            detector(source)
    with pytest.raises(FileNotFoundError, match="image not found"):
        detector(tmp_path / "missing.jpg")


def test_draw_detections_of_a_list_says_to_pass_one_images_dict():
    image = np.zeros((32, 32, 3), np.uint8)
    det = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64),
           "class_names": []}
    with pytest.raises(TypeError, match=r"one image's detections \(a dict\), got list: for dets "
                       r"= detector\(\[a, b\]\), draw_detections\(a, dets\[0\]\)"):
        draw_detections(image, [det, det])


def test_the_migration_note_gives_the_export_advice_only_for_a_checkpoint(caplog):
    old = {"model": {"head": {"dgqp": True}}}
    with caplog.at_level(logging.WARNING, logger="gfldet"):
        assert config_from_dict(old).model.head.dgqp == DGQPConfig()
    assert "model.head.dgqp: true -> {}" in caplog.text
    assert "tools/export.py" not in caplog.text and "Use the new keys" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gfldet"):
        config_from_dict(old, "work_dirs/x/last.pth")
    assert "tools/export.py CHECKPOINT --format weights writes a copy" in caplog.text
