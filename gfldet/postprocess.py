"""Detections from head outputs, batched over images (GFL Supp. D, MMDetection 3.x test_cfg).

Per image and level, the top `nms_pre` (prior, class) pairs by score are kept if their score
exceeds `score_thr` (the score is the sigmoid of the joint class-quality logit, used as is).
Boxes are decoded, clipped to the resized image, rescaled to the original image, boxes with no
width or height dropped, then class-aware NMS and the best `max_per_img` per image.

Shape legend: `B` images, `A` priors, `C` classes, `K` candidates per image (all levels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from gfldet.boxes import ltrb_to_boxes
from gfldet.models.priors import Priors


@dataclass
class PostProcessSettings:
    score_thr: float = 0.05
    nms_pre: int = 1000  # candidates per level and image before NMS
    nms_iou: float = 0.6
    max_per_img: int = 100


def postprocess(
    cls_logits: Tensor,
    distances: Tensor,
    priors: Priors,
    valid: Tensor,
    image_sizes: Tensor,
    orig_sizes: Tensor,
    settings: PostProcessSettings,
) -> list[dict[str, Tensor]]:
    """Turn head outputs into detections per image (torchvision's detection output contract).

    Args:
        cls_logits: [B, A, C]; distances: [B, A, 4] (l, t, r, b) in stride units.
        valid: [B, A] bool, False for priors in batch padding.
        image_sizes: [B, 2] (h, w) of the resized, unpadded images (boxes are clipped to it).
        orig_sizes: [B, 2] (h, w) of the original images (boxes are rescaled to it).

    Returns:
        per image {"boxes": [N, 4] xyxy original pixels, "scores": [N], "labels": [N] int64}.
    """
    num_images, _, num_classes = cls_logits.shape
    scores = cls_logits.float().sigmoid().masked_fill(~valid[..., None], 0.0)

    cand_scores, cand_priors = [], []
    start = 0
    for count in priors.num_per_level:
        level_scores = scores[:, start : start + count].reshape(num_images, -1)  # [B, n*C]
        top_scores, top_idx = level_scores.topk(min(settings.nms_pre, level_scores.shape[1]), dim=1)
        cand_scores.append(top_scores)
        cand_priors.append(top_idx + start * num_classes)
        start += count
    cand_scores = torch.cat(cand_scores, dim=1)  # [B, K]
    flat_idx = torch.cat(cand_priors, dim=1)  # [B, K] index into A * C
    prior_idx, labels = flat_idx // num_classes, flat_idx % num_classes

    dist = distances.gather(1, prior_idx[..., None].expand(-1, -1, 4)) * priors.strides[prior_idx][..., None]
    boxes = ltrb_to_boxes(priors.centers[prior_idx], dist)  # [B, K, 4] resized-image pixels
    size_hw = image_sizes.to(boxes)
    max_xy = size_hw.flip(1).repeat(1, 2)[:, None, :]  # [B, 1, 4] (w, h, w, h)
    boxes = torch.minimum(boxes.clamp(min=0), max_xy)
    scale = (orig_sizes.to(boxes) / size_hw).flip(1).repeat(1, 2)[:, None, :]  # orig / resized
    boxes = boxes * scale

    keep = (cand_scores > settings.score_thr) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    image_idx = torch.arange(num_images, device=boxes.device)[:, None].expand_as(labels)
    boxes, scores_k, labels, image_idx = boxes[keep], cand_scores[keep], labels[keep], image_idx[keep]
    # One NMS call for the whole batch: boxes of other images or classes never suppress each other.
    kept = batched_nms(boxes, scores_k, image_idx * num_classes + labels, settings.nms_iou)  # by score
    kept = kept[torch.sort(image_idx[kept], stable=True).indices]  # grouped by image, score order kept
    image_of_kept = image_idx[kept]
    counts = torch.bincount(image_of_kept, minlength=num_images)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(kept), device=boxes.device) - first[image_of_kept]
    kept = kept[rank < settings.max_per_img]
    counts = counts.clamp(max=settings.max_per_img).tolist()
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(
            boxes[kept].split(counts), scores_k[kept].split(counts), labels[kept].split(counts), strict=True
        )
    ]
