"""Crashes, preemption, numerical faults and failing processes never cost a run (issue 4)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, _tool_module, run_in_process, tiny_overrides
from test_train_cli import DEMO, TRAIN, run, run_overrides, trained_run  # noqa: F401 (fixture)

from gfldet.config import Config
from gfldet.engine.checkpoint import load_checkpoint
from gfldet.engine.progress import Progress
from gfldet.engine.trainer import StopRequested, TrainLoop


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def start_training(work: Path, data, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, TRAIN, DEMO, "--work-dir", str(work), *extra, "--cfg-options",
           *run_overrides(data)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_log_lines(work: Path, proc: subprocess.Popen, count: int,
                       timeout: float = 300) -> None:
    """Wait until train.log holds `count` iteration lines (log_interval is 1 in the tiny config)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = work / "train.log"
        if log.exists() and log.read_text().count("] lr: ") >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {count} iterations:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training")


def iterations_per_epoch(work: Path) -> int:
    return int((work / "train.log").read_text().split(" iterations per epoch")[0].split()[-1])


def test_sigkill_at_a_random_iteration_then_resume_matches(
        trained_run, tiny_coco, tmp_path):  # noqa: F811
    reference, _ = trained_run
    per_epoch = iterations_per_epoch(reference)
    # Kill somewhere in the second epoch, after epoch_1.pth exists (before it, there is nothing to
    # resume and the run is simply started again).
    kill_at = random.Random(os.getpid()).randint(per_epoch + 1, 2 * per_epoch - 1)
    work = tmp_path / "killed"
    proc = start_training(work, tiny_coco)
    wait_for_log_lines(work, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "epoch_1.pth").is_file() and not (work / "epoch_2.pth").exists()
    run(TRAIN, DEMO, "--work-dir", str(work), "--resume", "--cfg-options",
        *run_overrides(tiny_coco))
    assert same_weights(reference / "last.pth", work / "last.pth")


def test_sigterm_writes_a_mid_epoch_checkpoint_and_resume_matches(
        trained_run, tiny_coco, tmp_path):  # noqa: F811
    reference, _ = trained_run
    work = tmp_path / "preempted"
    proc = start_training(work, tiny_coco)
    wait_for_log_lines(work, proc, 2)  # inside the first epoch
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    state = load_checkpoint(work / "last.pth")
    assert state["epoch"] == 0 and state["batch"] >= 2, "the checkpoint is mid-epoch"
    assert "continue with --resume" in (work / "train.log").read_text()
    run(TRAIN, DEMO, "--work-dir", str(work), "--resume", "--cfg-options",
        *run_overrides(tiny_coco))
    assert same_weights(reference / "last.pth", work / "last.pth")
    # The stop and the resume name the same position, the epoch counted from 1 in both.
    where = f"at epoch 1, batch {state['batch']} of {iterations_per_epoch(work)}"
    log = (work / "train.log").read_text()
    assert f"stopped {where}: last.pth written" in log
    assert f"resumed from {work / 'last.pth'} {where} (iteration {state['batch']})" in log


