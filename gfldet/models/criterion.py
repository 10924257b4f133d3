"""GFL training targets and the weighted total loss, for the whole batch at once.

Follows the reference recipe (MMDetection `GFLHead.loss_by_feat`, GFL Eq. 8):
- ATSS assigns priors to boxes; priors in batch padding are ignored.
- Classification: QFL with the IoU between the (detached) predicted box and its ground truth as
  the soft target of the positive's class, summed and divided by N = the number of positives
  (each image counted at least once), averaged over processes, clamped at 1.
- Boxes: GIoU (x2.0) and DFL (x0.25, averaged over the four sides) of each positive, weighted by
  the detached max predicted class score w, divided by the sum of w (averaged over processes,
  clamped at 1). Boxes, distances and DFL targets are in stride units; DFL targets are clamped to
  [0, reg_max - 0.1] so that the right bin stays valid.

The classification loss covers every prior. The box terms only matter at the positives, a few
percent of the priors: they are computed on a fixed-size gather of M slots per image holding every
positive (`positive_slots`), so there is no host-device sync (`nonzero`) and no dense pass over
B * A * 4(R+1) logits. Non-positive slots are masked out.

Shape legend: `B` images, `A` priors, `G` boxes per image (padded), `C` classes, `R` = reg_max.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from gfldet.assigner import atss_assign
from gfldet.boxes import aligned_box_iou, boxes_to_ltrb, ltrb_to_boxes
from gfldet.config import LossSettings  # the schema's model.loss: choices and weights
from gfldet.distributed import reduce_mean
from gfldet.losses import distribution_focal_loss, focal_loss, giou_loss, quality_focal_loss
from gfldet.models.priors import Priors


def pad_targets(targets: list[dict], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image targets into padded tensors: boxes [B, G, 4], labels [B, G], mask [B, G].

    G is at least 1: one masked slot keeps the gathers of the loss valid when no image has boxes.
    """
    counts = torch.tensor([len(t["boxes"]) for t in targets], device=device)
    boxes = pad_sequence([t["boxes"].float() for t in targets], batch_first=True).to(device)
    labels = pad_sequence([t["labels"].long() for t in targets], batch_first=True).to(device)
    if boxes.shape[1] == 0:
        boxes, labels = boxes.new_zeros(len(targets), 1, 4), labels.new_zeros(len(targets), 1)
    mask = torch.arange(boxes.shape[1], device=device) < counts[:, None]
    return boxes.view(len(targets), -1, 4), labels, mask


def positive_slots(positive: Tensor, num_per_level: list[int], num_boxes: int,
                   topk: int) -> tuple[Tensor, Tensor]:
    """M slots per image holding all of its positives: (prior index [B, M], is-positive [B, M]).

    The positives fill the first slots in prior order; the remaining slots point at prior 0 and
    are masked. M is ATSS's upper bound on positives, `num_boxes` * sum of min(topk, priors on
    the level), capped at A: a shape known on the host, so no sync is needed to size the gather.
    """
    num_images, num_priors = positive.shape
    cap = num_boxes * sum(min(topk, n) for n in num_per_level)
    slots = min(num_priors, cap)
    rank = positive.cumsum(dim=1) - 1  # slot of each positive
    column = torch.where(positive, rank, slots)  # non-positives all go to a spare column, dropped
    prior_index = torch.arange(num_priors, device=positive.device).expand(num_images, -1)
    index = positive.new_zeros(num_images, slots + 1, dtype=torch.long).scatter_(
        1, column, prior_index
    )
    is_positive = torch.arange(slots, device=positive.device) < positive.sum(dim=1, keepdim=True)
    return index[:, :slots], is_positive


