"""Convert an MMDetection GFL checkpoint (ResNet + FPN + GFLHead) into a gfldet checkpoint, or an
official GFLv2 one (implus/GFocalV2 `GFocalHead`: DGQP, 81-channel gfl_cls; gfldet.convert_mmdet).

    python tools/convert_mmdet.py gfl_r50_fpn_1x_coco_20200629_121244-25944287.pth \\
        checkpoints/gfl_r50_fpn_1x_coco.pth [--config configs/gfl_r50_fpn_1x_coco.yaml]
    python tools/eval.py configs/gfl_r50_fpn_1x_coco.yaml checkpoints/gfl_r50_fpn_1x_coco.pth

gfldet's modules carry MMDetection's names, so every MMDetection key is its own gfldet key
(`bbox_head.` read as `head.`) except for the short table in gfldet/convert_mmdet.py. Every
MMDetection key must land on exactly one gfldet key with the same shape (or be one of the keys
dropped on purpose: the Integral's `project` bins, a classifier `fc`), and every gfldet key must
be filled; otherwise nothing is written and the offending keys are listed (exit 1), as for a
gfldet checkpoint (said to be one: it is used as it is). Without --config the model (depth,
channels, classes) is inferred from the file; the class names come from its meta, and one line
says how many and from which key, or what the detections will be named. A file that is missing,
damaged or unsafe, an OUT folder, or an existing OUT (without --overwrite): a message, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gfldet.config import load_config_or_exit
from gfldet.convert_mmdet import ConversionError, convert_checkpoint
from gfldet.engine.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mmdet_checkpoint", help="MMDetection GFL checkpoint (.pth)")
    parser.add_argument("out", help="gfldet checkpoint to write (.pth)")
    parser.add_argument(
        "--config", help="gfldet config describing the same model (default: inferred from the file)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    args = parser.parse_args(argv)
    # A bad config: status 2, like every tool.
    cfg = load_config_or_exit(args.config) if args.config else None
    if Path(args.out).is_dir():  # --overwrite replaces a file, never a folder
        example = Path(args.out) / f"{Path(args.mmdet_checkpoint).stem}_gfldet.pth"
        print(f"error: OUT {args.out} is a folder; give a file name (e.g. {example})",
              file=sys.stderr)
        return 2
    if Path(args.out).exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it, or give another OUT",
              file=sys.stderr)
        return 2
    if Path(args.out).resolve() == Path(args.mmdet_checkpoint).resolve():
        print(f"error: OUT {args.out} is the MMDetection checkpoint itself; give another OUT",
              file=sys.stderr)
        return 2
    try:
        out, report, cfg = convert_checkpoint(args.mmdet_checkpoint, args.out, cfg)
    except ConversionError as err:  # a readable file whose keys do not map: exit 1, as documented
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = cfg.model
    print(
        f"wrote {out}: ResNet-{m.backbone.depth} FPN({m.fpn.out_channels}) GFL head "
        f"({m.head.stacked_convs} x {m.head.feat_channels} ch, {m.head.norm}, "
        f"reg_max {m.head.reg_max}), "
        f"{m.num_classes} classes"
    )
    print(f"mapped {report.mapped} tensors; dropped {report.dropped or 'nothing'}")
    if (dgqp := m.head.dgqp) is not None:
        print(f"GFLv2: DGQP (top-{dgqp.topk}{' + mean' if dgqp.add_mean else ''}, "
              f"{dgqp.channels} channels)")
    if report.sliced:
        print("dropped the official GFLv2 background class channel (trained to 0, no class): "
              + "; ".join(report.sliced))
    print(report.class_names)
    if report.filled:
        print(f"filled {len(report.filled)} BatchNorm num_batches_tracked counters absent from "
              "the file with 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
