"""A GPU check to run unattended on a machine with CUDA: the recipe's training step in fp32, bf16
and fp16, with and without channels_last and torch.compile; the data loader at 2/4/8 workers;
torchvision's GPU JPEG decoding against PIL; a 2-process NCCL DDP step. One markdown table.

    python benchmarks/gpu_check.py [--steps 20] [--warmup 5] [--parts step loader decode nccl]
        [--out FILE]

Without a CUDA device it prints "no CUDA device: nothing to check" and exits 0.

- step: gfldet's own `TrainLoop.step` (normalise, autocast, loss, backward, GradScaler for fp16,
  gradient norm, the non-finite check, SGD, lr schedule) on the model `build_model` makes from
  configs/gfl_r50_fpn_1x_coco.yaml (random weights), 2 images of 800x1333 per GPU (padded to
  800x1344) with synthetic targets. img/s = 2 / median step seconds over `--steps` timed steps
  after `--warmup`, each bracketed by torch.cuda.synchronize. Peak MiB: max_memory_allocated,
  reset per configuration (weights, gradients and SGD state included).
- loader: `build_dataloader` as the trainer builds it, on generated JPEGs of 480-640 px per side
  (about a COCO 640x480 image's pixels) with the COCO train transforms (800/1333 + flip),
  images/s over whole passes (benchmarks/dataloader.py's `pass_seconds`).
- decode: `torchvision.io.decode_jpeg(list, device="cuda")` (one batched call) against gfldet's
  PIL decoding (`load_image_rgb`) of the same files, images/s.
- nccl: with two GPUs, the same step under DistributedDataParallel in 2 processes
  (torch.multiprocessing.spawn, NCCL); img/s counts both processes' images.

A configuration that fails (compile unsupported, out of memory, ...) becomes a row whose notes are
the error's first line, and the check goes on, so that an unattended run always ends with a whole
table. With `--out` the table is rewritten after every row, so a crash leaves what was measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from common import markdown_table, random_boxes

from gfldet.config import Config, DataConfig, load_config
from gfldet.data import (
    CocoDetection,
    build_transforms,
    collate,
    generate_synthetic_coco,
    load_image_rgb,
)
from gfldet.engine.build import build_lr_scheduler, build_model, build_optimizer
from gfldet.engine.precision import resolve_precision
from gfldet.engine.progress import Progress
from gfldet.engine.trainer import TrainLoop, seed_everything

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "gfl_r50_fpn_1x_coco.yaml"
PARTS = ("step", "loader", "decode", "nccl")
NO_CUDA = "no CUDA device: nothing to check"
NCCL = "nccl DDP step, 2 processes"
HEADER = ("configuration", "img/s", "peak MiB", "notes")
PRECISIONS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}  # name -> train.amp
IMAGE_SIZE = (800, 1333)  # (h, w): the recipe's train scale, a 4:3 COCO image resized to 800/1333
BOXES_PER_IMAGE = 7  # COCO train2017 averages 7.3 boxes per image
LOADER_WORKERS = (2, 4, 8)
LOADER_IMAGES = 240  # 120 batches of 2: a whole number per worker at 2, 4 and 8 workers
LOADER_PASSES = 3
DECODE_IMAGES = 64
# gfldet's generator draws each side from a range: 480-640 px averages 560x560 = 314k pixels, about
# a COCO image's 640x480 = 307k (as in benchmarks/dataloader.py).
SIDE_RANGE = (480, 640)
SIDES = "of 480-640 px per side"


@dataclass(frozen=True)
class Row:
    """One configuration's result; `error` (the exception's first line) when it failed."""

    config: str
    img_s: float | None = None
    peak_mib: float | None = None
    notes: str = ""
    error: str | None = None


def format_table(rows: Sequence[Row]) -> str:
    """The markdown table; a failed row shows "failed" and its error in the notes."""
    cells = []
    for r in rows:
        if r.error is not None:
            cells.append([r.config, "failed", "-", r.error])
        else:
            cells.append([r.config, "-" if r.img_s is None else f"{r.img_s:.1f}",
                          "-" if r.peak_mib is None else f"{r.peak_mib:.0f}", r.notes])
    return markdown_table(HEADER, cells)


def first_line(err: BaseException) -> str:
    """ "Type: first line of the message", its "|" escaped for a markdown cell."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text.replace("|", "\\|")


