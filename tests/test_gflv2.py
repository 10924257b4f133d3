"""GFLv2: the Distribution-Guided Quality Predictor, the QFL on the joint probability, and a GFLv2
model through every tool (config, train, eval, predict, export, resume, checkpoint import).

Shape legend: `B` images, `A` priors, `C` classes, `R` = reg_max, `N` rows of the loss.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gfldet.losses import quality_focal_loss
from gfldet.models.build import build_gfl
from gfldet.models.head import DGQP, GFLHead, joint_logit


def _side_logits(*probs: list[float]) -> torch.Tensor:
    """[1, 4(R+1), 1, 1] regression logits whose per-side softmax is exactly `probs`."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).reshape(1, -1, 1, 1)


def test_dgqp_worked_by_hand():
    # R = 4 (5 bins). Softmax per side, its top-4 (descending) and their mean:
    #   side 0 [.10 .40 .20 .25 .05] -> .40 .25 .20 .10, mean .2375
    #   side 1 [.60 .30 .04 .03 .03] -> .60 .30 .04 .03, mean .2425
    #   sides 2, 3 uniform .2        -> .2 .2 .2 .2,     mean .2
    # 20 statistics, side-major: channel 5 * side + j (j = 0..3 top-k, 4 the mean).
    # hidden 0 = sum of the top-1s - 1 = (.4 + .6 + .2 + .2) - 1 = 0.4 (ReLU keeps it)
    # hidden 1 = -(sum of the means)  = -.88 -> ReLU 0 (without the ReLU u would be -3.6)
    # u = 2 * 0.4 + 5 * 0 + 0.2 = 1.0, quality q = sigmoid(1) = 0.7310585786300049
    # class logit z = 0: joint score s = 0.5 * q = 0.36552928931500245
    dgqp = DGQP(reg_max=4, topk=4, channels=2, add_mean=True).double()
    with torch.no_grad():
        dgqp.hidden.weight.zero_()
        dgqp.hidden.weight[0, [0, 5, 10, 15], 0, 0] = 1.0
        dgqp.hidden.weight[1, [4, 9, 14, 19], 0, 0] = -1.0
        dgqp.hidden.bias.copy_(torch.tensor([-1.0, 0.0]))
        dgqp.out.weight.copy_(torch.tensor([2.0, 5.0]).reshape(1, 2, 1, 1))
        dgqp.out.bias.fill_(0.2)
    reg = _side_logits([.10, .40, .20, .25, .05], [.60, .30, .04, .03, .03], [.2] * 5, [.2] * 5)
    u = dgqp(reg)
    assert u.shape == (1, 1, 1, 1)
    assert u.item() == pytest.approx(1.0, abs=1e-12)
    s = torch.sigmoid(joint_logit(torch.zeros(1, 1, 1, 1, dtype=torch.float64), u))
    assert s.item() == pytest.approx(0.36552928931500245, abs=1e-12)


def test_dgqp_without_mean_has_4k_inputs_and_checks_topk():
    assert DGQP(reg_max=16, topk=3, add_mean=False).hidden.in_channels == 12
    assert DGQP().hidden.in_channels == 20 and DGQP().out.out_channels == 1  # paper: 4 x (4 + 1)
    with pytest.raises(ValueError, match="topk"):
        DGQP(reg_max=2, topk=4)


def test_head_class_output_is_the_joint_logit():
    torch.manual_seed(0)
    head = GFLHead(3, in_channels=32, feat_channels=32, stacked_convs=1, reg_max=4, num_levels=1,
                   dgqp=DGQP(reg_max=4, channels=8)).double()
    for p in head.dgqp.parameters():  # away from init, so that the quality is not ~0.5 everywhere
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    cls_logits, reg_logits = head([x])  # [B, A, C], [B, A, 4(R+1)]
    z = head.cls_out(head.cls_tower(x)).permute(0, 2, 3, 1).flatten(1, 2)
    u = head.dgqp(head.reg_out(head.reg_tower(x)) * head.scales[0]).permute(0, 2, 3, 1).flatten(1, 2)
    expected = torch.sigmoid(z) * torch.sigmoid(u)  # [B, A, C]: one quality for all classes
    assert cls_logits.shape == (2, 15, 3) and reg_logits.shape == (2, 15, 20)
    torch.testing.assert_close(torch.sigmoid(cls_logits), expected, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(torch.sigmoid(cls_logits), torch.sigmoid(z))


def official_qfl_on_probabilities(prob: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                                  beta: float = 2.0) -> torch.Tensor:
    """GFocalV2's `quality_focal_loss(use_sigmoid=False)`, restated: F.binary_cross_entropy on the
    joint probability [N, C], 0 targets everywhere but the labelled class of a positive. -> [N]"""
    loss = F.binary_cross_entropy(prob, torch.zeros_like(prob), reduction="none") * prob.pow(beta)
    pos = (labels >= 0) & (labels < prob.shape[1])
    rows, cols = pos.nonzero()[:, 0], labels[pos]
    p = prob[rows, cols]
    pos_loss = F.binary_cross_entropy(p, scores[rows], reduction="none") * (scores[rows] - p).abs().pow(beta)
    return loss.index_put((rows, cols), pos_loss).sum(dim=1)


def _qfl_cases() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class logits z [N, C], quality logits u [N, 1], labels [N], IoU targets [N], float64:
    random rows plus joint scores near 0 (1e-17) and near 1 (1 - 4e-9), and targets 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, generator=gen, dtype=torch.float64) * 3
    u = torch.randn(8, 1, generator=gen, dtype=torch.float64) * 3
    z[0], u[0] = 20.0, 20.0  # s = sigmoid(20)^2 = 1 - 4.1e-9
    z[1], u[1] = -20.0, -20.0  # s = 4.2e-18
    z[2, 1], u[2] = 20.0, 20.0  # near 1 on the positive entry of a positive with target 1
    labels = torch.tensor([0, 4, 1, 2, 3, 4, 0, 1])  # 4 = background
    scores = torch.tensor([0.0, 0.0, 1.0, 0.7, 1.0, 0.0, 0.3, 0.0], dtype=torch.float64)
    return z, u, labels, scores


