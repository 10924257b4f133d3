"""`train()` called from Python: it leaves the process as it found it (signal handlers, the
"gfldet" logger), says when a `model=` is not the one its config describes, and its run-folder
errors name the keyword arguments as well as the command-line options (trial F: 2, 3, 7)."""

from __future__ import annotations

import logging
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

import gfldet.engine.trainer as trainer
from gfldet.config import load_config
from gfldet.data.images import DatasetError
from gfldet.engine.build import build_model
from gfldet.engine.trainer import train

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
