"""Run a detector over a dataset and score it with COCO AP (gathered on rank 0 under torchrun).

An image that cannot be read is left out of the score, not counted as missed: its ground truth
is not scored (it is not among COCOeval's `params.imgIds`), and the log and the metrics
(`images_left_out`) name it. Such images are found by the dataset check before evaluation
(`CocoDetection.left_out`) or, when a file breaks later, by the decode that fails.

`evaluate_checkpoint` is tools/eval.py from Python: a checkpoint in, its metrics out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfldet.config import Config, ConfigError
from gfldet.data import build_dataloader, normalize_batch
from gfldet.data.images import DatasetError
from gfldet.data.index import describe_left_out
from gfldet.distributed import all_gather_objects, is_distributed, is_main_process
from gfldet.engine.build import build_dataset
from gfldet.engine.checkpoint import load_checkpoint
from gfldet.engine.coco_eval import (
    Backend,
    check_backend,
    detections_to_coco,
    evaluate_coco,
    format_per_class_table,
)
from gfldet.engine.precision import resolve_precision
from gfldet.inference import (
    PYTHON_CONFIG,
    config_for_checkpoint,
    load_inference_model,
    resolve_device,
)

log = logging.getLogger("gfldet")


@torch.no_grad()
def predict_dataset(model: nn.Module, loader, device: torch.device,
                    amp_dtype: torch.dtype | None = None) -> tuple[list[dict], dict[int, str]]:
    """COCO-format detections of this process's share of the loader's dataset, and the images
    that failed to decode (image id -> "file (image id N): error"). The convolutions follow the
    memory format of the model's weights (train.channels_last), whatever the images'."""
    model.eval()
    detections: list[dict] = []
    failed: dict[int, str] = {}
    for images, targets in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            images = normalize_batch(images.to(device, non_blocking=True),
                                     [t["image_size"] for t in targets])
            results = model(images, targets)
        # An image that failed to decode was replaced by another one (logged by the dataset);
        # its detections would count twice, so they are left out.
        for t in targets:
            for f in t.get("decode_failed", []):
                failed[f["image_id"]] = f"{f['file']} (image id {f['image_id']}): {f['error']}"
        kept = [i for i, t in enumerate(targets) if not t.get("decode_failed")]
        results = [{k: v.float().cpu() if v.is_floating_point() else v.cpu()
                    for k, v in results[i].items()} for i in kept]
        detections += detections_to_coco(results, [targets[i]["image_id"] for i in kept],
                                         loader.dataset.label_to_cat_id)
    return detections, failed


def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             backend: Backend = "pycocotools", keep_coco_eval: bool = False) -> dict:
    """COCO box AP of `model` on the loader's dataset. Every process predicts its share; rank 0
    gathers, scores with `backend` (pycocotools, or faster_coco_eval: same numbers, faster),
    prints the 12-line summary and the per-class table, and returns the metrics (other ranks
    return {}); with `keep_coco_eval`, the scorer's COCOeval as `metrics["coco_eval"]`."""
    gathered = all_gather_objects(predict_dataset(model, loader, device, amp_dtype))
    if not is_main_process():
        return {}
    all_detections = [d for part, _ in gathered for d in part]
    failed = {i: why for _, part in gathered for i, why in part.items()}
    dataset = loader.dataset
    left_out = dataset.left_out + [failed[i] for i in sorted(failed)]
    if left_out:
        log.warning("%s (their ground truth is not scored)",
                    describe_left_out(left_out, dataset.num_images_in_file, "the evaluation"))
    metrics = evaluate_coco(dataset.ground_truth(), all_detections, dataset.class_names,
                            backend=backend,
                            image_ids=[i for i in dataset.image_ids.tolist() if i not in failed],
                            keep_eval=keep_coco_eval)
    log.info("per-class AP:\n%s", format_per_class_table(metrics["per_class"]))
    metrics["images_left_out"] = left_out
    metrics["detections"] = all_detections
    return metrics


OVERRIDES_ADVICE = "overrides=['data.val.images=DIR', 'data.val.annotations=FILE']"


@dataclass
class CheckpointEvaluation:
    """What `evaluate_checkpoint` returns; under torchrun, ranks other than 0 get metrics {} and
    detections []."""

    metrics: dict[str, Any]  # bbox_mAP ... AR_100, per_class, images_left_out (as eval.py writes)
    detections: list[dict]  # COCO result format
    coco_eval: Any  # the scorer's COCOeval with keep_coco_eval (gfldet.report reads it), else None
    cfg: Config  # the config evaluated, overrides applied
    state: dict[str, Any]  # the loaded checkpoint
    dataset: Any  # the checked val set (a CocoDetection)


