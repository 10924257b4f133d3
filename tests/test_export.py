"""Exports: published weights reload to identical detections; ONNX and TorchScript graphs match
PyTorch on generated images (raw decoded outputs and the NMS-in-graph variant)."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT

from gfldet.config import config_from_dict, config_to_dict, load_config
from gfldet.data import build_transforms
from gfldet.data.synthetic import SynthParams, render_image
from gfldet.engine.checkpoint import load_checkpoint, save_checkpoint
from gfldet.export import (
    ExportVerificationError,
    export_onnx,
    export_torchscript,
    onnx_runner,
    reference_outputs,
    torchscript_runner,
    verify,
)
from gfldet.inference import Detector, build_inference_model, prepare_batch
from gfldet.postprocess import PostProcessSettings

TINY = {
    "model": {
        "num_classes": 3,
        "backbone": {"depth": 18, "weights": None, "frozen_stages": -1, "norm_eval": False},
        "fpn": {"out_channels": 32},
        "head": {"feat_channels": 64, "stacked_convs": 1},
    },
    "data": {"train_short_side": [128, 128], "test_short_side": 128, "max_size": 192},
}
SETTINGS = PostProcessSettings(score_thr=0.3, nms_pre=1000, nms_iou=0.6, max_per_img=100)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(num_classes: int = 3):
    cfg = config_from_dict(TINY)
    cfg.model.num_classes = num_classes
    return cfg


def tiny_model(num_classes: int = 3):
    torch.manual_seed(0)
    model = build_inference_model(tiny_config(num_classes))
    # Zero class bias (instead of the -4.6 prior) so that a random model scores ~0.5 and the
    # NMS variant has plenty of detections to compare.
    torch.nn.init.zeros_(model.head.cls_out.bias)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def inputs() -> list[torch.Tensor]:
    """Generated scenes at two sizes, preprocessed like evaluation: [1, 3, 128, 160], [1, 3, 160, 128]."""
    transform = build_transforms(train=False, short_side=128, max_size=192)
    images = [render_image(np.random.default_rng(i), h, w, SynthParams())[0]
              for i, (h, w) in enumerate([(128, 160), (150, 120)])]
    return [prepare_batch([im], transform)[0] for im in images]


def test_onnx_raw_outputs_match_pytorch_with_dynamic_axes(model, inputs, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    path = export_onnx(model, tmp_path / "dynamic.onnx", inputs[0], dynamic=True)
    batch = torch.cat([inputs[0], inputs[0].flip(-1)])  # batch of 2 at the traced size
    report = verify(onnx_runner(path), model, [*inputs, batch])  # another size, another batch
    print(f"ONNX dynamic raw: {report.summary()}")
    assert report.max_box_diff < 1e-4 * 160 and report.max_score_diff < 1e-4
    softmax = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and softmax[0].attribute[0].i == -1  # one softmax, over the bins


def test_onnx_nms_in_graph_matches_postprocess(model, inputs, tmp_path):
    pytest.importorskip("onnxruntime")
    path = export_onnx(model, tmp_path / "nms.onnx", inputs[0], nms=True, dynamic=True, settings=SETTINGS)
    run = onnx_runner(path)
    for images in inputs:
        got, ref = run(images), reference_outputs(model, images, nms=True, settings=SETTINGS)
        assert got["boxes"].shape == (1, 100, 4) and got["num_dets"].dtype == np.int64
        n = int(ref["num_dets"][0])
        assert n > 10 and int(got["num_dets"][0]) == n
        assert np.array_equal(got["labels"][0, :n], ref["labels"][0, :n])
        assert np.abs(got["boxes"] - ref["boxes"]).max() < 1e-2
        assert np.abs(got["scores"] - ref["scores"]).max() < 1e-4
        assert (got["labels"][0, n:] == -1).all() and (got["scores"][0, n:] == 0).all()
    report = verify(run, model, inputs, nms=True, settings=SETTINGS)
    print(f"ONNX NMS: {report.summary()}")


def test_torchscript_matches_pytorch(model, inputs, tmp_path):
    raw = export_torchscript(model, tmp_path / "raw.pt", inputs[0])
    report = verify(torchscript_runner(raw), model, inputs)  # inputs[1] is another size
    print(f"TorchScript raw: {report.summary()}")
    with_nms = export_torchscript(model, tmp_path / "nms.pt", inputs[0], nms=True, settings=SETTINGS)
    report = verify(torchscript_runner(with_nms), model, inputs, nms=True, settings=SETTINGS)
    print(f"TorchScript NMS: {report.summary()}")
    assert report.num_dets > 20


def test_verification_fails_above_tolerance(model, inputs):
    def off_by_a_little(images):
        ref = reference_outputs(model, images)
        return {"boxes": ref["boxes"] + 0.5, "scores": ref["scores"]}

    with pytest.raises(ExportVerificationError, match="boxes diff"):
        verify(off_by_a_little, model, inputs[:1])


# --------------------------------------------------------------------------- published weights


def training_checkpoint(path, with_ema: bool = True, num_classes: int = 3):
    """A checkpoint shaped like tools/train.py's, whose EMA weights differ from its raw ones."""
    model = tiny_model(num_classes)
    ema = None
    if with_ema:
        averaged = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
        with torch.no_grad():
            for p in averaged.module.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ema = averaged.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cfg = tiny_config(num_classes)
    state = {"model": model.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
             "scheduler": {}, "scaler": {}, "epoch": 3, "iteration": 30, "best_ap": 0.1,
             "rng": {}, "config": config_to_dict(cfg)}
    save_checkpoint(state, path)
    return cfg


