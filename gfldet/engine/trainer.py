"""The training loop: one process per device, DDP under torchrun, checkpoints and evaluation.

Reads a resolved `Config`; writes into the run folder (rank 0 only): `config.yaml`, `train.log`,
TensorBoard events under `tb/`, `epoch_N.pth`, `last.pth`, `best.pth` and `metrics_epoch_N.json`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gfldet.config import Config, config_from_dict, config_to_dict, dump_config
from gfldet.data import build_dataloader
from gfldet.distributed import get_rank, get_world_size, is_distributed, is_main_process
from gfldet.engine.build import (
    build_dataset,
    build_lr_scheduler,
    build_model,
    build_optimizer,
    scaled_lr,
)
from gfldet.engine.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from gfldet.engine.coco_eval import write_metrics_json
from gfldet.engine.evaluator import evaluate

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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    if use_cuda:
        if device_setting.startswith("cuda:"):
            return torch.device(device_setting)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device_setting.startswith("cuda"):
        raise RuntimeError(f"train.device is {device_setting!r} but CUDA is not available; use 'auto' or 'cpu'")
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


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if cfg.train.amp == "none":
        return None
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise RuntimeError("train.amp: fp16 needs a CUDA device; use bf16 on CPU or none")
    return torch.float16 if cfg.train.amp == "fp16" else torch.bfloat16


class Progress:
    """Log lines every `interval` iterations with losses, lr, images/s and ETA; the loss values
    are summed on the device and read only then, so the loop has no per-step host sync for logs."""

    def __init__(self, total_iters: int, interval: int, images_per_iter: int, writer) -> None:
        self.total_iters, self.interval, self.images_per_iter = total_iters, interval, images_per_iter
        self.writer = writer
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tic = time.perf_counter()

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach()
        self.count += 1

    def maybe_log(self, it: int, epoch: int, epochs: int, batch: int, batches: int, lr: float, force: bool = False) -> None:
        if not force and (it + 1) % self.interval:
            return
        if self.count == 0:
            return
        elapsed = time.perf_counter() - self.tic
        sec_per_iter = elapsed / self.count
        means = {k: (v / self.count).item() for k, v in self.sums.items()}
        total = sum(means.values())
        eta = timedelta(seconds=int(sec_per_iter * (self.total_iters - it - 1)))
        parts = " ".join(f"{k}: {v:.4f}" for k, v in means.items())
        log.info(
            "epoch [%d/%d][%d/%d] lr: %.3e %s loss: %.4f  %.1f img/s  eta: %s",
            epoch + 1, epochs, batch + 1, batches, lr, parts, total,
            self.images_per_iter / sec_per_iter, eta,
        )
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, it + 1)
            self.writer.add_scalar("train/loss", total, it + 1)
            self.writer.add_scalar("train/lr", lr, it + 1)
        self.sums, self.count, self.tic = {}, 0, time.perf_counter()


def train(cfg: Config, work_dir: Path, resume: str | bool | None = None, load_from: str | None = None) -> dict:
    """Train `cfg` into `work_dir`. `resume=True` continues from the folder's latest checkpoint,
    a path from that checkpoint. Returns the last evaluation's metrics (rank 0)."""
    device = init_distributed(cfg.train.device)
    rank, world = get_rank(), get_world_size()
    setup_logging(work_dir)
    seed_everything(cfg.train.seed + rank, cfg.train.deterministic)
    if is_main_process():
        dump_config(cfg, work_dir / "config.yaml")
    log.info("work dir %s, device %s, %d process(es)", work_dir, device, world)

    train_set = build_dataset(cfg, "train")
    val_set = build_dataset(cfg, "val") if cfg.train.eval_interval > 0 else None
    d = cfg.data
    train_loader = build_dataloader(
        train_set, d.batch_size, d.num_workers, train=True, seed=cfg.train.seed, distributed=is_distributed(),
        aspect_ratio_grouping=d.aspect_ratio_grouping, size_divisor=d.size_divisor,
    )
    val_loader = None
    if val_set is not None:
        val_loader = build_dataloader(
            val_set, d.val_batch_size, d.num_workers, train=False, seed=cfg.train.seed,
            distributed=is_distributed(), size_divisor=d.size_divisor,
        )
    iters_per_epoch = len(train_loader.batch_sampler)
    log.info("%d training images, %d iterations per epoch", len(train_set), iters_per_epoch)

    model = build_model(cfg.model).to(device)
    if load_from is not None:
        report = load_model_weights(model, load_checkpoint(load_from)["model"], strict=False)
        log.info("loaded %d tensors from %s; not loaded: %s", len(report["loaded"]), load_from,
                 {k: v for k, v in report.items() if k != "loaded" and v})
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    total_batch = d.batch_size * world
    optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim, total_batch))
    scheduler = build_lr_scheduler(optimizer, cfg.schedule, iters_per_epoch)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = None
    if cfg.train.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True
        )

    start_epoch, best_ap = 0, -1.0
    if resume:
        path = find_latest_checkpoint(work_dir) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {work_dir}; start without --resume")
        state = load_checkpoint(path)
        check_resumable(cfg, state, path)
        load_model_weights(model, state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        restore_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        start_epoch, best_ap = state["epoch"], state.get("best_ap", -1.0)
        log.info("resumed from %s at epoch %d (iteration %d)", path, start_epoch, state["iteration"])

    train_model: nn.Module = model
    if cfg.train.compile:
        train_model = torch.compile(model, dynamic=True)
    if is_distributed():
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    writer = None
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(work_dir / "tb"))
    epochs = cfg.schedule.epochs
    progress = Progress(epochs * iters_per_epoch, cfg.train.log_interval, total_batch, writer)
    metrics: dict = {}
    for epoch in range(start_epoch, epochs):
        train_loader.batch_sampler.set_epoch(epoch)
        train_one_epoch(train_model, ema, train_loader, optimizer, scheduler, scaler, dtype, device, cfg,
                        epoch, progress)
        eval_now = cfg.train.eval_interval and ((epoch + 1) % cfg.train.eval_interval == 0 or epoch + 1 == epochs)
        if eval_now and val_loader is not None:
            metrics = evaluate(ema.module if ema is not None else model, val_loader, device, dtype)
            metrics.pop("detections", None)
            if is_main_process():
                write_metrics_json({"epoch": epoch + 1, **metrics}, work_dir / f"metrics_epoch_{epoch + 1}.json")
                for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"):
                    writer.add_scalar(f"val/{key}", metrics[key], epoch + 1)
                log.info("epoch %d: bbox AP %.4f AP50 %.4f AP75 %.4f", epoch + 1, metrics["bbox_mAP"],
                         metrics["bbox_mAP_50"], metrics["bbox_mAP_75"])
        if is_main_process() and ((epoch + 1) % cfg.train.checkpoint_interval == 0 or epoch + 1 == epochs):
            ap = metrics.get("bbox_mAP", -1.0) if eval_now else -1.0
            state = {
                "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "iteration": (epoch + 1) * iters_per_epoch,
                "best_ap": max(best_ap, ap),
                "rng": gather_rng_states(),
                "config": config_to_dict(cfg),
            }
            save_checkpoint(state, work_dir / f"epoch_{epoch + 1}.pth")
            save_checkpoint(state, work_dir / "last.pth")
            if eval_now and ap > best_ap:
                best_ap = ap
                save_checkpoint(state, work_dir / "best.pth")
                log.info("new best bbox AP %.4f at epoch %d: best.pth", ap, epoch + 1)
            prune_checkpoints(work_dir, cfg.train.keep_checkpoints)
        elif is_distributed():
            gather_rng_states()  # the collective needs every rank
    if writer is not None:
        writer.close()
    return metrics


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state (collective under torchrun), so that a resume restores each rank's."""
    from gfldet.distributed import all_gather_objects

    return all_gather_objects(capture_rng_state())


