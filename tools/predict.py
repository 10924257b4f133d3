"""Detect objects in images, folders of images or globs; draw them and write them as JSON.

    python tools/predict.py CHECKPOINT INPUT [INPUT ...] [--out DIR] [--score-thr 0.3]
    python tools/predict.py work_dirs/demo_synthetic_cpu/best.pth "data/synthetic/val/*.jpg"
    python tools/predict.py work_dirs/demo_synthetic_cpu/best.pth photos/*.jpg more/  # several
    python tools/predict.py CONFIG CHECKPOINT INPUT...   # a YAML config, not the checkpoint's own

The CONFIG is told apart by its .yaml/.yml name (or by the checkpoint after it); every argument
after the checkpoint is an INPUT: an image, a folder (its images) or a glob. A checkpoint or a
config among the INPUTs is refused, as is a checkpoint where the CONFIG goes.

For each image NAME.ext, writes DIR/NAME.ext (boxes, class names and scores drawn) and
DIR/NAME.json: {"image", "width", "height", "detections": [{"box": [x1, y1, x2, y2] (pixels
of the original image), "score", "label", "class_name"}, ...]} ordered by score.

Only files predict wrote (a NAME.ext with its NAME.json record beside it) are replaced: a DIR
holding other files of those names, or one of the input images, is refused before anything is
written. An image that cannot be read is skipped and named at the end (exit code 2).
Predict runs in fp32: --cfg-options train.* (train.amp, ...) is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from gfldet.config import ConfigError, load_config
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


def output_files(out: Path, paths: list[Path]) -> list[tuple[Path, Path]]:
    """(drawn image, JSON record) that predict writes for each input image."""
    files = []
    for path, name in zip(paths, output_names(paths), strict=True):
        suffix = path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
        files.append((out / f"{name}{suffix}", out / f"{name}.json"))
    return files


def _written_by_predict(record: Path) -> bool:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"image", "detections"} <= data.keys()


def check_outputs(out: Path, paths: list[Path], files: list[tuple[Path, Path]]) -> None:
    """FileExistsError saying why when writing `files` into `out` would replace a user's file."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder; give predict a folder to "
                              "write into")
    inputs = {p.resolve() for p in paths}
    overwritten = [str(f) for pair in files for f in pair if f.resolve() in inputs]
    if overwritten:
        raise FileExistsError(f"--out {out} would overwrite input images "
                              f"({', '.join(overwritten[:5])}); write the drawn images to another "
                              "folder")
    foreign = [str(f) for image, record in files for f in (image, record)
               if f.exists() and not (record.is_file() and _written_by_predict(record))]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise FileExistsError(f"--out {out} holds files predict did not write, which it would "
                              f"replace: {', '.join(foreign[:5])}{more}; choose another --out "
                              "folder")


def score_threshold(text: str) -> float:
    """--score-thr: a float in [0, 1], the range of the detections' scores."""
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text} is outside 0..1, the range of the scores")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Two positionals for the usage line "[CONFIG] CHECKPOINT INPUT [INPUT ...]"; which leading
    # argument is the config is decided by split_config_argument.
    parser.add_argument("checkpoint", metavar="[CONFIG] CHECKPOINT",
                        help="a gfldet checkpoint (training, exported or converted), optionally "
                             "preceded by a YAML config to use instead of its own")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="images, folders of images, or globs such as 'photos/*.jpg' "
                             "(quoted, or expanded by the shell)")
    parser.add_argument("--out", default="outputs/predict",
                        help="output folder (default: outputs/predict)")
    parser.add_argument("--score-thr", type=score_threshold, default=0.3,
                        help="draw and keep detections above this score, in 0..1 (default: 0.3)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw weights even if EMA weights exist")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    # Predict runs in fp32 (as Detector does): a train.amp=bf16 here would be ignored silently.
    train_options = [o for o in args.cfg_options if o.partition("=")[0].strip()
                     .split(".")[0] == "train"]
    if train_options:
        parser.error(f"--cfg-options {' '.join(train_options)}: predict runs in fp32 and reads "
                     "no train.* setting; train.amp applies to training and tools/eval.py")
    try:
        config, (checkpoint, *sources) = split_config_argument(
            [args.checkpoint, *args.inputs], ["CHECKPOINT", "INPUT"], repeat_last=True)
    except ValueError as err:
        parser.error(str(err))
    device = default_device(args.device)
    known = re.fullmatch(r"cpu|cuda(:\d+)?", device)
    if not known or (device != "cpu" and not torch.cuda.is_available()):
        print(f"error: --device {args.device}: not available here; use auto or cpu",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        cfg = load_config(config, args.cfg_options) if config else None  # before the checkpoint
        # In the order given, each image once (a folder and a glob may both hold it).
        paths = list(dict.fromkeys(path for source in sources for path in list_images(source)))
        files = output_files(out, paths)
        check_outputs(out, paths, files)
        detector = Detector.from_checkpoint(
            checkpoint, cfg, device=device, score_thr=args.score_thr,
            use_ema=not args.no_ema, overrides=() if cfg else args.cfg_options,
        )
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = 0
    unreadable = []
    for path, (drawn, record_file) in zip(paths, files, strict=True):
        try:
            image = to_rgb_array(path)
        except Exception as err:  # PIL raises many types for a bad file (OSError, SyntaxError, ...)
            unreadable.append(f"{path}: {type(err).__name__}: {err}")
            continue
        det = detector(image)
        draw_detections(image, det).save(drawn)
        record = {"image": str(path), "width": image.shape[1], "height": image.shape[0],
                  "detections": detections_to_json(det)}
        record_file.write_text(json.dumps(record, indent=1))
        total += len(det["scores"])
    seconds = time.perf_counter() - start
    done = len(paths) - len(unreadable)
    print(f"{done} image(s), {total} detection(s) above {args.score_thr} in {seconds:.1f} s -> "
          f"{out}")
    if unreadable:
        more = f"; ... and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
        print(f"error: {len(unreadable)} of {len(paths)} image(s) could not be read (nothing "
              "written for them): " + "; ".join(unreadable[:10]) + more, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