def test_log_space_qfl_equals_bce_qfl_on_the_joint_probability_values_and_gradients():
    z, u, labels, scores = _qfl_cases()
    z1, u1 = z.clone().requires_grad_(), u.clone().requires_grad_()
    ours = quality_focal_loss(joint_logit(z1, u1), labels, scores)
    z2, u2 = z.clone().requires_grad_(), u.clone().requires_grad_()
    reference = official_qfl_on_probabilities(torch.sigmoid(z2) * torch.sigmoid(u2), labels, scores)
    # near s = 1 the reference forms 1 - s from a rounded s: ~1e-16 / 4e-9 relative, so 1e-6
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(ours[3:], reference[3:], rtol=1e-12, atol=1e-14)  # ordinary rows
    weights = torch.linspace(0.5, 2.0, len(ours), dtype=torch.float64)
    gz1, gu1 = torch.autograd.grad((ours * weights).sum(), (z1, u1))
    gz2, gu2 = torch.autograd.grad((reference * weights).sum(), (z2, u2))
    torch.testing.assert_close(gz1, gz2, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gu1, gu2, rtol=1e-6, atol=1e-12)
    assert gu1.abs().sum() > 0  # the classification loss trains the quality branch


def test_joint_logit_is_finite_where_both_sigmoids_round_to_one():
    # float32: logsigmoid(z) rounds to 0 beyond z ~ 104, so log s = 0 and logit(s) = inf unguarded
    z = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
    u = torch.tensor([[200.0]], requires_grad=True)
    logit = joint_logit(z, u)
    loss = quality_focal_loss(logit, torch.tensor([0]), torch.tensor([1.0]))
    loss.backward()
    assert torch.isfinite(logit).all() and torch.isfinite(loss).all()
    assert torch.isfinite(z.grad).all() and torch.isfinite(u.grad).all()


def test_box_weights_are_the_max_joint_probability():
    # The criterion weighs each positive's GIoU and DFL by sigmoid(max over classes of the class
    # output); with DGQP that is max_c sigmoid(z_c) * q, the official `cls_score.max(dim=1)`.
    z, u, _, _ = _qfl_cases()
    weight = joint_logit(z, u).amax(dim=1).sigmoid()
    torch.testing.assert_close(weight, (torch.sigmoid(z) * torch.sigmoid(u)).amax(dim=1), rtol=1e-12, atol=0)


def _tiny_batch() -> tuple[torch.Tensor, list[dict]]:
    images = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 70]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 20, 100, 90], [5, 5, 40, 30]]), "labels": torch.tensor([2, 0])}]
    return images, targets


def _tiny_model(dgqp: bool, seed: int = 0):
    torch.manual_seed(seed)
    return build_gfl(num_classes=3, depth=18, fpn_channels=32, feat_channels=32, stacked_convs=1,
                     dgqp=dgqp)


def test_gflv2_trains_under_bf16_autocast_with_finite_losses_and_gradients():
    model = _tiny_model(dgqp=True).train()
    images, targets = _tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.head.dgqp.hidden.weight.grad.abs().sum() > 0


def test_gflv2_starts_with_a_gflv1_sized_classification_loss():
    # GFocalV2#5: QFL given probabilities as if they were logits starts at 700-800. Here the head
    # emits a logit whenever DGQP is on, so the loss starts where GFLv1's does (same trunk draws:
    # the quality 0.5 halves the initial 0.01 scores, which lowers the negatives' loss).
    images, targets = _tiny_batch()
    v1 = _tiny_model(dgqp=False).train()(images, targets)["loss_cls"]
    v2 = _tiny_model(dgqp=True).train()(images, targets)["loss_cls"]
    assert 0.2 * v1 < v2 < 1.5 * v1 < 5


def test_dgqp_off_builds_exactly_the_gflv1_model():
    v1, off = _tiny_model(dgqp=False), _tiny_model(dgqp=False)
    assert off.head.dgqp is None
    v2 = _tiny_model(dgqp=True)
    extra = set(v2.state_dict()) - set(v1.state_dict())
    assert extra == {"head.dgqp.hidden.weight", "head.dgqp.hidden.bias", "head.dgqp.out.weight",
                     "head.dgqp.out.bias"}
    assert sum(v2.state_dict()[k].numel() for k in extra) == 20 * 64 + 64 + 64 + 1  # 1,409 (paper)
    assert math.isclose(v2.head.dgqp.hidden.weight.std().item(), 0.01, rel_tol=0.2)  # N(0, 0.01)
    assert v2.head.dgqp.out.bias.abs().sum() == 0
