"""The training loop: one process per device, DDP under torchrun, checkpoints and evaluation.

Reads a resolved `Config`; writes into the run folder (rank 0 only): `config.yaml`, `train.log`,
`scalars.jsonl` and TensorBoard events under `tb/` (the same values), `epoch_N.pth`, `last.pth`,
`best.pth`, `metrics_epoch_N.json` and `report/` (the final evaluation's report, `train.report`).
A folder that holds an earlier run is refused unless the run resumes it or overwrites it
(`gfldet.engine.run_dir`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.contrib.logging import logging_redirect_tqdm

from gfldet.config import Config, ConfigError, config_to_dict, dump_config
from gfldet.data import build_dataloader, normalize_batch
from gfldet.data.checks import split_problems, split_warnings
from gfldet.data.images import DatasetError
from gfldet.data.loader import freeze_heap_for_workers
from gfldet.distributed import (
    all_gather_objects,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
)
from gfldet.engine.build import (
    build_dataset,
    build_lr_scheduler,
    build_model,
    build_optimizer,
    scaled_lr,
)
from gfldet.engine.checkpoint import (
    MODEL_FORMAT,
    CheckpointError,
    capture_rng_state,
    find_checkpoint_file,
    find_latest_checkpoint,
    foreign_model_advice,
    load_checkpoint,
    load_model_weights,
    load_training_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from gfldet.engine.coco_eval import STAT_NAMES, write_metrics_json
from gfldet.engine.ema import build_ema
from gfldet.engine.evaluator import evaluate
from gfldet.engine.precision import resolve_precision
from gfldet.engine.progress import Progress, ScalarLog, drop_records_after
from gfldet.engine.resume import RunSetup, check_resumable, check_unfinished, continue_schedule
from gfldet.engine.run_dir import (
    CHECK_CACHE_DIR,
    RunDirError,
    check_run_dir,
    remove_stale_temporaries,
)
from gfldet.inference import build_inference_model, model_weights, refuse_mmdet_checkpoint

log = logging.getLogger("gfldet")


def setup_logging(work_dir: Path | None) -> None:
    """Log to stdout on rank 0 (and to work_dir/train.log); other ranks log warnings only."""
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if work_dir is not None and is_main_process():
        work_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(work_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)


def init_distributed(device_setting: str) -> torch.device:
    """Join the torchrun process group if launched by torchrun, and pick this process's device."""
    use_cuda = torch.cuda.is_available() and device_setting != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    if use_cuda:
        if device_setting.startswith("cuda:"):
            return torch.device(device_setting)
        return torch.device("cuda", local_rank)
    if device_setting.startswith("cuda"):
        raise RuntimeError(f"train.device is {device_setting!r} but CUDA is not available; "
                           "use 'auto' or 'cpu'")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


class StopRequested:
    """Set by SIGTERM/SIGINT (a preempted job, Ctrl-C); the loop checkpoints and returns."""

    signum: int | None = None

    @classmethod
    def install(cls) -> None:
        cls.signum = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        if cls.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        cls.signum = signum
        if is_main_process():  # torchrun signals every rank: one line, as train.log has it
            log.warning("received %s: stopping after this iteration with a checkpoint",
                        signal.Signals(signum).name)


@dataclass
class RunState:
    """Where a run is: `epoch` counts finished epochs, `batch` the batches done in the next one."""

    epoch: int = 0
    batch: int = 0
    best_ap: float = -1.0
    stopped_by: int | None = None  # signal number when the run stopped early


class TrainingStopped(KeyboardInterrupt):
    """`train()` stopped by SIGINT/SIGTERM after writing `checkpoint`. A KeyboardInterrupt, so
    `except Exception` lets it through as it does a Ctrl-C, and a loop over runs stops."""

    def __init__(self, signum: int, run: RunState, checkpoint: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name} stopped training at epoch "
                         f"{run.epoch + 1}, batch {run.batch}; {checkpoint} written: continue "
                         "with train(..., resume=True) (tools/train.py --resume)")
        self.signum, self.run, self.checkpoint = signum, run, checkpoint


