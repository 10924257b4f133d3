"""Turn a `Config` into the objects of a run: model, datasets, optimizer, lr schedule.

This is the only module that reads the config tree; everything it builds takes plain arguments.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gfldet.config import Config, DataConfig, ModelConfig, OptimConfig, ScheduleConfig
from gfldet.models import GFL, LossSettings, build_gfl
from gfldet.postprocess import PostProcessSettings

log = logging.getLogger("gfldet")


def build_model(cfg: ModelConfig) -> GFL:
    loss = LossSettings(
        cls_loss=cfg.loss.cls_loss,
        qfl_beta=cfg.loss.qfl_beta,
        focal_alpha=cfg.loss.focal_alpha,
        focal_gamma=cfg.loss.focal_gamma,
        cls_weight=cfg.loss.cls_weight,
        giou_weight=cfg.loss.giou_weight,
        dfl_weight=cfg.loss.dfl_weight,
        topk=cfg.assigner.topk,
    )
    test = PostProcessSettings(cfg.test.score_thr, cfg.test.nms_pre, cfg.test.nms_iou, cfg.test.max_per_img)
    return build_gfl(
        num_classes=cfg.num_classes,
        depth=cfg.backbone.depth,
        backbone_weights=cfg.backbone.weights,
        frozen_stages=cfg.backbone.frozen_stages,
        norm_eval=cfg.backbone.norm_eval,
        fpn_channels=cfg.fpn.out_channels,
        feat_channels=cfg.head.feat_channels,
        stacked_convs=cfg.head.stacked_convs,
        norm=cfg.head.norm,
        reg_max=cfg.head.reg_max,
        box_repr=cfg.loss.box_repr,
        dirac_init_distance=cfg.loss.dirac_init_distance,
        octave_base_scale=cfg.head.octave_base_scale,
        loss=loss,
        test=test,
    )


@dataclass(frozen=True)
class SplitPaths:
    images: Path
    annotations: Path


def dataset_paths(cfg: DataConfig, split: str) -> SplitPaths:
    """Image folder and annotation file of `split` ("train" or "val"); generates the bundled
    synthetic dataset on first use when `data.synthetic` is set (it wins over train/val)."""
    if cfg.synthetic is not None:
        from gfldet.data.synthetic import ensure_synthetic_coco

        paths = ensure_synthetic_coco(
            cfg.synthetic.root,
            num_train=cfg.synthetic.num_train,
            num_val=cfg.synthetic.num_val,
            seed=cfg.synthetic.seed,
            min_object_size=cfg.synthetic.min_object_size,
        )
        return SplitPaths(Path(paths[f"{split}_images"]), Path(paths[f"{split}_ann"]))
    split_cfg = getattr(cfg, split)
    return SplitPaths(Path(split_cfg.images), Path(split_cfg.annotations))


def build_dataset(cfg: Config, split: str):
    from gfldet.data import CocoDetection, build_transforms
    from gfldet.data.checks import ShardedCheck
    from gfldet.distributed import all_gather_objects, get_rank, get_world_size, is_distributed

    d = cfg.data
    paths = dataset_paths(d, split)
    train = split == "train"
    short_side = tuple(d.train_short_side) if train else d.test_short_side
    transform = build_transforms(train=train, short_side=short_side, max_size=d.max_size, flip_prob=d.flip_prob)
    # Training data is checked before any compute is spent (every image decoded; fixable
    # problems fixed and counted, fatal ones raise). Validation data is scored against its file
    # as is, so it is not rewritten.
    dataset = CocoDetection(
        paths.images, paths.annotations, transform,
        filter_empty=d.filter_empty if train else False,
        min_size=d.min_size if train else 0,
        check=train,
        max_decode_failures=cfg.train.max_decode_failures,
        # Under torchrun each process decodes its share of the images for the check.
        check_shard=ShardedCheck(get_rank(), get_world_size(), all_gather_objects) if is_distributed() else None,
    )
    if dataset.num_classes != cfg.model.num_classes:
        from gfldet.config import ConfigError

        raise ConfigError(
            f"model.num_classes is {cfg.model.num_classes} but {paths.annotations} has "
            f"{dataset.num_classes} categories; set model.num_classes: {dataset.num_classes}"
        )
    return dataset


def scaled_lr(cfg: OptimConfig, total_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr grows with the total batch size."""
    if not cfg.scale_lr or total_batch == cfg.reference_batch_size:
        return cfg.lr
    lr = cfg.lr * total_batch / cfg.reference_batch_size
    log.info(
        "lr scaled linearly from %g (for a total batch of %d) to %g for a total batch of %d",
        cfg.lr, cfg.reference_batch_size, lr, total_batch,
    )
    return lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


class LrFactor:
    """lr multiplier at an iteration: linear warmup (mmdet `LinearLR`) times step or cosine decay.

    A plain object of numbers so that `LambdaLR.state_dict()` stores it (and it loads with
    `torch.load(weights_only=True)`).
    """

    def __init__(self, cfg: ScheduleConfig, iters_per_epoch: int) -> None:
        self.policy = cfg.policy
        self.total_iters = cfg.epochs * iters_per_epoch
        self.milestones = [m * iters_per_epoch for m in cfg.milestones]
        self.gamma = cfg.gamma
        self.warmup_iters = cfg.warmup_iters
        self.warmup_ratio = cfg.warmup_ratio
        self.min_lr_ratio = cfg.min_lr_ratio

    def __call__(self, it: int) -> float:
        if self.policy == "step":
            decay = self.gamma ** sum(it >= m for m in self.milestones)
        else:
            progress = min(it / max(self.total_iters, 1), 1.0)
            decay = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if it < self.warmup_iters:
            decay *= self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup_iters
        return decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, iters_per_epoch: int):
    """Stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrFactor(cfg, iters_per_epoch))
