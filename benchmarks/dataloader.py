"""Images per second of gfldet's training input pipeline: JPEG decode + train augmentation at the
recipe's resolution (keep-ratio resize to short side 800 / long side <= 1333, horizontal flip) +
padding collate into a uint8 batch, through `build_dataloader` exactly as the trainer builds it,
for 0, 1 and 2 worker processes. Medians over passes; the first pass of each worker count is a
warm-up (it also starts the persistent workers) and is not counted. The normalisation that
follows on the training device (`normalize_batch`) is not part of the loader; its CPU cost per
batch is printed apart (on a GPU it is one elementwise kernel).

    python benchmarks/dataloader.py [--data DIR] [--images 300] [--workers 0 1 2] [--batch 2]
        [--passes 3]

`--data` is a dataset in the synthetic generator's layout (DIR/train/*.jpg and
DIR/annotations/instances_train.json, e.g. data/synthetic). Without it, `--images` synthetic
images are generated into a temporary directory first (not timed), 480-640 px per side so that
decoding costs about what a COCO image (~640x480) does; the bundled default of 256-384 px would
decode ~3x fewer pixels. No model runs: this is the rate the pipeline can feed a training step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, markdown_table, time_alternating

from gfldet.config import DataConfig
from gfldet.data import (
    CocoDetection,
    build_dataloader,
    build_transforms,
    collate,
    generate_synthetic_coco,
    normalize_batch,
)


def pass_seconds(dataset: CocoDetection, workers: int, batch: int, passes: int) -> list[float]:
    """Seconds of each timed pass over the whole dataset (after one warm-up pass)."""
    loader = build_dataloader(dataset, batch_size=batch, num_workers=workers, train=True, seed=0,
                              distributed=False, size_divisor=DataConfig().size_divisor)
    times = []
    for epoch in range(passes + 1):
        loader.batch_sampler.set_epoch(epoch)  # new shuffle and flips each pass, as in training
        start = time.perf_counter()
        seen = sum(len(targets) for _, targets in loader)
        times.append(time.perf_counter() - start)
        assert seen == len(dataset), (seen, len(dataset))
    del loader  # stops the persistent workers before the next worker count starts its own
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset root in the synthetic layout")
    parser.add_argument("--images", type=int, default=300,
                        help="synthetic images to generate without --data")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=2,
                        help="images per batch (the recipe's per-GPU batch)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--short-side", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            paths = generate_synthetic_coco(tmp, num_train=args.images, num_val=0,
                                            image_size=(480, 640))
            image_dir, ann_file = paths["train_images"], paths["train_ann"]
        else:
            image_dir = args.data / "train"
            ann_file = args.data / "annotations" / "instances_train.json"
        transform = build_transforms(True, args.short_side, args.max_size)
        dataset = CocoDetection(image_dir, ann_file, transform=transform, filter_empty=True)

        times = {w: pass_seconds(dataset, w, args.batch, args.passes) for w in args.workers}
        images, targets = collate([dataset[i] for i in range(args.batch)],
                                  size_divisor=DataConfig().size_divisor)
    sizes = [t["image_size"] for t in targets]
    normalise = time_alternating({"normalize": lambda: normalize_batch(images, sizes)},
                                 repeats=7)["normalize"]
    rates = {w: len(dataset) / statistics.median(t) for w, t in times.items()}
    base = rates[args.workers[0]]
    rows = [[w, f"{r:.1f}", f"{1e3 / r:.1f}", f"{min(times[w]):.2f}-{max(times[w]):.2f}",
             f"{r / base:.2f}"] for w, r in rates.items()]

    print(f"machine: {machine()}; {len(dataset)} images from "
          f"{args.data or 'synthetic 480-640 px JPEG'}, train transform "
          f"{args.short_side}/{args.max_size} + flip, batch {args.batch}")
    print(markdown_table(["workers", "images/s", "ms/image", "pass s (min-max)",
                          f"vs {args.workers[0]} workers"], rows))
    print("normalize_batch on this CPU (main process, after the loader): "
          f"{normalise * 1e3:.1f} ms per batch of {args.batch} ({tuple(images.shape)} uint8)")


if __name__ == "__main__":
    main()