def measure(config: str, run: Callable[[], Row]) -> Row:
    """`run()`, or a failed row with the error's first line; frees what the failure left behind."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - any failure is one row of an unattended run
        row = Row(config, error=first_line(err))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """max_memory_allocated on CUDA; None elsewhere (this check reports GPU memory only)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def median_seconds(call: Callable[[], object], steps: int, warmup: int,
                   device: torch.device) -> float:
    """Median seconds of `steps` calls after `warmup` untimed ones, each bracketed by a sync."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recipe_config(precision: str, channels_last: bool, compile_model: bool,
                  overrides: Sequence[str] = ()) -> Config:
    """The recipe with random weights (nothing downloaded) and this configuration's train keys."""
    return load_config(RECIPE, ["model.backbone.weights=null", f"train.amp={PRECISIONS[precision]}",
                                f"train.channels_last={str(channels_last).lower()}",
                                f"train.compile={str(compile_model).lower()}", *overrides])


def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int, seed: int = 0):
    """What the loader hands the trainer: a padded uint8 batch and targets with random boxes."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    samples = []
    for i in range(batch):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        target = {"boxes": random_boxes(BOXES_PER_IMAGE, h, w, gen),
                  "labels": torch.randint(0, num_classes, (BOXES_PER_IMAGE,), generator=gen),
                  "image_size": (h, w), "image_id": i}
        samples.append((image, target))
    return collate(samples, size_divisor=DataConfig().size_divisor)


def time_step(cfg: Config, device: torch.device, steps: int, warmup: int,
              wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
              size: tuple[int, int] = IMAGE_SIZE) -> tuple[float, float | None]:
    """Median seconds of gfldet's training step (`TrainLoop.step`) for `cfg` on `device`, and
    the peak memory (MiB, CUDA only). The model, optimizer, scaler and compile are set up as
    `gfldet.engine.trainer.train` sets them up; `wrap` (e.g. DDP) goes around the model last."""
    reset_peak(device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)  # also cudnn.benchmark, as train()
    dtype = resolve_precision(cfg.train.amp, device).dtype
    model = build_model(cfg.model, size_divisor=cfg.data.size_divisor).to(device)
    model.check_targets = False  # as train() runs it (on CUDA the checks would sync)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    total = warmup + steps
    scheduler = build_lr_scheduler(optimizer, replace(cfg.schedule, epochs=1, milestones=[]), total)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_model = torch.compile(model, dynamic=True) if cfg.train.compile else model
    if wrap is not None:
        train_model = wrap(train_model)
    train_model.train()
    progress = Progress(total, 10**9, cfg.data.batch_size, device, scalars=None, bar=False)
    loop = TrainLoop(train_model, None, optimizer, scheduler, scaler, dtype, device, cfg, progress)
    images, targets = synthetic_batch(cfg.data.batch_size, size, cfg.model.num_classes)
    if device.type == "cuda":  # build_dataloader pins its batches when CUDA is there
        images = images.pin_memory()
        targets = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
    it = iter(range(total))
    seconds = median_seconds(lambda: loop.step(images, targets, next(it)), steps, warmup, device)
    if loop.bad_steps:
        raise FloatingPointError(f"{loop.bad_steps} non-finite steps at the end")
    return seconds, peak_mib(device)


def step_row(precision: str, channels_last: bool, compile_model: bool, device: torch.device,
             steps: int, warmup: int) -> Row:
    """One configuration of the recipe's training step."""
    name = (f"step {precision}" + (" channels_last" if channels_last else "")
            + (" compile" if compile_model else ""))
    notes = f"recipe, 2x{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, median of {steps} after {warmup}"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        notes += "; GPU reports no native bf16"
    if precision == "fp16":
        notes += "; GradScaler"

    def run() -> Row:
        cfg = recipe_config(precision, channels_last, compile_model)
        seconds, peak = time_step(cfg, device, steps, warmup)
        return Row(name, cfg.data.batch_size / seconds, peak, notes)

    row = measure(name, run)
    if compile_model:
        torch._dynamo.reset()  # each compiled configuration starts from a clean cache
    return row


def loader_row(dataset, workers: int) -> Row:
    """images/s of `build_dataloader` over `dataset` with `workers` processes."""
    from dataloader import pass_seconds

    def run() -> Row:
        seconds = statistics.median(pass_seconds(dataset, workers, 2, LOADER_PASSES))
        return Row(f"loader {workers} workers", len(dataset) / seconds, None,
                   f"{len(dataset)} JPEGs {SIDES}, train transforms 800/1333, batch 2, median of "
                   f"{LOADER_PASSES} passes")

    return measure(f"loader {workers} workers", run)


