"""gfl_loss computes the box terms on a fixed-size gather of slots holding every positive; it must
equal the plain dense computation over all priors (the recipe as written), values and gradients."""

from __future__ import annotations

import pytest
import torch

from gfldet.assigner import atss_assign
from gfldet.boxes import aligned_box_iou, boxes_to_ltrb, ltrb_to_boxes
from gfldet.config import AssignerConfig
from gfldet.losses import distribution_focal_loss, focal_loss, giou_loss, quality_focal_loss
from gfldet.models.criterion import LossSettings, gfl_loss, pad_targets, positive_slots
from gfldet.models.head import Integral
from gfldet.models.priors import make_priors, valid_prior_mask

STRIDES = [8, 16, 32, 64, 128]
REG_MAX = 16
TOPK = AssignerConfig().topk  # the recipe's ATSS candidates per level


def dense_reference(cls_logits, reg_logits, decode, priors, valid, gt_boxes, gt_labels, gt_mask,
                    settings: LossSettings, reg_max):
    """Every term over all B * A priors, masked: the straightforward form of the recipe."""
    b, a, c = cls_logits.shape
    assigned = atss_assign(priors.boxes, priors.num_per_level, gt_boxes, gt_mask, TOPK, valid)
    positive = assigned >= 0
    gt_index = assigned.clamp(min=0)
    labels = torch.where(positive, gt_labels.gather(1, gt_index), c)
    strides = priors.strides[:, None]
    centers = priors.centers / strides
    target = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4)) / strides
    pred = ltrb_to_boxes(centers, decode(reg_logits))
    target = torch.where(positive[..., None], target, priors.boxes / strides)
    quality = torch.where(positive, aligned_box_iou(pred.detach(), target), 0.0)
    flat_logits, flat_labels = cls_logits.reshape(-1, c), labels.reshape(-1)
    if settings.cls_loss == "qfl":
        cls = quality_focal_loss(flat_logits, flat_labels, quality.reshape(-1), settings.qfl_beta)
    else:
        cls = focal_loss(flat_logits, flat_labels, settings.focal_alpha, settings.focal_gamma)
    num_pos = positive.sum(dim=1).clamp(min=1).sum().float().clamp(min=1.0)
    weight = torch.where(positive, cls_logits.detach().amax(dim=2).sigmoid(), 0.0)
    weight_sum = weight.sum().clamp(min=1.0)
    losses = {"loss_cls": (cls.view(b, a) * valid).sum() / num_pos}
    giou = giou_loss(pred.reshape(-1, 4), target.reshape(-1, 4)).view(b, a)
    losses["loss_bbox"] = settings.giou_weight * (weight * giou).sum() / weight_sum
    if reg_max is not None and settings.dfl_weight > 0:
        ltrb = boxes_to_ltrb(centers, target).clamp(0, reg_max - 0.1)
        dfl = distribution_focal_loss(reg_logits.reshape(-1, reg_max + 1), ltrb.reshape(-1))
        dfl = dfl.view(b, a, 4).mean(2)
        losses["loss_dfl"] = settings.dfl_weight * (weight * dfl).sum() / weight_sum
    return losses, positive


def batch(seed: int, sizes=((192, 256), (256, 160), (224, 224)), boxes=(7, 0, 3), num_classes=5):
    """A padded batch: images of different sizes (so batch padding exists), one without boxes."""
    gen = torch.Generator().manual_seed(seed)
    pad_h, pad_w = (max(s[i] for s in sizes) for i in (0, 1))
    levels = [(-(-pad_h // s), -(-pad_w // s)) for s in STRIDES]
    priors = make_priors(levels, STRIDES, octave_base_scale=8)
    valid = valid_prior_mask(priors, torch.tensor(sizes), size_divisor=32)
    targets = []
    for (h, w), n in zip(sizes, boxes, strict=True):
        wh = 8 + torch.rand(n, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        xy = torch.rand(n, 2, generator=gen) * (torch.tensor([w, h]) - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, num_classes, (n,), generator=gen)})
    a = priors.boxes.shape[0]
    cls = (torch.randn(len(sizes), a, num_classes, generator=gen) - 3).requires_grad_()
    reg = torch.randn(len(sizes), a, 4 * (REG_MAX + 1), generator=gen).requires_grad_()
    return cls, reg, priors, valid, pad_targets(targets, torch.device("cpu"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cls_loss", ["qfl", "focal"])
def test_gathered_losses_and_gradients_equal_the_dense_computation(seed: int,
                                                                   cls_loss: str) -> None:
    cls, reg, priors, valid, gt = batch(seed)
    settings = LossSettings(cls_loss=cls_loss)
    integral = Integral(REG_MAX)
    got = gfl_loss(cls, reg, integral, priors, valid, *gt, settings, REG_MAX, TOPK)
    grads = torch.autograd.grad(sum(got.values()), [cls, reg])
    want, positive = dense_reference(cls, reg, integral, priors, valid, *gt, settings, REG_MAX)
    want_grads = torch.autograd.grad(sum(want.values()), [cls, reg])
    assert positive.sum() > 10  # the box terms are really exercised
    assert got.keys() == want.keys() == {"loss_cls", "loss_bbox", "loss_dfl"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert reg.grad is None and grads[1].abs().sum() > 0  # DFL/GIoU reach the regression logits


def test_dirac_boxes_through_the_gather() -> None:
    cls, _, priors, valid, gt = batch(5)
    reg = torch.rand(*cls.shape[:2], 4).mul(4).requires_grad_()  # plain distances
    settings = LossSettings()

    def decode(x):
        return torch.relu(x.float())

    got = gfl_loss(cls, reg, decode, priors, valid, *gt, settings, None, TOPK)
    want, _ = dense_reference(cls, reg, decode, priors, valid, *gt, settings, None)
    assert got.keys() == want.keys() == {"loss_cls", "loss_bbox"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_slots_hold_every_positive_even_when_boxes_crowd() -> None:
    # 40 heavily overlapping boxes on a small image: many positives; the slots must cover them all.
    gen = torch.Generator().manual_seed(0)
    levels = [(-(-128 // s), -(-128 // s)) for s in STRIDES]
    priors = make_priors(levels, STRIDES, octave_base_scale=8)
    xy = torch.rand(1, 40, 2, generator=gen) * 64
    gt = torch.cat([xy, xy + 24 + torch.rand(1, 40, 2, generator=gen) * 40], dim=2)
    assigned = atss_assign(priors.boxes, priors.num_per_level, gt,
                           torch.ones(1, 40, dtype=torch.bool), 9)
    positive = assigned >= 0
    slots, slot_positive = positive_slots(positive, priors.num_per_level, 40, 9)
    candidates = 40 * sum(min(9, n) for n in priors.num_per_level)
    assert slots.shape == (1, min(priors.boxes.shape[0], candidates))
    held = slots[slot_positive]
    assert positive.sum() > 0 and held.numel() == positive.sum()
    assert torch.equal(held, positive[0].nonzero()[:, 0])  # every positive once, in prior order
    assert not slot_positive[0, held.numel():].any()
