"""`train()` called from Python: it leaves the process as it found it (signal handlers, the
"gfldet" logger), says when a `model=` is not the one its config describes, and its run-folder
errors name the keyword arguments as well as the command-line options (trial F: 2, 3, 7)."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_in_process, tiny_overrides

import gfldet.engine.trainer as trainer
from gfldet.config import ConfigError, load_config
from gfldet.data.images import DatasetError
from gfldet.engine.build import build_model
from gfldet.engine.checkpoint import CheckpointError, load_checkpoint
from gfldet.engine.run_dir import RunDirError
from gfldet.engine.trainer import TrainingStopped, model_matches_config, train
from gfldet.inference import Detector

DEMO = ROOT / "configs" / "demo_synthetic_cpu.yaml"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def config(data, *extra: str):
    return load_config(DEMO, [*tiny_overrides(data), *extra])


def foreign_model(cfg):
    """A detector the config does not describe: a wider FPN than tiny_overrides'."""
    model_cfg = replace(cfg.model, backbone=replace(cfg.model.backbone, weights=None),
                        fpn=replace(cfg.model.fpn, out_channels=64))
    return build_model(model_cfg, size_divisor=cfg.data.size_divisor)


def _mine(signum, frame) -> None:  # a user's handler, which train() must put back
    pass


@pytest.fixture
def own_handlers():
    """SIGINT/SIGTERM set to a user's handler for the test, and put back after it."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _mine)
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def assert_process_as_before(work: Path, handlers_before: list) -> None:
    """The user's signal handlers are back, and gfldet's later log lines stay out of train.log."""
    assert [signal.getsignal(sig) for sig in STOP_SIGNALS] == [_mine, _mine]
    gfldet_log = logging.getLogger("gfldet")
    assert gfldet_log.handlers == handlers_before and gfldet_log.propagate
    gfldet_log.warning("a line logged after train()")
    assert "a line logged after train()" not in (work / "train.log").read_text()


@pytest.fixture(scope="module")
def foreign_run(tiny_coco, tmp_path_factory):
    """Two epochs trained with train(model=...) of a model the config does not describe; the
    state of the process as train() left it, observed at once."""
    work = tmp_path_factory.mktemp("foreign") / "run"
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _mine)
    handlers = logging.getLogger("gfldet").handlers[:]
    try:
        cfg = config(tiny_coco)
        train(cfg, work, model=foreign_model(cfg))
        observed = {"signals": [signal.getsignal(sig) for sig in STOP_SIGNALS],
                    "handlers_back": logging.getLogger("gfldet").handlers == handlers}
        logging.getLogger("gfldet").warning("a line logged after train()")
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return work, observed


# --------------------------------------------------------------------------- finding 3


def test_after_train_returns_the_signal_handlers_and_the_logger_are_as_before(foreign_run):
    work, observed = foreign_run
    assert observed["signals"] == [_mine, _mine]  # were StopRequested._handle: Ctrl-C swallowed
    assert observed["handlers_back"]
    assert "a line logged after train()" not in (work / "train.log").read_text()


def test_after_train_raises_on_a_bad_dataset_the_process_is_as_before(tiny_coco, tmp_path,
                                                                     own_handlers):
    work = tmp_path / "run"
    handlers = logging.getLogger("gfldet").handlers[:]
    missing = tmp_path / "missing.json"
    with pytest.raises(DatasetError, match="missing.json"):
        train(config(tiny_coco, f"data.train.annotations={missing}"), work)
    assert "work dir" in (work / "train.log").read_text()  # raised with the run's log set up
    assert_process_as_before(work, handlers)


def test_after_train_raises_mid_run_the_process_is_as_before(tiny_coco, tmp_path, own_handlers,
                                                            monkeypatch):
    # An error after the stop handlers are installed (the first evaluation's).
    def broken(*args, **kwargs):
        raise RuntimeError("the scorer broke")

    monkeypatch.setattr(trainer, "evaluate", broken)
    work = tmp_path / "run"
    handlers = logging.getLogger("gfldet").handlers[:]
    with pytest.raises(RuntimeError, match="the scorer broke"):
        train(config(tiny_coco, "schedule.epochs=1", "schedule.milestones=[]"), work)
    assert (work / "last.pth").is_file()
    assert_process_as_before(work, handlers)


# --------------------------------------------------------------------------- finding 2


def test_a_model_the_config_does_not_describe_is_warned_about_and_recorded(foreign_run,
                                                                           tiny_coco):
    work, _ = foreign_run
    log = (work / "train.log").read_text()
    assert "WARNING train(model=...): the model is not the one the config's model section" in log
    assert "neck.lateral_convs.0.conv.weight (64, 128, 1, 1) vs the config's (32, 128, 1, 1)" in log
    assert "load only into this model" in log and "torch.load(path)['model']" in log
    for name in ("last.pth", "best.pth", "epoch_1.pth"):
        assert load_checkpoint(work / name)["meta"]["model_matches_config"] is False
    # What the warning says to do loads it.
    foreign_model(config(tiny_coco)).load_state_dict(torch.load(work / "last.pth")["model"])


@pytest.mark.parametrize("tool", ["eval", "predict"])
def test_the_tools_say_the_checkpoint_came_from_train_with_a_model(foreign_run, tiny_coco,
                                                                  tool):
    work, _ = foreign_run
    image = next(Path(tiny_coco["val_images"]).glob("*.jpg"))
    args = [str(work / "last.pth")] + ([str(image)] if tool == "predict" else [])
    proc = run_in_process(ROOT / "tools" / f"{tool}.py", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"{work / 'last.pth'} was written by train(model=...) with a model its config does "
            "not describe") in proc.stderr
    assert "drop the override" not in proc.stderr and "Traceback" not in proc.stderr


def test_detector_and_a_resume_without_the_model_say_the_same(foreign_run, tiny_coco):
    work, _ = foreign_run
    with pytest.raises(CheckpointError, match=r"written by train\(model=\.\.\.\)"):
        Detector.from_checkpoint(work / "best.pth")
    # The resume needs the model again; without it, the advice is not --load-from's.
    with pytest.raises(CheckpointError) as err:
        train(config(tiny_coco), work, resume=str(work / "epoch_1.pth"))
    assert "resume: train(..., model=that model)" in str(err.value)
    assert "--load-from" not in str(err.value)


def test_model_matches_config_builds_nothing_real(tiny_coco, monkeypatch, caplog):
    """The config's model is built on the meta device and without its ImageNet weights (the
    config asks for torchvision's, which would be a download)."""
    cfg = config(tiny_coco, "model.backbone.weights=torchvision")
    built = []

    def record(model_cfg, **kwargs):
        built.append(build_model(model_cfg, **kwargs))
        return built[-1]

    monkeypatch.setattr("gfldet.inference.build_model", record)
    monkeypatch.setattr("gfldet.models.backbone.load_imagenet_weights",
                        lambda *a: pytest.fail("ImageNet weights loaded"))
    own = build_model(replace(cfg.model, backbone=replace(cfg.model.backbone, weights=None)),
                      size_divisor=cfg.data.size_divisor)
    with caplog.at_level(logging.WARNING, "gfldet"):
        assert model_matches_config(own, cfg)
        assert not caplog.records  # a model the config describes: nothing to say
        assert not model_matches_config(foreign_model(cfg), cfg)
    assert "3 tensors differ" not in caplog.text and "tensors differ" in caplog.text
    assert {p.device.type for m in built for p in m.state_dict().values()} == {"meta"}
    assert cfg.model.backbone.weights == "torchvision"  # the caller's config is unchanged