def check_resumable(cfg: Config, state: dict, path: Path) -> None:
    """A resume must continue the same run: the model and schedule must match the checkpoint's."""
    saved = config_from_dict(state["config"], str(path))
    if saved.model != cfg.model:
        raise ValueError(f"{path} was trained with a different model config; resume with the same config")
    if saved.schedule != cfg.schedule:
        raise ValueError(
            f"the schedule in the config differs from the one {path} was trained with "
            f"({saved.schedule} vs {cfg.schedule}); resume with the same schedule"
        )


def train_one_epoch(model, ema, loader, optimizer, scheduler, scaler, dtype, device, cfg: Config,
                    epoch: int, progress: Progress) -> None:
    model.train()
    iters_per_epoch = len(loader.batch_sampler)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bad_steps = 0
    for batch, (images, targets) in enumerate(loader):
        it = epoch * iters_per_epoch + batch
        images = images.to(device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        with autocast:
            losses = model(images, targets)
        loss = sum(losses.values())
        # One host sync per step: a non-finite loss must not reach the weights.
        if not math.isfinite(loss.item()):
            bad_steps += 1
            names = [k for k, v in losses.items() if not torch.isfinite(v)]
            ids = [t["image_id"] for t in targets]
            log.warning("iteration %d: non-finite %s on images %s; step skipped", it + 1, names, ids)
            if bad_steps >= cfg.train.max_bad_steps:
                raise FloatingPointError(
                    f"{bad_steps} consecutive non-finite steps (last: {names} at iteration {it + 1}, images {ids}); "
                    "the last checkpoint is intact. Lower optim.lr or set optim.grad_clip."
                )
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            continue
        bad_steps = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model.module if isinstance(model, DistributedDataParallel) else model)
        progress.update(losses)
        progress.maybe_log(it, epoch, cfg.schedule.epochs, batch, iters_per_epoch, optimizer.param_groups[0]["lr"],
                           force=batch + 1 == iters_per_epoch)