def train(cfg: Config, work_dir: Path | str | None = None, resume: str | bool | None = None,
          load_from: str | None = None, allow_schedule_change: bool = False,
          model: nn.Module | None = None,
          overwrite: bool = False) -> tuple[dict, RunState]:
    """Train `cfg` into `work_dir` (None: `cfg.train.work_dir`). `resume=True` continues from the
    folder's latest checkpoint, a path from that checkpoint. A `work_dir` that holds an earlier
    run raises `RunDirError` unless `resume`, or `overwrite` (which deletes that run's outputs
    first). Returns the last evaluation's metrics (rank 0) and where the run stopped. A SIGINT
    (Ctrl-C) or SIGTERM writes last.pth, then raises `TrainingStopped` (a KeyboardInterrupt); a
    second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread there is no such
    handling (Python delivers signals to the main thread only).

    `model`: a pre-built detector following gfldet's calling convention (see
    `gfldet.models.detector`), trained instead of `build_model(cfg.model)` with everything else
    from `cfg` (data, optimizer, schedule, AMP, ...); its `state_dict()` goes into the
    checkpoints. Build it after seeding if its initialisation should follow `train.seed`. The
    tools and `Detector` load a checkpoint into the model `cfg.model` describes: for another
    model, a warning says that its checkpoints load only into it.

    On return and on error, the process is as before: the SIGINT/SIGTERM handlers, the "gfldet"
    logger, the RNG states, torch's determinism settings and `model.check_targets`."""
    with _process_state_restored(model):
        metrics, run = _train(cfg, work_dir, resume, load_from, allow_schedule_change, model,
                              overwrite)
    if run.stopped_by is not None:  # raised after the handlers are back: the caller's Ctrl-C
        raise TrainingStopped(run.stopped_by, run, Path(work_dir or cfg.train.work_dir)
                              / "last.pth")
    return metrics, run


