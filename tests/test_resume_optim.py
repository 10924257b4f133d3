"""Resume across a changed setup or config, and the optimizer's parameter groups (issue 15, part 4).

The runs are the tiny config of conftest: 16 training images, 2 epochs, a few seconds each. The
world-size tests resume, in this process, a checkpoint written by a real 2-process gloo run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    build_from_options,
    exit_worker,
    spawn_workers,
    tiny_overrides,
    to_format_1,
)

from gfldet.config import ConfigError, OptimConfig, ScheduleConfig, load_config
from gfldet.engine import trainer as trainer_mod
from gfldet.engine.build import LrFactor, build_lr_scheduler, build_optimizer
from gfldet.engine.checkpoint import load_checkpoint, save_checkpoint
from gfldet.engine.resume import RunSetup, check_resumable
from gfldet.engine.trainer import train

DEMO = ROOT / "configs" / "demo_synthetic_cpu.yaml"
# The official GFocal recipe's groups (biases at 2x lr without decay), plus Detectron2's
# undecayed norm layers.
GROUPS = ["optim.bias_lr_factor=2", "optim.bias_weight_decay=0", "optim.norm_weight_decay=0"]


def config(data, *extra: str, epochs: int = 2):
    return load_config(DEMO, [*tiny_overrides(data, epochs=epochs), *extra])


def iterations_per_epoch(work: Path) -> int:
    return int((work / "train.log").read_text().split(" iterations per epoch")[0].split()[-1])


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def folder_with(tmp_path: Path, name: str, **files: Path | dict) -> Path:
    """A fresh run folder holding the given checkpoints (a path is copied, a dict is saved)."""
    work = tmp_path / name
    work.mkdir()
    for file_name, source in files.items():
        if isinstance(source, dict):
            save_checkpoint(source, work / f"{file_name}.pth")
        else:
            shutil.copy(source, work / f"{file_name}.pth")
    return work


def mid_epoch(state: dict, batch: int = 1) -> dict:
    """`state` (written at an epoch boundary) as a SIGTERM would leave it `batch` steps later."""
    return {**state, "batch": batch, "iteration": state["iteration"] + batch}


def without_setup_record(state: dict) -> dict:
    """`state` as gfldet wrote checkpoints before they recorded the processes and batch size."""
    return {k: v for k, v in state.items()
            if k not in ("world_size", "batch_size", "iters_per_epoch")}


class Evaluations:
    """Wraps the trainer's `evaluate`: the post-processing settings and detections of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, list[dict]]] = []
        self.real = trainer_mod.evaluate

    def __call__(self, model, *args, **kwargs):
        metrics = self.real(model, *args, **kwargs)
        self.calls.append((model.test_settings, list(metrics.get("detections", []))))
        return metrics


# ------------------------------------------------------------------ runs shared by the tests

GROUPED_EXTRA = [*GROUPS, "model.test.score_thr=0.0"]  # score_thr 0: a barely trained model detects
NO_EVAL = "train.eval_interval=0"  # for resumed runs compared by their weights (a few seconds less)


@pytest.fixture(scope="module")
def grouped_run(tiny_coco, tmp_path_factory):
    """One process, 2 epochs, with the GFocal parameter groups; its evaluations are recorded."""
    work = tmp_path_factory.mktemp("grouped")
    evaluations = Evaluations()
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(trainer_mod, "evaluate", evaluations)
        train(config(tiny_coco, *GROUPED_EXTRA), work)
    return work, evaluations.calls