def evaluate_checkpoint(checkpoint: str | Path, config: Config | str | Path | None = None,
                        overrides: Sequence[str] = (), *, device: str | torch.device = "auto",
                        use_ema: bool = True, backend: Backend = "pycocotools",
                        keep_coco_eval: bool = False,
                        how_to_override: str = OVERRIDES_ADVICE) -> CheckpointEvaluation:
    """COCO box AP of `checkpoint` on its config's val set, computed as tools/eval.py does (which
    calls this): the precision of `train.amp` (bf16 where training used it), `channels_last` as
    configured, EMA weights unless `use_ema=False`.

    config: a YAML path or a Config; by default the config stored in the checkpoint.
    overrides: ``a.b=c`` items merged onto it (as --cfg-options), e.g. other val files.
    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N" or a torch.device.
    how_to_override: how a fatal val set problem's message says to name other files.

    Raises ConfigError, FileNotFoundError (no such checkpoint), CheckpointError, or DatasetError
    (nothing was evaluated: the val set has a fatal problem, or other classes than the
    checkpoint's). Sets up no logging and no process
    group: under torchrun, with one initialised, each rank predicts its share and rank 0 scores.
    """
    check_backend(backend)  # fail now, not after predicting the whole val set
    try:
        device = resolve_device(device)
    except ValueError as err:  # CUDA not here: a setting to change, as train() words it
        raise ConfigError(str(err)) from None
    checkpoint = str(checkpoint)
    named = PYTHON_CONFIG if isinstance(config, Config) else config
    cfg = dataset = None
    # A YAML config and its val split are checked before the (large) checkpoint is read.
    if config is not None:
        cfg = config_for_checkpoint({}, config, checkpoint, overrides)
        dataset = _val_set(cfg, str(named), how_to_override)
    state = load_checkpoint(checkpoint)
    if cfg is None:
        cfg = config_for_checkpoint(state, None, checkpoint, overrides)
        dataset = _val_set(cfg, f"{checkpoint}'s stored config", how_to_override)
    check_same_classes(state, checkpoint, dataset)
    precision = resolve_precision(cfg.train.amp, device)
    log.info("config: %s; precision: %s (%s)", named or f"{checkpoint} (stored config)",
             precision.name, precision.reason)
    if precision.warning:
        log.warning("%s", precision.warning)
    # Every weight from the checkpoint: no ImageNet download.
    model = load_inference_model(cfg, state, checkpoint, use_ema=use_ema).to(device)
    if cfg.train.channels_last:  # the format training evaluated with: same bf16 round-off and AP
        model = model.to(memory_format=torch.channels_last)
    loader = build_dataloader(dataset, cfg.data.val_batch_size, cfg.data.num_workers,
                              train=False, seed=cfg.train.seed, distributed=is_distributed(),
                              size_divisor=cfg.data.size_divisor)
    metrics = evaluate(model, loader, device, precision.dtype, backend=backend,
                       keep_coco_eval=keep_coco_eval)
    detections, coco_eval = metrics.pop("detections", []), metrics.pop("coco_eval", None)
    return CheckpointEvaluation(metrics, detections, coco_eval, cfg, state, dataset)


def _val_set(cfg: Config, source: str, how_to_override: str):
    """The checked val set; a fatal problem says that nothing was evaluated and how to name
    other files."""
    return build_dataset(
        cfg, "val", not_done="nothing was evaluated",
        advice=f"The val paths come from {source} (relative ones from the current folder); give "
               f"others with {how_to_override}.")


def check_same_classes(state: dict, checkpoint: str, dataset) -> None:
    """The val file's classes (in label order: by category id) must be the ones the checkpoint
    was trained on, as training requires of train and val: otherwise each label is scored as
    another class, silently."""
    trained = (state.get("meta") or {}).get("class_names")
    if trained is not None and list(trained) != list(dataset.class_names):
        raise DatasetError(
            f"{checkpoint} was trained on the classes {list(trained)} but {dataset.ann_file} "
            f"lists {list(dataset.class_names)} (in category id order); its labels would be "
            "scored as other classes. Evaluate on annotations with the training categories (the "
            "same names, in the same id order); nothing was evaluated")