def test_published_weights_strip_training_state_and_detect_identically(tmp_path):
    cfg = training_checkpoint(tmp_path / "last.pth")
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(json.dumps(config_to_dict(cfg)))  # JSON is YAML
    tool = load_tool("export")
    assert tool.main([str(config_path), str(tmp_path / "last.pth"), "--format", "weights",
                      "--out", str(tmp_path / "pub" / "gfl_tiny.pth")]) == 0
    (published,) = (tmp_path / "pub").glob("gfl_tiny-*.pth")
    digest = hashlib.sha256(published.read_bytes()).hexdigest()
    assert published.name == f"gfl_tiny-{digest[:8]}.pth"
    assert load_config(published.with_suffix(".yaml")).model.num_classes == 3  # config beside it

    state = load_checkpoint(published)
    assert set(state) == {"model", "config", "meta"} and state["meta"]["ema"] is True
    original = load_checkpoint(tmp_path / "last.pth")
    ema = {k.removeprefix("module."): v for k, v in original["ema"].items() if k != "n_averaged"}
    assert all(torch.equal(state["model"][k], ema[k]) for k in state["model"])  # EMA became the model

    images = [render_image(np.random.default_rng(7), 140, 170, SynthParams())[0],
              render_image(np.random.default_rng(8), 160, 128, SynthParams())[0]]
    before = Detector.from_checkpoint(tmp_path / "last.pth", score_thr=0.2)(images)
    after = Detector.from_checkpoint(published, score_thr=0.2)(images)
    assert sum(len(d["scores"]) for d in before) > 0
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a["boxes"], b["boxes"]) and np.array_equal(a["scores"], b["scores"])
        assert np.array_equal(a["labels"], b["labels"])

    # Publishing is deterministic: the same checkpoint gives the same name.
    tool.main([str(config_path), str(tmp_path / "last.pth"), "--format", "weights",
               "--out", str(tmp_path / "again" / "gfl_tiny.pth")])
    assert [p.name for p in (tmp_path / "again").glob("*.pth")] == [published.name]


def test_export_cli_onnx_static_shape_verifies_on_images(tmp_path, tiny_coco, capsys):
    pytest.importorskip("onnxruntime")
    cfg = training_checkpoint(tmp_path / "last.pth", with_ema=False)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(json.dumps(config_to_dict(cfg)))
    out = tmp_path / "tiny.onnx"
    code = load_tool("export").main([
        str(config_path), str(tmp_path / "last.pth"), "--format", "onnx", "--shape", "128", "160",
        "--out", str(out), "--verify-images", str(tiny_coco["val_images"]),
    ])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file(), text
    assert "input [1, 3, 128, 160]" in text  # a fixed-shape graph; the images were letterboxed
    assert "verified against PyTorch on 4 image(s)" in text and "max |boxes diff|" in text
