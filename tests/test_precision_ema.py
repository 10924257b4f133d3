"""Mixed precision and the EMA (issue 15, section 1): the fp16 gradient scaler across skipped
steps, the Integral's precision under autocast and in converted models, and the EMA's warmup."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import ROOT, build_from_options, tiny_overrides

from gfldet.config import ConfigError, load_config
from gfldet.engine.checkpoint import load_checkpoint, save_checkpoint
from gfldet.engine.ema import build_ema, ema_decay
from gfldet.engine.precision import resolve_precision
from gfldet.engine.progress import Progress
from gfldet.engine.trainer import TrainLoop, train
from gfldet.models.head import Integral

DEMO = ROOT / "configs" / "demo_synthetic_cpu.yaml"

# ------------------------------------------------------------------ train.amp: auto on the CPU
CPU = torch.device("cpu")


@pytest.fixture
def amx_cpu(monkeypatch):
    """A CPU with AVX512-BF16 and AMX whose torch kernels are capped at AVX2, as under
    ATEN_CPU_CAPABILITY=avx2; no oneDNN cap unless a test sets one."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_aten_cpu_capability_alone_keeps_bf16_native(amx_cpu):
    """oneDNN's convolutions ignore ATEN_CPU_CAPABILITY: bf16 ran 1.47x faster than fp32 there
    (trial E, finding 2), so auto picks it, explicit bf16 does not warn, and the reason says why."""
    chosen = resolve_precision("auto", CPU)
    assert chosen.name == "bf16" and chosen.warning is None
    assert "ATEN_CPU_CAPABILITY" in chosen.reason and "not the convolutions" in chosen.reason
    assert resolve_precision("bf16", CPU).warning is None


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_a_onednn_cap_without_bf16_gives_fp32_naming_the_variable_set(amx_cpu, variable):
    amx_cpu.setenv(variable, "AVX2")  # with ATEN_CPU_CAPABILITY=avx2: the AVX2-only imitation
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype is None and chosen.reason.endswith(f"oneDNN is capped at AVX2 ({variable})")
    other = {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"} - {variable}
    assert other.pop() not in chosen.reason
    assert "emulated" in resolve_precision("bf16", CPU).warning
    amx_cpu.setenv(variable, "avx512_core_amx")  # a cap that keeps AMX: native again
    assert resolve_precision("auto", CPU).name == "bf16"


# ------------------------------------------------------------------ fp16: the gradient scaler


class ToyModel(torch.nn.Module):
    """Two losses of one parameter; on the calls in `nan_loss` a loss is NaN, on the calls in
    `inf_grad` the loss is finite but its gradient is inf (d sqrt(x)/dx at x = 0), as an fp16
    overflow in the backward gives."""

    def __init__(self, nan_loss: set[int] = frozenset(), inf_grad: set[int] = frozenset()) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.nan_loss, self.inf_grad, self.calls = nan_loss, inf_grad, 0

    def forward(self, images, targets):
        self.calls += 1
        box = self.weight.sum() * images.mean()
        if self.calls in self.nan_loss:
            box = box * float("nan")
        if self.calls in self.inf_grad:
            box = box + (self.weight - self.weight.detach()).sqrt().sum()  # value 0, gradient inf
        return {"loss_cls": (self.weight**2).sum(), "loss_bbox": box}


def fp16_loop(model: torch.nn.Module) -> TrainLoop:
    """The loop `train.amp=fp16` builds (fp16 autocast, an enabled GradScaler, here on the CPU),
    with an EMA."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    progress = Progress(100, 10, 1, torch.device("cpu"), scalars=None, bar=False)
    ema = build_ema(model, decay=0.9998, warmup_iters=2000)
    return TrainLoop(model, ema, opt, sched, scaler, torch.float16, torch.device("cpu"),
                     load_config(DEMO), progress)


def batch(image_id: int):
    targets = [{"image_id": image_id, "boxes": torch.zeros(0, 4), "image_size": (4, 4)}]
    return torch.ones(1, 3, 4, 4, dtype=torch.uint8), targets


def test_fp16_nan_loss_skips_the_step_and_the_next_step_runs():
    model = ToyModel(nan_loss={1})
    loop = fp16_loop(model)
    before, scale = model.weight.detach().clone(), loop.scaler.get_scale()
    loop.step(*batch(1), it=0)
    assert torch.equal(model.weight, before) and loop.bad_steps == 1
    assert loop.ema.n_averaged.item() == 0 and loop.progress.count == 0, (
        "a skipped step is not averaged or logged")
    # The NaN loss gave NaN gradients, so the scaler backed off as it does on any inf/NaN gradient.
    assert loop.scaler.get_scale() == scale / 2
    loop.step(*batch(2), it=1)  # raised "unscale_() has already been called" before the fix
    assert not torch.equal(model.weight, before) and loop.bad_steps == 0
    assert loop.ema.n_averaged.item() == 1 and loop.progress.count == 1


def test_a_skipped_first_step_does_not_warn_that_the_schedule_lost_a_value():
    """torch warns that calling lr_scheduler.step() before any optimizer.step() skips the first
    learning rate. Here the skip is the loop's own and the schedule still counts the iteration, so
    that warning would mislead the user."""
    loop = fp16_loop(ToyModel(nan_loss={1}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.step(*batch(1), it=0)
        loop.step(*batch(2), it=1)
    assert loop.bad_steps == 0
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], caught


def test_a_skip_after_a_taken_step_leaves_the_warning_filters_alone(monkeypatch):
    """catch_warnings makes Python forget which warnings it has shown once; fp16 skips steps all
    run long, so the filter above is entered only before the first step is taken."""
    import gfldet.engine.trainer as trainer_mod

    entered = []
    real = trainer_mod.warnings.catch_warnings
    monkeypatch.setattr(trainer_mod.warnings, "catch_warnings",
                        lambda *a, **k: entered.append(1) or real(*a, **k))
    loop = fp16_loop(ToyModel(nan_loss={2}))
    loop.step(*batch(1), it=0)
    loop.step(*batch(2), it=1)  # skipped
    assert loop.bad_steps == 1 and entered == []


def test_fp16_overflow_is_the_scalers_skip_without_ema_or_logged_step():
    """A finite loss with inf gradients is the scaler's own overflow skip (expected while its
    scale calibrates): no weight change, no EMA update, no logged loss or inf gradient norm, not a
    bad step; the scale halves."""
    model = ToyModel(inf_grad={2})
    loop = fp16_loop(model)
    loop.step(*batch(1), it=0)
    before, scale = model.weight.detach().clone(), loop.scaler.get_scale()
    loop.step(*batch(2), it=1)
    assert torch.equal(model.weight, before)
    assert loop.ema.n_averaged.item() == 1 and loop.progress.count == 1
    assert loop.bad_steps == 0 and loop.scaler.get_scale() == scale / 2
    assert math.isfinite(float(loop.progress.sums["grad_norm"]))
    loop.step(*batch(3), it=2)
    assert not torch.equal(model.weight, before) and loop.ema.n_averaged.item() == 2


def test_fp16_overflow_on_every_step_stops_the_run_naming_the_cause():
    """Gradients that overflow whatever the scale (inf or NaN in the backward itself) would halve
    the scale forever without a step: after MAX_OVERFLOW_STEPS overflows in a row the run stops."""
    from gfldet.engine.trainer import MAX_OVERFLOW_STEPS

    model = ToyModel(inf_grad=set(range(1, 1000)))
    loop = fp16_loop(model)
    for it in range(MAX_OVERFLOW_STEPS - 1):
        loop.step(*batch(it + 1), it=it)
    with pytest.raises(FloatingPointError,
                       match=rf"{MAX_OVERFLOW_STEPS} consecutive fp16 overflows"):
        loop.step(*batch(MAX_OVERFLOW_STEPS), it=MAX_OVERFLOW_STEPS - 1)


# ------------------------------------------------------------------ the Integral's precision


def integral_reference(logits: torch.Tensor, reg_max: int = 16) -> torch.Tensor:
    """GFL Eq. 5 in float64: sum_i softmax(logits)_i * i."""
    probs = logits.double().unflatten(-1, (4, reg_max + 1)).softmax(dim=-1)
    return (probs * torch.arange(reg_max + 1, dtype=torch.float64)).sum(-1)


def random_logits(rows: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4 * 17, generator=torch.Generator().manual_seed(seed)) * 3


def test_integral_float32_is_the_plain_matmul_bit_for_bit():
    logits = random_logits()
    expected = logits.unflatten(-1, (4, 17)).softmax(dim=-1) @ torch.linspace(0, 16, 17)
    assert torch.equal(Integral(16)(logits), expected)


def test_integral_stays_float32_under_bf16_autocast():
    """Before the fix autocast ran the expectation's matmul in bf16: up to 0.06 strides off."""
    logits, integral = random_logits(), Integral(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = integral(logits)
    assert got.dtype == torch.float32
    assert (got.double() - integral_reference(logits)).abs().max() < 1e-5
    assert (got - integral(logits)).abs().max() <= 1e-6


@pytest.mark.parametrize(("dtype", "expected"), [(torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.float32),
                                                 (torch.float64, torch.float64)],
                         ids=["half", "bf16", "double"])
def test_integral_of_a_converted_model_computes_in_at_least_float32(dtype, expected):
    """model.half() / .to(bf16) / .double() convert the `project` buffer too (a dtype error
    before the fix). The expectation is float32 for half weights and float64 for double ones
    (the float64 comparisons with MMDetection need all of it)."""
    logits = random_logits().to(dtype)
    got = Integral(16).to(dtype)(logits)
    assert got.dtype == expected
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert (got.double() - integral_reference(logits)).abs().max() < tolerance


@pytest.mark.parametrize(("dtype", "expected", "tolerance"), [
    (torch.float16, torch.float32, 0.005), (torch.bfloat16, torch.float32, 0.03),
    (torch.float64, torch.float64, 1e-5),
], ids=["half", "bf16", "double"])
def test_converted_detector_runs_with_float32_or_float64_boxes(dtype, expected, tolerance):
    """The whole detector after .half() / .to(bf16) / .double(), on the CPU: the head's
    regression logits, distances and boxes are float32 (float64 for a double model), and the
    distances (7.4 to 8.5 strides here) are close to the float32 model's. The tolerances, in
    strides, are 4x the errors measured: half and bf16 round weights and features to 11 and 8
    bits (0.0014 and 0.0085); float64 differs by float32's own rounding (2e-6)."""
    torch.manual_seed(0)
    model = build_from_options(
        "model.num_classes=3", "model.backbone.depth=18", "model.fpn.out_channels=32",
        "model.head.feat_channels=64", "model.head.stacked_convs=1", "model.test.score_thr=0.0",
    ).eval()
    images = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.head.distances(model.head(model.neck(model.backbone(images)))[1])
        converted = model.to(dtype)
        features = converted.neck(converted.backbone(images.to(dtype)))
        cls_logits, reg_logits = converted.head(features)
        distances = converted.head.distances(reg_logits)
        detections = converted(images.to(dtype))
    assert cls_logits.dtype == dtype
    assert reg_logits.dtype == expected and distances.dtype == expected
    assert (distances.double() - reference.double()).abs().max() < tolerance
    assert detections[0]["boxes"].dtype == expected and len(detections[0]["boxes"]) > 0


# ------------------------------------------------------------------ the EMA's warmup


def test_ema_decay_formula():
    """decay * (1 - exp(-t / warmup)) at the t-th update (MMDetection's ExpMomentumEMA, YOLOX)."""
    assert ema_decay(1, 0.9998, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1 / 2000)),
                                                       rel=1e-15)
    assert ema_decay(2000, 0.9998, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1)), rel=1e-15)
    assert ema_decay(10**6, 0.9998, 2000) == pytest.approx(0.9998, rel=1e-15)
    assert ema_decay(5, 0.9998, 0) == 0.9998  # no warmup: constant decay


