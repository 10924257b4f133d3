"""Deployable forms of a GFL detector: ONNX and TorchScript graphs, checked against evaluation.

`GFLDecode` traces the model's own code, `GFL.head_outputs` then `gfldet.postprocess`, as
evaluation and `Detector` run it. Graph inputs (`GRAPH_INPUTS`; `graph_inputs` prepares them):
- images [B, 3, H, W] float32: RGB resized as evaluation resizes it, normalised with the ImageNet
  mean/std (0-255 units), zero-padded bottom/right to a common size that is a multiple of 32;
- image_sizes [B, 2] int64: (h, w) of each resized image before padding (priors outside its own
  padded extent are masked, boxes clipped to it);
- orig_sizes [B, 2] int64: (h, w) of each original image (boxes are rescaled to it, as `Detector`
  returns them).

Shape legend: `B` images, `H`, `W` input size, `A` priors over all levels, `C` classes,
`K` = max_per_img (padded detections per image).

ONNX export uses torch.onnx's TorchScript-based exporter (`dynamo=False`): torchvision registers
its NMS -> ONNX `NonMaxSuppression` translation for that exporter only, and it needs no package
beyond `onnx` (the dynamo exporter needs `onnxscript` too).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gfldet import __version__
from gfldet.config import Config, config_to_dict, dump_config, load_config
from gfldet.data import build_transforms, normalize_batch
from gfldet.engine.checkpoint import (
    MODEL_FORMAT,
    load_checkpoint,
    save_checkpoint,
)
from gfldet.inference import (
    ImageInput,
    class_names_for,
    load_inference_model,
    prepare_batch,
    to_rgb_array,
)
from gfldet.models.detector import GFL, STRIDES
from gfldet.postprocess import (
    PostProcessSettings,
    dense_detections,
    select_detections,
    split_detections,
)

GRAPH_INPUTS = ("images", "image_sizes", "orig_sizes")
RAW_OUTPUTS = ("boxes", "scores")
NMS_OUTPUTS = ("boxes", "scores", "labels", "num_dets")
DEFAULT_OPSET = 17
# pyproject's "export" extra: onnx to write ONNX graphs, onnxruntime to run (and verify) them.
INSTALL_EXPORT = 'pip install onnx onnxruntime (gfldet\'s extra: pip install -e ".[export]")'

# (images, targets with image_size, orig_size), as prepare_batch
Batch = tuple[Tensor, list[dict[str, Any]]]


class ExportVerificationError(RuntimeError):
    """An exported graph's detections differ from evaluation's by more than the tolerance."""


# --------------------------------------------------------------------------- graph wrapper


class GFLDecode(nn.Module):
    """(images, image_sizes, orig_sizes) -> the graph outputs of `model`: raw, every prior's
    boxes [B, A, 4] and scores [B, A, C] (`dense_detections`); with `nms`, evaluation's padded
    detections boxes [B, K, 4], scores [B, K], labels [B, K], num_dets [B] (`select_detections`
    with `settings`, default the model's). The priors are computed in the graph from the
    feature-map sizes, so a dynamic-axes graph works at any input size that is a multiple of 32.
    """

    def __init__(self, model: GFL, nms: bool = False, settings: PostProcessSettings | None = None):
        super().__init__()
        self.model, self.nms = model, nms
        self.settings = settings or model.test_settings

    def forward(self, images: Tensor, image_sizes: Tensor,
                orig_sizes: Tensor) -> tuple[Tensor, ...]:
        cls_logits, reg_logits, priors, valid = self.model.head_outputs(images, image_sizes)
        distances = self.model.head.distances(reg_logits)  # the head's Integral (or Dirac ReLU)
        boxes, scores = dense_detections(cls_logits, distances, priors, valid, image_sizes,
                                         orig_sizes)
        if not self.nms:
            return boxes, scores
        return select_detections(boxes, scores, priors.num_per_level, self.settings)


def export_module(model: GFL, nms: bool = False,
                  settings: PostProcessSettings | None = None) -> GFLDecode:
    """The graph wrapper of `model`, both in eval mode."""
    return GFLDecode(model, nms, settings).eval()  # eval() reaches the model too


def detections_from_raw(boxes: Tensor | np.ndarray, scores: Tensor | np.ndarray,
                        input_hw: tuple[int, int],
                        settings: PostProcessSettings) -> list[dict[str, Tensor]]:
    """gfldet's selection applied to a raw graph's outputs: evaluation's detections per image.

    input_hw: (H, W) of the graph's `images` input, which fixes how many priors each level has.
    """
    height, width = input_hw
    num_per_level = [math.ceil(height / s) * math.ceil(width / s) for s in STRIDES]
    selected = select_detections(torch.as_tensor(boxes), torch.as_tensor(scores), num_per_level,
                                 settings)
    return split_detections(*selected)


# --------------------------------------------------------------------------- graph inputs


def feeds_from_batch(batch: Tensor, targets: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """A preprocessed batch (`prepare_batch`, `letterbox`) -> the graphs' inputs by name."""
    return {
        "images": batch,
        "image_sizes": torch.tensor([tuple(t["image_size"]) for t in targets], dtype=torch.int64),
        "orig_sizes": torch.tensor([tuple(t["orig_size"]) for t in targets], dtype=torch.int64),
    }


def graph_inputs(images: Sequence[ImageInput], config: Config | str | Path,
                 shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The graphs' inputs (numpy, by name) for a batch of images, preprocessed as evaluation and
    `Detector` preprocess them (`data.test_short_side`, `data.max_size`, `data.size_divisor`).

    config: a Config or the path of a YAML config (the run's config.yaml, or the .yaml beside
    published weights). shape: (H, W) of a fixed-shape graph; the images are then letterboxed
    into it (resized to fit) instead.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    arrays = [to_rgb_array(im) for im in images]
    if shape is not None:
        batch, targets = letterbox(arrays, *shape)
    else:
        transform = build_transforms(train=False, short_side=cfg.data.test_short_side,
                                     max_size=cfg.data.max_size)
        batch, targets = prepare_batch(arrays, transform, cfg.data.size_divisor)
    return {name: t.numpy() for name, t in feeds_from_batch(batch, targets).items()}


def letterbox(images: Sequence[np.ndarray], height: int, width: int) -> Batch:
    """uint8 [h, w, 3] RGB images -> a normalised batch [B, 3, height, width] for a fixed-shape
    graph, each resized keeping its aspect ratio to fit (bilinear), zero-padded bottom/right
    like collate, and targets with image_size / orig_size as `prepare_batch` gives them."""
    import cv2  # albumentations' dependency; imported here as only letterboxing needs it

    out = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
    targets = []
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        scale = min(height / h, width / w)
        new_h = min(height, max(1, int(h * scale + 0.5)))
        new_w = min(width, max(1, int(w * scale + 0.5)))
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        out[i, :, :new_h, :new_w] = torch.from_numpy(resized).permute(2, 0, 1)
        targets.append({"image_size": (new_h, new_w), "orig_size": (h, w)})
    return normalize_batch(out, [t["image_size"] for t in targets]), targets


def verification_inputs(images: Sequence[np.ndarray], transform: Any, size_divisor: int,
                        shape: tuple[int, int] | None = None) -> list[Batch]:
    """Batches to check an export on: each image alone at its test-time size (padded to
    `size_divisor`), then a batch of two images of different sizes, so that each is padded
    to the other's size. `shape`: letterboxed into this fixed shape, one image per batch.

    The pair is the first two images when they resize to different sizes, else the first with
    the second cut to half its width (another aspect ratio, hence another size)."""
    if shape is not None:
        return [letterbox([im], *shape) for im in images]
    singles = [prepare_batch([im], transform, size_divisor) for im in images]
    if not images:
        return singles
    second = images[1] if len(images) > 1 else images[0]
    if len(images) == 1 or singles[0][1][0]["image_size"] == singles[1][1][0]["image_size"]:
        second = np.ascontiguousarray(second[:, : max(1, second.shape[1] // 2)])
    return [*singles, prepare_batch([images[0], second], transform, size_divisor)]


# --------------------------------------------------------------------------- export


def export_onnx(model: GFL, path: str | Path, example: Mapping[str, Tensor | np.ndarray],
                nms: bool = False, dynamic: bool = False,
                settings: PostProcessSettings | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model` as an ONNX graph traced at `example` (graph inputs by name, as
    `graph_inputs` or `feeds_from_batch` give them; H and W multiples of 32).

    dynamic: batch, height and width are free axes; otherwise the graph accepts exactly
    `example`'s shapes. NMS needs opset >= 11 (ONNX NonMaxSuppression).
    """
    # torch raises its own OnnxExporterError without onnx, after tracing; say what to install.
    if importlib.util.find_spec("onnx") is None:
        raise ImportError(f"ONNX export needs the onnx package: {INSTALL_EXPORT}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = NMS_OUTPUTS if nms else RAW_OUTPUTS
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"},
            "orig_sizes": {0: "batch"}}
    axes |= {name: {0: "batch"} if nms else {0: "batch", 1: "priors"} for name in names}
    with _tracing(model):
        torch.onnx.export(
            export_module(model, nms, settings), _example_args(example), str(path), dynamo=False,
            opset_version=opset, input_names=list(GRAPH_INPUTS), output_names=list(names),
            dynamic_axes=axes if dynamic else None,
        )
    import onnx

    onnx.checker.check_model(str(path))  # a bonus; the verification is the real test
    return path


def export_torchscript(model: GFL, path: str | Path, example: Mapping[str, Tensor | np.ndarray],
                       nms: bool = False, settings: PostProcessSettings | None = None) -> Path:
    """Trace `model` at `example` (graph inputs by name) and save it; load with
    `torch.jit.load(path)` and call it with the three inputs in `GRAPH_INPUTS` order.

    Traced, not scripted: the torchvision backbone scripts, but gfldet's FPN and head use
    Python constructs (zip(strict=...), dataclass priors) that TorchScript does not compile.
    Sizes are recorded as size ops, so the traced graph runs at other input and batch sizes too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _tracing(model):
        wrapper = export_module(model, nms, settings)
        traced = torch.jit.trace(wrapper, _example_args(example), check_trace=False)
        traced.save(str(path))  # while the (shared) parameters do not require grad
    return path


def _example_args(example: Mapping[str, Tensor | np.ndarray]) -> tuple[Tensor, ...]:
    return tuple(torch.as_tensor(example[name]) for name in GRAPH_INPUTS)


@contextmanager
def _tracing(model: nn.Module) -> Iterator[None]:
    # Parameters are traced (and saved) without requires_grad, else a loaded TorchScript file's
    # outputs require grad and `.numpy()` fails on them; the model's own flags are restored.
    flags = [p.requires_grad for p in model.parameters()]
    # Tracing warns about Python ints taken from sizes (stride bookkeeping); the graph is
    # checked against evaluation at other sizes by the verification instead.
    try:
        with torch.no_grad(), warnings.catch_warnings():
            for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            model.requires_grad_(False)
            yield
    finally:
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)


# --------------------------------------------------------------------------- runners


Runner = Callable[[Mapping[str, Tensor | np.ndarray]], dict[str, np.ndarray]]


def onnx_runner(path: str | Path) -> Runner:
    """Run an exported ONNX file in onnxruntime (CPU): graph inputs by name -> outputs by name."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(
            f"onnxruntime is needed to run or verify ONNX exports: {INSTALL_EXPORT}"
        ) from err
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, Tensor | np.ndarray]) -> dict[str, np.ndarray]:
        outputs = session.run(names, {name: np.asarray(feeds[name]) for name in GRAPH_INPUTS})
        return dict(zip(names, outputs, strict=True))

    return run


def torchscript_runner(path: str | Path) -> Runner:
    """Run a saved TorchScript export: graph inputs by name -> outputs by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(feeds: Mapping[str, Tensor | np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = module(*_example_args(feeds))
        names = NMS_OUTPUTS if len(outputs) == len(NMS_OUTPUTS) else RAW_OUTPUTS
        return {n: o.numpy() for n, o in zip(names, outputs, strict=True)}

    return run


# --------------------------------------------------------------------------- verification


@dataclass
class ParityReport:
    """Largest differences between an exported graph and evaluation over the verified batches.

    Box differences are in original-image pixels, score differences absolute. `box_tol` is
    `rtol` times the largest image side (boxes scale with the image); `score_tol` is `rtol`.
    """

    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    box_tol: float = 0.0
    score_tol: float = 0.0
    num_inputs: int = 0
    num_dets: int = 0  # detections compared
    mismatched: list[str] = field(default_factory=list)  # detections present on one side only

    def add(self, box_diff: float, score_diff: float) -> None:
        self.max_box_diff = max(self.max_box_diff, float(box_diff))
        self.max_score_diff = max(self.max_score_diff, float(score_diff))

    @property
    def ok(self) -> bool:
        return (self.max_box_diff <= self.box_tol and self.max_score_diff <= self.score_tol
                and not self.mismatched)

    def summary(self) -> str:
        text = (
            f"max |boxes diff| {self.max_box_diff:.3g} px (tolerance {self.box_tol:.3g}), "
            f"max |scores diff| {self.max_score_diff:.3g} (tolerance {self.score_tol:.3g}) "
            f"over {self.num_inputs} input(s)"
        )
        if self.num_dets:
            text += f", {self.num_dets} detections compared"
        if self.mismatched:
            shown = "; ".join(self.mismatched[:5])
            text += f"; {len(self.mismatched)} detection(s) on one side only: {shown}"
        return text


@torch.no_grad()
def verify(runner: Runner, model: GFL, inputs: Sequence[Batch], nms: bool = False,
           settings: PostProcessSettings | None = None, rtol: float = 1e-4,
           what: str = "export") -> ParityReport:
    """Compare `runner` with evaluation on each (batch, targets) (`verification_inputs`); raise
    `ExportVerificationError` when a difference exceeds the tolerance, else return the report.

    Evaluation is `model(batch, targets)` in eval mode with `settings` (default the model's own),
    the call tools/eval.py's evaluator and `Detector` make. Its detections are compared with the
    NMS graph's own, or for a raw graph with gfldet's selection applied to its outputs
    (`detections_from_raw`), whose boxes and scores are also compared with the PyTorch
    wrapper's element by element."""
    settings = settings or model.test_settings
    report = ParityReport(score_tol=rtol, num_inputs=len(inputs))
    saved = model.test_settings
    model.eval()
    try:
        model.test_settings = settings
        for batch, targets in inputs:
            feeds = feeds_from_batch(batch, targets)
            got = runner(feeds)
            box_tol = rtol * float(feeds["orig_sizes"].max())
            report.box_tol = max(report.box_tol, box_tol)
            reference = model(batch, targets)
            if nms:
                found = split_detections(*(got[name] for name in NMS_OUTPUTS))
            else:
                raw = export_module(model)(**feeds)
                for name, ref in zip(RAW_OUTPUTS, raw, strict=True):
                    if got[name].shape != tuple(ref.shape):
                        raise ExportVerificationError(
                            f"{what}: output {name!r} has shape {got[name].shape}, "
                            f"PyTorch {tuple(ref.shape)}"
                        )
                report.add(*(np.abs(got[name] - ref.numpy()).max(initial=0.0)
                             for name, ref in zip(RAW_OUTPUTS, raw, strict=True)))
                found = detections_from_raw(got["boxes"], got["scores"], tuple(batch.shape[-2:]),
                                            settings)
            for image, (ref, det) in enumerate(zip(reference, found, strict=True)):
                _compare_detections(image, ref, det, report, box_tol, rtol)
    finally:
        model.test_settings = saved
    if not report.ok:
        raise ExportVerificationError(f"{what} does not match evaluation: {report.summary()}")
    return report


def _compare_detections(image: int, ref: Mapping[str, Any], got: Mapping[str, Any],
                        report: ParityReport, box_tol: float, score_tol: float) -> None:
    """Pair one image's detections by label and box; a detection without a partner counts as a
    mismatch unless it is borderline (its score within `score_tol` of another kept or cut one
    is not decidable at float precision, so only unpaired detections scoring well above the
    weakest kept one are reported)."""
    ref, got = ({k: np.asarray(v) for k, v in dets.items()} for dets in (ref, got))
    used = np.zeros(len(got["scores"]), dtype=bool)
    unpaired = []
    for i, (box, score, label) in enumerate(
        zip(ref["boxes"], ref["scores"], ref["labels"], strict=True)
    ):
        cand = np.flatnonzero((got["labels"] == label) & ~used)
        box_diff = np.abs(got["boxes"][cand] - box).max(axis=1)
        if cand.size and box_diff.min() <= box_tol:
            j = cand[int(box_diff.argmin())]
            used[j] = True
            report.num_dets += 1
            report.add(box_diff.min(), abs(float(got["scores"][j] - score)))
        else:
            unpaired.append(("evaluation", ref, i))
    unpaired += [("export", got, j) for j in np.flatnonzero(~used)]
    for side, dets, i in unpaired:
        # Near the score threshold or the max_per_img cut a tiny score change legitimately
        # changes which detections survive; those are not export errors.
        if dets["scores"][i] - float(dets["scores"].min()) > 10 * score_tol:
            box = [round(float(v), 1) for v in dets["boxes"][i]]
            report.mismatched.append(f"image {image}: {side} only: label {int(dets['labels'][i])} "
                                     f"score {float(dets['scores'][i]):.4f} box {box}")


# --------------------------------------------------------------------------- publishing weights


def publish_weights(checkpoint: str | Path, cfg: Config, out: str | Path, use_ema: bool = True,
                    hash_chars: int = 8,
                    state: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write an inference-only copy of a checkpoint, named by its SHA-256 (MMDetection's publish).

    Keeps the model weights (the EMA weights when the run kept an EMA and `use_ema`), the
    config and `meta` (class names, source, epoch, whether EMA was used); drops the optimizer,
    scheduler, scaler, RNG and progress counters. The weights are loaded into a model built from
    `cfg` first, so a file that would not load is never published.

    out: "DIR/NAME.pth" -> writes DIR/NAME-<sha256[:8]>.pth and DIR/NAME-<sha256[:8]>.yaml
    (the config, beside it). Returns both paths. state: the checkpoint already loaded
    (`load_checkpoint`), so that it is not read (and its notes logged) a second time.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    state = load_checkpoint(checkpoint) if state is None else state
    model = load_inference_model(cfg, state, checkpoint, use_ema)
    published = {
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model_format": MODEL_FORMAT,
        "config": config_to_dict(cfg),
        "meta": {
            "class_names": class_names_for(cfg, state),
            "source": checkpoint.name,
            "epoch": state.get("epoch"),
            "ema": bool(use_ema and state.get("ema") is not None),
            "gfldet_version": __version__,
        },
    }
    stem = out.name.removesuffix(".pth")
    # Written under a hidden name first: the hash is only known once the file exists, and a
    # plain NAME.pth could be an existing file (even the source checkpoint).
    staging = save_checkpoint(published, out.with_name(f".{stem}.unhashed.pth"))
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    final = out.with_name(f"{stem}-{digest[:hash_chars]}.pth")
    staging.replace(final)
    config_path = final.with_suffix(".yaml")
    dump_config(cfg, config_path)
    return final, config_path