@contextlib.contextmanager
def _process_state_restored(model: nn.Module | None) -> Iterator[None]:
    """Put back what a run changes in the process: the signal handlers of `StopRequested` (else a
    notebook's Ctrl-C or a job's SIGTERM after training is swallowed), the logger of
    `setup_logging` (else later log lines go into the run's train.log), what `seed_everything`
    sets (else `deterministic: true` outlives its run, and every run leaves the same random
    numbers) and the `model=`'s target checks, which the run switches off."""
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    handlers, level, propagate = log.handlers[:], log.level, log.propagate
    rng, cublas = capture_rng_state(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    determinism = (torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    check_targets = getattr(model, "check_targets", None)
    try:
        yield
    finally:
        for sig, handler in signals.items():
            # None: a handler not set from Python, which signal.signal cannot reinstall.
            if handler is not None and signal.getsignal(sig) != handler:
                signal.signal(sig, handler)
        for handler in log.handlers:
            if handler not in handlers:
                handler.close()
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate
        restore_rng_state(rng)
        torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        if check_targets is not None:
            model.check_targets = check_targets


def _train(cfg: Config, work_dir: Path | str | None, resume: str | bool | None,
           load_from: str | None, allow_schedule_change: bool, model: nn.Module | None,
           overwrite: bool) -> tuple[dict, RunState]:
    cfg = cfg.validate()  # a Config edited in Python is checked as a YAML file is
    try:
        device = init_distributed(cfg.train.device)
    except RuntimeError as err:  # e.g. train.device: cuda without CUDA
        raise ConfigError(str(err)) from None
    rank, world = get_rank(), get_world_size()
    if work_dir is None and cfg.train.work_dir is None:  # work_dirs/<config name> needs a file
        raise ConfigError("train(cfg): no run folder: pass train(cfg, work_dir) or set "
                          "cfg.train.work_dir")
    if model is not None and getattr(model, "num_classes", cfg.model.num_classes) != (
            cfg.model.num_classes):  # the datasets are checked against the config's classes
        raise ConfigError(f"train(model=...): the model has {model.num_classes} classes but "
                          f"cfg.model.num_classes is {cfg.model.num_classes}, which the "
                          "datasets are checked against: make them equal")
    work_note = (f"work_dir {work_dir} given: train.work_dir {cfg.train.work_dir} is not used"
                 if work_dir is not None and cfg.train.work_dir is not None
                 and Path(work_dir) != Path(cfg.train.work_dir) else None)
    work_dir = Path(work_dir if work_dir is not None else cfg.train.work_dir)
    resume_from = check_start(work_dir, resume, overwrite, load_from)  # before anything is built
    folder_note, stale = prepare_work_dir(work_dir, bool(resume), overwrite)
    setup_logging(work_dir)
    matches_config = model is None or model_matches_config(model, cfg)  # warns if it does not
    state = None
    if resume_from is not None:  # a resume that would train nothing stops before any output
        state = load_training_checkpoint(resume_from)
        check_unfinished(cfg, state, resume_from)
    seed_everything(cfg.train.seed + rank, cfg.train.deterministic)
    log.info("work dir %s, device %s, %d process(es)", work_dir, device, world)
    for note in (folder_note, work_note):
        if note:
            log.info("%s", note)
    for path in stale:
        log.info("removed %s, left by a process that stopped while saving a checkpoint", path.name)
    precision = resolve_precision(cfg.train.amp, device)
    log.info("precision: %s (%s)", precision.name, precision.reason)
    if precision.warning:
        log.warning("%s", precision.warning)
    dtype = precision.dtype

    # Both splits are checked before anything is trained; val first, as it is usually the smaller.
    # The run folder keeps each split's check results, so a --resume decodes only changed files.
    splits = ["val", "train"] if cfg.train.eval_interval > 0 else ["train"]
    sets = {s: build_dataset(cfg, s, work_dir / CHECK_CACHE_DIR / f"{s}.json") for s in splits}
    train_set, val_set = sets["train"], sets.get("val")
    reports = {s: sets[s].check_report for s in reversed(splits)}  # train's problems first
    for warning in split_warnings(reports):
        log.warning("%s", warning)
    problems = split_problems(cfg.model.num_classes, reports)
    if problems:
        raise DatasetError("the datasets do not fit together; nothing was trained:\n"
                           + "\n".join(f"  - {p}" for p in problems)
                           + "\nRun tools/check_dataset.py CONFIG for the full report.")
    d = cfg.data
    loader_args = {"num_workers": d.num_workers, "seed": cfg.train.seed,
                   "distributed": is_distributed(), "size_divisor": d.size_divisor}
    train_loader = build_dataloader(train_set, d.batch_size, train=True,
                                    aspect_ratio_grouping=d.aspect_ratio_grouping, **loader_args)
    val_loader = (build_dataloader(val_set, d.val_batch_size, train=False, **loader_args)
                  if val_set is not None else None)
    iters_per_epoch = len(train_loader.batch_sampler)
    log.info("%d training images, %d iterations per epoch", len(train_set), iters_per_epoch)

    if model is None:
        # A resumed run's weights come from its checkpoint: the ImageNet weights are not loaded
        # (nor downloaded), so a moved file or an offline machine does not stop a resume.
        model_cfg = cfg.model
        if resume:
            model_cfg = replace(cfg.model, backbone=replace(cfg.model.backbone, weights=None))
        model = build_model(model_cfg, size_divisor=cfg.data.size_divisor)
    if hasattr(model, "check_targets"):  # GFL's: the datasets are checked, and it would sync
        model.check_targets = False
    model = model.to(device)
    if load_from is not None:
        load_matching_weights(model, load_from)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    total_batch = d.batch_size * world
    optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim, total_batch))
    scheduler = build_lr_scheduler(optimizer, cfg.schedule, iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = (build_ema(model, cfg.train.ema_decay, cfg.train.ema_warmup_iters) if cfg.train.ema
           else None)

    run = RunState()
    setup = RunSetup(world, d.batch_size, iters_per_epoch)
    if state is not None:
        rebuild_schedule = check_resumable(cfg, state, resume_from, allow_schedule_change, setup)
        base_lrs = list(scheduler.base_lrs)  # this run's, for its total batch
        load_model_weights(model, state["model"], strict=True, source=resume_from,
                           advice=foreign_model_advice(state, resume_from))
        optimizer.load_state_dict(state["optimizer"])
        # The lr function stays the one built from this config (check_resumable held it equal to
        # the saved one); the checkpoint's copy of its attributes is a record, not read back.
        scheduler.load_state_dict({**state["scheduler"],
                                   "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
        run = RunState(state["epoch"], state.get("batch", 0), state.get("best_ap", -1.0))
        if rebuild_schedule:  # the saved lr function is the old schedule's, batch or setup's
            continue_schedule(optimizer, scheduler, base_lrs, cfg.schedule, iters_per_epoch,
                              run.epoch * iters_per_epoch + run.batch)
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        rng = state["rng"]
        if not isinstance(rng, list):
            restore_rng_state(rng)
        elif rank < len(rng):  # a process the checkpoint had not keeps its seed, train.seed + rank
            restore_rng_state(rng[rank])
        # The epoch being trained, counted from 1, as the progress log and the stop message
        log.info("resumed from %s at epoch %d, batch %d of %d (iteration %d)", resume_from,
                 run.epoch + 1, run.batch, iters_per_epoch, run.epoch * iters_per_epoch + run.batch)
    purge_step = None
    if is_main_process():  # only now: a refused resume leaves the run's config.yaml as it was
        dump_config(cfg, work_dir / "config.yaml")
        if state is not None:
            purge_step = forget_later_progress(work_dir, resume_from, run, iters_per_epoch)

    train_model = torch.compile(model, dynamic=True) if cfg.train.compile else model
    if is_distributed():
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)

    scalars = ScalarLog(work_dir, purge_step) if is_main_process() else None
    epochs = cfg.schedule.epochs
    progress = Progress(epochs * iters_per_epoch, cfg.train.log_interval, total_batch, device,
                        scalars, start_iter=run.epoch * iters_per_epoch + run.batch)
    loop = TrainLoop(train_model, ema, optimizer, scheduler, scaler, dtype, device, cfg, progress,
                     work_dir)

    def checkpoint(names: list[str]) -> None:
        # Every rank's RNG state, for a resume to restore each (a collective: every rank calls it).
        rng_states = all_gather_objects(capture_rng_state())
        if not is_main_process():
            return
        state = {
            "model": model.state_dict(),
            "model_format": MODEL_FORMAT,  # the names of the model's (and EMA's) keys
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": run.epoch,
            "batch": run.batch,
            "iteration": run.epoch * iters_per_epoch + run.batch,
            "best_ap": run.best_ap,
            **asdict(setup),  # what the position means: processes x images per process
            "rng": rng_states,
            "config": config_to_dict(cfg),
            # What the labels mean, so predict/export need not find the annotation file again.
            "meta": {"class_names": list(train_set.class_names),
                     "model_matches_config": matches_config},  # False: the tools cannot load it
        }
        for name in names:
            save_checkpoint(state, work_dir / name)
        prune_checkpoints(work_dir, cfg.train.keep_checkpoints)

    if threading.current_thread() is threading.main_thread():
        StopRequested.install()
    else:  # signal.signal works in the main thread only, where Python delivers the signals
        StopRequested.signum = None
        log.info("train() runs outside the main thread: Ctrl-C and SIGTERM do not stop it")
    if cfg.data.num_workers > 0:
        freeze_heap_for_workers()  # the loader workers fork at the first iteration
    metrics: dict = {}
    final_eval, final_epoch = None, 0  # the last evaluation's COCOeval and epoch, for train.report
    try:
        with logging_redirect_tqdm(loggers=[log]):  # log lines print above the progress bar
            while run.epoch < epochs:
                train_loader.batch_sampler.set_epoch(run.epoch, skip_batches=run.batch)
                progress.leave_out_pause()  # the evaluation and checkpoint since the last step
                run.batch = loop.run_epoch(train_loader, run.epoch, run.batch)
                if run.batch < iters_per_epoch:  # stopped by a signal
                    run.stopped_by = StopRequested.signum
                    checkpoint(["last.pth"])
                    if is_main_process():  # the other ranks log warnings too: one line
                        log.warning("stopped at epoch %d, batch %d of %d: last.pth written; "
                                    "continue with --resume (resume=True)", run.epoch + 1,
                                    run.batch, iters_per_epoch)
                    break
                run.epoch, run.batch = run.epoch + 1, 0
                last_epoch = run.epoch == epochs
                names = []
                if val_loader is not None and (  # None when train.eval_interval is 0
                        run.epoch % cfg.train.eval_interval == 0 or last_epoch):
                    try:
                        metrics, failure = evaluate(
                            ema.module if ema is not None else model, val_loader, device, dtype,
                            keep_coco_eval=cfg.train.report and last_epoch), None
                    except Exception as err:  # e.g. a scorer's error: first keep the epoch
                        metrics, failure = {}, err
                    if any(all_gather_objects(failure is not None)):
                        checkpoint(["last.pth"])
                        log.error("the evaluation after epoch %d failed; last.pth holds the "
                                  "epoch's training: fix the cause, then continue with --resume "
                                  "(resume=True); tools/eval.py last.pth scores it", run.epoch)
                        raise failure or RuntimeError("the evaluation failed on another process")
                    metrics.pop("detections", None)
                    final_eval = metrics.pop("coco_eval", None)
                    final_epoch = run.epoch
                    if is_main_process():
                        write_metrics_json({"epoch": run.epoch, **metrics},
                                           work_dir / f"metrics_epoch_{run.epoch}.json")
                        scalars.write(run.epoch * iters_per_epoch, run.epoch,
                                      {f"val/{k}": metrics[k] for k in STAT_NAMES[:6]})  # APs
                        log.info("epoch %d: bbox AP %.4f AP50 %.4f AP75 %.4f", run.epoch,
                                 metrics["bbox_mAP"], metrics["bbox_mAP_50"],
                                 metrics["bbox_mAP_75"])
                    ap = all_gather_objects(metrics.get("bbox_mAP", -1.0))[0]
                    if ap > run.best_ap:
                        run.best_ap = ap
                        names.append("best.pth")
                        log.info("new best bbox AP %.4f at epoch %d: best.pth", ap, run.epoch)
                if run.epoch % cfg.train.checkpoint_interval == 0 or last_epoch:
                    names += [f"epoch_{run.epoch}.pth", "last.pth"]
                if names:
                    checkpoint(names)
    finally:
        progress.close()
        if scalars is not None:
            scalars.close()
    if final_eval is not None:  # the weights of its epoch's end (last.pth may be later, if stopped)
        source = {"checkpoint": f"training run {work_dir}", "epoch": final_epoch,
                  "epochs": cfg.schedule.epochs, "iteration": final_epoch * iters_per_epoch,
                  "config": str(work_dir / "config.yaml"), "val_annotations": str(val_set.ann_file)}
        write_run_report(work_dir, cfg, final_eval, val_set, source)
    return metrics, run


def write_run_report(work_dir: Path, cfg: Config, coco_eval, dataset, source: dict) -> None:
    """train.report: the final evaluation's report in work_dir/report, with the run's curves. A
    failure is logged, not raised: the run's checkpoints and metrics are written by then."""
    from gfldet.report import post_processing_settings, write_report

    try:
        write_report(work_dir / "report", coco_eval, dataset.class_names, dataset.image_dir,
                     thresholds=post_processing_settings(cfg.model.test), run_dir=work_dir,
                     source=source)
    except Exception as err:  # a plotting or disk problem must not fail a finished run
        log.warning("evaluation report not written: %s: %s", type(err).__name__, err,
                    exc_info=True)


def check_start(work_dir: Path, resume: str | bool | None, overwrite: bool,
                load_from: str | None) -> Path | None:
    """What the command line names, checked before anything is built, written or removed: the
    run folder is a folder, the checkpoint to resume from or to load exists, and --resume is not
    given with --load-from. Returns the checkpoint to resume from."""
    if work_dir.exists() and not work_dir.is_dir():
        raise RunDirError(f"the run folder {work_dir} is a file; give the run a folder with "
                          "--work-dir DIR (train()'s work_dir)")
    if resume and load_from is not None:  # the resume would replace the loaded weights at once
        raise RunDirError("--resume and --load-from contradict each other (resume= and "
                          "load_from= in train()): --resume continues the run with its "
                          "checkpoint's weights, --load-from starts a new run from another "
                          "checkpoint's weights; pass one of them")
    # Named as both spellings, the option's and train()'s keyword.
    files, resume_key = {}, f"--resume (resume={'True' if resume is True else 'PATH'})"
    if resume and not overwrite:  # with --overwrite as well, prepare_work_dir refuses the pair
        files[resume_key] = find_latest_checkpoint(work_dir) if resume is True else Path(resume)
        if files[resume_key] is None:  # --overwrite: else a stopped run's logs refuse the start
            raise RunDirError(
                f"{resume_key}: {work_dir} holds no checkpoint (last.pth or epoch_N.pth) to "
                "continue; start without --resume, with --overwrite (overwrite=True) if it holds "
                "a stopped run's logs, or name the checkpoint: --resume PATH (resume=PATH)")
    if load_from is not None:
        files["--load-from (load_from=)"] = load_from
    for option, path in files.items():
        try:
            find_checkpoint_file(path)
        except FileNotFoundError as err:
            raise CheckpointError(f"{option}: {err}") from None
    return files.get(resume_key)


def model_matches_config(model: nn.Module, cfg: Config) -> bool:
    """train(model=...): whether `model`'s state-dict keys and shapes are those of the model
    `cfg.model` describes, which the tools build to load a checkpoint; if not, a warning names
    the first differences. The config's model is built on the meta device (no memory, no
    ImageNet weights: `build_inference_model`)."""
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in build_inference_model(cfg).state_dict().items()}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in model.state_dict().items()}
    differ = [f"{k} {shape} vs the config's {wanted[k]}" if k in wanted
              else f"{k} (not in the config's model)"
              for k, shape in given.items() if wanted.get(k) != shape]
    differ += [f"{k} (only in the config's model)" for k in wanted if k not in given]
    if differ and is_main_process():
        log.warning(
            "train(model=...): the model is not the one the config's model section describes "
            "(%d tensors differ: %s%s). This run's checkpoints load only into this model, "
            "model.load_state_dict(torch.load(path)['model']), not with tools/eval.py, "
            "predict.py, export.py or Detector; for those, describe the model in cfg.model",
            len(differ), "; ".join(differ[:3]), ", ..." * (len(differ) > 3))
    return not differ


