"""The framework's own cost of a training step: assignment + target building + every loss + their
backward, given the head outputs as fixed leaf tensors (no network). gfldet's GFL criterion
against torchvision FCOS's and RetinaNet's `compute_loss` on their own head outputs for the same
images and boxes, fp32, alternating runs, medians.

    python benchmarks/loss_overhead.py [--repeats 7] [--threads N] [--skip-memory]
        [--case B SIZE BOXES ...] [--qfl]

Peak memory: each (case, entrant) runs once more in a fresh process, which reports how far one
loss + backward raises the resident set above the inputs (head outputs, priors, targets) already
in memory.

`--qfl` times Quality Focal Loss alone (forward + backward on the cases' [B * A, 80] logits):
gfldet's closed-form Function against the plain autograd formula (the tests' reference),
alternating, and prints how far apart their losses and gradients are.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import (
    TV_NUM_CLASSES,
    allocator_line,
    extra_peak_mib,
    machine,
    markdown_table,
    peak_in_fresh_process,
    random_boxes,
    set_threads,
    time_alternating,
    use_retaining_malloc,
)
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn

from gfldet.config import DataConfig, PriorsConfig
from gfldet.losses import quality_focal_loss
from gfldet.models.criterion import LossSettings, gfl_loss, pad_targets
from gfldet.models.head import Integral
from gfldet.models.priors import make_priors, valid_prior_mask

OCTAVE_BASE_SCALE = PriorsConfig().octave_base_scale  # the recipe's (gfldet.config)
SIZE_DIVISOR = DataConfig().size_divisor  # the recipe's (gfldet.config)

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
    priors = make_priors(sizes, STRIDES, OCTAVE_BASE_SCALE)
    num = priors.boxes.shape[0]
    valid = valid_prior_mask(priors, torch.tensor([[size, size]] * batch), SIZE_DIVISOR)
    cls = torch.randn(batch, num, NUM_CLASSES).mul_(0.5).sub_(4.0).requires_grad_()
    reg = torch.randn(batch, num, 68).requires_grad_()
    integral = Integral(16)
    gt = pad_targets(targets, torch.device("cpu"))
    settings = LossSettings()

    def run() -> None:
        losses = gfl_loss(cls, reg, integral, priors, valid, *gt, settings, 16, 9)
        sum(losses.values()).backward()
        cls.grad = reg.grad = None

    return run


def torchvision_entrant(kind: str, batch: int, size: int, targets: list[dict]):
    build = fcos_resnet50_fpn if kind == "fcos" else retinanet_resnet50_fpn
    model = build(weights=None, weights_backbone=None, num_classes=TV_NUM_CLASSES, min_size=size,
                  max_size=size)
    image_list, _ = model.transform(list(torch.zeros(batch, 3, size, size)))
    # The anchors depend only on the feature maps' shapes: one-channel stand-ins, no network run.
    features = [torch.empty(batch, 1, h, w) for h, w in level_sizes(size)]
    anchors = model.anchor_generator(image_list, features)
    per_location = 1 if kind == "fcos" else 9
    num_per_level = [h * w * per_location for h, w in level_sizes(size)]
    total = sum(num_per_level)
    gen = torch.Generator().manual_seed(1)
    shapes = {"cls_logits": TV_NUM_CLASSES, "bbox_regression": 4}
    if kind == "fcos":
        shapes["bbox_ctrness"] = 1
    # Head outputs as fixed leaves, logits near the prior like gfldet's (bias -log(99)).
    leaves = {name: (torch.randn(batch, total, width, generator=gen) * 0.5
                     - (4.0 if name == "cls_logits" else 0.0)).requires_grad_()
              for name, width in shapes.items()}
    # torchvision's heads keep index 0 for the background, hence + 1 (TV_NUM_CLASSES).
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]

    def run() -> None:
        if kind == "fcos":
            losses = model.compute_loss(tv_targets, leaves, anchors, num_per_level)
        else:
            losses = model.compute_loss(tv_targets, leaves, anchors)
        sum(losses.values()).backward()
        for v in leaves.values():
            v.grad = None

    return run, image_list.tensors.shape[-2:]


CASES = [(2, 640, 20), (8, 640, 20), (8, 640, 100), (16, 800, 20)]  # (batch, size, boxes per image)
ENTRANTS = ("gfl", "fcos", "retina")


def make_case(batch: int, size: int, boxes: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"boxes": random_boxes(boxes, size, size, gen),
             "labels": torch.randint(0, NUM_CLASSES, (boxes,), generator=gen)}
            for _ in range(batch)]


def make_entrant(name: str, batch: int, size: int, boxes: int):
    targets = make_case(batch, size, boxes)
    if name == "gfl":
        return gfl_entrant(batch, size, targets)
    kind = "fcos" if name == "fcos" else "retinanet"
    run, tv_size = torchvision_entrant(kind, batch, size, targets)
    if tuple(tv_size) != (size, size):
        print(f"note: torchvision resized {size} to {tuple(tv_size)}")
    return run


def plain_qfl(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
              beta: float = 2.0) -> torch.Tensor:
    """QFL straight from GFL Eq. 2 with a dense target, differentiated by autograd."""
    num_classes = logits.shape[1]
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes] * scores[:, None]  # [N, C]
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (target - logits.sigmoid()).abs().pow(beta)).sum(dim=1)


def qfl_entrants(batch: int, size: int, boxes: int) -> dict[str, Callable[[], torch.Tensor]]:
    """QFL forward + backward on [batch * priors, 80] logits, about 9 positives per box."""
    num = sum(h * w for h, w in level_sizes(size)) * batch
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(num, NUM_CLASSES, generator=gen) * 0.5 - 4.0).requires_grad_()
    labels = torch.full((num,), NUM_CLASSES)
    positives = torch.randperm(num, generator=gen)[: min(num, 9 * boxes * batch)]
    labels[positives] = torch.randint(0, NUM_CLASSES, (len(positives),), generator=gen)
    scores = torch.rand(num, generator=gen)

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            loss = fn()
            loss.sum().backward()
            grad, logits.grad = logits.grad, None
            return torch.cat([loss.detach(), grad.flatten()])
        return call

    return {"function": run(lambda: quality_focal_loss(logits, labels, scores)),
            "autograd": run(lambda: plain_qfl(logits, labels, scores))}


def qfl_main(cases: list[tuple[int, int, int]], repeats: int) -> None:
    rows = []
    for batch, size, boxes in cases:
        runs = qfl_entrants(batch, size, boxes)
        out = {name: fn() for name, fn in runs.items()}
        diff = (out["function"] - out["autograd"]).abs().max().item()
        t = time_alternating(runs, repeats=repeats)
        rows.append([f"{batch}x{size}²", out["function"].numel() // (NUM_CLASSES + 1),
                     *(f"{t[n] * 1e3:.1f}" for n in runs),
                     f"{t['autograd'] / t['function']:.2f}", f"{diff:.1e}"])
    print(markdown_table(["batch x size", "rows", "function ms", "autograd ms",
                          "autograd/function", "max |function - autograd|"], rows))


def child(name: str, batch: int, size: int, boxes: int) -> None:
    """In a fresh process: the peak memory one loss + backward adds above its inputs, in MiB."""
    make_entrant(name, 1, 64, 1)()  # warm-up: kernels, thread pool, allocator
    print(extra_peak_mib(make_entrant(name, batch, size, boxes)))


def peak_memory(name: str, batch: int, size: int, boxes: int, threads: int | None) -> float:
    return peak_in_fresh_process(
        __file__, ["--child", name, "--case", str(batch), str(size), str(boxes)], threads)


def main() -> None:
    use_retaining_malloc()
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-memory", action="store_true",
                        help="time only (each memory run is a fresh process)")
    parser.add_argument("--case", type=int, nargs=3, action="append",
                        metavar=("BATCH", "SIZE", "BOXES"),
                        help="run only these cases (default: the four of the issue)")
    parser.add_argument("--qfl", action="store_true",
                        help="time QFL alone: gfldet's Function vs plain autograd")
    parser.add_argument("--child", choices=ENTRANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    cases = [tuple(c) for c in args.case] if args.case else CASES
    if any(size % 32 for _, size, _ in cases):
        parser.error("--case SIZE must be a multiple of 32 (torchvision would resize and its "
                     "strides change)")
    if args.child:
        child(args.child, *cases[0])
        return
    print(f"machine: {machine()}; {allocator_line()}")
    if args.qfl:
        qfl_main(cases, args.repeats)
        return
    rows = []
    for batch, size, boxes in cases:
        runs = {name: make_entrant(name, batch, size, boxes) for name in ENTRANTS}
        t = time_alternating(runs, repeats=args.repeats)
        mem = {name: math.nan if args.skip_memory
               else peak_memory(name, batch, size, boxes, args.threads) for name in ENTRANTS}
        rows.append([f"{batch}x{size}²", boxes, *(f"{t[n] * 1e3:.0f}" for n in ENTRANTS),
                     f"{t['gfl'] / t['fcos']:.2f}", f"{t['gfl'] / t['retina']:.2f}",
                     *("-" if math.isnan(mem[n]) else f"{mem[n]:.0f}" for n in ENTRANTS)])
    print(markdown_table(["batch x size", "boxes/img", "gfldet ms", "FCOS ms", "RetinaNet ms",
                          "gfldet/FCOS", "gfldet/RetinaNet", "gfldet peak MiB", "FCOS peak MiB",
                          "RetinaNet peak MiB"], rows))


if __name__ == "__main__":
    main()
