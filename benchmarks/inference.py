"""End-to-end inference (network + post-processing) of gfldet's R-50-FPN GFL against torchvision's
FCOS and RetinaNet R-50-FPN at COCO test resolution, eval mode, no_grad, fp32, same threads,
alternating runs in one process, medians.

    python benchmarks/inference.py [--batch 1 8] [--repeats 5] [--threads N] [--scores dense|init]
    python benchmarks/inference.py --gflv2 [...]   # GFLv2 (DGQP) against GFLv1 instead

Images are 800x1333 (the recipe's test scale of a 3:5 image). gfldet gets the normalised batch
padded to 800x1344 with `image_size` = (800, 1333), as its data loader gives it; torchvision gets
the raw images with min_size=800, max_size=1333 (so its transform normalises and pads to
800x1344 but does not resize) and rescales the boxes back, all inside the timed call.
Each entrant uses its own test settings: gfldet score 0.05, 1000 per level, NMS 0.6, 100 per
image; FCOS 0.2, 1000, 0.6, 100; RetinaNet 0.05, 1000, 0.5, 300 (torchvision's defaults).

Random weights would score every candidate ~0.01 (the prior-probability bias) and leave nothing
for NMS. `--scores dense` (default) sets the classification biases to 0, so every score is ~0.5
and each entrant's post-processing runs at its maximum load (1000 candidates per level into
NMS); `--scores init` keeps the biases, giving the network time with next to no post-processing.

`--gflv2` times gfldet's GFLv2 (the same model with DGQP, the GFLv1 weights copied into it) against
GFLv1, alternating the two in one process, instead of the torchvision entrants.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import (
    allocator_line,
    machine,
    markdown_table,
    set_threads,
    time_alternating,
    torchvision_detector,
    use_retaining_malloc,
)
from torch import nn

from gfldet.config import BackboneConfig, DataConfig, DGQPConfig, HeadConfig, ModelConfig
from gfldet.data import IMAGENET_MEAN, IMAGENET_STD
from gfldet.engine.build import build_model
from gfldet.models.detector import GFL

HEIGHT, WIDTH = 800, 1333  # padded to 800x1344 (a multiple of 32)


def gfl_batch(
    batch: int, height: int, width: int, padded: tuple[int, int]
) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    """(normalised padded images [B, 3, H', W'], their targets, the raw pixels [B, 3, H, W])."""
    pixels = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    # gfldet's loader normalises, then zero-pads bottom/right to a multiple of 32.
    gfl_images = F.pad((pixels * 255 - mean) / std, (0, padded[1] - width, 0, padded[0] - height))
    gfl_targets = [{"image_size": (height, width), "orig_size": (height, width)}] * batch
    return gfl_images, gfl_targets, pixels


def measure_gflv2(
    gfl: GFL, gflv2: GFL, batch: int, height: int, width: int, padded: tuple[int, int], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per batch of GFLv1 and GFLv2, alternated, and their detections per image."""
    images, targets, _ = gfl_batch(batch, height, width, padded)
    outputs: dict[str, list[dict[str, torch.Tensor]]] = {}

    def run(name: str, model: nn.Module) -> None:
        with torch.no_grad():
            outputs[name] = model(images, targets)

    entrants = {"gfl": lambda: run("gfl", gfl), "gflv2": lambda: run("gflv2", gflv2)}
    t = time_alternating(entrants, repeats=repeats)
    return t, {k: sum(len(o["boxes"]) for o in v) / batch for k, v in outputs.items()}