def load_matching_weights(model: nn.Module, path: str) -> None:
    """--load-from: the checkpoint's model weights whose names and shapes match (fine-tuning)."""
    state = load_checkpoint(path)
    refuse_mmdet_checkpoint(state, path)  # its bbox_head.* keys would leave the head untrained
    weights = model_weights(state, use_ema=False, source=path)
    report = load_model_weights(model, weights, strict=False)
    if not report["loaded"]:
        examples = (report["mismatched"] + report["unexpected"])[:5]
        raise CheckpointError(
            f"--load-from {path}: none of its tensors fits this model (different names or "
            f"shapes, e.g. {examples}); is it a gfldet checkpoint of this backbone? "
            "(tools/convert_mmdet.py converts MMDetection files)")
    # Counts and at most 10 names per kind: another backbone misses hundreds of keys.
    def some(kind: str, what: str) -> str:
        keys = report[kind]
        return f"{len(keys)} {what} ({', '.join(keys[:10])}{', ...' * (len(keys) > 10)})"

    kept = [some(k, what) for k, what in (("missing", "missing in the checkpoint"),
                                          ("mismatched", "of another shape")) if report[k]]
    kept_text = f"; not loaded (the model keeps its initial values): {'; '.join(kept)}"
    unused = report["unexpected"] and f"; unused: {some('unexpected', 'not in this model')}"
    model_size = len(report["loaded"]) + len(report["missing"]) + len(report["mismatched"])
    log.info("loaded %d of the model's %d tensors from %s%s%s", len(report["loaded"]), model_size,
             path, kept_text if kept else "", unused or "")


