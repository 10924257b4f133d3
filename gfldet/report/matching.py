"""A per-image view of pycocotools' matches at one IoU threshold, for the error analyses.

Shape legend: G ground-truth boxes of an image (crowd / ignored ones left out), D detections of
an image (those COCOeval scored: at most `maxDets[-1]` per class, ignored ones left out).
Boxes are COCO `(x, y, w, h)` in original-image pixels, as in the annotation file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils


@dataclass
class ImageMatches:
    """One image's ground truth and detections with COCOeval's class-aware matching."""

    image_id: int
    gt_labels: np.ndarray  # int64 [G] category index k (order of params.catIds)
    gt_boxes: np.ndarray  # float64 [G, 4] xywh
    det_labels: np.ndarray  # int64 [D]
    det_scores: np.ndarray  # float64 [D]
    det_boxes: np.ndarray  # float64 [D, 4] xywh
    det_gt: np.ndarray  # int64 [D] index into the gt arrays of the matched box, -1 = false positive

    @property
    def gt_matched(self) -> np.ndarray:
        """bool [G]: matched by one of these detections (of its class)."""
        matched = np.zeros(len(self.gt_labels), dtype=bool)
        matched[self.det_gt[self.det_gt >= 0]] = True
        return matched

    def scoring_at_least(self, score_thr: float) -> ImageMatches:
        """Only the detections scoring >= `score_thr`. Their matches are those COCOeval made
        among all detections: it matches greedily by descending score."""
        keep = self.det_scores >= score_thr
        return dataclasses.replace(self, det_labels=self.det_labels[keep],
                                   det_scores=self.det_scores[keep],
                                   det_boxes=self.det_boxes[keep], det_gt=self.det_gt[keep])

    def iou(self) -> np.ndarray:
        """IoU of every detection with every ground-truth box, [D, G] (pycocotools' own IoU)."""
        shape = (len(self.det_labels), len(self.gt_labels))
        if not all(shape):
            return np.zeros(shape)
        return mask_utils.iou(self.det_boxes, self.gt_boxes, [0] * shape[1])


def iou_index(coco_eval, iou_thr: float) -> int:
    """Index of `iou_thr` in `coco_eval.params.iouThrs`; ValueError when it is not evaluated."""
    found = np.flatnonzero(np.isclose(coco_eval.params.iouThrs, iou_thr))
    if not found.size:
        raise ValueError(f"IoU {iou_thr} is not among the evaluated thresholds "
                         f"{coco_eval.params.iouThrs}")
    return int(found[0])


def image_matches(coco_eval, iou_thr: float = 0.5) -> list[ImageMatches]:
    """Per image (in `params.imgIds` order), COCOeval's matches at `iou_thr` for area "all".

    `coco_eval` is a pycocotools `COCOeval` after `evaluate()`. Within an image, detections keep
    COCOeval's order (by class, then by descending score), so concatenating an image list's
    detections of one class reproduces the order `accumulate()` ranks ties in.
    """
    params = coco_eval.params
    t = iou_index(coco_eval, iou_thr)
    area = list(params.areaRngLbl).index("all")
    num_images = len(params.imgIds)
    gt_anns, dt_anns = coco_eval.cocoGt.anns, coco_eval.cocoDt.anns
    out = []
    for i, image_id in enumerate(params.imgIds):
        gts: list[tuple[int, int]] = []  # (annotation id, k)
        dets: list[tuple[int, int, float, int]] = []  # (id, k, score, matched gt id or 0)
        for k in range(len(params.catIds)):
            # evalImgs is ordered by category, then area range, then image
            e = coco_eval.evalImgs[(k * len(params.areaRng) + area) * num_images + i]
            if e is None:
                continue
            gts += [(g, k) for g, ignore in zip(e["gtIds"], e["gtIgnore"], strict=True)
                    if not ignore]
            dets += [(d, k, s, int(m)) for d, s, m, ignore in zip(
                e["dtIds"], e["dtScores"], e["dtMatches"][t], e["dtIgnore"][t], strict=True)
                if not ignore]
        gt_index = {g: j for j, (g, _) in enumerate(gts)}
        out.append(ImageMatches(
            image_id=int(image_id),
            gt_labels=np.array([k for _, k in gts], dtype=np.int64),
            gt_boxes=np.array([gt_anns[g]["bbox"] for g, _ in gts],
                              dtype=np.float64).reshape(-1, 4),
            det_labels=np.array([k for _, k, *_ in dets], dtype=np.int64),
            det_scores=np.array([s for _, _, s, _ in dets], dtype=np.float64),
            det_boxes=np.array([dt_anns[d]["bbox"] for d, *_ in dets],
                               dtype=np.float64).reshape(-1, 4),
            det_gt=np.array([gt_index[m] if m else -1 for *_, m in dets], dtype=np.int64)))
    return out
