"""Overlay the training curves of several runs (each loss term, the learning rate, AP per
evaluation) in one PNG, to compare configs.

    python tools/plot_curves.py work_dirs/run_a work_dirs/run_b [--out curves.png] [--overwrite]

Each RUN_DIR is a training run folder; its `scalars.jsonl` is read. An existing --out file is
kept unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gfldet.report.curves import CurvesError, curves_figure, read_scalars


def run_names(dirs: list[Path]) -> list[str]:
    """Folder names, or the paths as given when two runs share a name (numbered if still equal)."""
    names = [d.name or str(d) for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="training run folders (with scalars.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    dirs = [Path(r) for r in args.runs]
    try:
        if out.is_dir():
            raise FileExistsError(f"--out {out} is a folder; give a .png file name")
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"--out {out} exists; add --overwrite to replace it, or choose "
                                  "another --out")
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {out}: the figure is written as PNG; give a name ending in "
                             ".png")
        runs = {name: read_scalars(d) for name, d in zip(run_names(dirs), dirs, strict=True)}
    except (CurvesError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    curves_figure(runs, out)
    print(f"{len(runs)} run(s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
