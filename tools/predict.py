"""Detect objects in an image, a folder of images or a glob; draw them and write them as JSON.

    python tools/predict.py CHECKPOINT INPUT [--out DIR] [--score-thr 0.3]
    python tools/predict.py work_dirs/demo_synthetic_cpu/best.pth "data/synthetic/val/*.jpg"
    python tools/predict.py CONFIG CHECKPOINT INPUT      # a YAML config instead of the checkpoint's own

For each image NAME.ext, writes DIR/NAME.ext (boxes, class names and scores drawn) and
DIR/NAME.json: {"image", "width", "height", "detections": [{"box": [x1, y1, x2, y2] (pixels
of the original image), "score", "label", "class_name"}, ...]} ordered by score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gfldet.config import ConfigError
from gfldet.engine.checkpoint import CheckpointError
from gfldet.inference import (
    Detector,
    default_device,
    detections_to_json,
    draw_detections,
    list_images,
    split_config_argument,
    to_rgb_array,
)


def output_names(paths: list[Path]) -> list[str]:
    """A distinct output stem per image (a glob may match equal names in different folders)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT INPUT",
                        help="a gfldet checkpoint (training, exported or converted), optionally preceded by a "
                             "YAML config to use instead of its own, then an image, a folder of images, or a "
                             "glob such as 'photos/*.jpg' (quoted)")
    parser.add_argument("--out", default="outputs/predict", help="output folder (default: outputs/predict)")
    parser.add_argument("--score-thr", type=float, default=0.3, help="draw and keep detections above this score")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA weights exist")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config, (checkpoint, source) = split_config_argument(args.paths, ["CHECKPOINT", "INPUT"])
    except ValueError as err:
        parser.error(str(err))
    try:
        paths = list_images(source)
        detector = Detector.from_checkpoint(
            checkpoint, config, device=default_device(args.device), score_thr=args.score_thr,
            use_ema=not args.no_ema, overrides=args.cfg_options,
        )
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = 0
    for path, name in zip(paths, output_names(paths), strict=True):
        image = to_rgb_array(path)
        det = detector(image)
        suffix = path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
        draw_detections(image, det).save(out / f"{name}{suffix}")
        record = {"image": str(path), "width": image.shape[1], "height": image.shape[0],
                  "detections": detections_to_json(det)}
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
        total += len(det["scores"])
    seconds = time.perf_counter() - start
    print(f"{len(paths)} image(s), {total} detection(s) above {args.score_thr} in {seconds:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
