"""Shared fixtures: a tiny synthetic COCO-format dataset and a tiny training config."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep the 2-core CI machine responsive and runs comparable.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> dict[str, Path]:
    """16 training and 4 validation images of 128-160 px, generated once per test session."""
    from gfldet.data import generate_synthetic_coco

    out = tmp_path_factory.mktemp("tiny_coco")
    return generate_synthetic_coco(out, num_train=16, num_val=4, image_size=(128, 160), seed=3,
                                   num_workers=1)


def tiny_overrides(data: dict[str, Path], epochs: int = 2) -> list[str]:
    """--cfg-options turning the demo config into a model and schedule that run in seconds."""
    return [
        f"data.train.images={data['train_images']}",
        f"data.train.annotations={data['train_ann']}",
        f"data.val.images={data['val_images']}",
        f"data.val.annotations={data['val_ann']}",
        "data.synthetic=null",
        "data.train_short_side=[128,128]",
        "data.test_short_side=128",
        "data.max_size=192",
        "data.batch_size=4",
        "data.val_batch_size=2",
        "data.num_workers=0",
        "model.fpn.out_channels=32",
        "model.head.feat_channels=64",
        "model.head.stacked_convs=1",
        "optim.name=sgd",
        "optim.lr=0.01",
        "optim.weight_decay=0.0001",
        "schedule.policy=step",
        f"schedule.epochs={epochs}",
        f"schedule.milestones={[1] if epochs > 1 else []}",
        "schedule.warmup_iters=2",
        "train.log_interval=1",
        "train.device=cpu",
        "train.deterministic=true",
        "train.amp=none",
        "train.report=false",  # seconds per run; tests/test_report.py turns it on
    ]


@functools.cache
def _tool_module(script: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tool_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(script: str | Path, *args: str,
                   check: bool = True) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as the tool's `main(argv)` in this process, with the same exit code,
    stdout and stderr: for tools that need no process of their own (no signal, no torchrun), it
    saves the ~5 s a new interpreter spends importing torch and torchvision. An exception that
    escapes `main` (a user's traceback) fails the test with it."""
    module = _tool_module(Path(script).resolve())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main(list(args))
            except SystemExit as exc:
                code = exc.code
                if isinstance(code, str):  # sys.exit("message"): printed, exit status 1
                    print(code, file=err)
                    code = 1
    finally:
        for sig, handler in handlers.items():  # train() installs its stop handlers
            signal.signal(sig, handler)
        _restore_gfldet_logger()  # its handlers wrote to the captured streams
    code = 0 if code is None else code
    proc = subprocess.CompletedProcess([str(script), *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} {args} failed ({code}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def build_from_options(*options: str):
    """`build_model` of the default model config with these overrides (``model.a.b=value``, as
    --cfg-options) and no ImageNet backbone weights."""
    from gfldet.config import config_from_dict
    from gfldet.engine.build import build_model

    cfg = config_from_dict({}, overrides=["model.backbone.weights=null", *options])
    return build_model(cfg.model, size_divisor=cfg.data.size_divisor)


def checked_dataset(image_dir, ann_file, transform=None, **options):
    """`CocoDetection` of a checked split, as the trainer builds it: `load_checked_split` with
    `options` (filter_empty, min_size, max_decode_failures, cache, ...), then the dataset."""
    from gfldet.data.checked_split import load_checked_split
    from gfldet.data.coco import CocoDetection

    split = load_checked_split(image_dir, ann_file, **options)
    keep = {k: options[k] for k in ("filter_empty", "min_size") if k in options}
    return CocoDetection(image_dir, ann_file, transform, **keep, split=split,
                         max_decode_failures=options.get("max_decode_failures", 0.01))


_GFLDET_LOGGER = logging.getLogger("gfldet")
_LOGGER_AT_START = (_GFLDET_LOGGER.handlers[:], _GFLDET_LOGGER.propagate, _GFLDET_LOGGER.level)


def _restore_gfldet_logger() -> None:
    handlers, propagate, level = _LOGGER_AT_START
    for handler in _GFLDET_LOGGER.handlers:
        if handler not in handlers:
            handler.close()
    _GFLDET_LOGGER.handlers[:] = handlers
    _GFLDET_LOGGER.propagate, _GFLDET_LOGGER.level = propagate, level


@pytest.fixture(autouse=True)
def _gfldet_logger_as_before():
    """`train()` run in-process sets up the "gfldet" logger (its own handlers, no propagation);
    put it back as it was when the session started, before and after each test, so that caplog
    sees its records. Before, too: a module-scoped fixture that trains runs before this one."""
    _restore_gfldet_logger()
    yield
    _restore_gfldet_logger()


def to_format_1(state_dict: dict) -> dict:
    """A state dict of today's model (or of its EMA, "module."-prefixed) renamed back to model
    format 1, gfldet's module layout before MMDetection's names: a `stem` Sequential (conv1, bn1),
    FPN `output_convs.i`, `p6`, `p7`, one Sequential per head tower of (conv, GroupNorm, ReLU)
    (or (conv, ReLU) without norm), `cls_out`, `reg_out` and DGQP's `hidden` and `out`. Written
    from that layout, independently of gfldet's own map."""
    slots = 3 if any(".gn." in k for k in state_dict) else 2
    fpn = {"0": "output_convs.0", "1": "output_convs.1", "2": "output_convs.2", "3": "p6",
           "4": "p7"}
    out = {}
    for key, value in state_dict.items():
        prefix = "module." if key.startswith("module.") else ""
        parts = key.removeprefix(prefix).split(".")
        if parts[:2] == ["backbone", "conv1"]:
            parts[1:2] = ["stem", "0"]
        elif parts[:2] == ["backbone", "bn1"]:
            parts[1:2] = ["stem", "1"]
        elif parts[:2] == ["neck", "lateral_convs"]:
            del parts[3]  # .conv
        elif parts[:2] == ["neck", "fpn_convs"]:
            parts[1:4] = fpn[parts[2]].split(".")
        elif parts[0] == "head" and parts[1] in ("cls_convs", "reg_convs"):
            index = slots * int(parts[2]) + (parts[3] == "gn")
            parts[1:4] = [parts[1].replace("convs", "tower"), str(index)]
        elif parts[:2] in (["head", "gfl_cls"], ["head", "gfl_reg"]):
            parts[1] = {"gfl_cls": "cls_out", "gfl_reg": "reg_out"}[parts[1]]
        elif parts[:2] == ["head", "reg_conf"]:
            parts[1:3] = ["dgqp", {"0": "hidden", "2": "out"}[parts[2]]]
        out[prefix + ".".join(parts)] = value
    return out


def join_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group on this machine; a collective that waits 2 minutes raises."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=2))


def exit_worker() -> None:
    """End a spawned worker that succeeded, without tearing its gloo process group down.

    Before torch 2.8, destroying a gloo process group holds the GIL while it joins its threads, and
    a thread still freeing a finished collective's Python tensors waits for the GIL: a deadlock
    (pytorch/pytorch#154976) that hung a CI run in the floors environment (torch 2.6).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_workers(fn, args: tuple, nprocs: int = 2, timeout: float = 300.0) -> None:
    """Run `fn(rank, *args)` in `nprocs` spawned processes; a worker that hangs fails the test
    after `timeout` seconds instead of stalling the suite."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
            for process in context.processes:
                process.kill()
            pytest.fail(f"worker(s) {alive} of {fn.__name__} still running after {timeout:.0f} s;"
                        " killed")
