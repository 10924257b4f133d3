"""What folding eval-mode BatchNorm into the convolutions (`gfldet.models.backbone.conv_bn`) saves:
gfldet's R-50-FPN GFL with the folded backbone against the same model (same weights) running
torchvision's unfolded module calls (conv, then BatchNorm), side by side in one process, medians.

    python benchmarks/bn_fold.py [--batch 2] [--size 640] [--boxes 20] [--eval-size 800 1344]
        [--repeats 5] [--threads N]

Rows: the training step of train_step.py (recipe: frozen stem + layer1, norm_eval, so every
BatchNorm folds; SGD over the trainable parameters) and the whole model in eval mode (network +
post-processing) at the test scale, batch 1. The two entrants compute the same function up to
float rounding (tests/test_model.py checks features and gradients).
"""

from __future__ import annotations

import argparse
import types

import torch
from common import (
    allocator_line,
    machine,
    markdown_table,
    random_boxes,
    set_threads,
    time_alternating,
    use_retaining_malloc,
)
from torch import Tensor
from train_step import train_step

from gfldet.config import BackboneConfig, DataConfig, ModelConfig
from gfldet.engine.build import build_model
from gfldet.models.backbone import ResNetBackbone

NUM_CLASSES = 80


def unfolded_forward(backbone: ResNetBackbone, images: Tensor) -> list[Tensor]:
    """torchvision's own module calls: every convolution followed by its BatchNorm module."""
    stem = torch.relu(backbone.bn1(backbone.conv1(images)))
    x = backbone.layer1(backbone.maxpool(stem))
    c3 = backbone.layer2(x)
    c4 = backbone.layer3(c3)
    return [c3, c4, backbone.layer4(c4)]


def build_pair() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    recipe = ModelConfig(num_classes=NUM_CLASSES, backbone=BackboneConfig(weights=None))
    size_divisor = DataConfig().size_divisor
    folded = build_model(recipe, size_divisor=size_divisor)
    unfolded = build_model(recipe, size_divisor=size_divisor)
    unfolded.load_state_dict(folded.state_dict())
    unfolded.backbone.forward = types.MethodType(unfolded_forward, unfolded.backbone)
    return {"folded": folded, "unfolded": unfolded}


def main() -> None:
    use_retaining_malloc()
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=640,
                        help="square training images, a multiple of 32")
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--eval-size", type=int, nargs=2, default=[800, 1344], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    size = args.size
    images = torch.randn(args.batch, 3, size, size, generator=gen)
    targets = [{"boxes": random_boxes(args.boxes, size, size, gen),
                "labels": torch.randint(0, NUM_CLASSES, (args.boxes,), generator=gen),
                "image_size": (size, size)} for _ in range(args.batch)]
    models = build_pair()
    steps = {}
    for name, model in models.items():
        model.train()
        steps[name] = train_step(model, lambda m=model: m(images, targets))[0]
    train_times = time_alternating(steps, repeats=args.repeats)

    height, width = args.eval_size
    eval_images = torch.randn(1, 3, height, width, generator=gen)
    eval_targets = [{"image_size": (height, width), "orig_size": (height, width)}]

    def infer(model: torch.nn.Module):
        @torch.no_grad()
        def run() -> None:
            model(eval_images, eval_targets)
        return run

    eval_times = time_alternating({n: infer(m.eval()) for n, m in models.items()},
                                  repeats=args.repeats)
    print(f"machine: {machine()}; {allocator_line()}")
    rows = [[f"training step {args.batch}x{size}², {args.boxes} boxes", *row(train_times)],
            [f"inference 1x{height}x{width}", *row(eval_times)]]
    print(markdown_table(["", "folded ms", "unfolded ms", "folded/unfolded"], rows))


def row(times: dict[str, float]) -> list[str]:
    """folded ms, unfolded ms, folded/unfolded."""
    return [f"{times['folded'] * 1e3:.0f}", f"{times['unfolded'] * 1e3:.0f}",
            f"{times['folded'] / times['unfolded']:.3f}"]


if __name__ == "__main__":
    main()