def _train_worker(rank: int, world: int, port: int, overrides: list[str], work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train(load_config(DEMO, overrides), Path(work))
    exit_worker()


# 2 images per process; the lr is given for a total batch of 16, so it is scaled to the total batch
# (4 on 2 processes, 2 on 1). No evaluation: these runs are about the position in the schedule.
DDP_EXTRA = ["data.batch_size=2", "optim.reference_batch_size=16", "train.eval_interval=0"]


@pytest.fixture(scope="module")
def ddp_run(tiny_coco, tmp_path_factory):
    """A real 2-process gloo run of 2 epochs (on this CPU): its checkpoints record world size 2."""
    work = tmp_path_factory.mktemp("ddp")
    port = 29500 + (os.getpid() + 250) % 1000
    overrides = [*tiny_overrides(tiny_coco), *DDP_EXTRA]
    spawn_workers(_train_worker, args=(2, port, overrides, str(work)), timeout=600)
    return work


# ----------------------------------------------------------- 1. a changed world size or batch


def test_checkpoints_record_world_size_and_batch_size(ddp_run, grouped_run):
    ddp = load_checkpoint(ddp_run / "epoch_1.pth")
    assert (ddp["world_size"], ddp["batch_size"]) == (2, 2)
    assert ddp["iters_per_epoch"] == iterations_per_epoch(ddp_run)
    single = load_checkpoint(grouped_run[0] / "epoch_1.pth")
    assert (single["world_size"], single["batch_size"]) == (1, 4)


def test_two_process_checkpoint_resumed_by_one_process_at_an_epoch_boundary(ddp_run, tiny_coco,
                                                                            tmp_path):
    """Epoch 1 on 2 processes x 2 images, epoch 2 on 1 process x 2 images: the sampler restarts at
    the epoch, so the run continues at the start of epoch 2 of the new setup; the lr follows the
    linear scaling rule to the new total batch (0.01 x 4/16 -> 0.01 x 2/16) and the schedule's
    iteration count is the new one (1 epoch x the new iterations per epoch)."""
    ddp_ipe = iterations_per_epoch(ddp_run)
    work = folder_with(tmp_path, "one", last=ddp_run / "epoch_1.pth")
    train(config(tiny_coco, *DDP_EXTRA), work, resume=True)
    ipe = iterations_per_epoch(work)
    assert ipe > ddp_ipe  # half the total batch: about twice the steps per epoch

    log = (work / "train.log").read_text()
    assert "processes 2 -> 1" in log and "total batch 4 -> 2" in log
    assert f"iterations per epoch {ddp_ipe} -> {ipe}" in log
    assert "lr 0.0025 -> 0.00125" in log
    final = load_checkpoint(work / "last.pth")
    assert (final["world_size"], final["batch_size"], final["iters_per_epoch"]) == (1, 2, ipe)
    assert final["iteration"] == 2 * ipe
    sched = final["scheduler"]
    assert sched["last_epoch"] == 2 * ipe  # not the checkpoint's ddp_ipe + this run's ipe
    assert sched["base_lrs"] == [pytest.approx(0.00125)]
    # milestone epoch 1, in the new iterations
    assert [f["milestones"] for f in sched["lr_lambdas"]] == [[ipe]]
    group = final["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(0.00125)
    assert group["lr"] == pytest.approx(0.00125 * 0.1)  # after the milestone
    # Epoch 2 trained with the new lr from its first step (the log's lr column, warmup long over).
    lrs = [float(m) for m in re.findall(r"lr: ([0-9.e-]+)", log)]
    assert lrs and lrs[0] == pytest.approx(0.000125, rel=1e-3)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "older-checkpoint"])
def test_two_process_checkpoint_mid_epoch_is_refused_on_one_process(ddp_run, tiny_coco, tmp_path,
                                                                    recorded):
    """Mid-epoch, the batches left in the epoch depend on the old processes x batch size: refused,
    naming the change and the two ways on. A checkpoint from before the record gives its world size
    by its per-process RNG states."""
    state = mid_epoch(load_checkpoint(ddp_run / "epoch_1.pth"))
    if not recorded:
        state = without_setup_record(state)
    work = folder_with(tmp_path, "mid", epoch_1=ddp_run / "epoch_1.pth", last=state)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    with pytest.raises(ConfigError) as err:
        train(config(tiny_coco, *DDP_EXTRA), work, resume=True)
    msg = str(err.value)
    assert "last.pth" in msg and "processes 2 -> 1" in msg
    assert "--nproc_per_node 2" in msg and "epoch_1.pth" in msg
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.suffix == ".pth"} == before


