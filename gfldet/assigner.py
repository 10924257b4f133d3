"""ATSS: Adaptive Training Sample Selection (Zhang et al. 2020), batched over images and boxes.

For every ground-truth box, take the k priors nearest to its centre on each pyramid level; the
box's IoU threshold is the mean plus the (unbiased) standard deviation of those candidates' IoUs.
A candidate becomes positive when its IoU reaches the threshold and its centre lies strictly
inside the box; a prior claimed by several boxes goes to the one it overlaps most.

The whole batch at once: padded ground truth `[B, G, 4]` with a mask, no Python loop over images
or boxes. The centre distances, the one O(A * G) part, are built per level and per block of boxes
(`_box_block`); everything else is O(B * G * k * levels).

Shape legend: `B` images, `A` priors (all levels), `G` ground-truth boxes (padded), `K` candidates
per box (k per level, summed over levels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gfldet.boxes import aligned_box_iou, box_centers

INSIDE_MARGIN = 0.01  # a candidate's centre must be > 0.01 px inside every edge (ATSS, mmdet)
# Elements of one [B, g, n] distance block. CPU: small enough for the distance passes and topk to
# run from cache (`python benchmarks/assigner.py --blocks` times it against one block per level).
# GPU: only a memory bound; blocks there would just add kernel launches.
CPU_BLOCK_ELEMENTS = 2**19  # 2 MiB of float32
GPU_BLOCK_ELEMENTS = 2**28  # 1 GiB of float32


def _box_block(num_images: int, num_priors: int, device: torch.device) -> int:
    """Boxes per distance block on a level of `num_priors` priors."""
    budget = GPU_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS
    return max(1, budget // (num_images * num_priors))


@torch.no_grad()
def atss_assign(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, gt_mask: Tensor,
                topk: int, valid_mask: Tensor | None = None) -> Tensor:
    """Assign each prior of each image to a ground-truth box, or to background.

    Args:
        anchors: [A, 4] anchor boxes, xyxy, levels concatenated in the order of `num_per_level`.
        num_per_level: number of priors on each level; sums to A.
        gt_boxes: [B, G, 4] ground-truth boxes, xyxy, padded along G.
        gt_mask: [B, G] bool, False marks padding.
        topk: candidates per level and box (clamped to the number of priors on the level).
        valid_mask: optional [B, A] bool; False priors (batch padding) are never candidates, so
            each image is assigned as if it were alone (MMDetection `valid_flags`).

    Returns:
        [B, A] int64: index in [0, G) of the assigned box, or -1 for background.
    """
    num_images, num_gts = gt_mask.shape
    num_anchors = anchors.shape[0]
    assert anchors.shape == (num_anchors, 4), anchors.shape
    assert gt_boxes.shape == (num_images, num_gts, 4), gt_boxes.shape
    assert sum(num_per_level) == num_anchors, (num_per_level, num_anchors)
    assigned = torch.full((num_images, num_anchors), -1, dtype=torch.long, device=anchors.device)
    if num_gts == 0 or num_anchors == 0:
        return assigned

    anchors = anchors.float()
    gt_boxes = gt_boxes.float()
    anchor_ctr = box_centers(anchors)  # [A, 2]
    gt_ctr = box_centers(gt_boxes)  # [B, G, 2]

    # 1. The k nearest priors (centre distance) of every box on every level, a block of boxes at
    # a time.
    candidate_idx, candidate_ok = [], []
    start = 0
    for count in num_per_level:
        if count == 0:
            continue
        level = slice(start, start + count)
        k = min(topk, count)
        block = min(num_gts, _box_block(num_images, count, anchors.device))
        # Two [B, block, n] buffers reused by every block: fresh ones per block would each touch
        # new pages (the allocator does not hand the freed ones back in time).
        dist_buf = anchors.new_empty(num_images, block, count)
        tmp_buf = torch.empty_like(dist_buf)
        nearest = anchors.new_empty(num_images, num_gts, k)
        idx = torch.empty(num_images, num_gts, k, dtype=torch.long, device=anchors.device)
        for first in range(0, num_gts, block):
            boxes = slice(first, min(first + block, num_gts))
            n_boxes = boxes.stop - first
            dist, tmp = dist_buf[:, :n_boxes], tmp_buf[:, :n_boxes]  # [B, g, n]
            torch.sub(gt_ctr[:, boxes, 0:1], anchor_ctr[level, 0], out=dist).square_()
            # Squared distances: the same order as the distances.
            dist.add_(torch.sub(gt_ctr[:, boxes, 1:2], anchor_ctr[level, 1], out=tmp).square_())
            if valid_mask is not None:
                dist.masked_fill_(~valid_mask[:, None, level], float("inf"))
            nearest[:, boxes], idx[:, boxes] = dist.topk(k, dim=2, largest=False)  # [B, g, k]
        candidate_idx.append(idx + start)
        candidate_ok.append(torch.isfinite(nearest))
        start += count
    candidates = torch.cat(candidate_idx, dim=2)  # [B, G, K]
    ok = torch.cat(candidate_ok, dim=2) & gt_mask[:, :, None]  # [B, G, K]

    # 2. Adaptive IoU threshold per box: mean + unbiased std over its valid candidates.
    cand_anchors = anchors[candidates]  # [B, G, K, 4]
    ious = aligned_box_iou(cand_anchors, gt_boxes[:, :, None, :])  # [B, G, K]
    ok_f = ok.float()
    count = ok_f.sum(dim=2, keepdim=True)  # [B, G, 1]
    mean = (ious * ok_f).sum(dim=2, keepdim=True) / count
    var = ((ious - mean).square() * ok_f).sum(dim=2, keepdim=True) / (count - 1)
    # A box with a single candidate gets var = 0/0 = NaN, hence no positive: as torch.std would.
    threshold = mean + var.sqrt()

    # 3. Positive: IoU >= threshold and the candidate's centre strictly inside the box.
    ctr = box_centers(cand_anchors)  # [B, G, K, 2]
    box = gt_boxes[:, :, None, :]
    margin = torch.minimum(ctr - box[..., :2], box[..., 2:] - ctr).amin(dim=3)  # [B, G, K]
    positive = ok & (ious >= threshold) & (margin > INSIDE_MARGIN)

    # 4. Priors claimed by several boxes go to the box of highest IoU (lowest index on ties,
    # like argmax). Scatter over flat (image, prior) indices, linear in the number of claims.
    image_offset = torch.arange(num_images, device=anchors.device)[:, None, None] * num_anchors
    flat = (candidates + image_offset).reshape(-1)
    claim_iou = torch.where(positive, ious, torch.full_like(ious, -1.0)).reshape(-1)
    best_iou = torch.full((num_images * num_anchors,), -1.0, device=anchors.device)
    best_iou.scatter_reduce_(0, flat, claim_iou, reduce="amax")
    wins = positive.reshape(-1) & (claim_iou == best_iou[flat])
    gt_index = torch.arange(num_gts, device=anchors.device)[None, :, None].expand_as(candidates)
    gt_index = gt_index.reshape(-1)
    winner = torch.full((num_images * num_anchors,), num_gts, dtype=torch.long,
                        device=anchors.device)
    claims = torch.where(wins, gt_index, torch.full_like(gt_index, num_gts))
    winner.scatter_reduce_(0, flat, claims, reduce="amin")
    assigned = torch.where(winner < num_gts, winner, torch.full_like(winner, -1))
    return assigned.view(num_images, num_anchors)
