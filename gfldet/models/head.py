"""The GFL head: a classification tower giving the joint class-quality score and a regression
tower giving each box edge as a discrete distribution over `reg_max + 1` bins (GFL Sec. 3).

Shape legend: `B` images, `A` priors over all levels, `C` classes, `R` = reg_max. The head's
outputs are flattened per level row-major and concatenated P3 -> P7, matching `make_priors`.

The module names are MMDetection's GFLHead's and, for GFLv2, the official GFocalV2 head's
(`reg_conf`); gfldet.convert_mmdet lists the few differences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gfldet.models.conv_module import ConvModule


def _tower(in_channels: int, feat_channels: int, num_convs: int, norm: str) -> nn.Sequential:
    """`num_convs` x (3x3 conv, norm, ReLU): MMDetection's `cls_convs` / `reg_convs`."""
    channels = [in_channels if i == 0 else feat_channels for i in range(num_convs)]
    return nn.Sequential(*(ConvModule(c, feat_channels, 3, norm=norm, relu=True) for c in channels))


def _at_least_float32(x: Tensor) -> Tensor:
    """`x` in float32, or float64 if it is float64: the box branch's precision (fp16 and bf16
    round a distance of 16 strides to 1/64 and 1/8 of a stride; float64 models stay exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Integral(nn.Module):
    """Expectation of a discrete distribution over the bins 0..R (GFL Eq. 5), in float32 (float64
    for float64 logits), under autocast and after model.half() / .to(bfloat16) alike.

    forward: [..., 4 * (R + 1)] logits -> [..., 4] distances in stride units, float32 or float64.
    """

    def __init__(self, reg_max: int) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1), persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        probs = _at_least_float32(logits).unflatten(-1, (4, self.reg_max + 1)).softmax(dim=-1)
        # Autocast would run the matmul in fp16/bf16, so it is off here; a matmul (not a sum of
        # products) keeps float32 results bit-identical to before. The integer bins follow the
        # model's dtype on .half() etc.: exact in fp16 up to 2048 and in bf16 up to 256.
        with torch.autocast(logits.device.type, enabled=False):
            return probs @ self.project.to(probs.dtype)


class DGQP(nn.Sequential):
    """GFLv2's Distribution-Guided Quality Predictor (GFLv2 Sec. 3.3): a sharp peak in each
    side's distribution should mean a high quality.

    forward: [B, 4 (R + 1), H, W] regression logits of one level -> [B, 1, H, W] logit u of the
    quality q = sigmoid(u). Per side, its `topk` largest bin probabilities and, with `add_mean`,
    their mean (as in the official code), side-major, then 1x1 conv, ReLU, 1x1 conv: the official
    `reg_conf` without its final Sigmoid (the head works with the logit, `joint_logit`).
    """

    def __init__(self, reg_max: int, *, topk: int, channels: int, add_mean: bool) -> None:
        if not 1 <= topk <= reg_max + 1:
            raise ValueError(f"topk must be in [1, reg_max + 1 = {reg_max + 1}], got {topk}")
        super().__init__(
            nn.Conv2d(4 * (topk + int(add_mean)), channels, 1), nn.ReLU(), nn.Conv2d(channels, 1, 1)
        )
        self.reg_max, self.topk, self.add_mean = reg_max, topk, add_mean

    def forward(self, reg_logits: Tensor) -> Tensor:
        batch, _, height, width = reg_logits.shape
        probs = reg_logits.unflatten(1, (4, self.reg_max + 1)).softmax(dim=2)  # [B, 4, R+1, H, W]
        stats = probs.topk(self.topk, dim=2).values  # [B, 4, k, H, W], descending
        if self.add_mean:
            stats = torch.cat([stats, stats.mean(dim=2, keepdim=True)], dim=2)  # [B, 4, k+1, H, W]
        return super().forward(stats.flatten(1, 2))  # [B, 1, H, W]


def joint_logit(cls_logits: Tensor, quality_logit: Tensor) -> Tensor:
    """The logit of s = sigmoid(z) * sigmoid(u), computed in log space, so that QFL on it equals
    BCE-based QFL on s (GFLv2) without forming log(s) or log(1 - s) from a rounded s.

    1 - s = sigmoid(-z) + sigmoid(z) * sigmoid(-u): two positive terms, so log(1 - s) is their
    log-sum-exp with no cancellation, finite for any finite z and u, with no branch.

    cls_logits [..., C] and quality_logit [..., 1] -> [..., C], in at least float32 (fp16 and bf16
    would keep little of 1 - s near s = 1).
    """
    z, u = _at_least_float32(cls_logits), _at_least_float32(quality_logit)
    log_sig_z = F.logsigmoid(z)
    log_s = log_sig_z + F.logsigmoid(u)
    return log_s - _logaddexp(F.logsigmoid(-z), log_sig_z + F.logsigmoid(-u))


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) + exp(b)), written out: ONNX export has no `aten::logaddexp`."""
    return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))