def test_changed_batch_size_mid_epoch_is_refused(grouped_run, tiny_coco, tmp_path):
    state = mid_epoch(load_checkpoint(grouped_run[0] / "epoch_1.pth"), batch=2)
    work = folder_with(tmp_path, "bs", last=state)
    with pytest.raises(ConfigError) as err:
        train(config(tiny_coco, *GROUPED_EXTRA, "data.batch_size=2"), work, resume=True)
    msg = str(err.value)
    assert "images per process 4 -> 2" in msg and "data.batch_size=4" in msg
    assert "epoch_N.pth" in msg  # no epoch checkpoint in that folder: named generically


@pytest.mark.parametrize("epoch_file", [True, False], ids=["epoch-file", "none"])
def test_mid_epoch_refusal_names_the_epoch_checkpoint_that_exists(grouped_run, tiny_coco,
                                                                 tmp_path, epoch_file):
    """The way on at an epoch boundary is the newest epoch_N.pth of the folder; without one (a
    run stopped in its first epoch), the message says so and offers --overwrite instead."""
    work0, _ = grouped_run
    state = mid_epoch(load_checkpoint(work0 / "epoch_1.pth"), batch=2)
    files = {"epoch_1": work0 / "epoch_1.pth"} if epoch_file else {}
    work = folder_with(tmp_path, "mid", last=state, **files)
    setup = RunSetup(1, 2, 2 * iterations_per_epoch(work0))
    with pytest.raises(ConfigError) as err:
        check_resumable(config(tiny_coco, *GROUPED_EXTRA), state, work / "last.pth", False, setup)
    msg = str(err.value)
    assert "the last epoch_N.pth of the run" not in msg
    if epoch_file:
        assert f"or resume from {work / 'epoch_1.pth'} (written at the end of an epoch" in msg
    else:
        assert f"{work} holds no epoch_N.pth" in msg and "--overwrite" in msg


def test_changed_data_and_train_keys_are_logged_on_resume(grouped_run, tiny_coco, caplog,
                                                          monkeypatch):
    work0, _ = grouped_run
    state = load_checkpoint(work0 / "epoch_1.pth")
    setup = RunSetup(1, 4, iterations_per_epoch(work0))
    log = gfldet_log(caplog, monkeypatch)
    cfg = config(tiny_coco, *GROUPED_EXTRA, "train.amp=bf16", "data.train_short_side=[96,128]",
                 "train.eval_interval=2", "data.num_workers=1")
    assert check_resumable(cfg, state, work0 / "epoch_1.pth", False, setup) is False
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert warning.startswith(f"resume: the config differs from {work0 / 'epoch_1.pth'}'s in ")
    for change in ("data.train_short_side: [128, 128] -> [96, 128]", "data.num_workers: 0 -> 1",
                   "train.amp: 'none' -> 'bf16'", "train.eval_interval: 1 -> 2"):
        assert change in warning, change
    assert "model." not in warning and "optim." not in warning and "schedule." not in warning
    caplog.clear()
    check_resumable(config(tiny_coco, *GROUPED_EXTRA), state, work0 / "epoch_1.pth", False, setup)
    assert "differs" not in log.text  # the same config: nothing to say


def gfldet_log(caplog, monkeypatch):
    """caplog for the "gfldet" logger, which an in-process train() detaches from the root logger."""
    monkeypatch.setattr(logging.getLogger("gfldet"), "propagate", True)
    caplog.set_level(logging.INFO, logger="gfldet")
    return caplog


