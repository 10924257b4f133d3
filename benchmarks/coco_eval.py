"""Time to score COCO val2017-sized results with gfldet's `evaluate_coco`: pycocotools against
faster-coco-eval (when installed), alternating runs in one process, medians, and the 12 summary
stats of both backends asserted equal to 1e-4.

    python benchmarks/coco_eval.py [--images 5000] [--dets 100] [--repeats 3]

The data are synthetic and built in memory: 5,000 640x480 images with 1-13 (mean 7) boxes of 80
categories, sides log-uniform in 4-400 px so that small, medium and large all occur (COCO
val2017 has ~7.3 boxes per image); detections are every box jittered by up to 10 % of its size
(10 % given a wrong category) plus random false positives up to 100 per image, scores uniform,
higher for the jittered ones. Timed: everything `evaluate_coco` does (loadRes, evaluate,
accumulate, summarize, per-class AP; for faster-coco-eval also its copy of the GT).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

import numpy as np
from common import machine, markdown_table, time_alternating
from pycocotools.coco import COCO

from gfldet.engine.coco_eval import STAT_NAMES, evaluate_coco

WIDTH, HEIGHT, NUM_CATEGORIES = 640, 480, 80


def random_xywh(rng: np.random.Generator, n: int) -> np.ndarray:
    wh = np.exp(rng.uniform(np.log(4), np.log(400), size=(n, 2)))
    wh = np.minimum(wh, [WIDTH, HEIGHT])
    xy = rng.uniform(0, 1, size=(n, 2)) * ([WIDTH, HEIGHT] - wh)
    return np.concatenate([xy, wh], axis=1)


def make_data(num_images: int, dets_per_image: int,
              seed: int = 0) -> tuple[COCO, list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": WIDTH, "height": HEIGHT, "file_name": f"{i:012d}.jpg"}
              for i in range(1, num_images + 1)]
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"}
                  for c in range(1, NUM_CATEGORIES + 1)]
    annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    for image_id in range(1, num_images + 1):
        num_gt = int(rng.integers(1, 14))
        gt = random_xywh(rng, num_gt)
        cats = rng.integers(1, NUM_CATEGORIES + 1, size=num_gt)
        for box, cat in zip(gt, cats, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(cat), "bbox": box.round(2).tolist(),
                                "area": float(box[2] * box[3]), "iscrowd": 0})
        # True positives (mostly): each box jittered; false positives fill up to dets_per_image.
        jitter = gt + rng.uniform(-0.1, 0.1, size=gt.shape) * gt[:, [2, 3, 2, 3]]
        wrong = rng.random(num_gt) < 0.1
        tp_cats = np.where(wrong, rng.integers(1, NUM_CATEGORIES + 1, size=num_gt), cats)
        num_fp = dets_per_image - num_gt
        boxes = np.concatenate([jitter, random_xywh(rng, num_fp)])
        det_cats = np.concatenate([tp_cats, rng.integers(1, NUM_CATEGORIES + 1, size=num_fp)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, num_gt), rng.uniform(0.0, 0.7, num_fp)])
        detections.extend(
            {"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
            for b, c, s in zip(boxes.round(3).tolist(), det_cats, scores, strict=True))
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index..."
        coco.createIndex()
    return coco, detections


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image (>= 13)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    coco, detections = make_data(args.images, args.dets)

    backends = ["pycocotools"]
    try:
        import faster_coco_eval  # noqa: F401

        backends.append("faster_coco_eval")
    except ImportError:
        print("faster-coco-eval is not installed: pycocotools only (pip install faster-coco-eval)")
    stats: dict[str, list[float]] = {}

    def score(backend: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # both print progress and the summary
            metrics = evaluate_coco(coco, detections, backend=backend)
        stats[backend] = [metrics[name] for name in STAT_NAMES]

    # Each run takes seconds to minutes and has no lazy set-up worth warming: no warm-up.
    t = time_alternating({b: (lambda b=b: score(b)) for b in backends}, repeats=args.repeats,
                         warmup=0)
    if len(backends) == 2:
        diff = max(abs(a - b) for a, b in zip(stats["pycocotools"], stats["faster_coco_eval"],
                                              strict=True))
        assert diff <= 1e-4, f"the backends disagree by {diff}: {stats}"
        print(f"stats equal between backends (max abs difference {diff:.1e})")

    print(f"machine: {machine()}; {args.images} images, {len(coco.anns)} boxes, "
          f"{len(detections)} detections")
    print(markdown_table(["backend", "seconds", "vs pycocotools", "bbox_mAP"],
                         [[b, f"{t[b]:.2f}", f"{t[b] / t['pycocotools']:.2f}",
                           f"{stats[b][0]:.4f}"] for b in backends]))


if __name__ == "__main__":
    main()
