"""What a resume may change, and where the resumed run continues.

A resume continues the same run. So a config that changes the trained model or the optimizer is
refused, naming the keys. Keys that never reach the trained weights may change, and are logged:
the ImageNet weights path (the checkpoint's weights replace them) and test-time post-processing.
A different schedule needs `--allow-schedule-change`. Changed `data.*` and `train.*` keys are
taken, with a warning naming each. A run that finished its schedule is not resumed.

The position is (epoch, batch in the epoch). Which images make up an epoch's batches depends on
the number of processes x images per process (`RunSetup`), so a run that stopped mid-epoch can
only continue on the same setup. At an epoch boundary the sampler starts a new epoch anyway, so
there the setup may change. The lr is then the new total batch's (linear scaling rule), and the
schedule continues at the same epoch counted in the new iterations per epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gfldet.config import Config, ConfigError, ScheduleConfig, config_from_dict, config_to_dict
from gfldet.engine.build import LrFactor
from gfldet.engine.checkpoint import CheckpointError, find_latest_checkpoint

log = logging.getLogger("gfldet")

# Keys (or key prefixes) that may change on a resume, and why: they do not reach the weights.
FREE_KEYS = {
    "model.backbone.weights": "only initialises a run; the checkpoint's weights replace it",
    "model.test.": "post-processing at evaluation",
    "optim.grad_clip": "applies from the next step",
}
# Optimizer keys that set the base lr: with --allow-schedule-change the new lr applies.
LR_KEYS = ("optim.lr", "optim.reference_batch_size", "optim.scale_lr")


@dataclass(frozen=True)
class RunSetup:
    """What divides an epoch into batches: processes x images per process, and the per-process
    batch count that gives (None: unknown, for an old checkpoint written in its first epoch)."""

    world_size: int
    batch_size: int
    iters_per_epoch: int | None

    def changes(self, new: RunSetup) -> list[str]:
        """`key old -> new` for every part of the setup that `new` changes."""
        out = []
        if self.world_size != new.world_size:
            out.append(f"processes {self.world_size} -> {new.world_size}")
        if self.batch_size != new.batch_size:
            out.append(f"images per process {self.batch_size} -> {new.batch_size}")
        if out:
            out.append(f"total batch {self.world_size * self.batch_size} -> "
                       f"{new.world_size * new.batch_size}")
        if self.iters_per_epoch is not None and self.iters_per_epoch != new.iters_per_epoch:
            out.append(f"iterations per epoch {self.iters_per_epoch} -> {new.iters_per_epoch}")
        return out


def config_changes(old: dict, new: dict, prefix: str) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf of two `config_to_dict` sections that differs."""
    out: dict[str, tuple[Any, Any]] = {}
    for key, value in new.items():
        dotted, before = f"{prefix}.{key}", old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            out.update(config_changes(before, value, dotted))
        elif before != value:
            out[dotted] = (before, value)
    return out


