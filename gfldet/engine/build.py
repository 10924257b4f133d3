"""Turn a `Config` into the objects of a run: model, datasets, optimizer, lr schedule (`LrFactor`).

Everything it builds takes plain arguments; the trainer reads the `train.*` loop settings itself.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from gfldet.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, ScheduleConfig
from gfldet.models.backbone import ResNetBackbone
from gfldet.models.detector import GFL, STRIDES
from gfldet.models.fpn import FPN
from gfldet.models.head import GFLHead

log = logging.getLogger("gfldet")


def build_model(cfg: ModelConfig, *, size_divisor: int) -> GFL:
    """The detector of `model` config `cfg`: each section is the keyword arguments of its part
    (gfldet.config documents the keys and holds their defaults), passed as they are, except
    `head.dirac_init_distance: null`, which becomes half the ATSS anchor's side.
    `size_divisor` is `data.size_divisor`: the per-image padding that marks priors valid."""
    backbone = ResNetBackbone(**asdict(cfg.backbone))
    neck = FPN(backbone.out_channels, **asdict(cfg.fpn))
    head_args = asdict(cfg.head)
    if cfg.head.box_repr == "dirac" and cfg.head.dirac_init_distance is None:  # the ATSS anchor:
        head_args["dirac_init_distance"] = cfg.priors.octave_base_scale / 2  # half its side
    head = GFLHead(num_classes=cfg.num_classes, in_channels=cfg.fpn.out_channels,
                   num_levels=len(STRIDES), **head_args)
    return GFL(backbone, neck, head, loss=copy.deepcopy(cfg.loss), test=copy.deepcopy(cfg.test),
               size_divisor=size_divisor, **asdict(cfg.priors), **asdict(cfg.assigner))


@dataclass(frozen=True)
class SplitPaths:
    images: Path
    annotations: Path


def dataset_paths(cfg: DataConfig, split: str, generate: bool = True) -> SplitPaths:
    """Image folder and annotation file of `split` ("train" or "val"). With `data.synthetic` set
    (train/val are then left at their defaults) the bundled synthetic dataset is generated on
    first use, unless `generate` is False: then its paths are returned whether it exists or not."""
    if cfg.synthetic is None:
        split_cfg = getattr(cfg, split)
        return SplitPaths(Path(split_cfg.images), Path(split_cfg.annotations))
    from gfldet.data.synthetic import dataset_layout, ensure_synthetic_coco

    s = cfg.synthetic
    paths = (ensure_synthetic_coco(s.root, num_train=s.num_train, num_val=s.num_val, seed=s.seed,
                                   min_object_size=s.min_object_size)
             if generate else dataset_layout(Path(s.root)))
    return SplitPaths(Path(paths[f"{split}_images"]), Path(paths[f"{split}_ann"]))


def build_dataset(cfg: Config, split: str, check_cache: Path | None = None, *,
                  not_done: str | None = None, advice: str | None = None):
    """The checked dataset of `split`: the check runs here (every image decoded; fatal problems
    raise), and the dataset indexes and loads its result. Training data is fixed in memory;
    validation data is scored against its file as written, only its unreadable images are left
    out (and named). `check_cache` (a JSON file) reuses the full-decode results of the image
    files unchanged since the check that wrote it (see gfldet.data.checks). `not_done` and
    `advice` end a fatal problem's message (default: training's wording)."""
    from gfldet.data import CocoDetection, build_transforms
    from gfldet.data.checked_split import load_checked_split
    from gfldet.data.checks import ShardedCheck
    from gfldet.distributed import all_gather_objects, get_rank, get_world_size, is_distributed

    d = cfg.data
    paths = dataset_paths(d, split)
    train = split == "train"
    transform = build_transforms(train=train, max_size=d.max_size, flip_prob=d.flip_prob,
                                 short_side=tuple(d.train_short_side) if train
                                 else d.test_short_side)
    filter_empty, min_size = (d.filter_empty, d.min_size) if train else (False, 0)
    # Under torchrun each process decodes its share of the images for the check.
    shard = (ShardedCheck(get_rank(), get_world_size(), all_gather_objects)
             if is_distributed() else None)
    split_data = load_checked_split(
        paths.images, paths.annotations, filter_empty=filter_empty, min_size=min_size,
        as_written=not train, max_decode_failures=cfg.train.max_decode_failures,
        cache=check_cache, shard=shard, split=split,
        **{k: v for k, v in (("not_done", not_done), ("advice", advice)) if v is not None})
    dataset = CocoDetection(paths.images, paths.annotations, transform, filter_empty, min_size,
                            split=split_data, max_decode_failures=cfg.train.max_decode_failures)
    if dataset.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes is {cfg.model.num_classes} but {paths.annotations} has "
            f"{dataset.num_classes} categories; set model.num_classes: {dataset.num_classes}")
    return dataset


def scaled_lr(cfg: OptimConfig, total_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr grows with the total batch size."""
    if not cfg.scale_lr or total_batch == cfg.reference_batch_size:
        return cfg.lr
    lr = cfg.lr * total_batch / cfg.reference_batch_size
    log.info("lr scaled linearly from %g (for a total batch of %d) to %g for a total batch of %d",
             cfg.lr, cfg.reference_batch_size, lr, total_batch)
    return lr


