"""Check a config's datasets before training: every problem at once, what is fixed, what is fatal.

    python tools/check_dataset.py CONFIG [--split train|val|both] [--no-images]
                                  [--max-image-pixels N] [--cfg-options a.b=c ...]

Checks the annotation JSON (structure, ids, categories, boxes) and, unless --no-images, fully
decodes every image (truncated / corrupt files, sizes vs the JSON after EXIF rotation). Also
checks that model.num_classes matches the categories and that train and val share them.
Training with the same data fixes the fixable problems in memory (files are never modified).

Exit code: 0 usable (possibly with fixes/warnings), 1 fatal problems, 2 invalid config.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from gfldet.config import Config, load_config_or_exit

if TYPE_CHECKING:
    from gfldet.data.checks import DatasetReport

# Keep in step with gfldet.data.coco.DEFAULT_MAX_IMAGE_PIXELS (a test checks it); not imported
# from there because that pulls in torch, and a config error should be reported at once.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--split", choices=("train", "val", "both"), default="both")
    parser.add_argument("--no-images", action="store_true",
                        help="check the JSON and that files exist, without decoding images (fast)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"largest width*height accepted (default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. data.train.images=/data/imgs")
    return parser.parse_args(argv)


def cross_checks(cfg: Config, reports: dict[str, DatasetReport]) -> list[str]:
    """Problems between the config and the splits (each split's own check cannot see them)."""
    problems = []
    cats = {split: sorted((c.get("id"), c.get("name")) for c in r.categories)
            for split, r in reports.items() if r.categories}
    for split, pairs in cats.items():
        if len(pairs) != cfg.model.num_classes:
            problems.append(f"model.num_classes is {cfg.model.num_classes} but the {split} "
                            f"annotations have {len(pairs)} categories; set model.num_classes: "
                            f"{len(pairs)}")
    if "train" in cats and "val" in cats and cats["train"] != cats["val"]:
        only_train = sorted(set(cats["train"]) - set(cats["val"]))
        only_val = sorted(set(cats["val"]) - set(cats["train"]))
        problems.append("train and val categories differ (labels would not mean the same class): "
                        f"only in train {only_train}, only in val {only_val}; use one categories list")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_or_exit(args.config, args.cfg_options)
    # Imported only now: these pull in torch (seconds), which a bad config need not wait for.
    from gfldet.data.checks import check_dataset
    from gfldet.engine.build import dataset_paths

    splits = ("train", "val") if args.split == "both" else (args.split,)
    reports: dict[str, DatasetReport] = {}
    for split in splits:
        paths = dataset_paths(cfg.data, split)
        report = check_dataset(
            paths.images, paths.annotations, fix=True, check_images=not args.no_images,
            max_bad_image_fraction=cfg.train.max_decode_failures,
            max_image_pixels=args.max_image_pixels,
        )
        reports[split] = report
        print(f"[{split}] {report.summary()}\n")
    problems = cross_checks(cfg, reports)
    if problems:
        print("FATAL (config vs data):")
        print("\n".join(f"  - {p}" for p in problems))
    usable = not problems and all(r.ok for r in reports.values())
    print("all checked splits are usable" if usable else "NOT usable: fix the FATAL problems above")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
