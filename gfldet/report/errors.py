"""Where the AP goes: a confusion matrix and a TIDE error breakdown (Bolya et al., ECCV 2020).

Both start from COCOeval's class-aware matching at IoU 0.5 (`gfldet.report.matching`), so the
breakdown's base AP is pycocotools' AP50 exactly. Shape legend: K classes, D detections and G
ground-truth boxes of an image.

TIDE's error types (paper Sec. 2.2) are `ERROR_TYPES`. Each is fixed by an oracle (Sec. 2.3) and
the AP recomputed; its dAP is the gain. A Cls or Loc fix applies only to the highest-scoring error
aimed at a box, and only when no detection matched that box (the others are suppressed). The
checks run in tidecv's order (Loc, Cls, Dupe, Bkg, else Both), which decides a detection fitting
two types.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from gfldet.report.matching import ImageMatches

# Each type of a false positive by its highest IoU with the ground truth (t_f = 0.5, t_b = 0.1),
# and its fix, as the report shows them.
ERROR_TYPES = {
    "Cls": "classification error: the box overlaps a ground-truth box of another class with IoU "
           ">= 0.5 (right place, wrong class). Fixed by giving it that box's class.",
    "Loc": "localisation error: its best overlap with a box of its class has 0.1 <= IoU < 0.5 "
           "(right class, poor box). Fixed by giving it that box.",
    "Both": "classification and localisation error: 0.1 <= IoU < 0.5 with a box of another class "
            "only. Fixed by removing it.",
    "Dupe": "duplicate: IoU >= 0.5 with a box of its class that a higher-scoring detection already "
            "matched. Fixed by removing it.",
    "Bkg": "background error: IoU < 0.1 with every ground-truth box. Fixed by removing it.",
    "Miss": "missed box: ground truth that no detection matched and no Cls or Loc error aimed at. "
            "Fixed by removing it from the ground truth.",
}
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall points


def average_precision(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
    """COCO's interpolated AP of one class: precision made non-increasing in recall and read at
    101 recall points (the first detection reaching each; 0 past the last recall reached).
    Ties in score keep the given order (COCOeval sorts with a stable sort as well)."""
    if num_gt <= 0:
        return float("nan")
    if not len(scores):
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    tp = np.cumsum(np.asarray(is_tp, dtype=bool)[order])
    fp = np.cumsum(~np.asarray(is_tp, dtype=bool)[order])
    recall = tp / num_gt
    precision = np.maximum.accumulate((tp / np.maximum(tp + fp, 1))[::-1])[::-1]
    at = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    sampled = np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)
    return float(sampled.mean())


@dataclass
class _Point:
    """One detection in the AP computation of class `label`."""

    label: int
    score: float
    tp: bool
    error: str | None = None  # its TIDE type when a false positive
    target_label: int | None = None  # the class its fix gives it (None: the fix removes it)


@dataclass
class TideResult:
    """Base AP50 (COCO's, mean over classes with ground truth), dAP and count per error type."""

    ap: float
    delta_ap: dict[str, float]
    counts: dict[str, int]


def classify_false_positive(iou_row: np.ndarray, same_class: np.ndarray, gt_matched: np.ndarray,
                            fg: float, bg: float) -> tuple[str, int]:
    """TIDE type of one false positive and the gt index it refers to (-1 for Bkg/Both).
    `iou_row`, `same_class`, `gt_matched`: [G] for the detection's image."""
    if not len(iou_row):
        return "Bkg", -1
    own = np.where(same_class, iou_row, -1.0)
    j = int(own.argmax())
    if bg <= own[j] < fg:
        return "Loc", j
    other = np.where(same_class, -1.0, iou_row)
    j = int(other.argmax())
    if other[j] >= fg:
        return "Cls", j
    if np.where(gt_matched, own, -1.0).max() >= fg:
        return "Dupe", -1
    if iou_row.max() < bg:
        return "Bkg", -1
    return "Both", -1


def tide_errors(images: list[ImageMatches], fg: float = 0.5, bg: float = 0.1) -> TideResult:
    """TIDE's main errors of matches made at IoU `fg` (see the module docstring)."""
    points: list[_Point] = []
    num_gt: Counter[int] = Counter()
    missed_per_class: Counter[int] = Counter()
    # (image position, gt index) of a box a Cls/Loc error aims at -> point of the best such error
    best_fix: dict[tuple[int, int], int] = {}
    for pos, m in enumerate(images):
        num_gt.update(m.gt_labels.tolist())
        gt_matched, iou = m.gt_matched, m.iou()  # [G], [D, G]
        for d in range(len(m.det_gt)):
            point = _Point(int(m.det_labels[d]), float(m.det_scores[d]), bool(m.det_gt[d] >= 0))
            if not point.tp:
                point.error, j = classify_false_positive(iou[d], m.gt_labels == point.label,
                                                         gt_matched, fg, bg)
                if point.error in ("Cls", "Loc") and not gt_matched[j]:
                    best = best_fix.get((pos, j))
                    if best is None or points[best].score < point.score:
                        best_fix[(pos, j)] = len(points)
            points.append(point)
        for j in np.flatnonzero(~gt_matched).tolist():
            if (pos, j) not in best_fix:
                missed_per_class[int(m.gt_labels[j])] += 1

    errors = Counter(p.error for p in points)
    counts = {kind: errors[kind] for kind in ERROR_TYPES} | {"Miss": missed_per_class.total()}
    for (pos, j), best in best_fix.items():  # a Cls/Loc fix applies to the best error only
        points[best].target_label = int(images[pos].gt_labels[j])

    def mean_ap(fix: str | None) -> float:
        per_class: dict[int, tuple[list[float], list[bool]]] = defaultdict(lambda: ([], []))
        for p in points:
            label, tp = p.label, p.tp
            if fix is not None and p.error == fix:
                if p.target_label is None:
                    continue  # removed, or suppressed by a better error aimed at its box
                label, tp = p.target_label, True
            per_class[label][0].append(p.score)
            per_class[label][1].append(tp)
        aps = []
        for k, n in num_gt.items():
            n -= missed_per_class[k] if fix == "Miss" else 0
            scores, tps = per_class.get(k, ([], []))
            if n == 0:  # every box of the class was missed: its AP is 0 with detections, else none
                if scores:
                    aps.append(0.0)
                continue
            aps.append(average_precision(np.array(scores), np.array(tps, dtype=bool), n))
        return float(np.mean(aps)) if aps else float("nan")

    base = mean_ap(None)
    return TideResult(base, {kind: mean_ap(kind) - base for kind in ERROR_TYPES}, counts)


def confusion_matrix(images: list[ImageMatches], num_classes: int, score_thr: float,
                     iou_thr: float = 0.5) -> np.ndarray:
    """Counts [K + 1, K + 1]: rows the ground truth's class, columns the detection's; the last
    row holds detections matching no box (background), the last column boxes nothing found.

    Detections scoring at least `score_thr` count. A detection matched by COCOeval (its class,
    IoU >= `iou_thr`) lands on the diagonal. Each remaining one, by descending score, takes the
    box of another class with its highest IoU >= `iou_thr` that no detection took yet, else it
    is background (a duplicate of a found box too). `images` must come from matches at `iou_thr`.
    """
    bg = num_classes
    counts = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for image in images:
        m = image.scoring_at_least(score_thr)
        taken = m.gt_matched
        matched = np.flatnonzero(m.det_gt >= 0)
        np.add.at(counts, (m.gt_labels[m.det_gt[matched]], m.det_labels[matched]), 1)
        iou = m.iou()  # [D, G]
        unmatched = np.flatnonzero(m.det_gt < 0)
        for d in unmatched[np.argsort(-m.det_scores[unmatched], kind="mergesort")].tolist():
            free = np.where(~taken & (m.gt_labels != m.det_labels[d]), iou[d], -1.0)
            if len(free) and free.max() >= iou_thr:
                j = int(free.argmax())
                taken[j] = True
                counts[m.gt_labels[j], m.det_labels[d]] += 1
            else:
                counts[bg, m.det_labels[d]] += 1
        np.add.at(counts, (m.gt_labels[~taken], bg), 1)
    return counts