def run_ema(values: list[float], warmup_iters: int, decay: float = 0.9998):
    """The EMA of a one-element parameter that takes `values` in turn, one update each."""
    param = torch.nn.Linear(1, 1, bias=False)
    ema = build_ema(param, decay, warmup_iters)
    for value in values:
        param.weight.data.fill_(value)
        ema.update_parameters(param)
    return ema, param


def test_ema_follows_the_update_formula_exactly():
    """Update 1 copies the weights; update t > 1 is ema = d_t * ema + (1 - d_t) * w, d_t above."""
    values = [0.0, 1.0, 3.0, -2.0]
    ema, _ = run_ema(values, warmup_iters=3, decay=0.9)
    expected = values[0]
    for t, value in enumerate(values[1:], start=2):
        d = 0.9 * (1 - math.exp(-t / 3))
        expected = d * expected + (1 - d) * value
    assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert ema.n_averaged.item() == len(values)


def test_ema_follows_a_parameter_that_jumps_after_step_1():
    """0 at update 1, then 1 for 300 updates. Ramped over 100 updates the EMA is within 1 % of 1;
    a constant 0.9998 keeps 0.9998^300 = 94 % of the first value (what the trainer did before)."""
    ramped, _ = run_ema([0.0] + [1.0] * 300, warmup_iters=100)
    constant, _ = run_ema([0.0] + [1.0] * 300, warmup_iters=0)
    assert ramped.module.weight.item() > 0.99
    assert 1 - constant.module.weight.item() == pytest.approx(0.9998**300, rel=1e-4)


