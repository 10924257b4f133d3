"""Run a detector over a dataset and score it with COCO AP (gathered on rank 0 under torchrun).

An image that cannot be read is left out of the score, not counted as missed: its ground truth
is not scored (it is not among COCOeval's `params.imgIds`), and the log and the metrics
(`images_left_out`) name it. Such images are found by the dataset check before evaluation
(`CocoDetection.left_out`) or, when a file breaks later, by the decode that fails.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gfldet.data import normalize_batch
from gfldet.data.index import describe_left_out
from gfldet.distributed import all_gather_objects, is_main_process
from gfldet.engine.coco_eval import (
    Backend,
    detections_to_coco,
    evaluate_coco,
    format_per_class_table,
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
