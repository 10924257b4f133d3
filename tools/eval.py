"""Evaluate a checkpoint's COCO box AP on the config's val set.

    python tools/eval.py CONFIG CHECKPOINT [--out DETECTIONS.json] [--backend faster_coco_eval] [--cfg-options ...]
    torchrun --nproc_per_node 8 tools/eval.py CONFIG CHECKPOINT

Prints the 12-line COCO summary and a per-class AP table; writes the metrics as JSON beside
the checkpoint (or to --metrics) and the detections in COCO result format to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gfldet.config import load_config_or_exit
from gfldet.data import build_dataloader
from gfldet.distributed import is_distributed, is_main_process
from gfldet.engine.build import build_dataset
from gfldet.engine.checkpoint import load_checkpoint, load_model_weights
from gfldet.engine.coco_eval import check_backend, write_metrics_json
from gfldet.engine.evaluator import evaluate
from gfldet.engine.trainer import amp_dtype, init_distributed, setup_logging
from gfldet.inference import build_inference_model, model_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--out", help="write the detections (COCO result json) here")
    parser.add_argument("--metrics", help="metrics json path (default: <checkpoint>.metrics.json)")
    parser.add_argument("--backend", choices=["pycocotools", "faster_coco_eval"], default="pycocotools",
                        help="COCO scorer: pycocotools (default) or faster-coco-eval (pip install "
                             "faster-coco-eval; same numbers, several times faster on COCO-sized sets)")
    parser.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even if EMA weights exist")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:  # fail now, not after predicting the whole val set
        check_backend(args.backend)
    except ImportError as err:
        parser.error(str(err))
    cfg = load_config_or_exit(args.config, args.cfg_options)
    device = init_distributed(cfg.train.device)
    setup_logging(None)
    dataset = build_dataset(cfg, "val")
    loader = build_dataloader(dataset, cfg.data.val_batch_size, cfg.data.num_workers, train=False,
                              seed=cfg.train.seed, distributed=is_distributed(), size_divisor=cfg.data.size_divisor)
    model = build_inference_model(cfg)  # every weight comes from the checkpoint: no ImageNet download
    state = load_checkpoint(args.checkpoint)
    load_model_weights(model, model_weights(state, use_ema=not args.no_ema, source=args.checkpoint), strict=True)
    model = model.to(device)
    if cfg.train.channels_last:  # the weights' format training evaluated with: same bf16 round-off, same AP
        model = model.to(memory_format=torch.channels_last)
    metrics = evaluate(model, loader, device, amp_dtype(cfg, device), backend=args.backend)
    if is_main_process():
        detections = metrics.pop("detections")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(detections))
        metrics_path = Path(args.metrics or f"{args.checkpoint}.metrics.json")
        write_metrics_json(metrics, metrics_path)
        print(f"bbox AP: {metrics['bbox_mAP']:.4f} (metrics in {metrics_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
