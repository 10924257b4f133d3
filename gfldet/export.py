"""Deployable forms of a GFL detector: ONNX and TorchScript graphs, checked against PyTorch.

Two graph wrappers share the model's own backbone, FPN, head and priors:

- `GFLDecode`: images -> every prior's decoded box and score ("raw" outputs, no NMS). The
  distribution decoding (softmax over the R + 1 bins and the expectation) is inside the graph.
- `GFLDecodeNMS`: the same, then gfldet's post-processing in graph form (score threshold, top
  `nms_pre` per level, clip, class-aware NMS, best `max_per_img`), with fixed-size padded outputs
  so that a batch has one shape.

Graph inputs are what the model sees: float images normalised with the ImageNet mean/std
(0-255 pixel units) and padded bottom/right to a multiple of 32 (`gfldet.inference` prepares
them). Boxes are xyxy pixels of that input; rescaling to the original image is the caller's job.

Shape legend: `B` images, `H`, `W` input size, `A` priors over all levels, `C` classes,
`R` = reg_max, `K` = max_per_img (padded detections per image), `L` levels.

ONNX export uses torch.onnx's TorchScript-based exporter (`dynamo=False`): torchvision registers
its NMS -> ONNX `NonMaxSuppression` translation for that exporter only, and it needs no package
beyond `onnx` (the dynamo exporter needs `onnxscript` too).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import nms

from gfldet import __version__
from gfldet.boxes import ltrb_to_boxes
from gfldet.config import Config, config_to_dict, dump_config
from gfldet.data import normalize_batch
from gfldet.engine.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from gfldet.inference import build_inference_model, class_names_for, model_weights
from gfldet.models.detector import GFL, STRIDES
from gfldet.models.priors import make_priors
from gfldet.postprocess import PostProcessSettings, postprocess

RAW_OUTPUTS = ("boxes", "scores")
NMS_OUTPUTS = ("boxes", "scores", "labels", "num_dets")
DEFAULT_OPSET = 17


class ExportVerificationError(RuntimeError):
    """An exported graph's outputs differ from PyTorch's by more than the tolerance."""


# --------------------------------------------------------------------------- graph wrappers


class GFLDecode(nn.Module):
    """images [B, 3, H, W] -> boxes [B, A, 4] (xyxy input pixels, unclipped), scores [B, A, C].

    Scores are the sigmoid of the joint class-quality logits. The priors are computed in the
    graph from the feature-map sizes, so a graph exported with dynamic axes works at any input
    size that is a multiple of 32.
    """

    def __init__(self, model: GFL) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = model.backbone, model.neck, model.head
        self.octave_base_scale = model.octave_base_scale

    def decode(self, images: Tensor) -> tuple[Tensor, Tensor, list]:
        """(boxes [B, A, 4], scores [B, A, C], priors per level [n_l]) of a batch."""
        features = self.neck(self.backbone(images))
        cls_logits, reg_logits = self.head(features)
        sizes = [f.shape[-2:] for f in features]  # traced as sizes, not constants
        priors = make_priors(sizes, _strides(len(features)), self.octave_base_scale, images.device)
        distances = self.head.distances(reg_logits)  # the head's own Integral (or Dirac ReLU): plain graph ops
        boxes = ltrb_to_boxes(priors.centers, distances * priors.strides[:, None])
        return boxes, cls_logits.sigmoid(), priors.num_per_level

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        boxes, scores, _ = self.decode(images)
        return boxes, scores


class GFLDecodeNMS(nn.Module):
    """images [B, 3, H, W] -> boxes [B, K, 4], scores [B, K], labels [B, K] int64, num_dets [B].

    gfldet's post-processing (`gfldet.postprocess`, MMDetection 3.x test_cfg) in a form that
    exports: per level the top `nms_pre` (prior, class) pairs, score > `score_thr`, boxes clipped
    to the input, class-aware NMS over the batch, then the best K per image by score. Rows past
    `num_dets[b]` are padding: zero boxes and scores, label -1.
    """

    def __init__(self, model: GFL, settings: PostProcessSettings | None = None) -> None:
        super().__init__()
        self.decoder = GFLDecode(model)
        self.settings = settings or model.test_settings
        self.num_classes = model.num_classes

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = self.settings
        boxes, scores, num_per_level = self.decoder.decode(images)
        num_images, num_classes = scores.shape[0], self.num_classes

        # Top nms_pre (prior, class) pairs per level. Each level's scores are padded with
        # nms_pre entries of -1 so that k is a constant whatever the level size (a dynamic
        # min(nms_pre, n * C) would be frozen by tracing); padding never passes the threshold.
        cand_boxes, cand_scores, cand_labels = [], [], []
        start = 0
        for count in num_per_level:
            level_boxes = boxes[:, start : start + count]  # [B, n, 4]
            level_scores = scores[:, start : start + count].flatten(1)  # [B, n * C]
            padded = torch.cat([level_scores, level_scores.new_full((num_images, s.nms_pre), -1.0)], dim=1)
            top_scores, top_idx = padded.topk(s.nms_pre, dim=1)
            prior = (top_idx // num_classes).clamp(max=count - 1)  # padding -> any valid row
            cand_boxes.append(level_boxes.gather(1, prior[..., None].expand(-1, -1, 4)))
            cand_scores.append(top_scores)
            cand_labels.append(top_idx % num_classes)
            start = start + count
        boxes = torch.cat(cand_boxes, dim=1)  # [B, P, 4], P = L * nms_pre
        scores = torch.cat(cand_scores, dim=1)  # [B, P]
        labels = torch.cat(cand_labels, dim=1)  # [B, P]
        num_cands = len(num_per_level) * s.nms_pre  # a Python int, also while tracing

        height, width = images.shape[-2:]
        # Sizes are ints in eager mode and 0-d tensors while tracing: as_tensor keeps them traced.
        max_xy = torch.stack([torch.as_tensor(v) for v in (width, height, width, height)]).to(boxes)
        boxes = torch.minimum(boxes.clamp(min=0), max_xy)
        keep = (scores > s.score_thr) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])

        # Class-aware NMS over the whole batch in one call: each (image, class) group is shifted
        # to its own coordinate range so that groups never overlap. Written out rather than
        # torchvision's batched_nms, whose offset comes from the kept subset and whose Python
        # empty-input branch tracing would freeze; here the offset is the max over all candidates.
        flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.reshape(-1)
        image_idx = torch.arange(num_images, device=boxes.device)[:, None].expand_as(labels)
        groups = (image_idx * num_classes + labels).reshape(-1)
        idx = keep.reshape(-1).nonzero().squeeze(1)
        offsets = groups[idx].to(flat_boxes) * (flat_boxes.max() + 1)
        kept = idx[nms(flat_boxes[idx] + offsets[:, None], flat_scores[idx], s.nms_iou)]

        # Survivors back onto a dense [B, P] grid (-1 elsewhere), then the best K per image.
        dense = flat_scores.new_full(flat_scores.shape, -1.0).scatter(0, kept, flat_scores[kept])
        max_dets = min(s.max_per_img, num_cands)
        top_scores, top_idx = dense.reshape(-1, num_cands).topk(max_dets, dim=1)  # [B, K]
        found = top_scores > -0.5  # survivors have scores >= 0, padding -1
        out_boxes = boxes.gather(1, top_idx[..., None].expand(-1, -1, 4)) * found[..., None]
        out_scores = torch.where(found, top_scores, torch.zeros_like(top_scores))
        out_labels = torch.where(found, labels.gather(1, top_idx), torch.full_like(top_idx, -1))
        return out_boxes, out_scores, out_labels, found.sum(dim=1)


def _strides(num_levels: int) -> list[int]:
    if num_levels != len(STRIDES):
        raise ValueError(f"expected {len(STRIDES)} feature levels, got {num_levels}")
    return list(STRIDES)


def export_module(model: GFL, nms: bool = False, settings: PostProcessSettings | None = None) -> nn.Module:
    """The graph wrapper of `model` in eval mode: `GFLDecodeNMS` if `nms` else `GFLDecode`."""
    model.eval()
    wrapper = GFLDecodeNMS(model, settings) if nms else GFLDecode(model)
    return wrapper.eval()


# --------------------------------------------------------------------------- PyTorch reference


@torch.no_grad()
def reference_outputs(
    model: GFL, images: Tensor, nms: bool = False, settings: PostProcessSettings | None = None
) -> dict[str, np.ndarray]:
    """What the export must reproduce, computed by the model's own code path (not the wrapper).

    Raw: boxes [B, A, 4] and scores [B, A, C] decoded as `GFL.forward` decodes them. With `nms`:
    `gfldet.postprocess` of the padded input (no rescaling), padded to `NMS_OUTPUTS` shapes.
    """
    model.eval()
    features = model.neck(model.backbone(images))
    cls_logits, reg_logits = model.head(features)
    priors = model.priors_for(features)
    distances = model.head.distances(reg_logits)
    if not nms:
        boxes = ltrb_to_boxes(priors.centers, distances * priors.strides[:, None])
        return {"boxes": boxes.numpy(), "scores": cls_logits.sigmoid().numpy()}
    settings = settings or model.test_settings
    sizes = torch.tensor([images.shape[-2:]] * images.shape[0], dtype=torch.long)
    valid = torch.ones(cls_logits.shape[:2], dtype=torch.bool)
    dets = postprocess(cls_logits, distances, priors, valid, sizes, sizes, settings)
    max_dets = min(settings.max_per_img, len(priors.num_per_level) * settings.nms_pre)
    out = {
        "boxes": np.zeros((len(dets), max_dets, 4), np.float32),
        "scores": np.zeros((len(dets), max_dets), np.float32),
        "labels": np.full((len(dets), max_dets), -1, np.int64),
        "num_dets": np.array([len(d["scores"]) for d in dets], np.int64),
    }
    for i, d in enumerate(dets):
        n = len(d["scores"])
        out["boxes"][i, :n], out["scores"][i, :n], out["labels"][i, :n] = d["boxes"], d["scores"], d["labels"]
    return out


# --------------------------------------------------------------------------- export


def export_onnx(
    model: GFL,
    path: str | Path,
    example: Tensor,
    nms: bool = False,
    dynamic: bool = False,
    settings: PostProcessSettings | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write `model` as an ONNX graph traced at `example` ([B, 3, H, W], H and W multiples of 32).

    dynamic: batch, height and width are free axes; otherwise the graph accepts exactly
    `example`'s shape. NMS needs opset >= 11 (ONNX NonMaxSuppression).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = NMS_OUTPUTS if nms else RAW_OUTPUTS
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        if nms:
            dynamic_axes.update({name: {0: "batch"} for name in names})
        else:
            dynamic_axes.update({"boxes": {0: "batch", 1: "priors"}, "scores": {0: "batch", 1: "priors"}})
    wrapper = export_module(model, nms, settings)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about Python ints taken from sizes (stride bookkeeping); the graph is
        # checked against PyTorch at other sizes by the verification instead.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=list(names), dynamic_axes=dynamic_axes,
        )
    try:
        import onnx
    except ImportError:  # the check is a bonus; onnxruntime verification is the real test
        return path
    onnx.checker.check_model(str(path))
    return path


def export_torchscript(
    model: GFL, path: str | Path, example: Tensor, nms: bool = False, settings: PostProcessSettings | None = None
) -> Path:
    """Trace `model` at `example` and save it; load with `torch.jit.load(path)`.

    Traced, not scripted: the torchvision backbone scripts, but gfldet's FPN and head use
    Python constructs (zip(strict=...), dataclass priors) that TorchScript does not compile.
    Sizes are recorded as size ops, so the traced graph runs at other input sizes too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = export_module(model, nms, settings)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    traced.save(str(path))
    return path


