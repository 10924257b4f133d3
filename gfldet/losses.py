"""The elementwise GFL losses, unreduced: Quality Focal Loss, Distribution Focal Loss, GIoU.

Weighting and normalisation are not done here but once, where the total loss is formed
(`gfldet.models.criterion`). References: Li et al. 2020, "Generalized Focal Loss", Eq. 2 (QFL)
and Eq. 6 (DFL).

Shape legend: `N` priors, `C` classes, `M` regressed edges (positives x 4 sides), `R` = reg_max.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

__all__ = ["quality_focal_loss", "distribution_focal_loss", "giou_loss", "focal_loss"]


class _QualityFocalLoss(torch.autograd.Function):
    """QFL summed over classes, with its closed-form gradient.

    The target of entry (n, c) is `score[n]` if `c == labels[n]` and 0 otherwise, so the loss is
    the "all-negative" term sum_c softplus(x) * sigmoid(x)^beta plus a correction on one entry
    per positive row. The [N, C] passes are what costs, so the gradient is formed in the forward
    pass from the sigmoid and softplus already there and is the only tensor saved; backward is
    one multiply. `python benchmarks/loss_overhead.py --qfl` times it against plain autograd.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, scores: Tensor, beta: float) -> Tensor:
        num_classes = logits.shape[1]
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.to(dtype)
        sigma = torch.sigmoid(x)
        softplus = F.softplus(x)
        sigma_b = sigma.square() if beta == 2 else sigma.pow(beta)
        # [N], no [N, C] product; autocast would run vecdot in bf16/fp16 whatever its inputs
        with torch.autocast(x.device.type, enabled=False):
            neg = torch.linalg.vecdot(softplus, sigma_b, dim=1)
        grad = None
        if ctx.needs_input_grad[0]:
            # d/dx [softplus(x) * s^b] = s^b * (s + b * softplus(x) * (1 - s)), s = sigmoid(x).
            grad = torch.addcmul(softplus, softplus, sigma, value=-1)  # softplus * (1 - s)
            torch.add(sigma, grad, alpha=beta, out=grad).mul_(sigma_b)  # [N, C]

        # The positive entries (one per positive row): the correction to the all-negative term.
        is_pos = labels < num_classes
        col = labels.clamp(max=num_classes - 1)[:, None]
        x_pos = logits.gather(1, col)[:, 0].to(dtype)  # [N], the entry whose target is the score
        y = scores.to(dtype)
        s = torch.sigmoid(x_pos)
        bce = F.binary_cross_entropy_with_logits(x_pos, y, reduction="none")
        d = s - y
        d_abs_b = d.abs().pow(beta)  # |s - y|^b
        pos_term = bce * d_abs_b
        neg_term_at_pos = F.softplus(x_pos) * s.pow(beta)
        loss = neg + torch.where(is_pos, pos_term - neg_term_at_pos, torch.zeros_like(neg))

        if grad is not None:
            # The positive entry: L = bce(x, y) * |s - y|^b,
            # dL/dx = (s - y)|s - y|^b + b * bce * sign(s - y)|s - y|^(b-1) * s(1 - s).
            g_pos = d * d_abs_b
            if beta != 0:
                # sign(d)|d|^(b-1) is 0 at d = 0 for b > 1; guard b < 1, where the power diverges.
                slope = torch.where(d == 0, torch.zeros_like(d), d.sign() * d.abs().pow(beta - 1))
                g_pos = g_pos + beta * bce * slope * s * (1 - s)
            g_neg_at_pos = grad.gather(1, col)[:, 0]
            correction = torch.where(is_pos, g_pos - g_neg_at_pos, torch.zeros_like(g_pos))
            grad.scatter_add_(1, col, correction[:, None])
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss[:, None], None, None, None


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor,
                       beta: float = 2.0) -> Tensor:
    """Quality Focal Loss (GFL Eq. 2), summed over classes: QFL(x, y) = BCE(sigmoid(x), y) *
    |y - sigmoid(x)|^beta, where the target y is the IoU `scores[n]` for the labelled class of a
    positive and 0 for every other entry.

    Args:
        logits: [N, C] joint class-quality logits.
        labels: [N] int64 class in [0, C), or C for background.
        scores: [N] float IoU target of each positive (ignored for background).
        beta: focusing exponent.

    Returns:
        [N] loss per prior, computed in fp32.
    """
    assert logits.dim() == 2 and labels.shape == scores.shape == logits.shape[:1]
    return _QualityFocalLoss.apply(logits, labels, scores, beta)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss (GFL Eq. 6).

    For a continuous target y between bins y_l = floor(y) and y_r = y_l + 1:
        DFL = (y_r - y) * CE(logits, y_l) + (y - y_l) * CE(logits, y_r),
    minimised when the softmax puts (y_r - y) on y_l and (y - y_l) on y_r, so that the expectation
    recovers y. Because the two weights sum to 1 this equals
        logsumexp(logits) - (y_r - y) * logits[y_l] - (y - y_l) * logits[y_r].

    Args:
        logits: [M, R + 1] logits over the bins 0..R.
        target: [M] float in [0, R) (callers clamp to R - 0.1 so that y_r <= R).

    Returns:
        [M] loss, fp32.
    """
    logits = logits.float()
    left = target.long()
    weight_right = target - left
    right = (left + 1).clamp(max=logits.shape[1] - 1)
    chosen = torch.stack([left, right], dim=1)
    picked = logits.gather(1, chosen)  # [M, 2]
    return (torch.logsumexp(logits, dim=1) - (1 - weight_right) * picked[:, 0]
            - weight_right * picked[:, 1])


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of aligned boxes. pred, target: [M, 4] xyxy -> [M] (torchvision's op)."""
    return generalized_box_iou_loss(pred.float(), target.float(), reduction="none", eps=eps)


def focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (RetinaNet) with binary targets, summed over classes: the paper's
    baseline for the QFL ablation. logits [N, C], labels [N] (C = background) -> [N]."""
    num_classes = logits.shape[1]
    onehot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    return sigmoid_focal_loss(logits.float(), onehot.float(), alpha=alpha, gamma=gamma,
                              reduction="none").sum(dim=1)
