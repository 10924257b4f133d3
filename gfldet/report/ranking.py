"""The worst images of an evaluation: a per-image score that counts what a drawing shows."""

from __future__ import annotations

from dataclasses import dataclass

from gfldet.report.matching import ImageMatches


@dataclass(frozen=True)
class ImageScore:
    """F1 of one image's detections scoring >= the threshold against its ground truth."""

    image_id: int
    f1: float
    true_positives: int
    false_positives: int
    missed: int


def worst_images(images: list[ImageMatches], score_thr: float, n: int) -> list[ImageScore]:
    """The `n` images with the lowest F1 = 2 TP / (2 TP + FP + FN) of their detections scoring
    >= `score_thr`, matched as COCOeval matches them (1 for an image with neither boxes nor
    detections); ties go to more errors (FP + FN), then lower image id."""
    scores = []
    for m in images:
        det_gt = m.scoring_at_least(score_thr).det_gt
        tp = int((det_gt >= 0).sum())
        fp, fn = len(det_gt) - tp, len(m.gt_labels) - tp
        denominator = 2 * tp + fp + fn
        scores.append(ImageScore(m.image_id, 2 * tp / denominator if denominator else 1.0,
                                 tp, fp, fn))
    return sorted(scores, key=lambda s: (s.f1, -(s.false_positives + s.missed), s.image_id))[:n]