def test_a_sigterm_to_the_whole_process_group_with_loader_workers_stops_cleanly(tiny_coco,
                                                                                tmp_path):
    """SLURM's scancel and `timeout` signal every process of the job, the DataLoader workers too:
    the run still stops after the iteration with last.pth, no traceback. (Ctrl-C, SIGINT to the
    terminal's process group, ends the same way.)"""
    sig = signal.SIGTERM
    work = tmp_path / "group"
    cmd = [sys.executable, TRAIN, DEMO, "--work-dir", str(work), "--cfg-options",
           *run_overrides(tiny_coco), "data.num_workers=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group, as a job's
    wait_for_log_lines(work, proc, 2)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert load_checkpoint(work / "last.pth")["batch"] >= 2


def test_schedule_change_on_resume_must_be_explicit(trained_run, tiny_coco, tmp_path):  # noqa: F811
    reference, _ = trained_run
    work = tmp_path / "longer"
    work.mkdir()
    (work / "last.pth").write_bytes((reference / "last.pth").read_bytes())
    longer = [*run_overrides(tiny_coco), "schedule.epochs=3"]
    proc = run_in_process(TRAIN, DEMO, "--work-dir", str(work), "--resume", "--cfg-options",
                          *longer, check=False)
    assert proc.returncode == 2 and "schedule.epochs: 2 -> 3" in proc.stderr
    assert "--allow-schedule-change" in proc.stderr
    run_in_process(TRAIN, DEMO, "--work-dir", str(work), "--resume", "--allow-schedule-change",
                   "--cfg-options", *longer)
    assert "schedule changed on resume" in (work / "train.log").read_text()
    assert load_checkpoint(work / "last.pth")["epoch"] == 3


class FaultyModel(torch.nn.Module):
    """A tiny model whose box loss turns NaN on chosen calls: an injected numerical fault."""

    def __init__(self, bad_calls: set[int]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, images, targets):
        self.calls += 1
        box = self.weight.sum() * images.mean()
        if self.calls in self.bad_calls:
            box = box * float("nan")
        return {"loss_cls": (self.weight**2).sum(), "loss_bbox": box}


def make_loop(model: torch.nn.Module, max_bad_steps: int = 3,
              work_dir: Path | None = None) -> TrainLoop:
    cfg = Config()
    cfg.train.max_bad_steps = max_bad_steps
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    progress = Progress(100, 10, 1, torch.device("cpu"), scalars=None, bar=False)
    return TrainLoop(model, None, opt, sched, scaler, None, torch.device("cpu"), cfg, progress,
                     work_dir)


def batch(image_id: int):
    """A loader batch: uint8 images and targets with their unpadded size."""
    targets = [{"image_id": image_id, "boxes": torch.zeros(0, 4), "image_size": (4, 4)}]
    return torch.ones(1, 3, 4, 4, dtype=torch.uint8), targets


def test_non_finite_loss_skips_the_step(caplog):
    model = FaultyModel(bad_calls={2})
    loop = make_loop(model)
    loop.step(*batch(11), it=0)
    before = model.weight.detach().clone()
    with caplog.at_level("WARNING", logger="gfldet"):
        loop.step(*batch(12), it=1)
    assert torch.equal(model.weight, before), "a NaN step must not touch the weights"
    assert "non-finite ['loss_bbox'] on images [12]" in caplog.text
    loop.step(*batch(13), it=2)
    assert not torch.equal(model.weight, before) and loop.bad_steps == 0


def test_consecutive_bad_steps_stop_the_run_with_names_iteration_and_images():
    loop = make_loop(FaultyModel(bad_calls={2, 3, 4}), max_bad_steps=3)
    loop.step(*batch(1), it=0)
    loop.step(*batch(2), it=1)
    loop.step(*batch(3), it=2)
    with pytest.raises(FloatingPointError, match=r"loss_bbox.*iteration 4.*images \[4\]"):
        loop.step(*batch(4), it=3)


def test_the_stop_message_names_the_newest_checkpoint_or_none(tmp_path):
    """"The last checkpoint is intact" was said in epoch 1 too, when none existed yet."""
    loop = make_loop(FaultyModel(bad_calls={1}), max_bad_steps=1, work_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="No checkpoint of this run was written yet"):
        loop.step(*batch(1), it=0)
    (tmp_path / "epoch_1.pth").write_bytes(b"x")
    (tmp_path / "last.pth").write_bytes(b"x")
    loop = make_loop(FaultyModel(bad_calls={1}), max_bad_steps=1, work_dir=tmp_path)
    with pytest.raises(FloatingPointError) as err:
        loop.step(*batch(1), it=0)
    assert f"The newest checkpoint, {tmp_path / 'last.pth'}, is intact" in str(err.value)


def test_stop_request_is_reported_by_the_step():
    loop = make_loop(FaultyModel(set()))
    StopRequested.signum = signal.SIGTERM
    try:
        assert loop.step(*batch(1), it=0) is True
    finally:
        StopRequested.signum = None


FAILING_RANK = """
import sys
import gfldet.engine.trainer as trainer
import torch.distributed as dist

original = trainer.TrainLoop.step

def step(self, images, targets, it):
    if dist.get_rank() == 1 and it == 1:
        raise RuntimeError("injected failure on rank 1")
    return original(self, images, targets, it)

trainer.TrainLoop.step = step
sys.path.insert(0, sys.argv.pop(1))
from train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_ends_the_job_and_its_error_is_shown(tiny_coco, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(31500 + os.getpid() % 1000),
           str(script), str(ROOT / "tools"), DEMO, "--work-dir", str(tmp_path / "w"),
           "--cfg-options", *tiny_overrides(tiny_coco, epochs=1), "data.batch_size=2"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert time.time() - started < 240, "the other rank hung"
    assert "injected failure on rank 1" in proc.stderr + proc.stdout


def test_under_torchrun_a_sigint_prints_each_stop_line_once(tiny_coco, tmp_path):
    """torchrun passes the signal to every rank; each rank stops after the iteration, but only
    rank 0 says so (trial E, finding 4), as train.log has it."""
    work = tmp_path / "w"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2",
           "--master_port", str(32500 + os.getpid() % 1000), TRAIN, DEMO, "--work-dir", str(work),
           "--cfg-options", *tiny_overrides(tiny_coco, epochs=3), "data.batch_size=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_log_lines(work, proc, 2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert out.count("received SIGINT: stopping after this iteration") == 1, out[-3000:]
    assert out.count("last.pth written; continue with --resume") == 1, out[-3000:]
    assert load_checkpoint(work / "last.pth")["batch"] >= 2
    # torchrun's own exit code and traceback, as the README's "When things go wrong" says
    assert proc.returncode == 1 and "SignalException" in out, out[-3000:]


@pytest.mark.parametrize(("rank", "lines"), [("0", 1), ("1", 0)])
def test_a_second_ctrl_c_is_reported_by_rank_0_only(monkeypatch, tiny_coco, tmp_path, rank,
                                                    lines):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_tool_module(Path(TRAIN).resolve()), "train", interrupted)
    monkeypatch.setenv("RANK", rank)  # as torchrun sets it, process group or not
    proc = run_in_process(TRAIN, DEMO, "--work-dir", str(tmp_path / "w"), "--cfg-options",
                          *tiny_overrides(tiny_coco), check=False)
    assert proc.returncode == 128 + signal.SIGINT
    assert proc.stderr.count("interrupted: a second Ctrl-C") == lines, proc.stderr