def test_ema_resume_keeps_the_ramp_position(tmp_path):
    """The update count is the AveragedModel's `n_averaged` buffer, saved in its state_dict, so a
    checkpointed and resumed EMA continues the ramp where it stopped."""
    values = [0.0, 1.0, 2.0, 3.0, 5.0, 8.0]
    uninterrupted, _ = run_ema(values, warmup_iters=4)
    first, param = run_ema(values[:3], warmup_iters=4)
    save_checkpoint({"ema": first.state_dict()}, tmp_path / "last.pth")
    resumed = build_ema(param, 0.9998, 4)
    resumed.load_state_dict(load_checkpoint(tmp_path / "last.pth")["ema"])
    for value in values[3:]:
        param.weight.data.fill_(value)
        resumed.update_parameters(param)
    assert resumed.n_averaged.item() == len(values)
    assert torch.equal(resumed.module.weight, uninterrupted.module.weight)


def test_ema_warmup_key_is_range_checked():
    with pytest.raises(ConfigError, match=r"train\.ema_warmup_iters.*must be >= 0"):
        load_config(DEMO, ["train.ema_warmup_iters=-1"])
    assert load_config(DEMO, ["train.ema_warmup_iters=0"]).train.ema_warmup_iters == 0
    assert load_config(DEMO).train.ema_warmup_iters == 2000


def test_trained_ema_tracks_the_weights_of_a_short_run(tiny_coco, tmp_path):
    """Two epochs of 5 iterations with train.ema=true: the EMA has 10 updates and, ramped, stays
    close to the current weights. The constant decay left it at the first step's weights, as far
    from the final weights as the whole second epoch moved them."""
    cfg = load_config(DEMO, [*tiny_overrides(tiny_coco, epochs=2), "train.eval_interval=0",
                             "train.ema=true"])
    train(cfg, tmp_path)
    first = load_checkpoint(tmp_path / "epoch_1.pth")
    last = load_checkpoint(tmp_path / "epoch_2.pth")
    assert last["ema"]["n_averaged"].item() == 10
    names = [k for k, v in last["model"].items() if v.is_floating_point()]

    def distance(a: dict, b: dict, prefix: str = "") -> float:
        return sum((a[prefix + k].double() - b[k].double()).square().sum().item()
                   for k in names) ** 0.5

    moved = distance(last["model"], first["model"])
    assert moved > 0
    assert distance(last["ema"], last["model"], "module.") < 0.05 * moved