def _show(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _text(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())


def check_resumable(cfg: Config, state: dict, path: Path, allow_schedule_change: bool,
                    setup: RunSetup) -> bool:
    """Raise `ConfigError` unless `cfg` on `setup` can continue the run of checkpoint `state`; log
    what changed that is allowed. Returns whether the lr schedule must be rebuilt for this run
    (`continue_schedule`): a new schedule or base lr, or another setup at an epoch boundary."""
    saved = config_from_dict(state["config"], str(path))
    old, new = config_to_dict(saved), config_to_dict(cfg)
    model = config_changes(old["model"], new["model"], "model")
    optim = config_changes(old["optim"], new["optim"], "optim")
    changes = {**model, **optim}
    free = {k: why for k in changes for key, why in FREE_KEYS.items() if k.startswith(key)}
    fixed_model = {k: v for k, v in model.items() if k not in free}
    if fixed_model:
        raise ConfigError(
            f"{path} was trained with another model: {_text(fixed_model)}. A resume continues the "
            "same run: use the checkpoint's values, or start a new run from its weights with "
            f"--load-from {path} (load_from= in train())")
    fixed = {k: v for k, v in optim.items() if k not in free and k not in LR_KEYS}
    if fixed:
        raise ConfigError(
            f"{path} was trained with another optimizer: {_text(fixed)}. The optimizer state in "
            "the checkpoint was built with these values: resume with them, or start a new run "
            f"with --load-from {path} (load_from= in train())")
    for key, why in free.items():
        log.info("resume: %s (%s)", _text({key: changes[key]}), why)
    # data.* and train.* may change (the run goes on with the new values), but never unsaid.
    loop = {k: v for s in ("data", "train") for k, v in config_changes(old[s], new[s], s).items()}
    if loop:
        log.warning("resume: the config differs from %s's in %s; the run continues with the new "
                    "values", path, _text(loop))

    schedule = config_changes(old["schedule"], new["schedule"], "schedule")
    schedule.update({k: v for k, v in optim.items() if k in LR_KEYS})
    if schedule:
        if not allow_schedule_change:
            raise ConfigError(
                f"the config's schedule differs from the one {path} was trained with "
                f"({_text(schedule)}). Resume with the same schedule, or pass "
                "--allow-schedule-change (allow_schedule_change=True) to continue on the new one.")
        log.warning("schedule changed on resume (--allow-schedule-change): %s", _text(schedule))
    return check_setup(state, saved, path, setup) or bool(schedule)


def check_setup(state: dict, saved: Config, path: Path, setup: RunSetup) -> bool:
    """Whether `setup` differs from the checkpoint's; a change mid-epoch raises `ConfigError`.
    Checkpoints from before gfldet recorded their setup hold one RNG state per process and their
    config's data.batch_size; both are used, and said."""
    epoch, batch = state["epoch"], state.get("batch", 0)
    if "world_size" in state:
        before = RunSetup(state["world_size"], state["batch_size"], state.get("iters_per_epoch"))
    else:
        rng = state.get("rng")
        world = len(rng) if isinstance(rng, list) and rng else 1
        iters = ((state["iteration"] - batch) // epoch
                 if epoch > 0 and "iteration" in state else None)  # unknown in epoch 1
        before = RunSetup(world, saved.data.batch_size, iters)
        log.info("%s records no world size or batch size (written by an older gfldet): taken as "
                 "%d process(es) (its RNG states) x %d images (its config's data.batch_size)",
                 path, world, saved.data.batch_size)
    changes = before.changes(setup)
    if not changes:
        return False
    if batch:
        n = before.world_size
        if (n, before.batch_size) == (setup.world_size, setup.batch_size):
            same = "the same training images, so that the epoch has as many batches as before"
        else:
            launch = (f"torchrun --nproc_per_node {n}, or {n} over several machines" if n > 1
                      else "without torchrun")
            same = f"{n} process(es) ({launch}) and data.batch_size={before.batch_size}"
        epoch_end = find_latest_checkpoint(path.parent, end_of_epoch=True)
        why = ("written at the end of an epoch, where the number of processes, the batch size "
               "and the data may change")
        other = (f", or resume from {epoch_end} ({why})" if epoch_end else
                 f"; or start it again on the new setup with --overwrite: {path.parent} holds no "
                 f"epoch_N.pth ({why}) to resume from instead")
        raise ConfigError(
            f"{path} stopped in the middle of epoch {epoch + 1} (after {batch} batches) with {n} "
            f"process(es) x {before.batch_size} images; this run has {setup.world_size} x "
            f"{setup.batch_size} ({', '.join(changes)}). The rest of that epoch is made of the old "
            f"setup's batches, so the run cannot continue where it stopped. Continue it with "
            f"{same}{other}.")
    log.warning("resuming at the start of epoch %d with another setup: %s. The sampler starts the "
                "epoch anew for this setup", epoch + 1, ", ".join(changes))
    return True


def continue_schedule(optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float],
                      schedule: ScheduleConfig, iters_per_epoch: int, iteration: int) -> None:
    """Put `scheduler` at `iteration` of `schedule` in this run's iterations per epoch, from this
    run's `base_lrs` (one per parameter group, as built for its total batch) instead of the
    checkpoint's. Every group gets the new lr function. The optimizer's state (SGD momentum, Adam
    moments) is kept: it holds no lr."""
    factor, old = LrFactor(schedule, iters_per_epoch), list(scheduler.base_lrs)
    scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
    scheduler.base_lrs = list(base_lrs)
    scheduler.last_epoch = iteration
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(iteration)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    base = f"{old[0]:g} -> {base_lrs[0]:g}" if old != base_lrs else f"{base_lrs[0]:g}"
    # The next step's lr, not only the base: a base lr alone reads as a restart at the peak.
    log.info("lr schedule continues at iteration %d of %d (%d per epoch): base lr %s, the next "
             "step's lr %.3e%s", iteration, factor.total_iters, iters_per_epoch, base,
             optimizer.param_groups[0]["lr"],
             " (each parameter group keeps its factor)" if len(base_lrs) > 1 else "")


def check_unfinished(cfg: Config, state: dict, path: Path) -> None:
    """Raise `CheckpointError` when `state` is at or past the end of `cfg`'s schedule: such a
    resume would train nothing (yet rewrite config.yaml and start a TensorBoard file)."""
    epoch, batch, epochs = state["epoch"], state.get("batch", 0), cfg.schedule.epochs
    if epoch < epochs:
        return
    saved = state.get("config", {}).get("schedule", {}).get("epochs")
    where = (f"the run finished (epoch {epoch} of {epochs})" if saved == epochs and not batch
             else f"it is at the end of epoch {epoch}{f', batch {batch}' if batch else ''}, and "
             f"schedule.epochs is {epochs}")
    raise CheckpointError(
        f"--resume {path}: {where}; there is nothing left to train. To train longer, raise "
        f"schedule.epochs above {epoch} and pass --allow-schedule-change "
        f"(allow_schedule_change=True in train()); tools/eval.py {path} evaluates it.")