def forget_later_progress(work_dir: Path, resume_from: Path, run: RunState,
                          iters_per_epoch: int) -> int:
    """A resume from an earlier checkpoint (an epoch_N.pth, or last.pth after a kill) starts the
    run's later part again: remove that part's records from scalars.jsonl, and say which later
    outputs the run will replace. Returns the step from which TensorBoard hides the older event
    files' values (`SummaryWriter`'s purge_step)."""
    iteration = run.epoch * iters_per_epoch + run.batch
    dropped = drop_records_after(work_dir / "scalars.jsonl", run.epoch, run.batch, iteration)
    # The dropped records' steps too: a setup changed at the epoch boundary numbers steps anew.
    steps = [r["step"] for r in dropped if isinstance(r.get("step"), int)]
    purge_step = min([iteration + 1, *steps])
    later = {}  # epoch checkpoints and metrics of later epochs, by (metrics?, epoch)
    for path in work_dir.iterdir():
        found = re.fullmatch(r"epoch_(\d+)\.pth|metrics_epoch_(\d+)\.json", path.name)
        if found and int(found[1] or found[2]) > run.epoch and path.is_file():
            later[found[2] is not None, int(found[1] or found[2])] = path.name
    names = [later[key] for key in sorted(later)]
    last = work_dir / "last.pth"
    if last.is_file() and resume_from.resolve() != last.resolve():
        names.append("last.pth")
    if (work_dir / "best.pth").is_file() and run.best_ap >= 0 and names:
        names.append(f"best.pth if an evaluation beats bbox AP {run.best_ap:.4f}")
    parts = [f"{len(dropped)} later records removed from scalars.jsonl (and hidden in "
             "TensorBoard)"] if dropped else []
    if names:
        parts.append(f"its later outputs are replaced as the run reaches them: {', '.join(names)}")
    if parts:
        log.warning("the run continues from %s at epoch %d, batch %d: %s", resume_from.name,
                    run.epoch + 1, run.batch, "; ".join(parts))
    return purge_step


