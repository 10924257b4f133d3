"""Exports: published weights reload to identical detections; ONNX and TorchScript graphs, raw
and with NMS, give Detector's detections on padded images and mixed-size batches; the export's
self-check compares with the evaluation path; the README's ONNX recipe runs as written."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT, run_in_process, to_format_1

from gfldet.config import config_from_dict, config_to_dict, load_config
from gfldet.data.synthetic import SynthParams, render_image
from gfldet.engine.checkpoint import load_checkpoint, save_checkpoint
from gfldet.export import (
    ExportVerificationError,
    detections_from_raw,
    export_module,
    export_onnx,
    export_torchscript,
    feeds_from_batch,
    graph_inputs,
    onnx_runner,
    torchscript_runner,
    verification_inputs,
    verify,
)
from gfldet.inference import Detector, build_inference_model
from gfldet.models.detector import STRIDES
from gfldet.models.priors import make_priors
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
    torch.nn.init.zeros_(model.head.gfl_cls.bias)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    model = tiny_model()
    model.test_settings = SETTINGS  # what Detector and the exported graphs apply
    return model


# --------------------------------------------------------------------------- graphs vs Detector
#
# The deployed graphs must give Detector's detections (the evaluation path: GFL.forward with each
# image's image_size / orig_size) on images whose resized size is not a multiple of 32, alone and
# in a batch with an image of another size. SCENES[0] resizes to 161 x 128 (padded to 192 x 128),
# SCENES[1] to 111 x 192 (padded to 128 x 192); together they pad to 192 x 192.
SCENE_SIZES = [(150, 119), (100, 173), (131, 197)]


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    return [
        render_image(np.random.default_rng(i), h, w, SynthParams())[0]
        for i, (h, w) in enumerate(SCENE_SIZES)
    ]


@pytest.fixture(scope="module")
def detector(model) -> Detector:
    return Detector(model, short_side=128, max_size=192)


def test_detector_pads_by_the_models_size_divisor(scenes):
    """The padding and the model's valid-prior mask use one divisor: the model's."""
    cfg = tiny_config()
    cfg.data.size_divisor = 64
    model = build_inference_model(cfg)
    batch, _ = Detector(model, short_side=140, max_size=192).preprocess(scenes[:1])
    assert model.size_divisor == 64
    assert batch.shape[-2:] == (192, 192)  # 176 x 140 padded by 64 (by 32: 192 x 160)


@pytest.fixture(scope="module")
def expected(model, detector, scenes) -> dict[str, tuple]:
    """(batch, targets, Detector's detections) of SCENES[0] and SCENES[1] alone ("single0",
    "single1") and together ("mixed", Detector with batch_size=2 as evaluation batches them)."""
    batched = Detector(model, short_side=128, max_size=192, batch_size=2)
    out = {
        f"single{i}": (*detector.preprocess([im]), [detector(im)])
        for i, im in enumerate(scenes[:2])
    }
    out["mixed"] = (*batched.preprocess(scenes[:2]), batched(scenes[:2]))
    return out


@pytest.fixture(scope="module")
def graph_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("graphs")


@pytest.fixture(scope="module")
def graphs(model, scenes, graph_folder) -> dict[tuple[str, str], object]:
    """The four graphs (ONNX with dynamic axes and TorchScript, raw and with NMS), each traced once
    on SCENES[2] (resized to 128 x 192, no padding) and run at other sizes and batch sizes."""
    folder = graph_folder
    example = graph_inputs([scenes[2]], tiny_config())
    runners = {}
    for kind in ("raw", "nms"):
        nms = kind == "nms"
        ts = export_torchscript(model, folder / f"{kind}.pt", example, nms=nms)
        runners["torchscript", kind] = torchscript_runner(ts)
        if importlib.util.find_spec("onnxruntime") is not None:
            path = export_onnx(model, folder / f"{kind}.onnx", example, nms=nms, dynamic=True)
            runners["onnx", kind] = onnx_runner(path)
    return runners


def graph_detections(runner, kind: str, batch: torch.Tensor, targets: list[dict]) -> list[dict]:
    """The graph's detections per image, as numpy arrays: the NMS graph's valid rows, or gfldet's
    selection applied to the raw graph's outputs."""
    out = runner(feeds_from_batch(batch, targets))
    if kind == "raw":
        dets = detections_from_raw(out["boxes"], out["scores"], tuple(batch.shape[-2:]), SETTINGS)
        return [{k: v.numpy() for k, v in d.items()} for d in dets]
    return [
        {k: out[k][b, : int(n)] for k in ("boxes", "scores", "labels")}
        for b, n in enumerate(out["num_dets"])
    ]


