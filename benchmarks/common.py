"""Shared helpers of the benchmarks: timing (alternating entrants, medians) and inputs."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

# glibc's malloc hands large freed blocks back to the kernel (munmap, heap trim), so every call
# page-faults its big tensors in again. On this project's VM that cost varies from run to run:
# medians of gfldet's loss at 2x640² moved between 17 and 45 ms over runs of the same code, and
# the gfldet/FCOS ratio with it (0.30-0.63). On a GPU both frameworks allocate through PyTorch's
# caching allocator, which keeps freed memory; these settings make glibc keep it too (no mmap,
# no trim), for every entrant alike. Opt out with GFLDET_BENCH_DEFAULT_MALLOC=1.
RETAINING_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36),
                        "MALLOC_TOP_PAD_": str(2**26)}


def use_retaining_malloc() -> None:
    """Re-execute this script under RETAINING_MALLOC_ENV unless it is already set (glibc reads it
    at start-up) or GFLDET_BENCH_DEFAULT_MALLOC=1. Call first thing in main()."""
    if os.environ.get("GFLDET_BENCH_DEFAULT_MALLOC") == "1" or retaining_malloc():
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETAINING_MALLOC_ENV})


def retaining_malloc() -> bool:
    return all(os.environ.get(k) == v for k, v in RETAINING_MALLOC_ENV.items())


def allocator_line() -> str:
    return ("malloc: freed memory retained (common.RETAINING_MALLOC_ENV)" if retaining_malloc()
            else "malloc: glibc defaults")


def machine() -> str:
    """CPU model (from /proc/cpuinfo on Linux, else the architecture), threads, torch version."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def time_alternating(entrants: dict[str, Callable[[], None]], repeats: int = 7,
                     warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each entrant, calls interleaved so that noise hits all alike."""
    for fn in entrants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in entrants}
    for _ in range(repeats):
        for name, fn in entrants.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def random_boxes(num: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """`num` boxes inside an image, 8 px to half the image per side: [num, 4] xyxy."""
    wh = 8 + torch.rand(num, 2, generator=generator) * torch.tensor([width / 2 - 8, height / 2 - 8])
    xy = torch.rand(num, 2, generator=generator) * (torch.tensor([width, height]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def set_threads(threads: int | None) -> None:
    """Same intra-op thread count for every entrant (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


# gfldet's benchmarks use COCO's 80 categories; torchvision's heads index classes from 1 (0 is
# background and never a target), so the same 80 classes take 81 outputs. Their COCO models have
# 91 (COCO category ids), which would give them 14 % more classification work than gfldet.
TV_NUM_CLASSES = 80 + 1


def torchvision_detector(kind: str, num_classes: int = TV_NUM_CLASSES, trainable_layers: int = 3,
                         **kwargs) -> nn.Module:
    """torchvision FCOS / RetinaNet R-50-FPN as they are trained on COCO, with random weights.

    `fcos_resnet50_fpn(weights_backbone=None)` silently switches to nn.BatchNorm2d and makes all
    five ResNet stages trainable (`trainable_backbone_layers` is ignored without weights), which is
    neither torchvision's COCO recipe nor comparable to gfldet's frozen_stages=1/norm_eval=True.
    So we build the backbone as the builder does *with* ImageNet weights, through the public
    `resnet_fpn_backbone`: FrozenBatchNorm2d, stem and layer1 frozen (3 trainable stages), P3-P7
    via LastLevelP6P7; gfldet's 80 classes (labels 1..80, see TV_NUM_CLASSES). `kwargs` go to
    the FCOS/RetinaNet class (min_size, max_size, ...).
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=trainable_layers,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    detector = {"fcos": FCOS, "retinanet": RetinaNet}[kind]
    return detector(backbone, num_classes, **kwargs)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rss_mib() -> float:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Reset this process's resident-set high-water mark to its current size (Linux >= 4.0:
    "5" to /proc/self/clear_refs), so that `peak_rss_mib` measures what comes after."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set since start or `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def extra_peak_mib(call: Callable[[], object]) -> float:
    """How far one `call()` raises this process's resident set above its size just before, MiB."""
    reset_peak_rss()
    before = rss_mib()
    call()
    return max(peak_rss_mib() - before, 0.0)


def peak_in_fresh_process(script: str, args: Sequence[str], threads: int | None) -> float:
    """Run `script --child ... args` in a new interpreter; it prints its `extra_peak_mib` last."""
    cmd = [sys.executable, script, *args] + (["--threads", str(threads)] if threads else [])
    # Default malloc: the peak a user's process reaches, not one inflated by retained blocks.
    env = {k: v for k, v in os.environ.items() if k not in RETAINING_MALLOC_ENV}
    env["GFLDET_BENCH_DEFAULT_MALLOC"] = "1"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return float(out.splitlines()[-1])