# --------------------------------------------------------------------------- runners


Runner = Callable[[Tensor], dict[str, np.ndarray]]


def onnx_runner(path: str | Path) -> Runner:
    """Run an exported ONNX file in onnxruntime (CPU): images -> outputs by name."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(
            "onnxruntime is needed to run or verify ONNX exports: pip install -e \".[export]\""
        ) from err
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(images: Tensor) -> dict[str, np.ndarray]:
        outputs = session.run(names, {"images": images.numpy()})
        return dict(zip(names, outputs, strict=True))

    return run


def torchscript_runner(path: str | Path) -> Runner:
    """Run a saved TorchScript export: images -> outputs by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = module(images)
        names = NMS_OUTPUTS if len(outputs) == len(NMS_OUTPUTS) else RAW_OUTPUTS
        return {n: o.numpy() for n, o in zip(names, outputs, strict=True)}

    return run


# --------------------------------------------------------------------------- verification


@dataclass
class ParityReport:
    """Largest differences between an exported graph and PyTorch over the verified inputs.

    Box differences are in input pixels, score differences absolute. `box_tol` is `rtol` times
    the largest input side (boxes scale with the image); `score_tol` is `rtol` itself.
    """

    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    box_tol: float = 0.0
    score_tol: float = 0.0
    num_inputs: int = 0
    num_dets: int = 0  # detections compared (NMS graphs)
    mismatched: list[str] = field(default_factory=list)  # detections present on one side only (NMS graphs)

    @property
    def ok(self) -> bool:
        return (
            self.max_box_diff <= self.box_tol
            and self.max_score_diff <= self.score_tol
            and not self.mismatched
        )

    def summary(self) -> str:
        text = (
            f"max |boxes diff| {self.max_box_diff:.3g} px (tolerance {self.box_tol:.3g}), "
            f"max |scores diff| {self.max_score_diff:.3g} (tolerance {self.score_tol:.3g}) "
            f"over {self.num_inputs} input(s)"
        )
        if self.num_dets:
            text += f", {self.num_dets} detections compared"
        if self.mismatched:
            text += f"; {len(self.mismatched)} detection(s) on one side only: " + "; ".join(self.mismatched[:5])
        return text


