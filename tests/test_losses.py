"""QFL, DFL and GIoU against hand-derived values (GFL Eq. 2 and 6, the seed's worked examples)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gfldet.losses import distribution_focal_loss, focal_loss, giou_loss, quality_focal_loss


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def reference_qfl(logits, labels, scores, beta):
    """QFL written straight from Eq. 2 with a dense target matrix, differentiated by autograd."""
    num_classes = logits.shape[1]
    target = torch.zeros_like(logits)
    pos = labels < num_classes
    target[pos, labels[pos]] = scores[pos].to(logits.dtype)
    sigma = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (target - sigma).abs().pow(beta)).sum(dim=1)


def test_qfl_dog_example():
    # Seed example: the dog box B has IoU target y = 0.4 and prediction sigma = 0.7, beta = 2:
    # QFL = -|0.4 - 0.7|^2 [0.6 ln 0.3 + 0.4 ln 0.7] = 0.09 * 0.8650537 = 0.0778548.
    loss = quality_focal_loss(torch.tensor([[logit(0.7)]]), torch.tensor([0]), torch.tensor([0.4]))
    assert loss.item() == pytest.approx(0.0778548, abs=1e-6)


def test_qfl_negative_entries_and_background():
    # Background row, sigma = 0.2 on both classes: each entry is -ln(0.8) * 0.2^2 = 0.0089257.
    x = torch.tensor([[logit(0.2), logit(0.2)]])
    loss = quality_focal_loss(x, torch.tensor([2]), torch.tensor([0.9]))
    assert loss.item() == pytest.approx(2 * -math.log(0.8) * 0.04, abs=1e-6)
    # A positive of class 1 with IoU 0.9: class 0 is still a negative entry, class 1 targets 0.9.
    pos = quality_focal_loss(x, torch.tensor([1]), torch.tensor([0.9]))
    expected = -math.log(0.8) * 0.04 + -(0.9 * math.log(0.2) + 0.1 * math.log(0.8)) * 0.7**2
    assert pos.item() == pytest.approx(expected, abs=1e-6)


def test_qfl_minimum_at_target():
    # The global minimum of QFL is sigma = y (and the loss there is the BCE entropy times 0).
    y = 0.63
    xs = torch.linspace(-3, 3, 601)
    losses = quality_focal_loss(xs[:, None], torch.zeros(601, dtype=torch.long),
                                torch.full((601,), y))
    best = torch.sigmoid(xs[losses.argmin()]).item()
    assert best == pytest.approx(y, abs=0.01)
    assert losses.min().item() < 1e-5


def test_qfl_beta_zero_is_bce_and_binary_target_is_focal():
    torch.manual_seed(0)
    x = torch.randn(20, 5)
    labels = torch.randint(0, 6, (20,))
    # beta = 0: the focusing factor is 1, QFL is plain BCE summed over classes.
    target = torch.zeros_like(x)
    pos = labels < 5
    target[pos, labels[pos]] = 0.7
    bce = F.binary_cross_entropy_with_logits(x, target, reduction="none").sum(1)
    torch.testing.assert_close(quality_focal_loss(x, labels, torch.full((20,), 0.7), beta=0.0), bce)
    # y in {0, 1}: QFL is focal loss with gamma = beta and no alpha (RetinaNet Eq. 4).
    onehot = torch.zeros_like(x)
    onehot[pos, labels[pos]] = 1.0
    p = x.sigmoid()
    p_t = torch.where(onehot == 1, p, 1 - p)
    fl = (-(1 - p_t) ** 2 * torch.log(p_t)).sum(1)
    torch.testing.assert_close(quality_focal_loss(x, labels, torch.ones(20), beta=2.0), fl,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, 2.5])
def test_qfl_closed_form_gradient_matches_autograd(beta):
    torch.manual_seed(1)
    x = torch.randn(64, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 8, (64,))
    scores = torch.rand(64, dtype=torch.float64)
    upstream = torch.rand(64, dtype=torch.float64)
    ours = quality_focal_loss(x, labels, scores, beta)
    ref = reference_qfl(x, labels, scores, beta)
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), x)
    torch.testing.assert_close(g_ours, g_ref)


def test_qfl_is_fp32_under_bf16_inputs():
    x = torch.randn(8, 3).bfloat16().requires_grad_()
    loss = quality_focal_loss(x, torch.tensor([0, 1, 3, 3, 2, 3, 3, 3]), torch.rand(8))
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_qfl_value_under_autocast_is_the_float32_value_bit_for_bit(autocast_dtype):
    """Autocast would run the all-negative term's `vecdot` in bf16/fp16 (found as a last-bits
    change of the demo's logged loss_cls): the loss must be the float32 one, whatever the region.
    """
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(400, 6, generator=gen) * 3).requires_grad_()
    labels, scores = torch.randint(0, 7, (400,), generator=gen), torch.rand(400, generator=gen)
    plain = quality_focal_loss(x, labels, scores)
    (plain_grad,) = torch.autograd.grad(plain.sum(), x)
    with torch.autocast("cpu", dtype=autocast_dtype):
        autocast = quality_focal_loss(x, labels, scores)
    (autocast_grad,) = torch.autograd.grad(autocast.sum(), x)
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, plain) and torch.equal(autocast_grad, plain_grad)


def test_dfl_worked_example_split():
    # Seed example: an edge at y = 7.3 lies between bins 7 and 8, weighted 0.7 and 0.3:
    # DFL = 0.7 * CE(7) + 0.3 * CE(8). With uniform logits over 17 bins, CE = ln 17 for every bin.
    uniform = torch.zeros(1, 17)
    assert distribution_focal_loss(uniform, torch.tensor([7.3])).item() == pytest.approx(
        math.log(17), abs=1e-5)
    # At the split (p7 = 0.7, p8 = 0.3, ~0 elsewhere) DFL is the entropy of (0.7, 0.3).
    probs = torch.full((17,), 1e-12)
    probs[7], probs[8] = 0.7, 0.3
    at_split = distribution_focal_loss(probs.log()[None], torch.tensor([7.3])).item()
    assert at_split == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)), abs=1e-5)
    # Explicit form with the two cross-entropies.
    logits = torch.randn(1, 17)
    ce = -logits.log_softmax(1)[0]
    expected = 0.7 * ce[7] + 0.3 * ce[8]
    assert distribution_focal_loss(logits, torch.tensor([7.3])).item() == pytest.approx(
        expected.item(), abs=1e-5)


def test_dfl_minimum_is_the_split_and_recovers_the_target():
    # Scan distributions that put q on bin 7 and 1 - q on bin 8: the loss is minimal at q = 0.7.
    qs = torch.linspace(0.01, 0.99, 99)
    logits = torch.full((99, 17), -30.0)
    logits[:, 7], logits[:, 8] = qs.log(), (1 - qs).log()
    losses = distribution_focal_loss(logits, torch.full((99,), 7.3))
    assert qs[losses.argmin()].item() == pytest.approx(0.7, abs=1e-6)
    # The split is a minimum among all distributions: random perturbations never do better, and
    # its expectation (the Integral) recovers 7.3.
    split = torch.full((17,), -30.0)
    split[7], split[8] = math.log(0.7), math.log(0.3)
    at_split = distribution_focal_loss(split[None], torch.tensor([7.3]))
    perturbed = split + 0.3 * torch.randn(200, 17, generator=torch.Generator().manual_seed(0))
    assert (distribution_focal_loss(perturbed, torch.full((200,), 7.3)) >= at_split - 1e-6).all()
    assert (split.softmax(0) * torch.arange(17.0)).sum().item() == pytest.approx(7.3, abs=1e-5)


def test_dfl_integer_target_is_cross_entropy():
    logits = torch.randn(3, 17)
    target = torch.tensor([0.0, 5.0, 15.9 - 0.9])  # 15.0
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    torch.testing.assert_close(distribution_focal_loss(logits, target), ce)


def test_giou_identical_and_disjoint():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert giou_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    # Disjoint unit squares with a gap of 1: IoU 0, enclosing area 3, union 2,
    # GIoU = 0 - (3 - 2) / 3 = -1/3, loss 4/3.
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert giou_loss(a, b).item() == pytest.approx(4 / 3, abs=1e-6)


def test_focal_loss_matches_formula():
    x = torch.tensor([[logit(0.9), logit(0.2)]])
    # class 0 positive: -0.25 * 0.1^2 ln 0.9; class 1 negative: -0.75 * 0.2^2 ln 0.8.
    expected = -0.25 * 0.01 * math.log(0.9) - 0.75 * 0.04 * math.log(0.8)
    assert focal_loss(x, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-6)
