"""Detections from head outputs, batched over images (GFL Supp. D, MMDetection 3.x test_cfg).

Per image and level, the top `nms_pre` (prior, class) pairs by score are kept if their score
exceeds `score_thr` (the score is the sigmoid of the joint class-quality logit, used as is).
Boxes are decoded, clipped to the resized image, rescaled to the original image, boxes with no
width or height dropped, then class-aware NMS and the best `max_per_img` per image.

This is the one implementation: evaluation and `Detector` call `postprocess`, and the exported
graphs (`gfldet.export`) trace `dense_detections` (the raw graph) and `select_detections` (the
NMS graph) on the same inputs. Both stages have fixed output shapes and take every size as a
tensor, so that a traced graph is right at any input size, batch size and per-image size.

Shape legend: `B` images, `A` priors, `C` classes, `L` levels, `P` = L * nms_pre candidates per
image, `K` = min(max_per_img, P) detections per image (padded).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from gfldet.boxes import ltrb_to_boxes
from gfldet.config import PostProcessSettings  # the schema's model.test
from gfldet.models.priors import Priors

XYXY_FROM_HW = [1, 0, 1, 0]  # (h, w) -> (w, h, w, h), the bounds of (x1, y1, x2, y2)


def postprocess(cls_logits: Tensor, distances: Tensor, priors: Priors, valid: Tensor,
                image_sizes: Tensor, orig_sizes: Tensor,
                settings: PostProcessSettings) -> list[dict[str, Tensor]]:
    """Turn head outputs into detections per image (torchvision's detection output contract).

    Args:
        cls_logits: [B, A, C]; distances: [B, A, 4] (l, t, r, b) in stride units.
        valid: [B, A] bool, False for priors in batch padding.
        image_sizes: [B, 2] (h, w) of the resized, unpadded images (boxes are clipped to it).
        orig_sizes: [B, 2] (h, w) of the original images (boxes are rescaled to it).

    Returns:
        per image {"boxes": [N, 4] xyxy original pixels, "scores": [N], "labels": [N] int64}.
    """
    boxes, scores = dense_detections(cls_logits, distances, priors, valid, image_sizes, orig_sizes)
    return split_detections(*select_detections(boxes, scores, priors.num_per_level, settings))


def dense_detections(cls_logits: Tensor, distances: Tensor, priors: Priors, valid: Tensor,
                     image_sizes: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Every prior's box and class scores, before any selection (the raw graph's outputs).

    Returns boxes [B, A, 4] xyxy original-image pixels, clipped to the image, and scores
    [B, A, C] (sigmoid), 0 at priors that are not `valid` (outside the image's own padded extent).
    """
    # [B, A, C] in the boxes' dtype (NMS)
    scores = cls_logits.to(distances.dtype).sigmoid().masked_fill(~valid[..., None], 0.0)
    # [B, A, 4] resized pixels
    boxes = ltrb_to_boxes(priors.centers, distances * priors.strides[:, None])
    size_hw = image_sizes.to(boxes)
    max_xy = size_hw[:, XYXY_FROM_HW][:, None, :]  # [B, 1, 4] (w, h, w, h)
    boxes = torch.minimum(boxes.clamp(min=0), max_xy)
    # [B, 1, 4] orig / resized
    scale = (orig_sizes.to(boxes) / size_hw)[:, XYXY_FROM_HW][:, None, :]
    return boxes * scale, scores


def select_detections(boxes: Tensor, scores: Tensor, num_per_level: list,
                      settings: PostProcessSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`dense_detections`' outputs -> the best detections per image (the selection in the module
    docstring), in fixed-size padded form.

    Returns boxes [B, K, 4], scores [B, K], labels [B, K] int64, num_dets [B] int64; rows past
    `num_dets[b]` are padding (zero boxes and scores, label -1), rows before it are in
    descending score order.
    """
    s = settings
    num_images, _, num_classes = scores.shape

    # Each level's scores are padded with nms_pre entries of -1 so that k is a constant whatever
    # the level size (a min(nms_pre, n * C) would be frozen by tracing); padding never passes
    # the threshold, as real scores are >= 0.
    cand_boxes, cand_scores, cand_labels = [], [], []
    start = 0
    for count in num_per_level:
        level_scores = scores[:, start : start + count].flatten(1)  # [B, n * C]
        padded = torch.cat(
            [level_scores, level_scores.new_full((num_images, s.nms_pre), -1.0)], dim=1
        )
        top_scores, top_idx = padded.topk(s.nms_pre, dim=1)  # [B, nms_pre]
        prior = (top_idx // num_classes).clamp(max=count - 1) + start  # padding -> any valid row
        cand_boxes.append(boxes.gather(1, prior[..., None].expand(-1, -1, 4)))
        cand_scores.append(top_scores)
        cand_labels.append(top_idx % num_classes)
        start = start + count
    boxes = torch.cat(cand_boxes, dim=1)  # [B, P, 4]
    scores = torch.cat(cand_scores, dim=1)  # [B, P]
    labels = torch.cat(cand_labels, dim=1)  # [B, P]
    num_cands = len(num_per_level) * s.nms_pre  # a Python int, also while tracing
    keep = (
        (scores > s.score_thr) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    )

    # One NMS call for the whole batch: boxes of other images or classes never suppress each other.
    flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.reshape(-1)
    image_idx = torch.arange(num_images, device=boxes.device)[:, None].expand_as(labels)
    groups = (image_idx * num_classes + labels).reshape(-1)
    idx = keep.reshape(-1).nonzero().squeeze(1)
    kept = idx[_class_aware_nms(flat_boxes, flat_scores, groups, idx, s.nms_iou)]

    # Survivors back onto a dense [B, P] grid (-1 elsewhere), then the best K per image.
    dense = flat_scores.new_full(flat_scores.shape, -1.0).scatter(0, kept, flat_scores[kept])
    max_dets = min(s.max_per_img, num_cands)
    top_scores, top_idx = dense.reshape(-1, num_cands).topk(max_dets, dim=1)  # [B, K]
    found = top_scores > -0.5  # survivors have scores >= 0, padding -1
    out_boxes = boxes.gather(1, top_idx[..., None].expand(-1, -1, 4)) * found[..., None]
    out_scores = torch.where(found, top_scores, torch.zeros_like(top_scores))
    out_labels = torch.where(found, labels.gather(1, top_idx), torch.full_like(top_idx, -1))
    return out_boxes, out_scores, out_labels, found.sum(dim=1)


def _class_aware_nms(boxes: Tensor, scores: Tensor, groups: Tensor, idx: Tensor,
                     iou: float) -> Tensor:
    """NMS within each group over the candidates `idx`; returns positions into `idx`.

    Eager: torchvision's `batched_nms`. While tracing, its coordinate trick written out, because
    `batched_nms` takes the offset from the kept subset behind a Python empty-input branch that
    tracing would freeze: each group is shifted by a multiple of the largest coordinate of all
    candidates (never an empty max), so that groups never overlap. The shift costs float32
    precision (about 6e-8 x groups x largest coordinate: 0.004 px for 80 classes at 800 px), so
    two boxes whose IoU is that close to `iou` may be decided unlike evaluation.
    """
    if not torch.jit.is_tracing():
        return batched_nms(boxes[idx], scores[idx], groups[idx], iou)
    offsets = groups[idx].to(boxes) * (boxes.max() + 1)
    return nms(boxes[idx] + offsets[:, None], scores[idx], iou)


def split_detections(boxes: Tensor, scores: Tensor, labels: Tensor,
                     num_dets: Tensor) -> list[dict[str, Tensor]]:
    """`select_detections`' padded outputs -> one {"boxes", "scores", "labels"} dict per image."""
    return [
        {"boxes": boxes[b, :n], "scores": scores[b, :n], "labels": labels[b, :n]}
        for b, n in enumerate(num_dets.tolist())
    ]
