"""The lr schedule of the recipe (mmdet LinearLR warmup + MultiStepLR) and linear lr scaling."""

import logging
import math
import typing
from types import SimpleNamespace

import pytest
import torch

from gfldet.config import OptimConfig, ScheduleConfig
from gfldet.engine.build import LrFactor, build_lr_scheduler, scaled_lr
from gfldet.engine.resume import continue_schedule


def lrs(cfg: ScheduleConfig, iters_per_epoch: int, base_lr: float = 0.01) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = build_lr_scheduler(opt, cfg, iters_per_epoch)
    out = []
    for _ in range(cfg.epochs * iters_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_recipe_warmup_and_steps():
    # 1x: linear warmup from 0.001 x lr over 500 iterations, x0.1 at epochs 8 and 11 of 12.
    values = lrs(ScheduleConfig(), iters_per_epoch=100)
    assert values[0] == pytest.approx(0.01 * 0.001)
    assert values[250] == pytest.approx(0.01 * (0.001 + 0.999 * 250 / 500))
    assert values[500] == pytest.approx(0.01)  # warmup over at iteration 500 (epoch 5)
    assert values[799] == pytest.approx(0.01) and values[800] == pytest.approx(0.001)
    assert values[1099] == pytest.approx(0.001) and values[1100] == pytest.approx(0.0001)
    assert len(values) == 1200


def test_cosine_policy():
    cfg = ScheduleConfig(epochs=2, policy="cosine", warmup_iters=0, min_lr_ratio=0.1)
    values = lrs(cfg, iters_per_epoch=50)
    assert values[0] == pytest.approx(0.01)
    assert values[50] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert values[-1] > 0.001 and values[-1] < 0.0011


def test_every_policy_the_schema_allows_has_its_own_curve():
    policies = typing.get_args(typing.get_type_hints(ScheduleConfig)["policy"])
    curves = {p: lrs(ScheduleConfig(epochs=2, policy=p, warmup_iters=0), iters_per_epoch=10)
              for p in policies}
    assert len(curves) >= 2 and len({tuple(c) for c in curves.values()}) == len(curves)
    # A policy added to the schema but not to LrFactor is an error, not another policy's curve.
    fields = vars(ScheduleConfig(epochs=2, warmup_iters=0))
    unknown = SimpleNamespace(**{**fields, "policy": "poly"})
    with pytest.raises(ValueError, match="schedule.policy 'poly'"):
        LrFactor(unknown, 10)(3)


def test_linear_lr_scaling():
    assert scaled_lr(OptimConfig(), total_batch=16) == 0.01
    assert scaled_lr(OptimConfig(), total_batch=2) == pytest.approx(0.00125)
    assert scaled_lr(OptimConfig(scale_lr=False), total_batch=2) == 0.01


def test_a_continued_schedule_logs_the_next_steps_lr(caplog):
    """A finished 4-epoch cosine run (9 iterations per epoch) extended to 6 epochs continues at
    iteration 36 of 54: lr 0.002 x 0.5 x (1 + cos(pi x 36/54)) = 0.0005, not the base 0.002."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.002)
    old = ScheduleConfig(epochs=4, policy="cosine", warmup_iters=0)
    sched = build_lr_scheduler(opt, old, iters_per_epoch=9)
    longer = ScheduleConfig(epochs=6, policy="cosine", warmup_iters=0)
    with caplog.at_level(logging.INFO, logger="gfldet"):
        continue_schedule(opt, sched, [0.002], longer, iters_per_epoch=9, iteration=36)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0005)
    assert caplog.records[0].getMessage() == (
        "lr schedule continues at iteration 36 of 54 (9 per epoch): base lr 0.002, the next "
        "step's lr 5.000e-04")
