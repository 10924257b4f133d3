"""What a run reports while it trains: log lines, a progress bar, TensorBoard and `scalars.jsonl`.

Every value that is logged goes through one `ScalarLog.write`, which gives TensorBoard and the
JSON lines file the very same numbers. `scalars.jsonl` holds one JSON object per log line and per
evaluation, e.g.
    {"step": 25, "epoch": 1, "train/loss": 1.93, "train/lr": 0.0009, "train/time": 0.61, ...}
    {"step": 250, "epoch": 1, "val/bbox_mAP": 0.312, ...}
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger("gfldet")


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: max allocated on CUDA, peak resident set (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # macOS: bytes, Linux: KiB


class ScalarLog:
    """TensorBoard events under `work_dir/tb` and `work_dir/scalars.jsonl`, written together.
    `purge_step` (a resumed run): TensorBoard hides the earlier event files' steps from it on."""

    def __init__(self, work_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(work_dir / "tb"), purge_step=purge_step)
        self.path = work_dir / "scalars.jsonl"
        self.file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.file.write(json.dumps({"step": step, "epoch": epoch, **scalars}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.writer.close()
        self.file.close()


def drop_records_after(path: Path, epoch: int, batch: int, iteration: int) -> list[dict]:
    """Remove from the scalars file `path` the records after a resumed position (`epoch` epochs
    and `batch` batches done, `iteration` in all), and lines that are not JSON records (one cut
    short by a kill, returned as {}); returns the removed records. The file is replaced atomically.

    A record's "epoch" is the 1-based epoch it belongs to. Records of epochs up to `epoch` stay
    whatever their step: a setup changed at that epoch boundary numbers steps anew."""
    if not path.is_file():
        return []
    kept, dropped = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            later = record["epoch"] > epoch + 1 or (record["epoch"] == epoch + 1 and (
                not batch or record["step"] > iteration))
        except (ValueError, TypeError, KeyError):
            record, later = {}, True  # cut short by a kill: unreadable, and no longer the last
        if later:
            dropped.append(record)
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")  # a stale-temporary name (run_dir removes it)
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class Progress:
    """Log lines after the first iteration and then every `interval`, with losses, lr, seconds
    per iteration, data-loading time, ETA, peak memory and gradient norm; a tqdm bar on a terminal.

    Loss values and gradient norms are summed on the device and read only at a log line, so
    the loop has no per-step host sync for logging."""

    def __init__(self, total_iters: int, interval: int, images_per_iter: int, device: torch.device,
                 scalars: ScalarLog | None, start_iter: int = 0, bar: bool | None = None) -> None:
        self.total_iters, self.interval = total_iters, interval
        self.images_per_iter, self.device, self.scalars = images_per_iter, device, scalars
        self.sums: dict[str, torch.Tensor] = {}  # the losses and "grad_norm"
        self.count = 0  # steps taken since the last log line (skipped ones excluded)
        self.iters = 0  # iterations since the last log line
        self.data_time = 0.0
        self.tic = self.last_tick = time.perf_counter()  # the clock: last log line, last iteration
        if bar is None:
            bar = scalars is not None and sys.stdout.isatty()
        # tqdm's default bar shows its own ETA and rate
        self.bar = tqdm(total=total_iters, initial=start_iter, dynamic_ncols=True) if bar else None

    def record_data_time(self, seconds: float) -> None:
        self.data_time += seconds

    def update(self, losses: dict[str, torch.Tensor] | None,
               grad_norm: torch.Tensor | None) -> None:
        """Count one iteration; `losses` and `grad_norm` are None for a skipped step."""
        self.iters += 1
        self.last_tick = time.perf_counter()
        if losses is not None:
            for name, value in {**losses, "grad_norm": grad_norm.float()}.items():
                self.sums[name] = self.sums.get(name, 0) + value.detach()
            self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def maybe_log(self, it: int, epoch: int, epochs: int, batch: int, batches: int, lr: float,
                  force: bool = False) -> dict[str, float] | None:
        """Log after iteration `it` (0-based) if it is the first, a multiple of the interval, or
        `force`d; returns the logged scalars."""
        if (not force and it > 0 and (it + 1) % self.interval) or self.iters == 0:
            return None
        sec_per_iter = (time.perf_counter() - self.tic) / self.iters
        eta = timedelta(seconds=int(sec_per_iter * max(self.total_iters - it - 1, 0)))
        scalars: dict[str, float] = {}
        if self.count:
            means = {k: (v / self.count).item() for k, v in self.sums.items()}
            grad_norm = means.pop("grad_norm")
            scalars.update({f"train/{k}": v for k, v in means.items()})
            scalars["train/loss"] = sum(means.values())
            scalars["train/grad_norm"] = grad_norm
        scalars.update({
            "train/lr": lr,
            "train/time": sec_per_iter,
            "train/data_time": self.data_time / self.iters,
            "train/images_per_s": self.images_per_iter / sec_per_iter,
            "train/memory_mib": peak_memory_mib(self.device),
        })
        losses = " ".join(f"{k.removeprefix('train/')}: {v:.4f}" for k, v in scalars.items()
                          if k.startswith("train/loss"))
        grad = f" grad_norm: {scalars['train/grad_norm']:.3f}" if self.count else ""
        log.info("epoch [%d/%d][%d/%d] lr: %.3e %s%s  time: %.3f s/it (data %.3f)  %.1f img/s  "
                 "eta: %s  mem: %.0f MiB", epoch + 1, epochs, batch + 1, batches, lr,
                 losses or "(every step skipped)", grad, sec_per_iter, scalars["train/data_time"],
                 scalars["train/images_per_s"], eta, scalars["train/memory_mib"])
        if self.scalars is not None:
            self.scalars.write(it + 1, epoch + 1, scalars)
        self.sums, self.count, self.iters, self.data_time = {}, 0, 0, 0.0
        self.tic = self.last_tick = time.perf_counter()
        return scalars

    def leave_out_pause(self) -> None:
        """Leave the time since the last iteration (an evaluation, a checkpoint) out of the next
        log line's s/it, ETA and images/s."""
        now = time.perf_counter()
        self.tic += now - self.last_tick
        self.last_tick = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