def gfl_loss(cls_logits: Tensor, reg_logits: Tensor, decode: Callable[[Tensor], Tensor],
             priors: Priors, valid: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor,
             settings: LossSettings, reg_max: int | None, topk: int) -> dict[str, Tensor]:
    """The named GFL losses of a batch.

    Args:
        cls_logits: [B, A, C] joint class-quality logits.
        reg_logits: [B, A, 4(R+1)] distribution logits (or [B, A, 4] for Dirac).
        decode: reg logits [..., 4(R+1)] -> distances [..., 4] (l, t, r, b) in stride units
            (`GFLHead.distances`); applied to the positives' slots only.
        priors: the batch's priors; valid: [B, A] bool, False in batch padding.
        gt_boxes: [B, G, 4] xyxy input pixels; gt_labels: [B, G]; gt_mask: [B, G] bool.
        reg_max: R for DFL, or None when the representation has no distribution (Dirac).
        topk: ATSS candidates per level (`atss_assign`).

    Returns:
        {"loss_cls", "loss_bbox"} and "loss_dfl" when DFL is on; their sum is the training loss.
    """
    num_images, num_priors, num_classes = cls_logits.shape
    assigned = atss_assign(priors.boxes, priors.num_per_level, gt_boxes, gt_mask, topk, valid)
    positive = assigned >= 0  # [B, A]
    gt_index = assigned.clamp(min=0)
    labels = torch.where(positive, gt_labels.gather(1, gt_index), num_classes)  # [B, A]

    # The box terms on M slots per image holding every positive: [B, M] below.
    slots, slot_positive = positive_slots(positive, priors.num_per_level, gt_boxes.shape[1], topk)
    slot_gt = gt_index.gather(1, slots)
    strides = priors.strides[slots][..., None]  # [B, M, 1]
    centers = priors.centers[slots] / strides  # [B, M, 2] stride units (GFL regresses 0..R strides)
    slot_reg = reg_logits.gather(
        1, slots[..., None].expand(-1, -1, reg_logits.shape[2])
    )  # [B, M, 4(R+1)]
    pred_boxes = ltrb_to_boxes(centers, decode(slot_reg))  # [B, M, 4]
    target_boxes = gt_boxes.gather(1, slot_gt[..., None].expand(-1, -1, 4)) / strides  # [B, M, 4]
    # Non-positive slots regress onto their own anchor box so that every term stays finite.
    target_boxes = torch.where(slot_positive[..., None], target_boxes,
                               priors.boxes[slots] / strides)

    slot_quality = torch.where(
        slot_positive, aligned_box_iou(pred_boxes.detach(), target_boxes), 0.0
    )
    # scatter_add: masked slots repeat prior 0 with quality 0, which must not overwrite a positive.
    quality = slot_quality.new_zeros(num_images, num_priors).scatter_add(
        1, slots, slot_quality
    )  # [B, A]
    flat_logits = cls_logits.reshape(-1, num_classes)
    if settings.cls_loss == "qfl":
        cls_per_prior = quality_focal_loss(flat_logits, labels.reshape(-1), quality.reshape(-1),
                                           settings.qfl_beta)
    else:
        cls_per_prior = focal_loss(flat_logits, labels.reshape(-1), settings.focal_alpha,
                                   settings.focal_gamma)
    cls_per_prior = cls_per_prior.view(num_images, num_priors) * valid

    num_pos = positive.sum(dim=1).clamp(min=1).sum().float()  # each image counts at least once
    num_pos = reduce_mean(num_pos).clamp(min=1.0)
    slot_scores = cls_logits.detach().gather(
        1, slots[..., None].expand(-1, -1, num_classes)
    )  # [B, M, C]
    weight = torch.where(slot_positive, slot_scores.amax(dim=2).float().sigmoid(), 0.0)  # [B, M]
    weight_sum = reduce_mean(weight.sum()).clamp(min=1.0)

    losses = {"loss_cls": settings.cls_weight * cls_per_prior.sum() / num_pos}
    giou = giou_loss(pred_boxes.reshape(-1, 4), target_boxes.reshape(-1, 4)).view_as(weight)
    losses["loss_bbox"] = settings.giou_weight * (weight * giou).sum() / weight_sum

    if reg_max is not None and settings.dfl_weight > 0:
        target_ltrb = boxes_to_ltrb(centers, target_boxes).clamp(0, reg_max - 0.1)  # [B, M, 4]
        dfl = distribution_focal_loss(slot_reg.reshape(-1, reg_max + 1), target_ltrb.reshape(-1))
        dfl = dfl.view(*weight.shape, 4).mean(dim=2)
        losses["loss_dfl"] = settings.dfl_weight * (weight * dfl).sum() / weight_sum
    return losses