def test_older_checkpoint_at_an_epoch_boundary_resumes_and_says_so(grouped_run, tiny_coco, caplog,
                                                                   monkeypatch):
    work0, _ = grouped_run
    path = work0 / "epoch_1.pth"
    state = without_setup_record(load_checkpoint(path))
    setup = RunSetup(1, 4, iterations_per_epoch(work0))
    log = gfldet_log(caplog, monkeypatch)
    cfg = config(tiny_coco, *GROUPED_EXTRA)
    assert check_resumable(cfg, state, path, False, setup) is False
    assert "records no world size or batch size" in log.text and "1 process(es)" in log.text
    with pytest.raises(ConfigError, match="images per process 4 -> 2"):  # and still compared
        check_resumable(cfg, mid_epoch(state), path, False,
                        RunSetup(1, 2, 2 * setup.iters_per_epoch))


# ----------------------------------------------------------- 2. what a resume may change


@pytest.mark.parametrize("override", ["model.backbone.weights=/gone/resnet18.pth",
                                      "model.backbone.weights=torchvision",
                                      "model.test.score_thr=0.3", "model.test.nms_iou=0.5",
                                      "model.test.max_per_img=10", "model.test.nms_pre=50"])
def test_imagenet_weights_and_test_settings_may_change(grouped_run, tiny_coco, caplog, monkeypatch,
                                                       override):
    work0, _ = grouped_run
    state = load_checkpoint(work0 / "epoch_1.pth")
    setup = RunSetup(1, 4, iterations_per_epoch(work0))
    log = gfldet_log(caplog, monkeypatch)
    assert check_resumable(config(tiny_coco, *GROUPED_EXTRA, override), state,
                           work0 / "epoch_1.pth", False, setup) is False
    assert f"resume: {override.split('=')[0]}: " in log.text


