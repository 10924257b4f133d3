"""One full training step (forward + loss + backward + SGD step) of gfldet's R-50-FPN GFL against
torchvision's FCOS and RetinaNet R-50-FPN, on the same images and boxes, fp32, same threads,
alternating runs in one process, medians.

    python benchmarks/train_step.py [--batch 2] [--size 640] [--boxes 20] [--repeats 7]
        [--threads N]

All three are built as they train on COCO, with random weights (nothing is downloaded):
- gfldet: `build_model` of the recipe's model config (80 classes, frozen_stages=1,
  norm_eval=True: stem and layer1 frozen,
  BatchNorm statistics fixed, BN affine parameters of layer2-4 still trained, as in MMDetection).
- torchvision: `common.torchvision_detector` (FrozenBatchNorm2d, stem and layer1 frozen, the
  same 80 classes), because the public builders ignore `trainable_backbone_layers` and switch to
  trainable BatchNorm2d when `weights_backbone=None`. `min_size=max_size=size`, so their
  transform does not resize; it still normalises and batches the images inside the timed step
  (the "tv transform" column; gfldet gets the normalised batch its data loader would give).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from common import (
    allocator_line,
    machine,
    markdown_table,
    random_boxes,
    set_threads,
    time_alternating,
    torchvision_detector,
    use_retaining_malloc,
)
from torch import nn

from gfldet.config import BackboneConfig, DataConfig, ModelConfig
from gfldet.data import IMAGENET_MEAN, IMAGENET_STD
from gfldet.engine.build import build_model

NUM_CLASSES = 80
# The SGD kernels do the same work at any lr; a tiny one keeps randomly initialised weights (and
# so the activations and the assigners' inputs) in the same regime over all repeats.
LR = 1e-5


def train_step(model: nn.Module, forward: Callable[[], dict[str, torch.Tensor]]
               ) -> tuple[Callable[[], None], list[float]]:
    """A step as the trainer does it; returns the step and the list of its losses (to check)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-4)  # the recipe's SGD
    history: list[float] = []

    def run() -> None:
        loss = sum(forward().values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())

    return run, history


def trainable_millions(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


def main() -> None:
    use_retaining_malloc()
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=640, help="square images, a multiple of 32")
    parser.add_argument("--boxes", type=int, default=20, help="boxes per image")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    batch, size = args.batch, args.size
    assert size % 32 == 0, "a multiple of 32, so that no entrant pads"

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, size, size, generator=gen)  # one image set, 0..1 RGB
    boxes = [random_boxes(args.boxes, size, size, gen) for _ in range(batch)]
    labels = [torch.randint(0, NUM_CLASSES, (args.boxes,), generator=gen) for _ in range(batch)]

    torch.manual_seed(0)
    recipe = ModelConfig(num_classes=NUM_CLASSES, backbone=BackboneConfig(weights=None))
    gfl = build_model(recipe, size_divisor=DataConfig().size_divisor).train()
    gfl.check_targets = False  # as train() runs it: its datasets are checked
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    gfl_images = (pixels * 255 - mean) / std  # what the data loader hands the model
    gfl_targets = [{"boxes": b, "labels": lab, "image_size": (size, size)}
                   for b, lab in zip(boxes, labels, strict=True)]
    gfl_step, gfl_losses = train_step(gfl, lambda: gfl(gfl_images, gfl_targets))

    tv_images = list(pixels)  # torchvision normalises inside the model
    tv_targets = [{"boxes": b, "labels": lab + 1}  # 0 = background
                  for b, lab in zip(boxes, labels, strict=True)]
    fcos = torchvision_detector("fcos", min_size=size, max_size=size).train()
    retina = torchvision_detector("retinanet", min_size=size, max_size=size).train()
    fcos_step, fcos_losses = train_step(fcos, lambda: fcos(tv_images, tv_targets))
    retina_step, retina_losses = train_step(retina, lambda: retina(tv_images, tv_targets))
    with torch.no_grad():
        resized = fcos.transform(tv_images)[0].tensors.shape[-2:]
    assert tuple(resized) == (size, size), f"torchvision resized {size} to {tuple(resized)}"

    t = time_alternating(
        {"gfl": gfl_step, "fcos": fcos_step, "retina": retina_step,
         "transform": lambda: fcos.transform(tv_images, tv_targets)},
        repeats=args.repeats,
    )
    print(f"machine: {machine()}; {allocator_line()}")
    print(markdown_table(
        ["batch x size", "boxes/img", "gfldet ms", "FCOS ms", "RetinaNet ms", "gfldet/FCOS",
         "gfldet/RetinaNet", "tv transform ms"],
        [[f"{batch}x{size}²", args.boxes, f"{t['gfl'] * 1e3:.0f}", f"{t['fcos'] * 1e3:.0f}",
          f"{t['retina'] * 1e3:.0f}", f"{t['gfl'] / t['fcos']:.2f}",
          f"{t['gfl'] / t['retina']:.2f}", f"{t['transform'] * 1e3:.1f}"]],
    ))
    print(f"trainable parameters (M): gfldet {trainable_millions(gfl):.2f}, "
          f"FCOS {trainable_millions(fcos):.2f}, RetinaNet {trainable_millions(retina):.2f}")
    last = {"gfldet": gfl_losses[-1], "FCOS": fcos_losses[-1], "RetinaNet": retina_losses[-1]}
    print("last total losses: " + ", ".join(f"{k} {v:.3f}" for k, v in last.items()))
    if not all(math.isfinite(v) for v in last.values()):
        print("WARNING: a non-finite loss; the timings may not be representative")


if __name__ == "__main__":
    main()
