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
from gfldet.engine.build import build_dataset, build_model
from gfldet.engine.checkpoint import load_checkpoint, load_model_weights
from gfldet.engine.coco_eval import write_metrics_json
from gfldet.engine.evaluator import evaluate
from gfldet.engine.trainer import amp_dtype, init_distributed, setup_logging


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
    if args.backend == "faster_coco_eval":  # fail now, not after predicting the whole val set
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            parser.error("--backend faster_coco_eval needs the faster-coco-eval package: pip install faster-coco-eval")
    cfg = load_config_or_exit(args.config, args.cfg_options)
    device = init_distributed(cfg.train.device)
    setup_logging(None)
    dataset = build_dataset(cfg, "val")
    loader = build_dataloader(dataset, cfg.data.val_batch_size, cfg.data.num_workers, train=False,
                              seed=cfg.train.seed, distributed=is_distributed(), size_divisor=cfg.data.size_divisor)
    cfg.model.backbone.weights = None  # every weight comes from the checkpoint: no ImageNet download
    model = build_model(cfg.model)
    state = load_checkpoint(args.checkpoint)
    weights = state.get("model", state)
    if state.get("ema") is not None and not args.no_ema:
        # AveragedModel's state dict: "module." + the model's keys, plus its update counter.
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    load_model_weights(model, weights, strict=True)
    model = model.to(device)
    if cfg.train.channels_last:  # the memory format training evaluated in: same bf16 round-off, same AP
        model = model.to(memory_format=torch.channels_last)
    metrics = evaluate(model, loader, device, amp_dtype(cfg, device), backend=args.backend,
                       channels_last=cfg.train.channels_last)
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