def verify(
    runner: Runner,
    model: GFL,
    inputs: Sequence[Tensor],
    nms: bool = False,
    settings: PostProcessSettings | None = None,
    rtol: float = 1e-4,
    what: str = "export",
) -> ParityReport:
    """Compare `runner` with PyTorch on each input batch; raise `ExportVerificationError` when a
    difference exceeds the tolerance, else return the report (largest differences seen)."""
    report = ParityReport(score_tol=rtol)
    for images in inputs:
        ref = reference_outputs(model, images, nms, settings)
        got = runner(images)
        report.num_inputs += 1
        report.box_tol = max(report.box_tol, rtol * max(images.shape[-2:]))
        if nms:
            _compare_detections(ref, got, report, rtol * max(images.shape[-2:]), rtol)
        else:
            for name in RAW_OUTPUTS:
                if got[name].shape != ref[name].shape:
                    raise ExportVerificationError(
                        f"{what}: output {name!r} has shape {got[name].shape}, PyTorch {ref[name].shape}"
                    )
            report.max_box_diff = max(report.max_box_diff, _max_abs(got["boxes"] - ref["boxes"]))
            report.max_score_diff = max(report.max_score_diff, _max_abs(got["scores"] - ref["scores"]))
    if not report.ok:
        raise ExportVerificationError(f"{what} does not match PyTorch: {report.summary()}")
    return report


