"""Evaluate a checkpoint's COCO box AP on its config's val set.

    python tools/eval.py CHECKPOINT [--out DETECTIONS.json] [--backend faster_coco_eval]
        [--cfg-options ...]
    python tools/eval.py CHECKPOINT --report DIR    # also an HTML report: DIR/index.html
    python tools/eval.py CONFIG CHECKPOINT          # a YAML config instead of the checkpoint's own
    torchrun --nproc_per_node 8 tools/eval.py CHECKPOINT

A training checkpoint stores the config it was trained with; that config is used unless a YAML
CONFIG is given before the checkpoint. --cfg-options apply to either. Prints the 12-line COCO
summary and a per-class AP table; writes the metrics as JSON beside the checkpoint (or to
--metrics) and the detections in COCO result format to --out.

--report DIR writes the evaluation report (gfldet.report): DIR/index.html with its PNGs beside
it, which opens from the disk. Its training curves come from the checkpoint's run folder when
that holds scalars.jsonl (or from --run-dir). DIR must be new, empty or an earlier report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gfldet.config import ConfigError
from gfldet.data.images import DatasetError
from gfldet.distributed import is_main_process
from gfldet.engine.checkpoint import CheckpointError
from gfldet.engine.coco_eval import check_backend, write_metrics_json
from gfldet.engine.evaluator import evaluate_checkpoint
from gfldet.engine.trainer import init_distributed, setup_logging
from gfldet.inference import split_config_argument


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, usage="%(prog)s [CONFIG] CHECKPOINT "
                                     "[options]  (one checkpoint; --help lists the options)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT",
                        help="a checkpoint, optionally preceded by a YAML config to use instead "
                             "of its own")
    parser.add_argument("--out", help="write the detections (COCO result json) here")
    parser.add_argument("--metrics", help="metrics json path (default: <checkpoint>.metrics.json)")
    parser.add_argument("--backend", choices=["pycocotools", "faster_coco_eval"],
                        default="pycocotools",
                        help="COCO scorer: pycocotools (default) or faster-coco-eval (pip install "
                             "faster-coco-eval; same numbers, several times faster on COCO-sized "
                             "sets)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--no-ema", action="store_true",
                        help="evaluate the raw weights even if EMA weights exist")
    parser.add_argument("--report", metavar="DIR", help="write the HTML evaluation report into DIR")
    parser.add_argument("--run-dir",
                        help="training run folder whose scalars.jsonl the report plots "
                             "(default: the checkpoint's folder, when it holds one)")
    parser.add_argument("--report-score-thr", type=float,
                        help="score of the detections the report draws and counts in its "
                             "confusion matrix and worst-image ranking (default 0.3; AP counts "
                             "every detection)")
    parser.add_argument("--report-images", type=int,
                        help="worst images the report shows (default 12)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    report_options = {"--run-dir": args.run_dir, "--report-score-thr": args.report_score_thr,
                      "--report-images": args.report_images}
    for option, value in report_options.items():
        if value is not None and not args.report:  # it would be ignored without a word
            parser.error(f"{option} sets up the report: give it with --report DIR, or leave it out")
    if args.report_images is not None and args.report_images < 0:
        parser.error(f"--report-images must be >= 0, got {args.report_images}")
    if args.report_score_thr is not None and not 0.0 <= args.report_score_thr <= 1.0:
        parser.error(f"--report-score-thr must be in [0, 1] (the range of the scores), got "
                     f"{args.report_score_thr}")
    if args.report and args.backend != "pycocotools":
        parser.error("--report reads pycocotools' matches; use it with --backend pycocotools "
                     "(the default)")
    try:
        config_path, (checkpoint,) = split_config_argument(args.paths, ["CHECKPOINT"])
        check_backend(args.backend)  # fail now, not after predicting the whole val set
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    run_dir = Path(args.run_dir) if args.run_dir else Path(checkpoint).parent
    try:
        if args.report:  # before the val set is predicted
            from gfldet.report import check_report_dir  # matplotlib only for a report

            check_report_dir(Path(args.report))
            if args.run_dir and not (run_dir / "scalars.jsonl").is_file():
                raise FileNotFoundError(f"--run-dir {run_dir}: no scalars.jsonl there; give a "
                                        "training run folder")
        try:
            device = init_distributed(args.device)
        except RuntimeError as err:  # e.g. --device cuda without CUDA
            raise ConfigError(f"--device {args.device}: {err}") from None
        setup_logging(None)
        result = evaluate_checkpoint(
            checkpoint, config_path, args.cfg_options, device=device, use_ema=not args.no_ema,
            backend=args.backend, keep_coco_eval=bool(args.report),
            how_to_override="--cfg-options data.val.images=DIR data.val.annotations=FILE")
    except (ConfigError, CheckpointError, DatasetError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if is_main_process():
        metrics, dataset = result.metrics, result.dataset
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result.detections))
        metrics_path = Path(args.metrics or f"{checkpoint}.metrics.json")
        write_metrics_json(metrics, metrics_path)
        print(f"bbox AP: {metrics['bbox_mAP']:.4f} (metrics in {metrics_path})")
        if args.report:
            from gfldet.report import post_processing_settings, source_of_checkpoint, write_report

            config = str(config_path or "stored in the checkpoint") + (
                f" with --cfg-options {' '.join(args.cfg_options)}" if args.cfg_options else "")
            source = source_of_checkpoint(result.state, checkpoint) | {
                "config": config, "val_annotations": str(dataset.ann_file)}
            given = {"score_thr": args.report_score_thr, "num_worst": args.report_images}
            index = write_report(args.report, result.coco_eval, dataset.class_names,
                                 dataset.image_dir,
                                 thresholds=post_processing_settings(result.cfg.model.test),
                                 run_dir=run_dir if (run_dir / "scalars.jsonl").is_file() else None,
                                 source=source,
                                 **{k: v for k, v in given.items() if v is not None})
            print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