# --------------------------------------------------------------------------- finding 7


def test_a_used_run_folder_names_the_keyword_arguments_too(foreign_run, tiny_coco):
    work, _ = foreign_run
    with pytest.raises(RunDirError) as err:
        train(config(tiny_coco), work)
    message = str(err.value)
    assert "--resume (resume=True in train())" in message
    assert "--overwrite (overwrite=True)" in message
    assert "--work-dir DIR (train()'s work_dir)" in message


# --------------------------------------------------------------------------- trial G


def _process_globals() -> dict:
    """What a run may change in the process besides signals and the logger (trial G: 3a, 4)."""
    return {"det": (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled()),
            "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "rng": (random.getstate(), np.random.get_state()[1].tolist(),
                    torch.get_rng_state().tolist())}


def test_a_signal_raises_training_stopped_and_the_process_is_as_before(tiny_coco, tmp_path,
                                                                      own_handlers, monkeypatch):
    """G1: a SIGTERM (a preempted job) or Ctrl-C writes last.pth, then train() raises, so a loop
    over seeds stops; G3a/G4: a deterministic run leaves torch's settings, the RNGs and the
    model's target checks as they were; G10: the work_dir argument wins over train.work_dir."""
    original = trainer.TrainLoop.step

    def step(self, images, targets, it):
        if it == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by StopRequested during the step
        return original(self, images, targets, it)

    monkeypatch.setattr(trainer.TrainLoop, "step", step)
    cfg = config(tiny_coco, "train.deterministic=true", f"train.work_dir={tmp_path / 'other'}")
    model = build_model(replace(cfg.model, backbone=replace(cfg.model.backbone, weights=None)),
                        size_divisor=cfg.data.size_divisor)
    before, work = _process_globals(), tmp_path / "run"
    with pytest.raises(TrainingStopped) as err:
        try:
            train(cfg, work, model=model)
        except Exception:  # a script's broad handler does not swallow it, as with a Ctrl-C
            pytest.fail("TrainingStopped caught by except Exception")
    stop = err.value
    assert isinstance(stop, KeyboardInterrupt) and stop.signum == signal.SIGTERM
    assert stop.checkpoint == work / "last.pth" and stop.checkpoint.is_file()
    assert (stop.run.epoch, stop.run.batch, stop.run.stopped_by) == (0, 2, signal.SIGTERM)
    assert f"{work / 'last.pth'} written" in str(stop) and "resume=True" in str(stop)
    assert _process_globals() == before
    assert model.check_targets is True
    assert [signal.getsignal(sig) for sig in STOP_SIGNALS] == [_mine, _mine]
    log = (work / "train.log").read_text()
    assert f"train.work_dir {tmp_path / 'other'} is not used" in log
    assert not (tmp_path / "other").exists()


