"""COCO bbox evaluation: detection -> COCO json conversion, COCOeval wrapper, per-class AP."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools.coco import COCO

Backend = Literal["pycocotools", "faster_coco_eval"]

# Names of the 12 COCOeval bbox stats, in the order COCOeval.summarize fills `stats`.
STAT_NAMES: tuple[str, ...] = (
    "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
    "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l",
)


def detections_to_coco(results: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                       label_to_cat_id: Sequence[int]) -> list[dict[str, Any]]:
    """Convert per-image model outputs to COCO result dicts.

    ``results[i]`` belongs to ``image_ids[i]`` and holds ``boxes`` (xyxy, original-image
    pixels), ``scores`` and contiguous ``labels`` in ``[0, C)``; ``label_to_cat_id[c]`` is the
    COCO category id of label ``c``.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"got {len(results)} results for {len(image_ids)} image ids")
    cat_lut = torch.as_tensor(list(label_to_cat_id), dtype=torch.long)
    out: list[dict[str, Any]] = []
    for res, img_id in zip(results, image_ids, strict=True):
        boxes = res["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = res["scores"].detach().to("cpu", torch.float64).reshape(-1)
        labels = res["labels"].detach().to("cpu", torch.long).reshape(-1)
        n = boxes.shape[0]
        if not scores.numel() == labels.numel() == n:
            raise ValueError(f"image {img_id}: boxes/scores/labels lengths differ "
                             f"({n}, {scores.numel()}, {labels.numel()})")
        if n == 0:
            continue
        if int(labels.min()) < 0 or int(labels.max()) >= len(cat_lut):
            raise ValueError(f"image {img_id}: label out of range [0, {len(cat_lut)}): "
                             f"min {int(labels.min())}, max {int(labels.max())}")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        # 3 decimals (sub-pixel /1000) is far below IoU sensitivity and keeps the json small.
        # Scores are kept at full precision: rounding creates ties that can reorder matches.
        out += [{"image_id": int(img_id), "category_id": c, "bbox": b, "score": s}
                for b, s, c in zip(np.round(xywh.numpy(), 3).tolist(), scores.tolist(),
                                   cat_lut[labels].tolist(), strict=True)]
    return out


def check_backend(backend: Backend) -> tuple[type, type]:
    """The (COCO, COCOeval) classes of `backend`; ImportError naming the pip package, or
    ValueError, unless it can run here."""
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO as FCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError as e:
            raise ImportError("backend='faster_coco_eval' requires the faster-coco-eval package: "
                              "pip install faster-coco-eval") from e
        return FCOCO, COCOeval_faster
    raise ValueError(
        f"unknown COCO eval backend {backend!r}; use 'pycocotools' or 'faster_coco_eval'")


def _per_class_ap(coco_eval: Any) -> list[float]:
    """AP@[.5:.95] per category (order of params.catIds), area all, maxDets 100."""
    precision = np.asarray(coco_eval.eval["precision"])  # [T, R, K, A, M]
    params = coco_eval.params
    area_idx = list(params.areaRngLbl).index("all")
    max_det_idx = list(params.maxDets).index(100) if 100 in params.maxDets else -1
    aps: list[float] = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, area_idx, max_det_idx]
        valid = p[p > -1]  # -1 marks "no GT for this class"
        aps.append(float(valid.mean()) if valid.size else float("nan"))
    return aps


def evaluate_coco(coco_gt: COCO, detections: list[dict[str, Any]],
                  class_names: Sequence[str] | None = None, backend: Backend = "pycocotools",
                  image_ids: Sequence[int] | None = None,
                  keep_eval: bool = False) -> dict[str, Any]:
    """Run COCO bbox evaluation, print the standard summary and return metrics (0..1 scale).

    ``class_names`` (if given) must follow the sorted category-id order of ``coco_gt``;
    otherwise names come from the GT categories. ``keep_eval``: the backend's COCOeval object,
    after accumulate and summarize, is returned as ``metrics["coco_eval"]`` (for the report).
    """
    coco_cls, eval_cls = check_backend(backend)
    gt = coco_gt
    if backend != "pycocotools":
        # faster_coco_eval wants its own COCO object; build it from the same dataset dict.
        gt = coco_cls(copy.deepcopy(coco_gt.dataset))
    if detections:
        # loadRes adds keys (id/area/segmentation) to the dicts it gets, so hand it shallow
        # copies (deepcopy is slow at COCO scale).
        dt = gt.loadRes([dict(d) for d in detections])
    else:  # loadRes cannot take []
        dt = coco_cls()
        dt.dataset = {"images": list(gt.dataset.get("images", [])),
                      "categories": copy.deepcopy(gt.dataset.get("categories", [])),
                      "annotations": []}
        dt.createIndex()
    # faster_coco_eval logs its summary by default; route it to stdout like pycocotools.
    # Its summary adds AR@0.5/AR@0.75 lines after the 12 standard ones.
    options = {} if backend == "pycocotools" else {"print_function": print}
    coco_eval = eval_cls(gt, dt, "bbox", **options)
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()  # prints the 12-line summary
    stats = coco_eval.stats[: len(STAT_NAMES)]
    metrics: dict[str, Any] = {name: float(s) for name, s in zip(STAT_NAMES, stats, strict=True)}

    cat_ids = list(coco_eval.params.catIds)
    if class_names is None:
        class_names = [coco_gt.cats[c]["name"] for c in cat_ids]
    elif len(class_names) != len(cat_ids):
        raise ValueError(f"{len(class_names)} class names for {len(cat_ids)} GT categories")
    metrics["per_class"] = dict(zip(class_names, _per_class_ap(coco_eval), strict=True))
    if keep_eval:
        metrics["coco_eval"] = coco_eval
    return metrics


def format_per_class_table(per_class: dict[str, float], num_columns: int = 3) -> str:
    """Aligned table with ``num_columns`` (category, AP) pairs per row; AP in percent, as the
    header says (the metrics and the report keep fractions)."""
    items = [(name, "nan" if math.isnan(ap) else f"{100.0 * ap:.1f}")
             for name, ap in per_class.items()]
    if not items:
        return "(no classes)"
    name_w = max(len("category"), *(len(n) for n, _ in items))
    ap_w = max(len("AP (%)"), *(len(a) for _, a in items))
    cell = f"{{:<{name_w}}} | {{:>{ap_w}}}"
    ncol = max(1, min(num_columns, len(items)))
    lines = [" | ".join([cell.format("category", "AP (%)")] * ncol),
             "-+-".join(["-" * name_w + "-+-" + "-" * ap_w] * ncol)]
    for start in range(0, len(items), ncol):
        row = items[start : start + ncol]
        lines.append(" | ".join(cell.format(n, a) for n, a in row).rstrip())
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """Map nan/inf to None and numpy/torch scalars to Python so the output is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics_json(metrics: dict[str, Any], path: str | Path) -> None:
    """Write metrics as indented JSON (nan -> null), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(metrics), indent=2) + "\n", encoding="utf-8")