# Layers whose parameters (weight and bias) take optim.norm_weight_decay: _NormBase is every
# BatchNorm (SyncBatchNorm too) and InstanceNorm. FrozenBatchNorm2d has buffers only.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, cfg: OptimConfig, lr: float) -> list[dict]:
    """The trainable parameters of `model` in groups of equal lr and weight decay, in model order.

    Semantics of MMEngine's `paramwise_cfg` (norm_decay_mult, bias_decay_mult, bias_lr_mult),
    which the official GFocal recipe used: a norm layer's weight and bias take
    `norm_weight_decay` at `lr`; the `bias` of any other layer takes `bias_weight_decay` at
    `bias_lr_factor * lr`; every other parameter (conv and linear weights, the head's per-level
    `scales`) takes `weight_decay` at `lr`. (Detectron2's BIAS_LR_FACTOR also applies to norm
    biases; here, as in MMEngine, it does not.) Classes with the same values share a group, and a
    group holds only the keys that differ from the optimizer's defaults, so the default options
    give one group `{"params": [...]}`: the optimizer MMDetection's GFL recipe uses."""
    decay = cfg.weight_decay
    settings = {  # kind -> (lr, weight decay)
        "weights": (lr, decay),
        "norm": (lr, decay if cfg.norm_weight_decay is None else cfg.norm_weight_decay),
        "biases": (lr * cfg.bias_lr_factor,
                   decay if cfg.bias_weight_decay is None else cfg.bias_weight_decay),
    }
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    kinds: dict[tuple[float, float], dict[str, None]] = {}  # the kinds in a group, in order
    for full_name, param in model.named_parameters():  # each shared parameter once
        if not param.requires_grad:
            continue
        owner, _, name = full_name.rpartition(".")
        kind = ("norm" if isinstance(model.get_submodule(owner), NORM_LAYERS)
                else "biases" if name == "bias" else "weights")
        groups.setdefault(settings[kind], []).append(param)
        kinds.setdefault(settings[kind], {})[kind] = None
    out = []
    for (group_lr, group_decay), params in groups.items():
        group: dict = {"params": params}
        if group_lr != lr:
            group["lr"] = group_lr
        if group_decay != decay:
            group["weight_decay"] = group_decay
        out.append(group)
    if len(out) > 1:
        log.info("optimizer parameter groups: %s", "; ".join(
            f"{' and '.join(kinds[key])}: {len(params)} tensors at lr {key[0]:g}, "
            f"weight decay {key[1]:g}" for key, params in groups.items()))
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW over `param_groups(model, cfg, lr)`."""
    groups = param_groups(model, cfg, lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999),
                             weight_decay=cfg.weight_decay)


class LrFactor:
    """lr multiplier at an iteration: linear warmup (mmdet `LinearLR`) times step or cosine decay.

    A plain object of numbers so that `LambdaLR.state_dict()` stores it (and it loads with
    `torch.load(weights_only=True)`).
    """

    def __init__(self, cfg: ScheduleConfig, iters_per_epoch: int) -> None:
        self.policy, self.gamma, self.min_lr_ratio = cfg.policy, cfg.gamma, cfg.min_lr_ratio
        self.warmup_iters, self.warmup_ratio = cfg.warmup_iters, cfg.warmup_ratio
        self.total_iters = cfg.epochs * iters_per_epoch
        self.milestones = [m * iters_per_epoch for m in cfg.milestones]

    def __call__(self, it: int) -> float:
        if self.policy == "step":
            decay = self.gamma ** sum(it >= m for m in self.milestones)
        elif self.policy == "cosine":
            progress = min(it / max(self.total_iters, 1), 1.0)
            decay = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
                1 + math.cos(math.pi * progress))
        else:  # a policy the schema allows but nothing here computes
            raise ValueError(f"schedule.policy {self.policy!r} has no lr curve in LrFactor")
        if it < self.warmup_iters:
            decay *= self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup_iters
        return decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, iters_per_epoch: int):
    """Stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrFactor(cfg, iters_per_epoch))