def test_resume_with_a_moved_imagenet_weights_file_and_another_score_threshold(
        grouped_run, tiny_coco, tmp_path, monkeypatch):
    """The backbone's ImageNet weights only initialise a run: a resumed run's come from the
    checkpoint, so a path that no longer exists does not stop it (nothing is loaded). The test
    post-processing is the new config's: evaluation keeps only scores above the new threshold."""
    work0, calls = grouped_run
    before = calls[-1][1]  # the uninterrupted run's epoch-2 detections, score_thr 0
    scores = sorted(d["score"] for d in before)
    thr = scores[len(scores) // 2]
    moved = tmp_path / "moved" / "resnet18-imagenet.pth"
    work = folder_with(tmp_path, "thr", last=work0 / "epoch_1.pth")
    evaluations = Evaluations()
    monkeypatch.setattr(trainer_mod, "evaluate", evaluations)
    train(config(tiny_coco, *GROUPS, f"model.test.score_thr={thr}",
                 f"model.backbone.weights={moved}"), work, resume=True)
    log = (work / "train.log").read_text()
    assert f"model.test.score_thr: 0.0 -> {thr}" in log
    assert f"model.backbone.weights: null -> '{moved}'" in log
    assert same_weights(work / "last.pth", work0 / "last.pth")
    settings, detections = evaluations.calls[-1]
    assert settings.score_thr == thr
    assert detections and min(d["score"] for d in detections) >= thr
    assert len(detections) < len(before)


@pytest.mark.parametrize(("override", "named"), [
    ("model.head.stacked_convs=2", "model.head.stacked_convs: 1 -> 2"),
    ("model.loss.dfl_weight=0.5", "model.loss.dfl_weight: 0.25 -> 0.5"),
    ("model.backbone.frozen_stages=1", "model.backbone.frozen_stages: -1 -> 1"),
    ("optim.bias_lr_factor=1", "optim.bias_lr_factor: 2.0 -> 1.0"),
    ("optim.weight_decay=0.001", "optim.weight_decay: 0.0001 -> 0.001"),
])
def test_resume_refuses_a_changed_model_or_optimizer_naming_the_key(grouped_run, tiny_coco,
                                                                    tmp_path, override, named):
    work = folder_with(tmp_path, "model", last=grouped_run[0] / "epoch_1.pth")
    saved_config = work / "config.yaml"
    saved_config.write_text("# the run's own config.yaml\n")
    with pytest.raises(ConfigError) as err:
        train(config(tiny_coco, *GROUPED_EXTRA, override), work, resume=True)
    assert named in str(err.value) and "last.pth" in str(err.value)
    # the refused config is not written
    assert saved_config.read_text() == "# the run's own config.yaml\n"


# ----------------------------------------------------------- 3. parameter groups


def tiny_model(*options: str):
    torch.manual_seed(0)
    return build_from_options(
        "model.num_classes=3", "model.backbone.depth=18", "model.backbone.frozen_stages=3",
        "model.fpn.out_channels=32", "model.head.feat_channels=32", "model.head.stacked_convs=1",
        *options)


def expected_kind(name: str) -> str:
    """Written from the names, not from module types, so that the test does not restate the code:
    BatchNorm (bn*, downsample.1) and GroupNorm (*.gn) parameters are norm; the biases of the FPN
    convs and of the two output convs are biases; conv weights and head.scales are weights."""
    if re.search(r"\.bn\d\.|downsample\.1\.|\.gn\.", name):
        return "norm"
    if name.endswith(".bias"):
        return "bias"
    return "weight"


def group_of(optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def test_default_groups_are_todays_single_group():
    """Defaults keep MMDetection's GFL recipe: one group, every trainable parameter in model order,
    exactly the optimizer gfldet built before the group options existed."""
    model = tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    built = build_optimizer(model, OptimConfig(), lr=0.01)
    plain = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    assert len(built.param_groups) == 1
    assert [id(p) for p in built.param_groups[0]["params"]] == [id(p) for p in params]
    assert built.state_dict() == plain.state_dict()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_groups_put_each_parameter_where_the_options_say(name):
    model = tiny_model()
    cfg = OptimConfig(name=name, weight_decay=1e-4, bias_lr_factor=2.0, bias_weight_decay=0.0,
                      norm_weight_decay=0.0)
    optimizer = build_optimizer(model, cfg, lr=0.01)
    groups = group_of(optimizer)
    expected = {"weight": (0.01, 1e-4), "norm": (0.01, 0.0), "bias": (0.02, 0.0)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {expected_kind(n) for n, _ in named} == set(expected)
    for n, p in named:
        assert (groups[id(p)]["lr"], groups[id(p)]["weight_decay"]) == expected[expected_kind(n)], n
    assert groups[id(model.head.scales)]["lr"] == 0.01  # the learnt per-level scales: weights
    assert groups[id(model.head.cls_convs[0].gn.bias)]["lr"] == 0.01  # a norm's, not "biases"
    assert len(optimizer.param_groups) == 3
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert not any(id(p) in groups for p in frozen)


def test_a_group_option_equal_to_the_default_adds_no_group():
    model = tiny_model("model.head.norm=none")  # towers without GroupNorm: their convs have biases
    optimizer = build_optimizer(model, OptimConfig(norm_weight_decay=1e-4, bias_weight_decay=0.0),
                                lr=0.01)
    # norm decay = weight_decay: BatchNorm stays with the weights
    assert len(optimizer.param_groups) == 2
    groups = group_of(optimizer)
    assert groups[id(model.head.cls_convs[0].conv.bias)]["weight_decay"] == 0.0
    assert groups[id(model.backbone.layer4[0].bn1.weight)]["weight_decay"] == 1e-4


def test_lr_schedule_scales_every_group_from_its_own_base_lr():
    model = tiny_model()
    optimizer = build_optimizer(model, OptimConfig(bias_lr_factor=2.0, norm_weight_decay=0.0),
                                lr=0.01)
    schedule = ScheduleConfig(epochs=3, milestones=[1, 2], gamma=0.1, warmup_iters=5,
                              warmup_ratio=0.1)
    scheduler = build_lr_scheduler(optimizer, schedule, iters_per_epoch=4)
    factor = LrFactor(schedule, 4)
    bases = [0.01, 0.01, 0.02]  # weights, norm, biases: in order of their first parameter
    assert [g["initial_lr"] for g in optimizer.param_groups] == bases
    for it in range(12):
        # warmup 0.1 -> 1 over 5 iterations, then x0.1 at iterations 4 and 8 (inside the warmup too)
        for group, base in zip(optimizer.param_groups, bases, strict=True):
            assert group["lr"] == pytest.approx(base * factor(it), rel=1e-12), (it, base)
        optimizer.step()
        scheduler.step()
    assert factor(4) == pytest.approx(0.1 * (0.1 + 0.9 * 4 / 5))  # the warmup and a step together


def test_resume_restores_the_groups_and_continues_exactly(grouped_run, tiny_coco, tmp_path):
    work0, _ = grouped_run
    saved = load_checkpoint(work0 / "epoch_1.pth")["optimizer"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in saved["param_groups"]] == [
        (0.01, 1e-4), (0.01, 0.0), (0.02, 0.0)]
    work = folder_with(tmp_path, "groups", last=work0 / "epoch_1.pth")
    train(config(tiny_coco, *GROUPED_EXTRA, NO_EVAL), work, resume=True)
    assert same_weights(work / "last.pth", work0 / "last.pth")
    a, b = (load_checkpoint(w / "last.pth")["optimizer"] for w in (work, work0))
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])
               for k in b["state"])


