"""Tests for gfldet.engine.coco_eval on a tiny hand-made COCO ground truth."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from pycocotools.coco import COCO

from gfldet.engine.coco_eval import (
    STAT_NAMES,
    detections_to_coco,
    evaluate_coco,
    format_per_class_table,
    write_metrics_json,
)

# Non-contiguous category ids; "bird" has no annotations (per-class AP must be nan).
CATEGORIES = [
    {"id": 3, "name": "cat"},
    {"id": 7, "name": "dog"},
    {"id": 9, "name": "bird"},
]
LABEL_TO_CAT = [3, 7, 9]
# (image_id, category_id, x, y, w, h): small (<32^2), medium and large boxes so every area
# range has ground truth and all 12 stats are defined.
GT_BOXES = [
    (1, 3, 10.0, 20.0, 100.0, 80.0),
    (1, 7, 200.0, 150.0, 40.0, 50.0),
    (2, 3, 300.0, 100.0, 20.0, 25.0),
    (2, 7, 50.0, 60.0, 200.0, 180.0),
    (3, 7, 400.0, 300.0, 60.0, 45.0),
]


def make_gt() -> COCO:
    dataset = {
        "images": [
            {"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in (1, 2, 3)
        ],
        "categories": CATEGORIES,
        "annotations": [
            {
                "id": k + 1,
                "image_id": img,
                "category_id": cat,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
            for k, (img, cat, x, y, w, h) in enumerate(GT_BOXES)
        ],
    }
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def model_outputs(dx: float = 0.0, image_ids: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """Per-image outputs equal to the GT, with boxes shifted right by dx * width."""
    outs = []
    for img in image_ids:
        rows = [b for b in GT_BOXES if b[0] == img]
        boxes = torch.tensor(
            [[x + dx * w, y, x + dx * w + w, y + h] for _, _, x, y, w, h in rows]
        ).reshape(-1, 4)
        labels = torch.tensor([LABEL_TO_CAT.index(c) for _, c, *_ in rows], dtype=torch.long)
        scores = torch.linspace(0.9, 0.5, len(rows))
        outs.append({"boxes": boxes, "scores": scores, "labels": labels})
    return outs


def test_detections_to_coco_converts_boxes_and_labels() -> None:
    results = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 110.0, 100.0], [0.5, 1.25, 2.5, 4.0]]),
            "scores": torch.tensor([0.9, 0.1]),
            "labels": torch.tensor([0, 2]),
        },
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.long),
        },
    ]
    dets = detections_to_coco(results, [5, 6], LABEL_TO_CAT)
    assert len(dets) == 2
    assert dets[0] == {
        "image_id": 5,
        "category_id": 3,
        "bbox": [10.0, 20.0, 100.0, 80.0],
        "score": pytest.approx(0.9),
    }
    assert dets[1]["category_id"] == 9
    assert dets[1]["bbox"] == pytest.approx([0.5, 1.25, 2.0, 2.75])
    assert all(isinstance(v, float) for v in dets[1]["bbox"])
    assert isinstance(dets[1]["image_id"], int) and isinstance(dets[1]["category_id"], int)


def test_detections_to_coco_rejects_bad_input() -> None:
    bad_label = [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([3])}]
    with pytest.raises(ValueError, match="out of range"):
        detections_to_coco(bad_label, [1], LABEL_TO_CAT)
    with pytest.raises(ValueError, match="image ids"):
        detections_to_coco(bad_label, [1, 2], LABEL_TO_CAT)


def test_perfect_detections_give_ap_one(capsys: pytest.CaptureFixture[str]) -> None:
    gt = make_gt()
    dets = detections_to_coco(model_outputs(), [1, 2, 3], LABEL_TO_CAT)
    metrics = evaluate_coco(gt, dets)
    out = capsys.readouterr().out
    assert sum("Average Precision" in ln for ln in out.splitlines()) == 6
    assert sum("Average Recall" in ln for ln in out.splitlines()) == 6
    for name in STAT_NAMES:
        assert metrics[name] == pytest.approx(1.0), name
    assert metrics["per_class"]["cat"] == pytest.approx(1.0)
    assert metrics["per_class"]["dog"] == pytest.approx(1.0)
    assert math.isnan(metrics["per_class"]["bird"])
    assert list(metrics["per_class"]) == ["cat", "dog", "bird"]  # sorted category-id order


def test_shifted_boxes_lower_ap() -> None:
    gt = make_gt()
    # Shift by 20% of the width: IoU = 0.8/1.2 = 0.67, a hit at 0.5 but a miss at 0.75.
    dets = detections_to_coco(model_outputs(dx=0.2), [1, 2, 3], LABEL_TO_CAT)
    m = evaluate_coco(gt, dets)
    assert 0.0 < m["bbox_mAP"] < 1.0
    assert m["bbox_mAP_50"] == pytest.approx(1.0)
    assert m["bbox_mAP_75"] == pytest.approx(0.0)


def test_no_detections_do_not_crash(capsys: pytest.CaptureFixture[str]) -> None:
    gt = make_gt()
    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.long),
        }
    ] * 3
    dets = detections_to_coco(empty, [1, 2, 3], LABEL_TO_CAT)
    assert dets == []
    m = evaluate_coco(gt, dets)
    out = capsys.readouterr().out
    summary = [ln for ln in out.splitlines() if "Average Precision" in ln or "Average Recall" in ln]
    assert len(summary) == 12
    for name in STAT_NAMES:
        assert m[name] == 0.0, name
    assert m["per_class"]["cat"] == 0.0 and m["per_class"]["dog"] == 0.0
    assert math.isnan(m["per_class"]["bird"])


def test_image_ids_restricts_evaluation() -> None:
    gt = make_gt()
    # Detections only for image 1: perfect on image 1, missing everything else.
    dets = detections_to_coco(model_outputs(image_ids=(1,)), [1], LABEL_TO_CAT)
    assert evaluate_coco(gt, dets)["bbox_mAP"] < 1.0
    assert evaluate_coco(gt, dets, image_ids=[1])["bbox_mAP"] == pytest.approx(1.0)


def test_class_names_override_and_validation() -> None:
    gt = make_gt()
    dets = detections_to_coco(model_outputs(), [1, 2, 3], LABEL_TO_CAT)
    m = evaluate_coco(gt, dets, class_names=["Cat", "Dog", "Bird"])
    assert set(m["per_class"]) == {"Cat", "Dog", "Bird"}
    with pytest.raises(ValueError, match="class names"):
        evaluate_coco(gt, dets, class_names=["a"])


def test_per_class_table_contains_names() -> None:
    per_class = {"cat": 0.5, "dog": 1.0, "bird": float("nan"), "a_very_long_name": 0.123}
    table = format_per_class_table(per_class)
    for name in per_class:
        assert name in table
    assert "50.0" in table and "100.0" in table and "nan" in table and "12.3" in table
    lines = table.splitlines()
    assert lines[0].count("category") == 3  # three (name, AP) column pairs
    assert lines[0].count("AP (%)") == 3  # percent, beside the fractions of "bbox AP 0.0334"
    assert len(lines) == 2 + 2  # header, rule, two data rows for four classes


def test_write_metrics_json_is_strict_json(tmp_path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    write_metrics_json({"bbox_mAP": 0.25, "per_class": {"cat": float("nan")}}, path)
    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"bbox_mAP": 0.25, "per_class": {"cat": None}}


def test_unknown_backend_and_missing_faster_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    gt = make_gt()
    with pytest.raises(ValueError, match="unknown"):
        evaluate_coco(gt, [], backend="nope")  # type: ignore[arg-type]
    # Simulate the optional package being absent.
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        evaluate_coco(gt, [], backend="faster_coco_eval")


def _noisy_detections() -> list[dict]:
    """Jittered true positives plus false positives, so precision curves are non-trivial."""
    g = torch.Generator().manual_seed(0)
    outs = []
    for img in (1, 2, 3):
        rows = [b for b in GT_BOXES if b[0] == img]
        boxes, labels = [], []
        for _, c, x, y, w, h in rows:
            for _ in range(3):
                j = (torch.rand(4, generator=g) - 0.5) * 0.4 * torch.tensor([w, h, w, h])
                boxes.append(torch.tensor([x, y, x + w, y + h]) + j)
                labels.append(LABEL_TO_CAT.index(c))
        for _ in range(4):
            xy = torch.rand(2, generator=g) * 400
            wh = 10 + torch.rand(2, generator=g) * 150
            boxes.append(torch.cat([xy, xy + wh]))
            labels.append(int(torch.randint(0, 3, (1,), generator=g)))
        outs.append(
            {
                "boxes": torch.stack(boxes),
                "scores": torch.rand(len(boxes), generator=g),
                "labels": torch.tensor(labels),
            }
        )
    return outs


def test_per_class_ap_averages_to_map() -> None:
    gt = make_gt()
    dets = detections_to_coco(_noisy_detections(), [1, 2, 3], LABEL_TO_CAT)
    m = evaluate_coco(gt, dets)
    assert 0.0 < m["bbox_mAP"] < 1.0
    valid = [ap for ap in m["per_class"].values() if not math.isnan(ap)]
    # COCO mAP is the mean over categories with GT, so the per-class numbers must agree.
    assert sum(valid) / len(valid) == pytest.approx(m["bbox_mAP"], abs=1e-9)


def test_faster_coco_eval_matches_pycocotools() -> None:
    pytest.importorskip("faster_coco_eval")
    gt = make_gt()
    dets = detections_to_coco(_noisy_detections(), [1, 2, 3], LABEL_TO_CAT)
    ref = evaluate_coco(gt, dets, backend="pycocotools")
    fast = evaluate_coco(gt, dets, backend="faster_coco_eval")
    assert 0.0 < ref["bbox_mAP"] < 1.0
    for name in STAT_NAMES:
        assert fast[name] == pytest.approx(ref[name], abs=1e-4), name
    for cls, ap in ref["per_class"].items():
        if math.isnan(ap):
            assert math.isnan(fast["per_class"][cls])
        else:
            assert fast["per_class"][cls] == pytest.approx(ap, abs=1e-4), cls
    # Empty detections through the fast backend too.
    empty = evaluate_coco(gt, [], backend="faster_coco_eval")
    assert empty["bbox_mAP"] == 0.0
