"""Check a config's datasets before training: every problem at once, what is fixed, what is fatal.

    python tools/check_dataset.py CONFIG [--split train|val|both] [--no-images]
                                  [--max-image-pixels N] [--cfg-options a.b=c ...]

Checks the annotation JSON (structure, ids, categories, boxes) and, unless --no-images, fully
decodes every image (truncated / corrupt files, sizes vs the JSON after EXIF rotation). Also
checks that model.num_classes matches the categories and that train and val share them (and warns
when val is the train file), and names each training image that training leaves out (no usable
box, a side below data.min_size).
Training with the same data fixes the fixable problems in memory (files are never modified);
evaluation scores the val file as written, leaving out only its unreadable images.

Exit code: 0 usable (possibly with fixes/warnings), 1 fatal problems, 2 invalid config.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from gfldet.config import load_config_or_exit

if TYPE_CHECKING:
    from gfldet.data.checks import DatasetReport

# Keep in step with gfldet.data.images.DEFAULT_MAX_IMAGE_PIXELS (a test checks it); not imported
# from there because that pulls in torch, and a config error should be reported at once.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--split", choices=("train", "val", "both"), default="both")
    parser.add_argument("--no-images", action="store_true",
                        help="check the JSON and that files exist, without decoding images (fast)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="largest width*height accepted "
                        f"(default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. data.train.images=/data/imgs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_or_exit(args.config, args.cfg_options)
    # Imported only now: these pull in torch (seconds), which a bad config need not wait for.
    from gfldet.data.checks import check_dataset, split_problems, split_warnings
    from gfldet.data.index import (
        describe_left_out,
        images_left_out_of_training,
        no_training_images_left,
    )
    from gfldet.engine.build import dataset_paths

    splits = ("train", "val") if args.split == "both" else (args.split,)
    reports: dict[str, DatasetReport] = {}
    for split in splits:
        paths = dataset_paths(cfg.data, split)
        report = check_dataset(
            paths.images, paths.annotations, fix=True, check_images=not args.no_images,
            max_bad_image_fraction=cfg.train.max_decode_failures,
            max_image_pixels=args.max_image_pixels, split=split, evaluation=split == "val",
        )
        reports[split] = report
        print(f"[{split}] {report.summary()}\n")
    problems = split_problems(cfg.model.num_classes, reports)
    train = reports.get("train")
    if train is not None and train.annotations is not None and cfg.data.filter_empty:
        # Named as training names them (gfldet.data.coco): the same rules, the same line.
        left_out = images_left_out_of_training(train.annotations, cfg.data.min_size)
        total = len(train.annotations["images"])
        if left_out:
            print(f"[train] {describe_left_out(left_out, total, 'training')}\n")
        if len(left_out) == total:
            problems.append(no_training_images_left(train.ann_file, left_out, total))
    remarks = split_warnings(reports)
    if remarks:
        print("warnings (train vs val):")
        print("\n".join(f"  - {r}" for r in remarks) + "\n")
    if problems:
        print("FATAL (config vs data):")
        print("\n".join(f"  - {p}" for p in problems))
    usable = not problems and all(r.ok for r in reports.values())
    print("all checked splits are usable" if usable else "NOT usable: fix the FATAL problems above")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