def test_resume_from_a_model_format_1_checkpoint_continues_exactly(
    grouped_run, tiny_coco, tmp_path
):
    """A checkpoint as gfldet wrote it before MMDetection's module names (old model keys, no
    "model_format") resumes to the same weights and momentum. The optimizer state is keyed by
    parameter index, not by name, so the model's keys are all that needs the map."""
    work0, _ = grouped_run
    state = load_checkpoint(work0 / "epoch_1.pth")
    assert state["model_format"] == 2
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])
    assert not any("param_names" in g for g in state["optimizer"]["param_groups"])
    old = {k: v for k, v in state.items() if k != "model_format"}
    old["model"] = to_format_1(state["model"])
    assert "backbone.stem.0.weight" in old["model"]
    work = folder_with(tmp_path, "format1", last=old)
    train(config(tiny_coco, *GROUPED_EXTRA, NO_EVAL), work, resume=True)
    assert (work / "train.log").read_text().count("model format 1") == 1
    assert same_weights(work / "last.pth", work0 / "last.pth")
    a, b = (load_checkpoint(w / "last.pth")["optimizer"] for w in (work, work0))
    for k in b["state"]:
        assert torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])


def test_schedule_change_on_resume_applies_to_every_group(grouped_run, tiny_coco, tmp_path):
    """--allow-schedule-change swaps the lr function of every parameter group, not of the first:
    the finished 2-epoch run (milestone 1) continues for a third epoch with milestones 1 and 2."""
    work = folder_with(tmp_path, "longer", last=grouped_run[0] / "epoch_2.pth")
    train(config(tiny_coco, *GROUPED_EXTRA, NO_EVAL, "schedule.milestones=[1, 2]", epochs=3),
          work, resume=True, allow_schedule_change=True)
    ipe = iterations_per_epoch(work)
    log = (work / "train.log").read_text()
    # The lr the next step takes, 0.01 x 0.1 x 0.1 past both new milestones, and not the base.
    assert (f"lr schedule continues at iteration {2 * ipe} of {3 * ipe} ({ipe} per epoch): base "
            "lr 0.01, the next step's lr 1.000e-04 (each parameter group keeps its factor)") in log
    final = load_checkpoint(work / "last.pth")
    assert [f["milestones"] for f in final["scheduler"]["lr_lambdas"]] == [[ipe, 2 * ipe]] * 3
    # x0.01 after both new milestones (the old lr function would give x0.1)
    lrs = [g["lr"] for g in final["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([1e-4, 1e-4, 2e-4])
