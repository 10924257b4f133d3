"""Everyday paths of a run: precision chosen by the hardware, progress from the first step,
`scalars.jsonl`, run folders that are never overwritten, and tools that need only the checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, build_from_options, run_in_process, tiny_overrides

from gfldet.config import config_from_dict
from gfldet.engine import progress as progress_module
from gfldet.engine.build import LrFactor, build_model
from gfldet.engine.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from gfldet.engine.precision import cpu_bf16_support, resolve_precision
from gfldet.engine.progress import Progress, ScalarLog
from gfldet.engine.run_dir import RunDirError, check_run_dir
from gfldet.engine.trainer import check_start, load_matching_weights

TRAIN = str(ROOT / "tools" / "train.py")
EVAL = str(ROOT / "tools" / "eval.py")
PREDICT = str(ROOT / "tools" / "predict.py")
EXPORT = str(ROOT / "tools" / "export.py")
DEMO = str(ROOT / "configs" / "demo_synthetic_cpu.yaml")
CPU = torch.device("cpu")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def fake_cpu(monkeypatch, capability: str, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


# --------------------------------------------------------------------------- precision


def test_auto_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", avx512_bf16=False, amx=False)
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype is None and chosen.name == "fp32" and chosen.warning is None
    assert "no native bf16" in chosen.reason and "AVX2" in chosen.reason


@pytest.mark.parametrize(("avx512_bf16", "amx", "named"),
                         [(True, False, "AVX512-BF16"), (False, True, "AMX")])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(monkeypatch, avx512_bf16, amx, named):
    fake_cpu(monkeypatch, "AVX512", avx512_bf16=avx512_bf16, amx=amx)
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype == torch.bfloat16 and chosen.name == "bf16"
    assert named in chosen.reason


def test_the_avx2_imitation_counts_as_no_native_bf16(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU: the kernels cannot use it."""
    fake_cpu(monkeypatch, "AVX512", avx512_bf16=True, amx=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_bf16_support()[0] is False and resolve_precision("auto", CPU).dtype is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_bf16_support()[0] is True
    # ATEN_CPU_CAPABILITY=avx2 alone: the convolutions still run on AMX (trial E, finding 2)
    fake_cpu(monkeypatch, "AVX2", avx512_bf16=True, amx=True)
    assert cpu_bf16_support()[0] is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the imitation: both variables
    assert cpu_bf16_support()[0] is False


def test_explicit_bf16_without_native_support_runs_with_a_warning(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", avx512_bf16=False, amx=False)
    chosen = resolve_precision("bf16", CPU)
    assert chosen.dtype == torch.bfloat16
    assert "emulated" in chosen.warning and "slower" in chosen.warning and "auto" in chosen.warning
    fake_cpu(monkeypatch, "AVX512", avx512_bf16=True, amx=False)
    assert resolve_precision("bf16", CPU).warning is None


def test_cuda_auto_is_bf16_where_supported_else_fp16(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    chosen = resolve_precision("auto", cuda)
    assert chosen.dtype == torch.float16 and "scaler" in chosen.reason
    assert resolve_precision("none", cuda).dtype is None


def test_fp16_off_cuda_is_refused():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)


# --------------------------------------------------------------------------- progress


def test_progress_logs_after_the_first_iteration_then_every_interval(tmp_path, caplog):
    scalars = ScalarLog(tmp_path)
    progress = Progress(total_iters=10, interval=4, images_per_iter=2, device=CPU, scalars=scalars,
                        bar=False)
    logged = []
    with caplog.at_level(logging.INFO, logger="gfldet"):
        for it in range(10):
            progress.record_data_time(0.01)
            progress.update({"loss_a": torch.tensor(float(it)), "loss_b": torch.tensor(1.0)},
                            torch.tensor(2.0 * it))
            if progress.maybe_log(it, 0, 1, it, 10, lr=0.1, force=it == 9) is not None:
                logged.append(it + 1)
    scalars.close()
    assert logged == [1, 4, 8, 10]
    lines = [r.getMessage() for r in caplog.records if "epoch [1/1]" in r.getMessage()]
    records = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == logged
    # Iterations 2-4: loss_a 1, 2, 3 (mean 2), loss_b 1, grad norm 2, 4, 6 (mean 4).
    second = records[1]
    assert second["train/loss_a"] == pytest.approx(2.0)
    assert second["train/loss"] == pytest.approx(3.0)
    assert second["train/grad_norm"] == pytest.approx(4.0)
    assert second["train/data_time"] == pytest.approx(0.01)
    assert second["train/memory_mib"] > 1
    for line, record in zip(lines, records, strict=True):  # the log line shows the record's values
        assert f"loss: {record['train/loss']:.4f}" in line
        assert f"grad_norm: {record['train/grad_norm']:.3f}" in line
        assert (f"time: {record['train/time']:.3f} s/it "
                f"(data {record['train/data_time']:.3f})") in line
        assert f"mem: {record['train/memory_mib']:.0f} MiB" in line and "eta: " in line


class FakeClock:
    """`time` for gfldet.engine.progress: perf_counter() is what the test sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_an_evaluation_between_log_lines_is_not_counted_as_training_time(tmp_path, monkeypatch):
    """Epoch 1 ends with a log line, then a 100 s evaluation and checkpoint; the first line of
    epoch 2 comes 2 iterations of 1 s later: 1 s/it (before: (100 + 2) / 2 = 51 s/it)."""
    clock = FakeClock()
    monkeypatch.setattr(progress_module, "time", clock)
    scalars = ScalarLog(tmp_path)
    progress = Progress(total_iters=8, interval=2, images_per_iter=4, device=CPU, scalars=scalars,
                        bar=False)
    logged = []
    for it in range(8):
        if it == 4:  # the trainer, at the start of epoch 2
            clock.now += 100.0  # evaluation and checkpoint
            progress.leave_out_pause()
        clock.now += 1.0
        progress.update({"loss": torch.tensor(1.0)}, torch.tensor(1.0))
        out = progress.maybe_log(it, it // 4, 2, it % 4, 4, lr=0.1, force=it % 4 == 3)
        if out is not None:
            logged.append(out)
    scalars.close()
    assert [s["train/time"] for s in logged] == [1.0] * len(logged)
    assert logged[-1]["train/images_per_s"] == 4.0


# --------------------------------------------------------------------------- a tiny run


def tiny_args(data, work: Path, *extra: str) -> list[str]:
    # score_thr 0: AP > 0 when barely trained
    return [TRAIN, DEMO, "--work-dir", str(work), *extra, "--cfg-options", *tiny_overrides(data),
            "train.log_interval=50", "train.amp=auto", "model.test.score_thr=0.0"]


@pytest.fixture(scope="module")
def tiny_run(tiny_coco, tmp_path_factory):
    work = tmp_path_factory.mktemp("usability") / "run"
    proc = run_in_process(*tiny_args(tiny_coco, work))
    return work, proc


def iterations_per_epoch(log: str) -> int:
    return int(re.search(r"(\d+) iterations per epoch", log).group(1))


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_log_names_the_precision_and_the_first_iteration(tiny_run):
    work, proc = tiny_run
    log = (work / "train.log").read_text()
    head = log.splitlines()[:3]
    assert any("precision: " in line and "train.amp is auto" in line for line in head), head
    # A few iterations per epoch, log_interval 50: a line after iteration 1 all the same.
    per_epoch = iterations_per_epoch(log)
    first = next(line for line in log.splitlines() if "epoch [1/2]" in line)
    assert f"epoch [1/2][1/{per_epoch}]" in first and "s/it" in first
    assert "mem:" in first and "grad_norm" in first
    # Each split's dataset check summary is logged once (val is checked before training too).
    assert log.count("result: usable") == 2


def test_scalars_jsonl_holds_the_log_lines_values(tiny_run):
    work, _ = tiny_run
    lines = [line for line in (work / "train.log").read_text().splitlines() if "] lr: " in line]
    records = [json.loads(r) for r in (work / "scalars.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    per_epoch = iterations_per_epoch((work / "train.log").read_text())
    # the first iteration and the epochs' ends
    assert [r["step"] for r in train_records] == [1, per_epoch, 2 * per_epoch]
    for line, record in zip(lines, train_records, strict=True):
        for name in ("loss_cls", "loss_bbox", "loss_dfl"):
            assert f"{name}: {record[f'train/{name}']:.4f}" in line
        assert f"lr: {record['train/lr']:.3e}" in line
    # The lr logged for step s is the one iteration s - 1 trained with (warmup: each differs).
    state = load_checkpoint(work / "last.pth")
    factor = LrFactor(config_from_dict(state["config"]).schedule, per_epoch)
    base = state["scheduler"]["base_lrs"][0]
    assert [r["train/lr"] for r in train_records] == pytest.approx(
        [base * factor(r["step"] - 1) for r in train_records], rel=1e-12)
    evals = [r for r in records if "val/bbox_mAP" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    metrics = json.loads((work / "metrics_epoch_2.json").read_text())
    assert evals[-1]["val/bbox_mAP"] == metrics["bbox_mAP"]


def test_rerunning_into_a_used_folder_changes_no_byte(tiny_run, tiny_coco):
    work, _ = tiny_run
    before = digests(work)
    assert any(name.endswith(".pth") for name in before)
    proc = run_in_process(*tiny_args(tiny_coco, work), check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr and str(work) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert digests(work) == before


def test_overwrite_deletes_only_the_earlier_runs_outputs(tiny_coco, tmp_path):
    work = tmp_path / "run"
    run_in_process(*tiny_args(tiny_coco, work), "schedule.epochs=1", "schedule.milestones=[]")
    (work / "notes.txt").write_text("mine")
    old_last = digests(work)["last.pth"]
    proc = run_in_process(*tiny_args(tiny_coco, work, "--overwrite"), "schedule.epochs=1",
                          "schedule.milestones=[]", "train.seed=1")
    assert (work / "notes.txt").read_text() == "mine"
    assert digests(work)["last.pth"] != old_last
    log = (work / "train.log").read_text()
    assert "--overwrite: removed" in log and log.count("precision: ") == 1  # a fresh log
    assert "final bbox AP" in proc.stdout


def test_overwrite_removes_the_earlier_runs_report_and_keeps_other_folders(tmp_path):
    from gfldet.engine.run_dir import remove_run_outputs

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("old report")
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "model.onnx").write_text("mine")
    (tmp_path / "last.pth.metrics.json").write_text("{}")  # tools/eval.py's, of the old last.pth
    (tmp_path / "notes.metrics.json").write_text("mine")
    for name in ("epoch_12_backup.pth", "epoch_3.pth.bak", "metrics_epoch_x.json"):  # a user's
        (tmp_path / name).write_text("mine")
    (tmp_path / "epoch_3.pth").write_text("the run's")
    removed = remove_run_outputs(tmp_path)
    assert removed == [tmp_path / "epoch_3.pth", tmp_path / "last.pth.metrics.json",
                       tmp_path / "report"]
    for name in ("epoch_12_backup.pth", "epoch_3.pth.bak", "metrics_epoch_x.json"):
        assert (tmp_path / name).read_text() == "mine"
    assert not (tmp_path / "report").exists() and (tmp_path / "notes.metrics.json").exists()
    assert (tmp_path / "exports" / "model.onnx").read_text() == "mine"


def test_a_failed_evaluation_keeps_the_epochs_training(tiny_coco, tmp_path, monkeypatch):
    # An error while scoring (a scorer's KeyError, a full disk...) came after a whole epoch of
    # training and before its checkpoint: the epoch was lost, and the folder refused a rerun.
    import gfldet.engine.trainer as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("the scorer broke")

    work = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "evaluate", broken)
        with pytest.raises(RuntimeError, match="the scorer broke"):
            run_in_process(*tiny_args(tiny_coco, work))
    state = load_checkpoint(work / "last.pth")
    assert (state["epoch"], state["batch"]) == (1, 0)
    assert "the evaluation after epoch 1 failed; last.pth holds" in (work / "train.log").read_text()
    proc = run_in_process(*tiny_args(tiny_coco, work, "--resume"))
    assert "resumed from" in proc.stdout and "final bbox AP" in proc.stdout
    assert load_checkpoint(work / "last.pth")["epoch"] == 2


def test_training_warns_when_val_is_the_train_file(tiny_coco, tmp_path):
    work = tmp_path / "run"
    run_in_process(*tiny_args(tiny_coco, work), "schedule.epochs=1", "schedule.milestones=[]",
                   f"data.val.images={tiny_coco['train_images']}",
                   f"data.val.annotations={tiny_coco['train_ann']}")
    log = (work / "train.log").read_text()
    assert f"WARNING val uses the train annotation file ({tiny_coco['train_ann']})" in log


def test_a_folder_without_a_checkpoint_is_refused_without_offering_resume(tmp_path):
    (tmp_path / "scalars.jsonl").write_text('{"iteration": 1}\n')  # a run that died in epoch 1
    with pytest.raises(RunDirError) as info:
        check_run_dir(tmp_path, resume=False, overwrite=False)
    message = str(info.value)
    assert ("To keep it, give this run its own folder with --work-dir DIR (train()'s work_dir); "
            in message)
    assert "--resume" not in message and "--overwrite" in message


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunDirError, match="contradict"):
        check_run_dir(tmp_path, resume=True, overwrite=True)


def test_a_stale_tmp_file_is_removed_at_the_next_start(tiny_run, tiny_coco, tmp_path):
    work, _ = tiny_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pth").write_bytes((work / "epoch_1.pth").read_bytes())
    stale = resumed / ".last.pth.k3x9q2.tmp"  # what save_checkpoint leaves when killed mid-write
    stale.write_bytes(b"half a checkpoint")
    (resumed / "keep.tmp").write_text("not ours")  # no leading dot: not a checkpoint temporary
    run_in_process(*tiny_args(tiny_coco, resumed, "--resume"))
    assert not stale.exists() and (resumed / "keep.tmp").exists()
    assert f"removed {stale.name}" in (resumed / "train.log").read_text()


def test_resume_follows_the_configs_lr_curve_not_the_checkpoints_copy(tiny_run, tiny_coco,
                                                                     tmp_path):
    """The scheduler state stores the lr function's attributes; a resume computes the lr from
    the config (which check_resumable holds equal), so a stale copy changes nothing."""
    work = tmp_path / "run"
    shutil.copytree(tiny_run[0], work)
    state = load_checkpoint(work / "epoch_1.pth")
    for stored in state["scheduler"]["lr_lambdas"]:
        stored.update(policy="step", milestones=[1], gamma=0.5, warmup_iters=0)
    save_checkpoint(state, work / "epoch_1.pth")
    run_in_process(*tiny_args(tiny_coco, work, "--resume", str(work / "epoch_1.pth")))
    final = load_checkpoint(work / "last.pth")
    per_epoch = iterations_per_epoch((work / "train.log").read_text())
    factor = LrFactor(config_from_dict(final["config"]).schedule, per_epoch)
    base = final["scheduler"]["base_lrs"][0]
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        base * factor(final["iteration"]), rel=1e-12)


def test_resuming_an_earlier_epoch_replaces_the_later_records(tiny_run, tiny_coco, tmp_path):
    """Resumed from epoch_1.pth of the finished 2-epoch run, epoch 2 is trained again: the first
    epoch 2's records leave scalars.jsonl and TensorBoard, so each step is there once, in order,
    and the log says what the run replaces."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "run"
    shutil.copytree(tiny_run[0], work)
    before = [json.loads(r) for r in (work / "scalars.jsonl").read_text().splitlines()]
    run_in_process(*tiny_args(tiny_coco, work, "--resume", str(work / "epoch_1.pth")))
    records = [json.loads(r) for r in (work / "scalars.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps)) == [r["step"] for r in before if "train/loss" in r]
    assert [r["epoch"] for r in records if "val/bbox_mAP" in r] == [1, 2]
    assert len(list((work / "tb").iterdir())) == 2  # the first run's event file and this one's
    events = EventAccumulator(str(work / "tb"))
    events.Reload()
    for tag in ("train/loss", "val/bbox_mAP"):
        tb_steps = [e.step for e in events.Scalars(tag)]
        assert tb_steps == sorted(set(tb_steps)), (tag, tb_steps)
    log = (work / "train.log").read_text()
    per_epoch = iterations_per_epoch(log)
    # epochs counted from 1, as in the progress lines and "stopped at epoch E, batch B"
    assert f"epoch_1.pth at epoch 2, batch 0 of {per_epoch} (iteration {per_epoch})" in log
    assert ("WARNING the run continues from epoch_1.pth at epoch 2, batch 0: 2 later records "
            "removed from scalars.jsonl (and hidden in TensorBoard); its later outputs are "
            "replaced as the run reaches them: epoch_2.pth, metrics_epoch_2.json, last.pth, "
            "best.pth if an evaluation beats bbox AP ") in log


def test_records_after_the_resumed_position_are_dropped(tmp_path):
    from gfldet.engine.progress import drop_records_after

    path = tmp_path / "scalars.jsonl"
    rows = [{"step": 1, "epoch": 1}, {"step": 4, "epoch": 1}, {"step": 4, "epoch": 1, "val": 0.1},
            {"step": 5, "epoch": 2}, {"step": 6, "epoch": 2}, {"step": 8, "epoch": 2},
            {"step": 8, "epoch": 2, "val": 0.2}]
    text = "".join(f"{json.dumps(r)}\n" for r in rows)
    path.write_text(text + '{"step": 9, "epo')  # cut short by a kill
    # In epoch 2 after 1 batch (iteration 5): the rest of epoch 2 and the cut line go.
    assert drop_records_after(path, 1, 1, 5) == [*rows[4:], {}]
    assert path.read_text() == "".join(f"{json.dumps(r)}\n" for r in rows[:4])
    # At the end of epoch 1 on a setup with twice the iterations per epoch: epoch 2's old steps
    # 5-8 are below the new iteration 8, and go all the same.
    path.write_text(text)
    assert drop_records_after(path, 1, 0, 8) == rows[3:]
    assert [json.loads(r) for r in path.read_text().splitlines()] == rows[:3]
    assert drop_records_after(path, 1, 0, 8) == [] and sorted(tmp_path.iterdir()) == [path]


def test_resuming_a_finished_run_is_refused_before_anything_is_written(tiny_run, tiny_coco,
                                                                     tmp_path):
    work = tmp_path / "run"
    shutil.copytree(tiny_run[0], work)
    before = digests(work)
    proc = run_in_process(*tiny_args(tiny_coco, work, "--resume"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--resume {work / 'last.pth'}: the run finished (epoch 2 of 2)" in proc.stderr
    assert "raise schedule.epochs above 2 and pass --allow-schedule-change" in proc.stderr
    assert digests(work) == before  # config.yaml and train.log as they were, no new tb/ file


def test_resume_with_load_from_is_refused_as_contradictory(tiny_run, tiny_coco, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    shutil.copy(tiny_run[0] / "epoch_1.pth", work / "last.pth")
    proc = run_in_process(*tiny_args(tiny_coco, work, "--resume", "--load-from",
                                     str(tiny_run[0] / "last.pth")), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--resume and --load-from contradict each other" in proc.stderr
    assert [p.name for p in work.iterdir()] == ["last.pth"]
    with pytest.raises(RunDirError, match="pass one of them"):  # before anything is built
        check_start(tmp_path / "nothing", True, False, "other.pth")


def test_load_from_another_model_logs_counts_and_a_few_names(tiny_run, caplog):
    path = tiny_run[0] / "last.pth"
    state = load_checkpoint(path)
    other = build_from_options("model.num_classes=6")  # R-50 and a 256-channel head, not R-18
    missing = [k for k in other.state_dict() if k not in state["model"]]
    unexpected = [k for k in state["model"] if k not in other.state_dict()]
    with caplog.at_level(logging.INFO, logger="gfldet"):
        load_matching_weights(other, str(path))
        cfg = config_from_dict(state["config"])
        load_matching_weights(build_model(cfg.model, size_divisor=cfg.data.size_divisor),
                              str(path))
    partial, full = (r.getMessage() for r in caplog.records)
    assert len(missing) > 10 and len(partial) < 3000  # it was 11 KB
    assert f"{len(missing)} missing in the checkpoint ({', '.join(missing[:10])}, ...)" in partial
    assert re.search(r"; \d+ of another shape \(", partial)
    assert ("unused: " in partial) == bool(unexpected)
    n = len(state["model"])
    assert full == f"loaded {n} of the model's {n} tensors from {path}"


def test_a_pruned_epoch_checkpoint_is_logged(tmp_path, caplog):
    for n in (1, 2, 3):
        (tmp_path / f"epoch_{n}.pth").write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="gfldet"):
        assert prune_checkpoints(tmp_path, keep=0) == []  # 0 keeps all
        assert prune_checkpoints(tmp_path, keep=2) == [tmp_path / "epoch_1.pth"]
    assert [r.getMessage() for r in caplog.records] == [
        "removed epoch_1.pth: train.keep_checkpoints=2 keeps the newest 2 epoch_N.pth besides "
        "last.pth and best.pth (0 keeps all)"]


# --------------------------------------------------------------------------- tools


def test_eval_from_the_checkpoint_alone_matches_training(tiny_run, tmp_path):
    work, _ = tiny_run
    proc = run_in_process(EVAL, str(work / "last.pth"), "--metrics", str(tmp_path / "m.json"))
    assert "stored config" in proc.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    trained = json.loads((work / "metrics_epoch_2.json").read_text())
    assert trained["bbox_mAP"] > 0
    for key in ("bbox_mAP", "bbox_mAP_50", "AR_100"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-9), key
    # A YAML config before the checkpoint still wins, and --cfg-options apply to the stored one.
    run_in_process(EVAL, str(work / "last.pth"), "--metrics", str(tmp_path / "m2.json"), "--out",
                   str(tmp_path / "d.json"), "--cfg-options", "model.test.max_per_img=1")
    detections = json.loads((tmp_path / "d.json").read_text())
    per_image = [d["image_id"] for d in detections]
    assert detections and all(per_image.count(i) == 1 for i in per_image)
    proc = run_in_process(EVAL, str(work / "config.yaml"), str(work / "last.pth"), "--metrics",
                          str(tmp_path / "m3.json"))
    again = json.loads((tmp_path / "m3.json").read_text())["bbox_mAP"]
    assert again == pytest.approx(trained["bbox_mAP"], abs=1e-9)


def test_predict_and_export_from_the_checkpoint_alone(tiny_run, tiny_coco, tmp_path):
    work, _ = tiny_run
    out = tmp_path / "pred"
    proc = run_in_process(PREDICT, str(work / "last.pth"), str(tiny_coco["val_images"]), "--out",
                          str(out), "--score-thr", "0.0")
    assert "image(s)" in proc.stdout
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(records) == 4 and all(r["detections"] for r in records)
    proc = run_in_process(EXPORT, str(work / "last.pth"), "--format", "torchscript", "--out",
                          str(tmp_path / "m.pt"), "--verify-images", str(tiny_coco["val_images"]),
                          "--num-verify", "1")
    assert "verified against PyTorch" in proc.stdout and (tmp_path / "m.pt").is_file()
    proc = run_in_process(EXPORT, str(work / "last.pth"), "--format", "weights", "--out",
                          str(tmp_path / "w.pth"))
    assert re.search(r"w-[0-9a-f]{8}\.pth", proc.stdout)


def test_a_config_given_where_the_checkpoint_belongs_is_a_usage_error(tiny_run, tiny_coco):
    work, _ = tiny_run
    proc = run_in_process(PREDICT, str(work / "config.yaml"), str(work / "last.pth"), check=False)
    assert proc.returncode == 2 and "YAML config" in proc.stderr and "Traceback" not in proc.stderr
