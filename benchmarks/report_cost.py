"""What the evaluation report costs beside the evaluation itself, for one checkpoint's val split.

    python benchmarks/report_cost.py CHECKPOINT [--repeats 3] [--warmup 1] [--cfg-options K=V ...]

Entrants, alternately in one process (`common.time_alternating`, medians): "evaluate" is
`gfldet.engine.evaluator.evaluate` (predict every val image, then pycocotools' evaluate /
accumulate / summarize and the per-class table), "report" is `write_report` on the COCOeval that
evaluation returns (matching, confusion matrix, TIDE, every figure and the worst images drawn,
the page). Each report goes to a fresh temporary folder; training curves are drawn when the
checkpoint's folder holds scalars.jsonl, as tools/eval.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import torch
from common import machine, markdown_table, time_alternating

from gfldet.data import build_dataloader
from gfldet.engine.build import build_dataset
from gfldet.engine.checkpoint import load_checkpoint
from gfldet.engine.evaluator import evaluate
from gfldet.engine.precision import resolve_precision
from gfldet.inference import config_for_checkpoint, load_inference_model
from gfldet.report import post_processing_settings, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    state = load_checkpoint(args.checkpoint)
    cfg = config_for_checkpoint(state, None, args.checkpoint, args.cfg_options)
    dataset = build_dataset(cfg, "val")
    device = torch.device("cpu")
    precision = resolve_precision(cfg.train.amp, device)
    model = load_inference_model(cfg, state, args.checkpoint)
    loader = build_dataloader(dataset, cfg.data.val_batch_size, cfg.data.num_workers,
                              train=False, seed=cfg.train.seed, distributed=False,
                              size_divisor=cfg.data.size_divisor)
    run_dir = Path(args.checkpoint).parent
    latest: dict = {}
    out = Path(tempfile.mkdtemp(prefix="report_cost_"))

    def run_evaluate() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            latest["metrics"] = evaluate(model, loader, device, precision.dtype,
                                         keep_coco_eval=True)

    def run_report() -> None:
        if "metrics" not in latest:
            run_evaluate()
        folder = out / f"r{len(list(out.iterdir()))}"
        write_report(folder, latest["metrics"]["coco_eval"], dataset.class_names, dataset.image_dir,
                     thresholds=post_processing_settings(cfg.model.test),
                     run_dir=run_dir if (run_dir / "scalars.jsonl").is_file() else None)

    seconds = time_alternating({"evaluate": run_evaluate, "report": run_report}, args.repeats,
                               args.warmup)
    metrics = latest["metrics"]
    print(machine() + f"; precision {precision.name}")
    print(markdown_table(
        ["val images", "detections", "box AP", "evaluate s", "report s", "report / evaluate"],
        [[len(dataset), len(metrics["detections"]), f"{metrics['bbox_mAP']:.3f}",
          f"{seconds['evaluate']:.2f}", f"{seconds['report']:.2f}",
          f"{seconds['report'] / seconds['evaluate']:.2f}"]]))
    print(f"reports in {out}")


if __name__ == "__main__":
    main()
