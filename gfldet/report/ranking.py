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


def image_score(m: ImageMatches, score_thr: float) -> ImageScore:
    """F1 = 2 TP / (2 TP + FP + FN) of the detections >= `score_thr`, matched as COCOeval
    matches them (its class, greedy by score, so the matches above a threshold are those of
    all detections); 1 for an image with neither boxes nor detections."""
    keep = m.det_scores >= score_thr
    tp = int((keep & (m.det_gt >= 0)).sum())
    fp = int((keep & (m.det_gt < 0)).sum())
    fn = len(m.gt_ids) - tp
    denominator = 2 * tp + fp + fn
    return ImageScore(m.image_id, 2 * tp / denominator if denominator else 1.0, tp, fp, fn)


def worst_images(images: list[ImageMatches], score_thr: float, n: int) -> list[ImageScore]:
    """The `n` images with the lowest F1; ties go to more errors (FP + FN), then lower image id."""
    scores = [image_score(m, score_thr) for m in images]
    return sorted(scores, key=lambda s: (s.f1, -(s.false_positives + s.missed), s.image_id))[:n]