def _max_abs(diff: np.ndarray) -> float:
    return float(np.abs(diff).max()) if diff.size else 0.0


def _compare_detections(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], report: ParityReport, box_tol: float, score_tol: float
) -> None:
    """Pair each image's detections by label and box; a detection without a partner counts as a
    mismatch unless it is borderline (its score within `score_tol` of another kept or cut one
    is not decidable at float precision, so only unpaired detections scoring well above the
    weakest kept one are reported)."""
    for b in range(len(ref["num_dets"])):
        n_ref, n_got = int(ref["num_dets"][b]), int(got["num_dets"][b])
        ref_boxes, got_boxes = ref["boxes"][b, :n_ref], got["boxes"][b, :n_got]
        ref_scores, got_scores = ref["scores"][b, :n_ref], got["scores"][b, :n_got]
        ref_labels, got_labels = ref["labels"][b, :n_ref], got["labels"][b, :n_got]
        used = np.zeros(n_got, dtype=bool)
        for i in range(n_ref):
            cand = np.flatnonzero((got_labels == ref_labels[i]) & ~used)
            if cand.size:
                box_diff = np.abs(got_boxes[cand] - ref_boxes[i]).max(axis=1)
                j = cand[int(box_diff.argmin())]
                if box_diff.min() <= box_tol:
                    used[j] = True
                    report.num_dets += 1
                    report.max_box_diff = max(report.max_box_diff, float(box_diff.min()))
                    report.max_score_diff = max(report.max_score_diff, abs(float(got_scores[j] - ref_scores[i])))
                    continue
            _note_unpaired(report, "PyTorch", b, ref_boxes[i], ref_scores[i], ref_labels[i], ref_scores, score_tol)
        for j in np.flatnonzero(~used):
            _note_unpaired(report, "export", b, got_boxes[j], got_scores[j], got_labels[j], got_scores, score_tol)