def prepare_work_dir(work_dir: Path, resume: bool,
                     overwrite: bool) -> tuple[str | None, list[Path]]:
    """Rank 0 checks the run folder (`check_run_dir`) and removes stale temporary files; every
    process gets the same outcome, so all of them stop together on a refusal."""
    outcome: RunDirError | tuple[str | None, list[Path]] = (None, [])
    if is_main_process():
        try:
            note = check_run_dir(work_dir, resume, overwrite)
            outcome = (note, remove_stale_temporaries(work_dir))
        except RunDirError as err:
            outcome = err
    outcome = all_gather_objects(outcome)[0]
    if isinstance(outcome, RunDirError):
        raise RunDirError(str(outcome))
    return outcome


# fp16 overflows in a row that stop a run: each halves the gradient scaler's scale, so by then it
# is 2^-40 of where it was, and gradients that still overflow are inf or NaN at any scale.
MAX_OVERFLOW_STEPS = 40


class TrainLoop:
    """One optimisation step per batch, with the checks that keep a run alive."""

    def __init__(self, model, ema, optimizer, scheduler, scaler, dtype, device, cfg: Config,
                 progress: Progress, work_dir: Path | None = None):
        self.model, self.ema, self.optimizer, self.scheduler = model, ema, optimizer, scheduler
        self.scaler, self.dtype, self.device = scaler, dtype, device
        self.cfg, self.progress, self.work_dir = cfg, progress, work_dir
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.bad_steps = 0
        self.overflow_steps = 0  # fp16 overflows in a row (not bad steps: the scaler calibrating)
        self.stepped_once = False  # in this process

    def run_epoch(self, loader, epoch: int, start_batch: int) -> int:
        """Train from `start_batch` to the end of the epoch (or to a stop request); returns the
        number of batches of this epoch done."""
        self.model.train()
        iters_per_epoch = len(loader.batch_sampler)
        batch = start_batch
        tic = time.perf_counter()
        for images, targets in loader:
            self.progress.record_data_time(time.perf_counter() - tic)
            it = epoch * iters_per_epoch + batch
            lr = self.optimizer.param_groups[0]["lr"]  # this step's: step() moves the schedule on
            stop = self.step(images, targets, it)
            self.progress.maybe_log(it, epoch, self.cfg.schedule.epochs, batch, iters_per_epoch,
                                    lr, force=batch + 1 == iters_per_epoch)
            batch += 1
            if stop:
                break
            tic = time.perf_counter()
        return batch

    def step(self, images, targets, it: int) -> bool:
        """One iteration; returns True when a stop was requested (on any process)."""
        cfg = self.cfg
        images = normalize_batch(images.to(self.device, non_blocking=True),
                                 [t["image_size"] for t in targets])
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = [{k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                    for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            losses = self.model(images, targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # fp16: norm and clipping see true gradients
        grads = [p.grad for p in self.params if p.grad is not None]
        if cfg.optim.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        # The one host sync of a step: non-finite loss or gradient, and stop requests, agreed by
        # every process so that all of them skip or stop together.
        flags = torch.stack([
            ~torch.isfinite(loss.detach()),
            ~torch.isfinite(grad_norm),
            torch.tensor(StopRequested.signum is not None, device=grad_norm.device),
        ]).float()
        if is_distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_grad, stop = (bool(f) for f in flags.tolist())
        stepped = not (bad_loss or bad_grad)
        if stepped:
            self.bad_steps = self.overflow_steps = 0
            self.scaler.step(self.optimizer)
        elif bad_loss or not self.scaler.is_enabled():
            self.skip_step(losses, targets, it, "gradient" if not bad_loss else None)
        else:
            # fp16 overflowed (a finite loss, inf/NaN gradients): expected while the scaler's
            # scale calibrates, so not a bad step. scaler.step would skip it too; skipping here
            # keeps it out of the EMA and the logged losses.
            self.overflow_steps += 1
            if self.overflow_steps >= MAX_OVERFLOW_STEPS:
                raise FloatingPointError(
                    f"{self.overflow_steps} consecutive fp16 overflows (inf/NaN gradients with a "
                    f"finite loss) up to iteration {it + 1}, images "
                    f"{[t['image_id'] for t in targets]}: the gradient scale fell to "
                    f"{self.scaler.get_scale():.3g} and they still overflow. "
                    f"{self.checkpoint_note()}Train with train.amp=bf16 or none, lower optim.lr, "
                    "or set optim.grad_clip.")

        # Every iteration ends the scaler's step, taken or not: after unscale_, only update()
        # readies it for the next one (else the next unscale_ raises). It backs the scale off on
        # inf/NaN gradients, as a NaN loss's are: the safe side when the cause is unknown.
        self.scaler.update()
        if stepped and self.ema is not None:
            ddp = isinstance(self.model, DistributedDataParallel)
            self.ema.update_parameters(self.model.module if ddp else self.model)
        self.progress.update(losses if stepped else None, grad_norm if stepped else None)
        self.stepped_once |= stepped
        if self.stepped_once:
            self.scheduler.step()
        else:
            # torch warns that a learning rate is lost when the steps before the first optimizer
            # step are skipped; none is, the schedule counts iterations. (Only then:
            # catch_warnings makes Python forget which warnings it has shown once.)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
        return stop

    def skip_step(self, losses: dict, targets: list[dict], it: int, what: str | None) -> None:
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        names = ([k for k, v in losses.items() if not torch.isfinite(v)]
                 or [what or "loss on another process"])
        ids = [t["image_id"] for t in targets]
        log.warning("iteration %d: non-finite %s on images %s; step skipped (%d in a row)",
                    it + 1, names, ids, self.bad_steps)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_steps} consecutive non-finite steps: {names} at iteration {it + 1}, "
                f"images {ids}. {self.checkpoint_note()}Lower optim.lr, set optim.grad_clip, "
                "or check these images."
            )

    def checkpoint_note(self) -> str:
        """What a run stopped by non-finite steps keeps: its newest checkpoint, if any."""
        if self.work_dir is None:  # a loop outside a run folder
            return ""
        latest = find_latest_checkpoint(self.work_dir)
        return (f"The newest checkpoint, {latest}, is intact. "
                if latest is not None else "No checkpoint of this run was written yet. ")