def time_decode(files: Sequence[Path], device: torch.device, steps: int, warmup: int) -> list[Row]:
    """images/s of torchvision's batched `decode_jpeg` on `device` and of gfldet's PIL decoding."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    data = [read_file(str(f)) for f in files]
    n = f"{len(files)} JPEGs {SIDES}"

    def torchvision_row() -> Row:
        reset_peak(device)
        seconds = median_seconds(lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=device),
                                 steps, warmup, device)
        return Row(f"decode torchvision {device.type}", len(files) / seconds, peak_mib(device),
                   f"{n}, one batched decode_jpeg call, RGB")

    def pil_row() -> Row:
        seconds = median_seconds(lambda: [load_image_rgb(f) for f in files], steps, warmup,
                                 torch.device("cpu"))
        return Row("decode PIL", len(files) / seconds, None,
                   f"{n}, gfldet's load_image_rgb, 1 process")

    return [measure(f"decode torchvision {device.type}", torchvision_row),
            measure("decode PIL", pil_row)]


def data_rows(parts: Sequence[str], device: torch.device, steps: int, warmup: int,
              report: Callable[[Row], None]) -> None:
    """The loader and decode rows, on JPEGs generated into a temporary folder (not timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = generate_synthetic_coco(tmp, num_train=LOADER_IMAGES, num_val=0,
                                            image_size=SIDE_RANGE)
            transform = build_transforms(True, IMAGE_SIZE[0], IMAGE_SIZE[1])
            dataset = CocoDetection(paths["train_images"], paths["train_ann"], transform=transform,
                                    filter_empty=True)
        except Exception as err:  # noqa: BLE001 - one row, and the check goes on to nccl
            report(Row("loader and decode: generating the JPEGs", error=first_line(err)))
            return
        if "loader" in parts:
            for workers in LOADER_WORKERS:
                report(loader_row(dataset, workers))
        if "decode" in parts:
            files = sorted(Path(paths["train_images"]).glob("*.jpg"))[:DECODE_IMAGES]
            for row in time_decode(files, device, steps, warmup):
                report(row)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_worker(rank: int, port: int, steps: int, warmup: int, out_dir: str) -> None:
    """One of 2 processes: the recipe's fp32 step under DDP; writes its result or error as JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    result: dict = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=2, timeout=timedelta(minutes=10),
                                device_id=device)
        seconds, peak = time_step(recipe_config("fp32", False, False), device, steps, warmup,
                                  wrap=lambda m: DistributedDataParallel(m, device_ids=[rank]))
        result = {"seconds": seconds, "peak": peak}
    except Exception as err:  # noqa: BLE001 - reported in the table by the parent
        result = {"error": first_line(err)}
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()


def nccl_row(steps: int, warmup: int) -> Row:
    if torch.cuda.device_count() < 2:
        return Row(NCCL, notes=f"skipped: {torch.cuda.device_count()} GPU, 2 needed")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(nccl_worker, args=(free_port(), steps, warmup, tmp), nprocs=2, join=True)
        except Exception as err:  # noqa: BLE001 - a rank's own error, when it wrote one, is clearer
            results = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
            errors = [r["error"] for r in results if "error" in r]
            return Row(NCCL, error=errors[0] if errors else first_line(err))
        result = json.loads(Path(tmp, "rank0.json").read_text())
    images = 2 * recipe_config("fp32", False, False).data.batch_size  # both processes' batches
    return Row(NCCL, images / result["seconds"], result["peak"],
               f"recipe fp32, 2 images per GPU, rank 0's median of {steps} after {warmup}, "
               "rank 0's peak")


def environment_lines() -> list[str]:
    import torchvision

    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return [f"device: {names} ({torch.cuda.device_count()} GPU)",
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, torchvision {torchvision.__version__}, "
            f"{os.cpu_count()} CPUs"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps (or decode calls) per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to check")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be at least 1 and --warmup at least 0 (got {args.steps}, "
                     f"{args.warmup})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    head = environment_lines()
    print("\n".join(head), flush=True)
    rows: list[Row] = []

    def report(row: Row) -> None:  # printed, and --out rewritten, as each row comes
        rows.append(row)
        done = row.error or (f"{row.img_s:.1f} img/s" if row.img_s is not None else row.notes)
        print(f"{row.config}: {done}", file=sys.stderr, flush=True)
        if args.out is not None:
            args.out.write_text("\n".join(head) + "\n\n" + format_table(rows) + "\n")

    if "step" in args.parts:
        for precision in PRECISIONS:
            for channels_last in (False, True):
                for compile_model in (False, True):
                    report(step_row(precision, channels_last, compile_model, device, args.steps,
                                    args.warmup))
    if {"loader", "decode"} & set(args.parts):
        data_rows(args.parts, device, args.steps, args.warmup, report)
    if "nccl" in args.parts:
        report(measure(NCCL, lambda: nccl_row(args.steps, args.warmup)))
    print("\n" + format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