def test_train_in_a_thread_trains_without_stop_handlers(tiny_coco, tmp_path, own_handlers):
    """G6: signal.signal works in the main thread only; a thread's run trains, without Ctrl-C
    handling, and says so. G10: no work_dir argument: cfg.train.work_dir."""
    cfg = config(tiny_coco, "schedule.epochs=1", "schedule.milestones=[]")
    cfg.train.work_dir = str(tmp_path / "from_cfg")
    before, result = _process_globals(), {}

    def worker() -> None:
        try:
            result["run"] = train(cfg)[1]
        except BaseException as err:  # reported to the test's thread
            result["error"] = err

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert "error" not in result, result
    assert result["run"].epoch == 1 and result["run"].stopped_by is None
    log = (tmp_path / "from_cfg" / "train.log").read_text()
    assert "outside the main thread: Ctrl-C and SIGTERM do not stop it" in log
    assert [signal.getsignal(sig) for sig in STOP_SIGNALS] == [_mine, _mine]
    assert _process_globals() == before


def test_train_without_a_run_folder_or_with_a_model_of_other_classes_is_refused(tiny_coco,
                                                                                tmp_path):
    """G10: train(cfg) with no train.work_dir; G3b: the datasets are checked against
    cfg.model.num_classes, so a model= with other classes would train some as background."""
    cfg = config(tiny_coco)
    with pytest.raises(ConfigError, match=r"pass train\(cfg, work_dir\) or set "
                                          r"cfg.train.work_dir"):
        train(cfg)
    other = build_model(replace(cfg.model, num_classes=cfg.model.num_classes - 1,
                                backbone=replace(cfg.model.backbone, weights=None)),
                        size_divisor=cfg.data.size_divisor)
    with pytest.raises(ConfigError) as err:
        train(cfg, tmp_path / "run", model=other)
    assert (f"the model has {cfg.model.num_classes - 1} classes but cfg.model.num_classes is "
            f"{cfg.model.num_classes}") in str(err.value)
    assert not (tmp_path / "run").exists()


def test_checkpoint_messages_name_the_keyword_arguments_too(foreign_run, tiny_coco, tmp_path):
    """G7: a Python caller passed resume=/load_from=/allow_schedule_change=, not the options."""
    work, _ = foreign_run
    with pytest.raises(CheckpointError) as err:
        train(config(tiny_coco), work, resume=True)  # the run finished
    assert "pass --allow-schedule-change (allow_schedule_change=True in train())" in str(err.value)
    with pytest.raises(CheckpointError, match=r"^--resume \(resume=PATH\): checkpoint not found"):
        train(config(tiny_coco), tmp_path / "a", resume="True")
    with pytest.raises(CheckpointError, match=r"^--load-from \(load_from=\): checkpoint not found"):
        train(config(tiny_coco), tmp_path / "b", load_from=str(tmp_path / "nope.pth"))
    # A run stopped before its first checkpoint: the advice must not loop back to resume.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "scalars.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError) as err:
        train(config(tiny_coco), tmp_path / "c", resume=True)
    assert "--overwrite (overwrite=True) if it holds a stopped run's logs" in str(err.value)
