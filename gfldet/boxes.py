"""Box helpers that torchvision does not have: aligned IoU and distance (ltrb) coding.

Shape legend: `N` boxes. Boxes are `(x1, y1, x2, y2)`; `_ltrb` tensors are the distances from a
point to the left, top, right and bottom edges of a box. Pixel conventions follow MMDetection
2.x/3.x: no "+1" in widths, areas or IoU.
"""

from __future__ import annotations

import torch
from torch import Tensor


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of `boxes1[i]` with `boxes2[i]` (not all pairs, unlike `torchvision.ops.box_iou`).

    boxes1, boxes2: [..., 4] -> [...]. The union is clamped at `eps` so that degenerate boxes
    give 0 rather than NaN.
    """
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    return inter / (area1 + area2 - inter).clamp(min=eps)


def box_centers(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 2] centre (x, y)."""
    return (boxes[..., :2] + boxes[..., 2:]) * 0.5


def ltrb_to_boxes(points: Tensor, ltrb: Tensor) -> Tensor:
    """Decode point-to-edge distances: points [..., 2], ltrb [..., 4] -> [..., 4] xyxy."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def boxes_to_ltrb(points: Tensor, boxes: Tensor) -> Tensor:
    """Encode boxes as distances from points to their edges. [..., 2], [..., 4] -> [..., 4].

    Distances of a point outside the box are negative; callers clamp as their loss needs.
    """
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
