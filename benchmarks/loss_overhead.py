"""The framework's own cost of a training step: assignment + target building + every loss + their
backward, given the head outputs as fixed leaf tensors (no network). gfldet's GFL criterion
against torchvision FCOS's and RetinaNet's `compute_loss` on their own head outputs for the same
images and boxes, fp32, alternating runs, medians.

    python benchmarks/loss_overhead.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import resource

import torch
from common import machine, random_boxes, time_alternating
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn

from gfldet.models.criterion import LossSettings, gfl_loss, pad_targets
from gfldet.models.head import Integral
from gfldet.models.priors import make_priors, valid_prior_mask

STRIDES = [8, 16, 32, 64, 128]
NUM_CLASSES = 80


def level_sizes(size: int) -> list[tuple[int, int]]:
    """P3 at stride 8, then each level halves (ceil), as the stride-2 convs do."""
    side = -(-size // 8)
    sizes = []
    for _ in STRIDES:
        sizes.append((side, side))
        side = -(-side // 2)
    return sizes


def gfl_entrant(batch: int, size: int, targets: list[dict]):
    sizes = level_sizes(size)
    priors = make_priors(sizes, STRIDES)
    num = priors.boxes.shape[0]
    valid = valid_prior_mask(priors, torch.tensor([[size, size]] * batch))
    cls = torch.randn(batch, num, NUM_CLASSES).mul_(0.5).sub_(4.0).requires_grad_()
    reg = torch.randn(batch, num, 68).requires_grad_()
    integral = Integral(16)
    gt = pad_targets(targets, torch.device("cpu"))
    settings = LossSettings()

    def run() -> None:
        losses = gfl_loss(cls, reg, integral(reg), priors, valid, *gt, settings, 16)
        sum(losses.values()).backward()
        cls.grad = reg.grad = None

    return run, num


def torchvision_entrant(kind: str, batch: int, size: int, targets: list[dict]):
    build = fcos_resnet50_fpn if kind == "fcos" else retinanet_resnet50_fpn
    model = build(weights=None, weights_backbone=None, num_classes=91, min_size=size, max_size=size)
    images = torch.zeros(batch, 3, size, size)
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
        # Run the network once to get the anchors and the output shapes; then time the loss alone.
        features = list(model.backbone(image_list.tensors).values())
        head = model.head(features)
        anchors = model.anchor_generator(image_list, features)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in head.items()}
    num_per_level = [f.shape[-2] * f.shape[-1] for f in features]
    if kind == "retinanet":
        num_per_level = [n * 9 for n in num_per_level]
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]  # 0 is background

    def run() -> None:
        if kind == "fcos":
            losses = model.compute_loss(tv_targets, leaves, anchors, num_per_level)
        else:
            losses = model.compute_loss(tv_targets, leaves, anchors)
        sum(losses.values()).backward()
        for v in leaves.values():
            v.grad = None

    return run, image_list.tensors.shape[-2:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print("| batch x size | boxes/img | gfldet ms | FCOS ms | RetinaNet ms | gfldet/FCOS | gfldet/RetinaNet |")
    print("|---|---|---|---|---|---|---|")
    for batch, size, boxes in [(2, 640, 20), (8, 640, 20), (8, 640, 100), (16, 800, 20)]:
        gen = torch.Generator().manual_seed(0)
        targets = [{"boxes": random_boxes(boxes, size, size, gen),
                    "labels": torch.randint(0, NUM_CLASSES, (boxes,), generator=gen)} for _ in range(batch)]
        gfl, _ = gfl_entrant(batch, size, targets)
        fcos, tv_size = torchvision_entrant("fcos", batch, size, targets)
        retina, _ = torchvision_entrant("retinanet", batch, size, targets)
        if tuple(tv_size) != (size, size):
            print(f"note: torchvision resized {size} to {tuple(tv_size)}")
        t = time_alternating({"gfl": gfl, "fcos": fcos, "retina": retina}, repeats=args.repeats)
        print(f"| {batch}x{size}² | {boxes} | {t['gfl'] * 1e3:.0f} | {t['fcos'] * 1e3:.0f} | {t['retina'] * 1e3:.0f} "
              f"| {t['gfl'] / t['fcos']:.2f} | {t['gfl'] / t['retina']:.2f} |")
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