def assert_same_detections(
    got: list[dict], ref: list[dict], box_tol: float = 1e-3, score_tol: float = 1e-5
):
    """Identical counts per image and a one-to-one pairing: each reference detection with the
    unused detection of the same label whose box is closest; boxes within box_tol pixels, scores
    within score_tol. Pairing by box (not by rank) is robust to near-equal scores swapping."""
    assert len(got) == len(ref)
    for image, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert len(g["scores"]) == len(r["scores"]), (
            f"image {image}: {len(g['scores'])} vs {len(r['scores'])} detections"
        )
        used = np.zeros(len(g["scores"]), dtype=bool)
        for box, score, label in zip(r["boxes"], r["scores"], r["labels"], strict=True):
            cand = np.flatnonzero((g["labels"] == label) & ~used)
            assert cand.size, f"image {image}: no partner for label {label} box {box}"
            diff = np.abs(g["boxes"][cand] - box).max(axis=1)
            j = cand[int(diff.argmin())]
            assert diff.min() <= box_tol, f"image {image}: box {box} vs {g['boxes'][j]}"
            assert abs(float(g["scores"][j]) - float(score)) <= score_tol
            used[j] = True


FORMATS = ["onnx", "torchscript"]


@pytest.mark.parametrize("kind", ["raw", "nms"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_detects_what_detector_detects_on_padded_images(graphs, expected, fmt, kind):
    if (fmt, kind) not in graphs:
        pytest.skip("onnxruntime is not installed")
    for name, padded_shape, size in [
        ("single0", (192, 128), (161, 128)),
        ("single1", (128, 192), (111, 192)),
    ]:
        batch, targets, ref = expected[name]
        assert tuple(batch.shape[-2:]) == padded_shape and tuple(targets[0]["image_size"]) == size
        assert len(ref[0]["scores"]) > 10  # enough detections to compare
        assert_same_detections(graph_detections(graphs[fmt, kind], kind, batch, targets), ref)


@pytest.mark.parametrize("kind", ["raw", "nms"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_detects_what_detector_detects_on_a_mixed_size_batch(
    graphs, expected, scenes, fmt, kind
):
    if (fmt, kind) not in graphs:
        pytest.skip("onnxruntime is not installed")
    batch, targets, ref = expected["mixed"]
    assert tuple(batch.shape) == (2, 3, 192, 192)
    got = graph_detections(graphs[fmt, kind], kind, batch, targets)
    assert_same_detections(got, ref)
    if kind == "nms":  # the padded output contract
        out = graphs[fmt, kind](feeds_from_batch(batch, targets))
        assert (
            out["boxes"].shape == (2, 100, 4)
            and out["num_dets"].dtype == out["labels"].dtype == np.int64
        )
        for b, n in enumerate(out["num_dets"]):
            assert (out["labels"][b, n:] == -1).all() and (out["scores"][b, n:] == 0).all()
            assert (out["boxes"][b, n:] == 0).all() and (np.diff(out["scores"][b, :n]) <= 0).all()
    # Nothing detected in an image's padding: boxes inside each original image, none of zero area.
    for det, image in zip(got, scenes[:2], strict=True):
        h, w = image.shape[:2]
        boxes = det["boxes"]
        assert (
            (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        )
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_raw_graph_masks_the_padding_of_each_image(graphs, expected, scenes):
    """Raw outputs of the mixed batch (192 x 192): scores are 0 exactly at the priors outside each
    image's own 32-padded extent (192 x 128 and 128 x 192), boxes lie inside each original image."""
    batch, targets, _ = expected["mixed"]
    out = graphs["torchscript", "raw"](feeds_from_batch(batch, targets))
    priors = make_priors([(math.ceil(192 / s), math.ceil(192 / s)) for s in STRIDES], list(STRIDES),
                         octave_base_scale=8)
    assert out["scores"].shape == (2, len(priors.strides), 3)
    masked = (out["scores"] == 0).all(axis=2)  # [B, A]
    x, y, stride = (
        priors.grid_xy[:, 0].numpy(), priors.grid_xy[:, 1].numpy(), priors.strides.numpy()
    )
    assert np.array_equal(masked[0], x >= np.ceil(128 / stride))  # image 0: columns past 128 px
    assert np.array_equal(masked[1], y >= np.ceil(128 / stride))  # image 1: rows past 128 px
    for boxes, image in zip(out["boxes"], scenes[:2], strict=True):
        h, w = image.shape[:2]
        assert boxes.min() >= 0 and boxes[:, [0, 2]].max() <= w and boxes[:, [1, 3]].max() <= h


def test_onnx_graph_has_dynamic_axes_and_one_softmax(graphs, graph_folder):
    pytest.importorskip("onnxruntime")
    import onnx

    graph = onnx.load(str(graph_folder / "raw.onnx")).graph
    assert [i.name for i in graph.input] == ["images", "image_sizes", "orig_sizes"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert dims == [["batch", 3, "height", "width"], ["batch", 2], ["batch", 2]]
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and softmax[0].attribute[0].i == -1  # one softmax, over the bins


def test_verification_compares_with_the_evaluation_path(model, scenes, graphs):
    """The self-check fails a graph that clips to the padded input and masks no prior (what the
    graphs did before they took the images' sizes), and passes the exported ones."""
    detector = Detector(model, short_side=128, max_size=192)
    inputs = verification_inputs(scenes[:2], detector.transform, 32)
    assert [tuple(b.shape) for b, _ in inputs] == [
        (1, 3, 192, 128),
        (1, 3, 128, 192),
        (2, 3, 192, 192),
    ]
    wrapper = export_module(model, nms=True, settings=SETTINGS)

    def padded_sizes_graph(feeds):
        # The old graphs: every image taken as the whole padded input, then rescaled and clipped
        # to the original image by the caller (the README's former recipe).
        images, sizes, orig = feeds["images"], feeds["image_sizes"], feeds["orig_sizes"]
        padded = torch.tensor([images.shape[-2:]] * len(images))
        with torch.no_grad():
            boxes, scores, labels, num_dets = wrapper(images, padded, padded)
        scale = (orig / sizes)[:, [1, 0, 1, 0]][:, None, :]
        limit = orig[:, [1, 0, 1, 0]][:, None, :].float()
        boxes = torch.minimum(boxes * scale, limit) * (labels >= 0)[..., None]
        return {
            "boxes": boxes.numpy(),
            "scores": scores.numpy(),
            "labels": labels.numpy(),
            "num_dets": num_dets.numpy(),
        }

    with pytest.raises(ExportVerificationError, match="on one side only"):
        verify(padded_sizes_graph, model, inputs, nms=True, settings=SETTINGS)
    report = verify(graphs["torchscript", "nms"], model, inputs, nms=True, settings=SETTINGS)
    assert report.num_dets > 100  # the raw graph's verification runs in the CLI tests


def test_verification_fails_above_tolerance(model, scenes):
    detector = Detector(model, short_side=128, max_size=192)
    inputs = verification_inputs(scenes[:1], detector.transform, 32)
    wrapper = export_module(model, nms=False)

    def off_by_a_little(feeds):
        with torch.no_grad():
            boxes, scores = wrapper(*feeds.values())
        return {"boxes": boxes.numpy() + 0.5, "scores": scores.numpy()}

    with pytest.raises(ExportVerificationError, match="boxes diff"):
        verify(off_by_a_little, model, inputs)


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
    assert set(state) == {"model", "model_format", "config", "meta"}
    assert state["meta"]["ema"] is True
    assert state["model_format"] == 2
    original = load_checkpoint(tmp_path / "last.pth")
    ema = {k.removeprefix("module."): v for k, v in original["ema"].items() if k != "n_averaged"}
    # EMA became the model
    assert all(torch.equal(state["model"][k], ema[k]) for k in state["model"])

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
        "--out", str(out), "--verify-images", str(tiny_coco["val_images"]), "--num-verify", "2",
    ])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file(), text
    assert "input [1, 3, 128, 160]" in text  # a fixed-shape graph; the images were letterboxed
    assert (
        "verified against PyTorch evaluation (GFL.forward) on 2 input(s)" in text
        and "max |boxes diff|" in text
    )


def readme_python_block(section: str) -> str:
    """The first ```python block of a README section (a '## ' heading)."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_onnx_recipe_gives_detectors_detections(tmp_path, scenes, monkeypatch, capsys):
    """The README's export commands and its ONNX snippet, run as written in a folder laid out
    like a training run, give Detector's detections on an image that is padded when resized."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "work_dirs" / "RUN"
    run.mkdir(parents=True)
    cfg = training_checkpoint(run / "best.pth", with_ema=False)
    (run / "config.yaml").write_text(json.dumps(config_to_dict(cfg)))
    Image.fromarray(scenes[0]).save(tmp_path / "photo.jpg")
    # as the README's command, verified more briefly
    code = load_tool("export").main(
        ["work_dirs/RUN/best.pth", "--format", "onnx", "--dynamic", "--nms", "--num-verify", "1"]
    )
    assert code == 0, capsys.readouterr()
    snippet = readme_python_block("Exporting a trained model")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    ref = Detector.from_checkpoint(run / "best.pth")("photo.jpg")
    assert len(ref["scores"]) > 10
    got = {k: namespace[k] for k in ("boxes", "scores", "labels")}
    assert_same_detections([got], [ref])


# --------------------------------------------------------------------------- CLI: what --out means,
# options that do nothing, unreadable verification images, unverified exports

EXPORT = ROOT / "tools" / "export.py"


def export_cli(*args: str):
    """tools/export.py ARGS in this process; a traceback fails the test (run_in_process)."""
    return run_in_process(EXPORT, *map(str, args), check=False)


def jit_load(path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        return torch.jit.load(str(path))


def files_under(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny training checkpoint, tmp_path/run/last.pth."""
    (tmp_path / "run").mkdir()
    training_checkpoint(tmp_path / "run" / "last.pth", with_ema=False)
    return tmp_path / "run" / "last.pth"


@pytest.mark.parametrize("fmt", ["torchscript", "weights"])
@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_out_that_is_the_input_checkpoint_is_refused(checkpoint, fmt, spelling):
    """Even with --overwrite: the training checkpoint (optimizer, EMA) must never be replaced."""
    run = checkpoint.parent
    out = {"same": checkpoint, "dotdot": run / ".." / "run" / "last.pth",
           "symlink": run / "link.pth", "hardlink": run / "hard.pth"}[spelling]
    if spelling == "symlink":
        out.symlink_to(checkpoint)
    elif spelling == "hardlink":
        out.hardlink_to(checkpoint)
    before = checkpoint.read_bytes()
    listing = files_under(run)
    proc = export_cli(checkpoint, "--format", fmt, "--out", out, "--overwrite")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--out {out} is the input checkpoint {checkpoint} itself" in proc.stderr
    assert checkpoint.read_bytes() == before and files_under(run) == listing


def test_out_that_is_the_input_config_is_refused_and_weights_default_name_is_not(checkpoint):
    run = checkpoint.parent
    config = run / "tiny.yaml"
    config.write_text(json.dumps(config_to_dict(tiny_config())))
    proc = export_cli(config, checkpoint, "--format", "torchscript", "--out", config, "--overwrite")
    assert proc.returncode == 2 and f"--out {config} is the input config {config} itself" in (
        proc.stderr)
    # weights' default NAME.pth (the run folder's name) only prefixes the hashed file names
    renamed = checkpoint.rename(run / "run.pth")
    proc = export_cli(renamed, "--format", "weights")
    assert proc.returncode == 0, proc.stderr
    assert len(list(run.glob("run-*.pth"))) == 1 and renamed.is_file()


def test_weights_out_is_a_folder_or_a_name_pth(checkpoint, tmp_path):
    """--format weights: an existing folder (or a path ending in /) receives RUN-<hash>.pth and
    .yaml; DIR/NAME.pth gives DIR/NAME-<hash>.*; anything else is refused, nothing written."""
    (tmp_path / "exp").mkdir()
    listing = files_under(tmp_path)
    proc = export_cli(checkpoint, "--format", "weights", "--out", tmp_path / "exp" / "m.onnx")
    assert proc.returncode == 2 and "for --format weights, --out is a folder" in proc.stderr
    assert "or DIR/NAME.pth to write DIR/NAME-<sha256[:8]>.pth" in proc.stderr
    assert files_under(tmp_path) == listing

    assert export_cli(checkpoint, "--format", "weights", "--out", tmp_path / "exp").returncode == 0
    (weights,) = (tmp_path / "exp").glob("*.pth")
    assert weights.name.startswith("run-") and weights.with_suffix(".yaml").is_file()
    assert files_under(tmp_path) == listing | {f"exp/{weights.name}", f"exp/{weights.stem}.yaml"}

    proc = export_cli(checkpoint, "--format", "weights", "--out", f"{tmp_path}/new/")
    assert proc.returncode == 0, proc.stderr
    assert sorted(files_under(tmp_path / "new")) == [weights.name, f"{weights.stem}.yaml"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_graph_out_that_is_a_folder_is_refused(checkpoint, tmp_path, overwrite):
    (tmp_path / "d").mkdir()
    proc = export_cli(checkpoint, "--format", "torchscript", "--out", tmp_path / "d", *overwrite)
    assert proc.returncode == 2
    assert f"--out {tmp_path / 'd'} is a folder; give a file name" in proc.stderr
    assert not any((tmp_path / "d").iterdir())


@pytest.mark.parametrize("args, message", [
    (["--num-verify", "0"], "argument --num-verify: 0 is not >= 1"),
    (["--num-verify", "-2"], "argument --num-verify: -2 is not >= 1"),
    (["--score-thr", "0.5"], "--score-thr does nothing without --nms"),
    (["--nms", "--score-thr", "1.5"], "argument --score-thr: 1.5 is outside [0, 1]"),
    (["--nms", "--score-thr", "-0.1"], "argument --score-thr: -0.1 is outside [0, 1]"),
    (["--dynamic"], "--dynamic does nothing with torchscript"),
    (["--shape", "128", "128"], "--shape does nothing with torchscript or --dynamic"),
    (["--format", "onnx", "--dynamic", "--shape", "128", "128"], "--shape does nothing"),
    (["--format", "weights", "--nms", "--num-verify", "2"],
     "--nms, --num-verify: only for --format onnx or torchscript"),
    # Trial E, finding 1: the export runs in fp32, whatever train.amp says.
    (["--cfg-options", "model.test.nms_iou=0.5", "train.amp=bf16"],
     "--cfg-options train.amp=bf16: export runs in fp32 and reads no train.* setting; train.amp "
     "applies to training and tools/eval.py"),
    (["--format", "weights", "--cfg-options", "train.ema=false"],
     "--cfg-options train.ema=false: export runs in fp32"),
])
def test_options_that_would_do_nothing_are_refused(checkpoint, tmp_path, args, message):
    """--format torchscript unless the case says otherwise (argparse takes the last)."""
    proc = export_cli(checkpoint, "--format", "torchscript", "--out", tmp_path / "m.pt", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.pt").exists()


def test_unreadable_verification_images_are_skipped_and_named(checkpoint, tmp_path, scenes):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    (images / "a_empty.png").write_bytes(b"")
    (images / "b_fake.jpg").write_text("x")
    out = tmp_path / "m.pt"
    proc = export_cli(checkpoint, "--format", "torchscript", "--out", out,
                      "--verify-images", images, "--num-verify", "2")
    assert proc.returncode == 2 and not out.exists()
    assert f"none of the 2 file(s) of {images} could be read" in proc.stderr
    assert f"{images / 'a_empty.png'}: UnidentifiedImageError" in proc.stderr
    assert f"{images / 'b_fake.jpg'}: UnidentifiedImageError" in proc.stderr

    Image.fromarray(scenes[0]).save(images / "c_good.png")
    proc = export_cli(checkpoint, "--format", "torchscript", "--out", out,
                      "--verify-images", images, "--num-verify", "2")
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    assert f"skipped 2 file(s) of {images} that could not be read" in proc.stderr
    assert "a_empty.png" in proc.stderr and "b_fake.jpg" in proc.stderr
    assert "on 2 input(s)" in proc.stdout  # the one readable image alone and in a pair


def test_onnx_export_without_the_onnx_package_says_what_to_install(checkpoint, tmp_path,
                                                                    monkeypatch, model):
    """torch raises its OnnxExporterError (not an ImportError) when onnx is missing."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx fails, find_spec gives None
    out = tmp_path / "m.onnx"
    proc = export_cli(checkpoint, "--format", "onnx", "--dynamic", "--out", out)
    assert proc.returncode == 2 and "ONNX export needs onnx, not installed here" in proc.stderr
    assert "pip install onnx" in proc.stderr and files_under(tmp_path) == {"run", "run/last.pth"}
    example = graph_inputs([np.zeros((64, 64, 3), np.uint8)], tiny_config())
    with pytest.raises(ImportError, match="needs the onnx package: pip install onnx"):
        export_onnx(model, out, example)


@pytest.mark.parametrize("existing", [False, True])
def test_export_that_fails_verification_is_kept_as_unverified(checkpoint, tmp_path, monkeypatch,
                                                              existing):
    """OUT appears only once verified; a failed one is OUT.unverified, and an OUT replaced with
    --overwrite is left as it was."""
    from gfldet import export

    def fails(*args, **kwargs):
        raise ExportVerificationError("torchscript export does not match evaluation: (forced)")

    monkeypatch.setattr(export, "verify", fails)
    tool = load_tool("export")  # imports verify from the patched module
    out = tmp_path / "m.pt"
    if existing:
        out.write_text("an earlier export")
    code = tool.main([str(checkpoint), "--format", "torchscript", "--out", str(out),
                      "--overwrite", "--num-verify", "1"])
    assert code == 1
    unverified = tmp_path / "m.pt.unverified"
    assert unverified.is_file() and jit_load(unverified) is not None
    assert files_under(tmp_path) == {"run", "run/last.pth", "m.pt.unverified"} | (
        {"m.pt"} if existing else set())  # no temporary file left behind
    assert not existing or out.read_text() == "an earlier export"


def test_loaded_torchscript_outputs_do_not_require_grad(graphs, graph_folder, model, expected):
    """The README's TorchScript call, outside torch.no_grad: the outputs convert to numpy."""
    batch, targets, _ = expected["single0"]
    feeds = feeds_from_batch(batch, targets)
    for kind in ("raw", "nms"):
        outputs = jit_load(graph_folder / f"{kind}.pt")(*feeds.values())
        assert not any(o.requires_grad for o in outputs)
        assert outputs[0].numpy().shape[0] == 1
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags are restored


def test_weights_export_logs_the_model_format_note_once(tmp_path, caplog):
    """A model format 1 checkpoint: the key-map note once, not again when publishing."""
    training_checkpoint(tmp_path / "old.pth", with_ema=False)
    state = load_checkpoint(tmp_path / "old.pth")
    state["model"] = to_format_1(state["model"])
    state.pop("model_format", None)
    save_checkpoint(state, tmp_path / "old.pth")
    with caplog.at_level(logging.WARNING):
        proc = export_cli(tmp_path / "old.pth", "--format", "weights", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    notes = [r for r in caplog.records if "model format 1" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in notes]