class GFLHead(nn.Module):
    """Towers of `stacked_convs` x (3x3 conv, GroupNorm(32) if norm == "gn", ReLU) shared over
    the levels. The keyword arguments are the config's `model.head` section
    (gfldet.config.HeadConfig documents them and holds their defaults).

    Args:
        num_classes: C, sigmoid classes (no background channel).
        box_repr: "distribution" (GFL: 4 x (R + 1) logits, Integral) or "dirac" (4 distances,
            ReLU, the ablation baseline of GFL Table 3).
        dirac_init_distance: "dirac" only (and then needed), each side's initial distance in
            strides (the bias of the 4 outputs); 0 starts every box at zero size, as torchvision's
            FCOS head does.
        dgqp: `DGQP`'s keyword arguments (GFLv2), or None (GFLv1). With it, the class output is
            the logit of sigmoid(class logit) x quality (`joint_logit`), so the loss, the box
            weights and post-processing read it as they read GFLv1's logits.
    """

    def __init__(self, num_classes: int, in_channels: int, num_levels: int, *, feat_channels: int,
                 stacked_convs: int, norm: str, reg_max: int, box_repr: str,
                 dirac_init_distance: float | None, dgqp: Mapping[str, Any] | None) -> None:
        super().__init__()
        if norm not in ("gn", "none"):
            raise ValueError(f"norm must be 'gn' or 'none', got {norm!r}")
        if box_repr not in ("distribution", "dirac"):
            raise ValueError(f"box_repr must be 'distribution' or 'dirac', got {box_repr!r}")
        if (dirac_init_distance is None) == (box_repr == "dirac"):
            raise ValueError("dirac_init_distance is needed with box_repr='dirac', and only then")
        if dgqp is not None and box_repr != "distribution":
            raise ValueError("dgqp needs box_repr='distribution'")
        # DGQP is built before the towers, so the random draws happen in the recipe's order.
        dgqp = DGQP(reg_max, **dgqp) if dgqp is not None else None
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.box_repr = box_repr
        self.cls_convs = _tower(in_channels, feat_channels, stacked_convs, norm)
        self.reg_convs = _tower(in_channels, feat_channels, stacked_convs, norm)
        self.gfl_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.reg_channels = 4 * (reg_max + 1) if box_repr == "distribution" else 4
        self.gfl_reg = nn.Conv2d(feat_channels, self.reg_channels, 3, padding=1)
        # One learnable scalar per level multiplying the regression *logits* before the softmax:
        # a per-level temperature (MMDetection `Scale` in GFLHead.forward_single).
        self.scales = nn.Parameter(torch.ones(num_levels))
        self.integral = Integral(reg_max)
        self.reg_conf = dgqp  # the official GFLv2 name
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Prior probability 0.01 for every class at the start (RetinaNet Sec. 4.1): -log(99).
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - 0.01) / 0.01))
        if box_repr == "dirac":  # the per-level scales start at 1, so the bias is the distance
            nn.init.constant_(self.gfl_reg.bias, dirac_init_distance)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """features: [B, F, H_l, W_l] per level -> (cls_logits [B, A, C], reg_logits
        [B, A, 4(R+1)]). With DGQP, cls_logits are `joint_logit`s, in at least float32."""
        cls_levels, reg_levels = [], []
        for level, x in enumerate(features):
            cls = self.gfl_cls(self.cls_convs(x))
            reg = self.gfl_reg(self.reg_convs(x)) * self.scales[level]
            if self.reg_conf is not None:  # softmax statistics of the float32 logits, as official
                cls = joint_logit(cls, self.reg_conf(_at_least_float32(reg)))  # [B, C, H, W]
            cls_levels.append(cls.permute(0, 2, 3, 1).flatten(1, 2))  # [B, H*W, C]
            reg_levels.append(_at_least_float32(reg).permute(0, 2, 3, 1).flatten(1, 2))
        return torch.cat(cls_levels, dim=1), torch.cat(reg_levels, dim=1)

    def distances(self, reg_logits: Tensor) -> Tensor:
        """[..., reg_channels] -> [..., 4] distances (l, t, r, b) in stride units."""
        if self.box_repr == "distribution":
            return self.integral(reg_logits)
        return F.relu(_at_least_float32(reg_logits))