def measure(gfl: GFL, fcos: nn.Module, retina: nn.Module, batch: int, height: int, width: int,
            padded: tuple[int, int], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per batch of each entrant, and the detections per image each returned."""
    gfl_images, gfl_targets, pixels = gfl_batch(batch, height, width, padded)
    tv_images = list(pixels)
    with torch.no_grad():
        tv_shape = tuple(fcos.transform(tv_images)[0].tensors.shape[-2:])
        assert tv_shape == padded, "torchvision resized"
    outputs: dict[str, list[dict[str, torch.Tensor]]] = {}

    def run(name: str, model: nn.Module, *inputs: object) -> None:
        with torch.no_grad():
            outputs[name] = model(*inputs)

    t = time_alternating(
        {"gfl": lambda: run("gfl", gfl, gfl_images, gfl_targets),
         "fcos": lambda: run("fcos", fcos, tv_images),
         "retina": lambda: run("retina", retina, tv_images)},
        repeats=repeats,
    )
    return t, {k: sum(len(o["boxes"]) for o in v) / batch for k, v in outputs.items()}


def main() -> None:
    use_retaining_malloc()
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scores", choices=["dense", "init"], default="dense")
    parser.add_argument("--gflv2", action="store_true", help="GFLv2 (DGQP) against GFLv1 instead")
    parser.add_argument("--height", type=int, default=HEIGHT, help="for smoke runs only")
    parser.add_argument("--width", type=int, default=WIDTH, help="for smoke runs only")
    args = parser.parse_args()
    set_threads(args.threads)
    height, width = args.height, args.width
    padded = (-(-height // 32) * 32, -(-width // 32) * 32)  # 800x1333 -> 800x1344

    torch.manual_seed(0)
    gfl = build_model(ModelConfig(backbone=BackboneConfig(weights=None)),  # 80 classes
                      size_divisor=DataConfig().size_divisor).eval()
    if args.gflv2:
        compare_gflv2(gfl, args, height, width, padded)
        return
    fcos = torchvision_detector("fcos", min_size=height, max_size=width).eval()
    retina = torchvision_detector("retinanet", min_size=height, max_size=width).eval()
    if args.scores == "dense":
        for bias in (gfl.head.gfl_cls.bias, fcos.head.classification_head.cls_logits.bias,
                     retina.head.classification_head.cls_logits.bias):
            torch.nn.init.zeros_(bias)

    rows, counts = [], {}
    for batch in args.batch:
        t, counts[batch] = measure(gfl, fcos, retina, batch, height, width, padded, args.repeats)
        rows.append([batch, f"{t['gfl'] * 1e3:.0f}", f"{t['fcos'] * 1e3:.0f}",
                     f"{t['retina'] * 1e3:.0f}", f"{batch / t['gfl']:.2f}",
                     f"{t['gfl'] / t['fcos']:.2f}", f"{t['gfl'] / t['retina']:.2f}"])

    print(f"machine: {machine()}; {allocator_line()}; images {height}x{width} "
          f"(padded {padded[0]}x{padded[1]}), scores: {args.scores}")
    print(markdown_table(["batch", "gfldet ms", "FCOS ms", "RetinaNet ms", "gfldet img/s",
                          "gfldet/FCOS", "gfldet/RetinaNet"], rows))
    for batch, c in counts.items():
        print(f"detections per image, batch {batch}: gfldet {c['gfl']:.0f}, FCOS {c['fcos']:.0f}, "
              f"RetinaNet {c['retina']:.0f}")


def compare_gflv2(
    gfl: GFL, args: argparse.Namespace, height: int, width: int, padded: tuple[int, int]
) -> None:
    gflv2 = build_model(ModelConfig(backbone=BackboneConfig(weights=None),
                                    head=HeadConfig(dgqp=DGQPConfig())),
                        size_divisor=DataConfig().size_divisor).eval()
    # the same trunk and head weights; only DGQP keeps its initialisation
    missing, unexpected = gflv2.load_state_dict(gfl.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("head.reg_conf.") for k in missing)
    if args.scores == "dense":
        for model in (gfl, gflv2):
            torch.nn.init.zeros_(model.head.gfl_cls.bias)
    rows, counts = [], {}
    for batch in args.batch:
        t, counts[batch] = measure_gflv2(gfl, gflv2, batch, height, width, padded, args.repeats)
        ms_v1, ms_v2 = t["gfl"] * 1e3, t["gflv2"] * 1e3
        rows.append([batch, f"{ms_v1:.0f}", f"{ms_v2:.0f}", f"{ms_v2 / ms_v1:.3f}"])
    print(f"machine: {machine()}; {allocator_line()}; images {height}x{width} "
          f"(padded {padded[0]}x{padded[1]}), scores: {args.scores}")
    print(markdown_table(["batch", "GFLv1 ms", "GFLv2 ms", "GFLv2/GFLv1"], rows))
    for batch, c in counts.items():
        print(f"detections per image, batch {batch}: GFLv1 {c['gfl']:.0f}, GFLv2 {c['gflv2']:.0f}")


if __name__ == "__main__":
    main()
