"""The exponential moving average (EMA) of a model's weights, its decay ramped up over the
first updates.

A constant decay of 0.9998 keeps 0.9998^1499 = 74 % of the first step's weights after 1,500
updates, so the EMA of a short or fine-tuning run would be a nearly untrained model. The decay of
the t-th update (t = 1, 2, ...) is therefore

    d_t = decay * (1 - exp(-t / warmup_iters)),

the ramp of YOLOX's `ModelEMA` and MMDetection's `ExpMomentumEMA` (decay 0.9998 and 2000 there):
about t / warmup_iters at first, within 1 % of `decay` after 4.6 x warmup_iters updates.
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay(update: int, decay: float, warmup_iters: int) -> float:
    """d_t of the `update`-th update (1-based); `warmup_iters` 0 = the constant `decay`."""
    if warmup_iters == 0:
        return decay
    return decay * (1 - math.exp(-update / warmup_iters))


def build_ema(model: nn.Module, decay: float, warmup_iters: int) -> AveragedModel:
    """An `AveragedModel` of `model`'s parameters and buffers: its first `update_parameters`
    copies them, the t-th moves them by ema = d_t * ema + (1 - d_t) * weights. The update count
    is its `n_averaged` buffer, part of its state_dict, so a resumed run continues the ramp."""

    def update(ema_tensors, model_tensors, num_averaged) -> None:
        # num_averaged counts the updates before this one. Reading it syncs with the device, as
        # AveragedModel.update_parameters itself does (it checks n_averaged == 0).
        decay_t = ema_decay(int(num_averaged) + 1, decay, warmup_iters)
        get_ema_multi_avg_fn(decay_t)(ema_tensors, model_tensors, num_averaged)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