def _note_unpaired(
    report: ParityReport, side: str, image: int, box: np.ndarray, score: float, label: int,
    side_scores: np.ndarray, score_tol: float,
) -> None:
    # Near the score threshold or the max_per_img cut a tiny score change legitimately
    # changes which detections survive; those are not export errors.
    weakest = float(side_scores.min()) if side_scores.size else 0.0
    if score - weakest <= 10 * score_tol:
        return
    report.mismatched.append(
        f"image {image}: {side} only: label {int(label)} score {float(score):.4f} box "
        f"{[round(float(v), 1) for v in box]}"
    )


def letterbox(image: np.ndarray, height: int, width: int) -> Tensor:
    """uint8 [h, w, 3] RGB -> normalised [1, 3, height, width] for a fixed-shape graph: resized
    keeping its aspect ratio to fit (bilinear), then zero-padded bottom/right like collate."""
    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = min(height, max(1, int(h * scale + 0.5))), min(width, max(1, int(w * scale + 0.5)))
    import cv2  # albumentations' dependency; imported here as only letterboxing needs it

    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = torch.zeros(1, 3, height, width, dtype=torch.uint8)
    out[0, :, :new_h, :new_w] = torch.from_numpy(resized).permute(2, 0, 1)
    return normalize_batch(out, [(new_h, new_w)])


# --------------------------------------------------------------------------- publishing weights


def publish_weights(
    checkpoint: str | Path, cfg: Config, out: str | Path, use_ema: bool = True, hash_chars: int = 8
) -> tuple[Path, Path]:
    """Write an inference-only copy of a checkpoint, named by its SHA-256 (MMDetection's publish).

    Keeps the model weights (the EMA weights when the run kept an EMA and `use_ema`), the
    config and `meta` (class names, source, epoch, whether EMA was used); drops the optimizer,
    scheduler, scaler, RNG and progress counters. The weights are loaded into a model built from
    `cfg` first, so a file that would not load is never published.

    out: "DIR/NAME.pth" -> writes DIR/NAME-<sha256[:8]>.pth and DIR/NAME-<sha256[:8]>.yaml
    (the config, beside it). Returns both paths.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    state = load_checkpoint(checkpoint)
    model = build_inference_model(cfg)
    load_model_weights(model, model_weights(state, use_ema, str(checkpoint)), strict=True)
    used_ema = bool(use_ema and state.get("ema") is not None)
    published = {
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": config_to_dict(cfg),
        "meta": {
            "class_names": class_names_for(cfg, state),
            "source": checkpoint.name,
            "epoch": state.get("epoch"),
            "ema": used_ema,
            "gfldet_version": __version__,
        },
    }
    stem = out.name.removesuffix(".pth")
    # Written under a hidden name first: the hash is only known once the file exists, and a
    # plain NAME.pth could be an existing file (even the source checkpoint).
    staging = save_checkpoint(published, out.with_name(f".{stem}.unhashed.pth"))
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    final = out.with_name(f"{stem}-{digest[:hash_chars]}.pth")
    os.replace(staging, final)
    config_path = final.with_suffix(".yaml")
    dump_config(cfg, config_path)
    return final, config_path
