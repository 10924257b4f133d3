"""Strict, typed configuration for gfldet.

The schema is the tree of dataclasses below; every field has a type, a default and a
comment, and the defaults *are* the GFL R-50 FPN 1x COCO recipe (MMDetection
``gfl_r50_fpn_1x_coco``, 40.2 box AP on val2017). There are no registries: a config
only chooses values, never classes by name.

``load_config(path, overrides)`` turns YAML into that tree:

1. The file is read with PyYAML's safe loader (no python tags; duplicate keys are
   errors; ``1e-4`` is read as a float as in YAML 1.2). The top level must be a mapping.
2. A top-level key ``base: other.yaml`` (relative to the file naming it) loads that file
   first; chains are allowed, cycles and missing files are errors. The child's mapping
   is deep-merged onto the base's: mappings merge key by key, lists and scalars replace.
3. Command-line overrides ``a.b.c=value`` (``--cfg-options``) are merged last, the same
   way; ``value`` is parsed as YAML, so ``8``, ``0.01``, ``[8, 11]``, ``null``, ``true``
   work and ``abc`` is the string "abc".
4. The merged mapping is converted to the dataclasses strictly (unknown keys and wrong
   types are errors naming the dotted key and where it was set), then
   ``Config.validate`` checks the values (ranges and cross-field rules).

Every problem raises :class:`ConfigError` (a ``ValueError``) whose message names the
dotted key, the offending value, where it came from and what is allowed; all problems
found in one pass are reported together.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "AssignerConfig",
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "FPNConfig",
    "HeadConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "SyntheticConfig",
    "TestConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "dump_config",
    "load_config",
    "load_config_or_exit",
    "parse_overrides",
]

OVERRIDE_SOURCE = "--cfg-options"
GN_GROUPS = 32  # GroupNorm groups used by the head when norm == "gn"
# The largest FPN stride (P7), gfldet.models.detector.STRIDES[-1] (a test checks; not imported:
# the config is read before torch is).
TOP_STRIDE = 128
RESNET_DEPTHS = (18, 34, 50, 101)


class ConfigError(ValueError):
    """A config file, an override or a config value is invalid; the message says which and why."""


# --------------------------------------------------------------------------------------
# Schema (defaults = GFL R-50 FPN 1x COCO recipe)
# --------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    """ResNet backbone."""

    depth: int = 50  # ResNet depth: 18, 34, 50 or 101
    weights: str | None = "torchvision"  # "torchvision" (ImageNet weights via torchvision's enum; needs internet), a local .pth path, or null (from scratch)
    frozen_stages: int = 1  # -1 none frozen; 0 stem; 1 stem+layer1 (recipe); up to 4
    norm_eval: bool = True  # keep BatchNorm in eval mode (frozen statistics), as the recipe


@dataclass
class FPNConfig:
    """Feature pyramid (P3-P7)."""

    out_channels: int = 256  # channels of every pyramid level


@dataclass
class HeadConfig:
    """GFL head (shared across levels)."""

    feat_channels: int = 256  # channels of the stacked convs
    stacked_convs: int = 4  # conv layers in each of the cls and reg towers
    norm: Literal["gn", "none"] = "gn"  # normalization in the towers: GroupNorm(32) or none
    reg_max: int = 16  # box side distances are distributions over reg_max + 1 bins (in stride units)
    octave_base_scale: int = 8  # anchor side = octave_base_scale * stride (ATSS priors)
    # GFLv2's Distribution-Guided Quality Predictor: the top-k bin probabilities of each side
    # (and their mean) -> 1x1 convs -> a quality that scales sigmoid(class logit). Off = GFLv1.
    # On, the head emits the joint score's logit, so QFL takes the probability with no other key.
    dgqp: bool = False
    dgqp_topk: int = 4  # top-k probabilities per side fed to DGQP (GFLv2 paper: 4)
    dgqp_channels: int = 64  # hidden channels of DGQP's two 1x1 convs (GFLv2 paper: 64)
    dgqp_add_mean: bool = True  # append the mean of the top-k to each side (GFLv2 paper: true)


@dataclass
class AssignerConfig:
    """ATSS assigner."""

    topk: int = 9  # candidate priors per level nearest to each gt centre


@dataclass
class LossConfig:
    """Losses of the GFL head."""

    cls_loss: Literal["qfl", "focal"] = "qfl"  # ablation switch (paper Table 3): QFL joint score, or plain focal loss with binary targets
    box_repr: Literal["distribution", "dirac"] = "distribution"  # general distribution (integral over reg_max + 1 bins) or Dirac (4 plain distances)
    # box_repr "dirac" only: each side's initial distance in strides (the bias of the 4 ReLU
    # outputs). Unset: model.head.octave_base_scale / 2, so every box starts at its ATSS anchor, as
    # ATSS's own regression does (the paper's baseline). 0 is torchvision FCOS's init: zero-size
    # boxes, with ~40 % of the sides in the ReLU's dead zone; on the bundled data it cost 10 AP
    # (focal_dirac, seed 0, benchmarks/RESULTS.md).
    dirac_init_distance: float | None = None
    qfl_beta: float = 2.0  # Quality Focal Loss modulating exponent
    focal_alpha: float = 0.25  # focal loss alpha (cls_loss == "focal" only)
    focal_gamma: float = 2.0  # focal loss gamma (cls_loss == "focal" only)
    cls_weight: float = 1.0  # weight of the classification loss
    giou_weight: float = 2.0  # weight of the GIoU box loss
    dfl_weight: float = 0.25  # weight of Distribution Focal Loss; 0 = distribution without DFL


@dataclass
class TestConfig:
    """Inference post-processing."""

    __test__ = False  # not a pytest test class despite the name

    score_thr: float = 0.05  # drop detections scoring below this
    nms_pre: int = 1000  # top-k (prior, class) pairs per level before NMS
    nms_iou: float = 0.6  # IoU threshold of the (class-wise) NMS
    max_per_img: int = 100  # detections kept per image after NMS


@dataclass
class ModelConfig:
    """Detector: ResNet + FPN + GFL head with ATSS assignment."""

    num_classes: int = 80  # object classes (no background class)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # ResNet backbone
    fpn: FPNConfig = field(default_factory=FPNConfig)  # feature pyramid
    head: HeadConfig = field(default_factory=HeadConfig)  # GFL head
    assigner: AssignerConfig = field(default_factory=AssignerConfig)  # ATSS assigner
    loss: LossConfig = field(default_factory=LossConfig)  # losses
    test: TestConfig = field(default_factory=TestConfig)  # inference post-processing


@dataclass
class DatasetConfig:
    """A COCO-format dataset split (relative paths are resolved against the working directory)."""

    images: str = "data/coco/train2017"  # image directory
    annotations: str = "data/coco/annotations/instances_train2017.json"  # COCO-format annotation json


@dataclass
class SyntheticConfig:
    """The bundled synthetic dataset (generated into `root` on first use)."""

    root: str = "data/synthetic"  # where the images and COCO jsons are generated
    num_train: int = 2000  # training images
    num_val: int = 300  # validation images
    seed: int = 0  # generator seed (same seed -> same dataset)
    min_object_size: float = 16.0  # px, sqrt(w*h) of the smallest shapes; lower makes the data harder


def _val_split() -> DatasetConfig:
    return DatasetConfig(
        images="data/coco/val2017", annotations="data/coco/annotations/instances_val2017.json"
    )


@dataclass
class DataConfig:
    """Data loading and augmentation.

    When ``synthetic`` is set it wins: the synthetic dataset is generated into
    ``synthetic.root`` and ``train``/``val`` are ignored (they point there instead).
    """

    train: DatasetConfig = field(default_factory=DatasetConfig)  # training split
    val: DatasetConfig = field(default_factory=_val_split)  # validation split
    synthetic: SyntheticConfig | None = None  # when set, the bundled synthetic dataset is generated into `root` on first use and train/val point there (wins over train/val)
    train_short_side: tuple[int, int] = (800, 800)  # short side sampled uniformly in [lo, hi] (multi-scale when lo < hi)
    test_short_side: int = 800  # short side at test time
    max_size: int = 1333  # cap on the long side (train and test)
    flip_prob: float = 0.5  # horizontal flip probability (train)
    filter_empty: bool = True  # drop training images without annotations
    min_size: int = 32  # drop training images whose width or height is below this
    size_divisor: int = 32  # pad batched images to a multiple of this
    batch_size: int = 2  # images per process (GPU)
    val_batch_size: int = 1  # images per process at evaluation
    num_workers: int = 2  # data loader workers per process
    aspect_ratio_grouping: bool = True  # batch landscape and portrait images separately


@dataclass
class OptimConfig:
    """Optimizer."""

    name: Literal["sgd", "adamw"] = "sgd"  # optimizer
    lr: float = 0.01  # for `reference_batch_size` images per iteration; scaled linearly to the actual total batch
    reference_batch_size: int = 16  # total batch size `lr` is given for
    scale_lr: bool = True  # scale lr by total_batch / reference_batch_size
    momentum: float = 0.9  # SGD momentum (AdamW: beta1)
    weight_decay: float = 0.0001  # L2 / decoupled weight decay
    # Parameter groups, as MMEngine's paramwise_cfg (and the official GFocal's): the weight and
    # bias of every norm layer (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) take
    # norm_weight_decay; the bias of every other layer takes bias_weight_decay and
    # bias_lr_factor x the lr; the rest, the head's per-level scales included, lr and weight_decay.
    norm_weight_decay: float | None = None  # null = weight_decay; Detectron2 recipes often use 0
    bias_weight_decay: float | None = None  # null = weight_decay; official GFocal: 0
    bias_lr_factor: float = 1.0  # lr multiplier of the non-norm biases; official GFocal: 2
    grad_clip: float | None = None  # max global grad norm, null = off


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (epoch based, with linear warmup in iterations)."""

    epochs: int = 12  # training epochs
    policy: Literal["step", "cosine"] = "step"  # step decay at milestones, or cosine to min_lr_ratio
    milestones: list[int] = field(default_factory=lambda: [8, 11])  # epochs at which lr *= gamma (policy "step")
    gamma: float = 0.1  # step decay factor
    warmup_iters: int = 500  # linear warmup iterations (0 = none)
    warmup_ratio: float = 0.001  # warmup start lr = ratio * lr (mmdet 2.x/3.x; official GFocal used 1/3)
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr


@dataclass
class TrainConfig:
    """Training loop."""

    seed: int = 0  # global random seed
    deterministic: bool = False  # deterministic cuDNN / algorithms (slower)
    # Mixed precision. auto: bf16 on a CPU with native bf16 (AVX512-BF16/AMX) and on GPUs that
    # support it, fp16 (with gradient scaling) on other GPUs, fp32 on other CPUs, where bf16 is
    # emulated and far slower. none = fp32. The COCO recipe trains in fp32, as MMDetection's.
    amp: Literal["auto", "none", "fp16", "bf16"] = "none"
    channels_last: bool = False  # channels_last memory format
    compile: bool = False  # torch.compile the model
    ema: bool = False  # keep an exponential moving average of the weights
    ema_decay: float = 0.9998  # EMA decay per iteration, once ramped up
    # The t-th EMA update decays by ema_decay * (1 - exp(-t / ema_warmup_iters)), the ramp of
    # YOLOX and MMDetection's ExpMomentumEMA (2000 there); 0 = constant ema_decay from the start.
    ema_warmup_iters: int = 2000
    log_interval: int = 20  # iterations between log lines
    eval_interval: int = 1  # epochs between evaluations; 0 = never
    checkpoint_interval: int = 1  # epochs between checkpoints
    keep_checkpoints: int = 3  # epoch checkpoints kept besides last/best
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    max_decode_failures: float = 0.01  # fraction of images that may fail to decode before the run stops
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    work_dir: str | None = None  # null = work_dirs/<config name>


@dataclass
class Config:
    """A complete gfldet experiment. ``Config()`` is the GFL R-50 FPN 1x COCO recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)  # detector
    data: DataConfig = field(default_factory=DataConfig)  # datasets and loading
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # lr schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # training loop

    def problems(self) -> list[tuple[str, str]]:
        """Every value problem as ``(dotted_key, message)``; empty when the config is valid."""
        c = _Checker()
        m, d, o, s, t = self.model, self.data, self.optim, self.schedule, self.train

        c.at_least("model.num_classes", m.num_classes, 1)
        c.one_of("model.backbone.depth", m.backbone.depth, RESNET_DEPTHS)
        c.between("model.backbone.frozen_stages", m.backbone.frozen_stages, -1, 4)
        if m.backbone.weights is not None:
            c.non_empty("model.backbone.weights", m.backbone.weights,
                        '"torchvision", a .pth path, or null')
        c.at_least("model.fpn.out_channels", m.fpn.out_channels, 1)
        c.at_least("model.head.feat_channels", m.head.feat_channels, 1)
        if m.head.norm == "gn" and m.head.feat_channels % GN_GROUPS:
            c.add("model.head.feat_channels", m.head.feat_channels,
                  f"a multiple of {GN_GROUPS} when model.head.norm is 'gn' "
                  f"(GroupNorm({GN_GROUPS})); or set model.head.norm: none")
        c.at_least("model.head.stacked_convs", m.head.stacked_convs, 0)
        c.at_least("model.head.reg_max", m.head.reg_max, 1)
        c.at_least("model.head.octave_base_scale", m.head.octave_base_scale, 1)
        if m.head.dgqp:
            c.between("model.head.dgqp_topk", m.head.dgqp_topk, 1, m.head.reg_max + 1)
            c.at_least("model.head.dgqp_channels", m.head.dgqp_channels, 1)
            if m.loss.box_repr != "distribution":
                c.add("model.head.dgqp", m.head.dgqp,
                      "false when model.loss.box_repr is 'dirac' (DGQP reads the distribution)")
            if m.loss.cls_loss != "qfl":
                c.add("model.head.dgqp", m.head.dgqp,
                      "false when model.loss.cls_loss is 'focal' (DGQP learns the IoU from QFL)")
        c.at_least("model.assigner.topk", m.assigner.topk, 1)
        c.at_least("model.loss.qfl_beta", m.loss.qfl_beta, 0)
        c.between("model.loss.focal_alpha", m.loss.focal_alpha, 0, 1)
        c.at_least("model.loss.focal_gamma", m.loss.focal_gamma, 0)
        c.greater("model.loss.cls_weight", m.loss.cls_weight, 0)
        c.at_least("model.loss.giou_weight", m.loss.giou_weight, 0)
        c.at_least("model.loss.dfl_weight", m.loss.dfl_weight, 0)
        if m.loss.box_repr == "dirac" and m.loss.dfl_weight != 0:
            c.add("model.loss.dfl_weight", m.loss.dfl_weight,
                  "0 when model.loss.box_repr is 'dirac' (DFL needs the distribution)")
        if m.loss.dirac_init_distance is not None:
            c.at_least("model.loss.dirac_init_distance", m.loss.dirac_init_distance, 0)
            if m.loss.box_repr != "dirac":
                c.add("model.loss.dirac_init_distance", m.loss.dirac_init_distance,
                      "unset unless model.loss.box_repr is 'dirac' (the distribution has no such bias)")
        if m.loss.giou_weight == 0 and m.loss.dfl_weight == 0:
            c.add("model.loss.giou_weight", m.loss.giou_weight,
                  "> 0 when model.loss.dfl_weight is 0 (otherwise no box loss is trained)")
        c.half_open("model.test.score_thr", m.test.score_thr, 0, 1)
        c.at_least("model.test.nms_pre", m.test.nms_pre, 1)
        c.open_closed("model.test.nms_iou", m.test.nms_iou, 0, 1)
        c.at_least("model.test.max_per_img", m.test.max_per_img, 1)

        for split in ("train", "val"):
            ds: DatasetConfig = getattr(d, split)
            c.non_empty(f"data.{split}.images", ds.images, "an image directory path")
            c.non_empty(f"data.{split}.annotations", ds.annotations, "a COCO json path")
        if d.synthetic is not None:
            c.non_empty("data.synthetic.root", d.synthetic.root, "a directory path")
            c.at_least("data.synthetic.num_train", d.synthetic.num_train, 1)
            c.at_least("data.synthetic.num_val", d.synthetic.num_val, 1)
            c.at_least("data.synthetic.seed", d.synthetic.seed, 0)
        lo, hi = d.train_short_side
        if lo < 1 or lo > hi:
            c.add("data.train_short_side", list(d.train_short_side),
                  "[lo, hi] with 1 <= lo <= hi")
        c.at_least("data.test_short_side", d.test_short_side, 1)
        longest_short = max(hi, d.test_short_side)
        if d.max_size < longest_short:
            c.add("data.max_size", d.max_size,
                  f">= the largest short side ({longest_short}); it caps the long side")
        c.between("data.flip_prob", d.flip_prob, 0, 1)
        c.at_least("data.min_size", d.min_size, 0)
        c.at_least("data.size_divisor", d.size_divisor, 1)
        c.at_least("data.batch_size", d.batch_size, 1)
        c.at_least("data.val_batch_size", d.val_batch_size, 1)
        c.at_least("data.num_workers", d.num_workers, 0)
        self._check_groupnorm_groups(c)

        c.greater("optim.lr", o.lr, 0)
        c.at_least("optim.reference_batch_size", o.reference_batch_size, 1)
        c.half_open("optim.momentum", o.momentum, 0, 1)
        c.at_least("optim.weight_decay", o.weight_decay, 0)
        for key in ("norm_weight_decay", "bias_weight_decay"):
            if getattr(o, key) is not None:
                c.at_least(f"optim.{key}", getattr(o, key), 0, extra=" or null (= optim.weight_decay)")
        c.greater("optim.bias_lr_factor", o.bias_lr_factor, 0)
        if o.grad_clip is not None:
            c.greater("optim.grad_clip", o.grad_clip, 0, extra=" or null (off)")

        c.at_least("schedule.epochs", s.epochs, 1)
        if s.policy == "step":  # milestones are ignored by the cosine policy
            ms = s.milestones
            if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
                c.add("schedule.milestones", ms, "strictly increasing")
            if any(not 1 <= x < s.epochs for x in ms):
                c.add("schedule.milestones", ms,
                      f"epochs in [1, schedule.epochs) = [1, {s.epochs}) "
                      "(lower them or raise schedule.epochs)")
        c.open_closed("schedule.gamma", s.gamma, 0, 1)
        c.at_least("schedule.warmup_iters", s.warmup_iters, 0)
        c.open_closed("schedule.warmup_ratio", s.warmup_ratio, 0, 1)
        c.half_open("schedule.min_lr_ratio", s.min_lr_ratio, 0, 1)

        c.at_least("train.seed", t.seed, 0)
        c.open_interval("train.ema_decay", t.ema_decay, 0, 1)
        c.at_least("train.ema_warmup_iters", t.ema_warmup_iters, 0, extra=" (0 = no warmup)")
        c.at_least("train.log_interval", t.log_interval, 1)
        c.at_least("train.eval_interval", t.eval_interval, 0, extra=" (0 = never)")
        c.at_least("train.checkpoint_interval", t.checkpoint_interval, 1)
        c.at_least("train.keep_checkpoints", t.keep_checkpoints, 0)
        c.at_least("train.max_bad_steps", t.max_bad_steps, 1)
        c.between("train.max_decode_failures", t.max_decode_failures, 0, 1)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
            c.add("train.device", t.device, "one of 'auto', 'cpu', 'cuda', 'cuda:N'")
        if t.work_dir is not None:
            c.non_empty("train.work_dir", t.work_dir, "a directory path or null")
        return c.problems

    def _check_groupnorm_groups(self, c: _Checker) -> None:
        """A GroupNorm group must hold more than one value at every level.

        A group holds feat_channels / 32 channels times the level's H x W. P7 (stride 128) is
        ceil(side / 128) on each side, so an image resized to 128 x 128 px or less (a square image
        at a short side <= 128) has a 1 x 1 P7: with feat_channels 32 each group then holds a
        single value, normalised to a constant, and torch refuses a batch of one such image
        ("Expected more than 1 value per channel"; predict, the last evaluation batch and
        val_batch_size 1 are batches of one). Any short side above 128, or 64+ channels, works.
        """
        head, d = self.model.head, self.data
        if not (head.norm == "gn" and head.stacked_convs > 0 and head.feat_channels == GN_GROUPS):
            return
        small = [f"{key}={_show(value)}" for key, value, side in (
            ("data.test_short_side", d.test_short_side, d.test_short_side),
            ("data.train_short_side", list(d.train_short_side), d.train_short_side[0]),
        ) if side <= TOP_STRIDE]
        if small:
            c.add("model.head.feat_channels", head.feat_channels,
                  f"at least {2 * GN_GROUPS} with {' and '.join(small)}: GroupNorm({GN_GROUPS}) then has "
                  f"one channel per group, and an image resized to {TOP_STRIDE}x{TOP_STRIDE} px or less "
                  f"has a 1x1 P7 (stride {TOP_STRIDE}), where a group holds a single value (constant "
                  "features; torch stops on a batch of one such image: 'Expected more than 1 value per "
                  f"channel'). Set model.head.feat_channels: {2 * GN_GROUPS}, or the short sides above "
                  f"{TOP_STRIDE}, or model.head.norm: none")

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every value problem (see :meth:`problems`)."""
        problems = self.problems()
        if problems:
            raise ConfigError(_report("invalid config", [msg for _, msg in problems]))


class _Checker:
    """Collects ``(key, message)`` value problems for :meth:`Config.problems`."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, key: str, value: Any, allowed: str) -> None:
        self.problems.append((key, f"{key}={_show(value)} is invalid: must be {allowed}"))

    def at_least(self, key: str, value: float, lo: float, extra: str = "") -> None:
        if not value >= lo:
            self.add(key, value, f">= {lo}{extra}")

    def greater(self, key: str, value: float, lo: float, extra: str = "") -> None:
        if not value > lo:
            self.add(key, value, f"> {lo}{extra}")

    def between(self, key: str, value: float, lo: float, hi: float) -> None:
        if not lo <= value <= hi:
            self.add(key, value, f"in [{lo}, {hi}]")

    def half_open(self, key: str, value: float, lo: float, hi: float) -> None:
        if not lo <= value < hi:
            self.add(key, value, f"in [{lo}, {hi})")

    def open_closed(self, key: str, value: float, lo: float, hi: float) -> None:
        if not lo < value <= hi:
            self.add(key, value, f"in ({lo}, {hi}]")

    def open_interval(self, key: str, value: float, lo: float, hi: float) -> None:
        if not lo < value < hi:
            self.add(key, value, f"in ({lo}, {hi})")

    def one_of(self, key: str, value: Any, allowed: Sequence[Any]) -> None:
        if value not in allowed:
            self.add(key, value, "one of " + ", ".join(map(str, allowed)))

    def non_empty(self, key: str, value: str, what: str) -> None:
        if not value.strip():
            self.add(key, value, f"a non-empty string ({what})")


# --------------------------------------------------------------------------------------
# YAML reading
# --------------------------------------------------------------------------------------


class _StrictSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no python tags) that also rejects duplicate keys and reads
    exponent floats without a dot (``1e-4``) as floats, as YAML 1.2 does."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first defined on line "
                    f"{first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_StrictSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT,
                                        list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        context = f"{context} (line {context_mark.line + 1})"
    detail = f"{context}: {problem}" if context else problem
    hint = ""
    if "constructor for the tag" in detail:
        hint = " (only plain YAML is accepted: tags such as !!python/... are refused)"
    return ConfigError(f"{where}: malformed YAML: {detail}{hint}")


def _read_mapping(path: Path, display: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {display}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {display}: {exc}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(display, exc) from None
    if data is None:
        raise ConfigError(f"{display}: the file is empty; a config must be a YAML mapping "
                          "(write `{}` to use all defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{display}: the top level must be a YAML mapping (key: value), "
                          f"got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------
# Base inheritance, overrides and merging. `origins` maps dotted keys to where they were set.
# --------------------------------------------------------------------------------------


def _merge_into(dst: dict, src: dict, prefix: str, origins: dict[str, str], source: str) -> None:
    """Deep-merge ``src`` onto ``dst`` in place: mappings merge, lists and scalars replace."""
    for key, value in src.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        origins[dotted] = source
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(dst[key], value, dotted, origins, source)
            continue
        for stale in [k for k in origins if k.startswith(dotted + ".")]:
            del origins[stale]
        dst[key] = copy.deepcopy(value)
        if isinstance(value, dict):
            _record_origins(value, dotted, origins, source)


def _record_origins(data: dict, prefix: str, origins: dict[str, str], source: str) -> None:
    for key, value in data.items():
        dotted = f"{prefix}.{key}"
        origins[dotted] = source
        if isinstance(value, dict):
            _record_origins(value, dotted, origins, source)


def _load_tree(path: Path, display: str, chain: list[tuple[Path, str]],
               origins: dict[str, str]) -> dict:
    resolved = path.resolve()
    for seen, _ in chain:
        if seen == resolved:
            cycle = " -> ".join([name for _, name in chain] + [display])
            raise ConfigError(f"base cycle: {cycle}; remove one of these `base:` keys")
    data = _read_mapping(path, display)
    merged: dict = {}
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{display}: `base` must be a path to another YAML file "
                              f"(relative to {display}), got {base!r}")
        base_path = path.parent / base
        base_display = os.path.normpath(os.path.join(os.path.dirname(display), base))
        if not base_path.is_file():
            raise ConfigError(f"{display}: base file {base!r} not found (looked for "
                              f"{base_display}); `base` is relative to the file naming it")
        merged = _load_tree(base_path, base_display, [*chain, (resolved, display)], origins)
    _merge_into(merged, data, "", origins, display)
    return merged


def load_config_or_exit(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """`load_config` for the command-line tools: a bad config prints its error and exits with
    status 2 (the usual code for a usage error), before anything heavy is imported or built."""
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_overrides(items: Iterable[str]) -> dict:
    """Turn ``["optim.lr=0.02", "schedule.milestones=[16, 22]"]`` into a nested mapping.

    Each value is parsed as YAML (``8``, ``0.01``, ``[8, 11]``, ``null``, ``true``; other
    text is a string). Later items win. Raises :class:`ConfigError` for an item without
    ``=``, an empty key segment, or a value that is not valid YAML.
    """
    if isinstance(items, str):
        raise ConfigError("overrides must be a list of 'key=value' strings, not one string")
    out: dict = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{OVERRIDE_SOURCE}: {item!r} is not of the form key=value "
                              "(e.g. optim.lr=0.02 or schedule.milestones=[16,22])")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts) or any(p != p.strip() for p in parts):
            raise ConfigError(f"{OVERRIDE_SOURCE}: {item!r} has an invalid key {key!r}; "
                              "use dotted names such as model.backbone.depth")
        try:
            value = _yaml_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{OVERRIDE_SOURCE}: cannot parse the value of {item!r} as YAML "
                              f"({getattr(exc, 'problem', exc)}); quote strings that contain "
                              "YAML syntax") from None
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------
# dict -> dataclass tree (strict typing)
# --------------------------------------------------------------------------------------

_INVALID = object()  # marks a value that failed conversion (an error was recorded)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _dataclass_arm(tp: Any) -> type | None:
    """The dataclass in ``X`` or ``X | None``, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return None


@functools.cache
def _all_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every valid dotted key of the schema (mappings included)."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        dotted = f"{prefix}.{name}" if prefix else name
        keys.append(dotted)
        sub = _dataclass_arm(tp)
        if sub is not None:
            keys.extend(_all_keys(sub, dotted))
    return tuple(keys)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        inner = ", ".join(_type_name(a) for a in args)
        return f"tuple[{inner}] (a list of {len(args)})"
    if tp is bool:
        return "bool (true/false)"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    """A value as it would be written in YAML (short)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:77]) + "..."
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    except yaml.YAMLError:
        text = repr(value)
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def _type_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Converter:
    """Converts a merged mapping into the dataclass tree, collecting errors."""

    def __init__(self, origins: dict[str, str], default_source: str) -> None:
        self.origins = origins
        self.default_source = default_source
        self.errors: list[str] = []

    def where(self, key: str) -> str:
        key = re.sub(r"\[\d+\]", "", key)
        while key:
            if key in self.origins:
                src = self.origins[key]
                return "from --cfg-options" if src == OVERRIDE_SOURCE else f"in {src}"
            key = key.rpartition(".")[0]
        return f"in {self.default_source}" if self.default_source else "default"

    def type_error(self, key: str, tp: Any, value: Any) -> object:
        self.errors.append(f"{key}: expected {_type_name(tp)}, got {_show(value)} "
                           f"({_type_of(value)}) [{self.where(key)}]")
        return _INVALID

    def unknown(self, key: str, cls: type, prefix: str) -> None:
        name = key.rpartition(".")[2]
        names = _field_names(cls)
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.7)
        if close:
            suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        else:  # maybe the key exists elsewhere in the tree (e.g. optim.epochs)
            everywhere = _all_keys()
            same_leaf = [k for k in everywhere if k.rpartition(".")[2] == name]
            suggestion = same_leaf[0] if same_leaf else None
            if suggestion is None:
                leaves = {k.rpartition(".")[2]: k for k in reversed(everywhere)}
                near = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
                suggestion = leaves[near[0]] if near else None
        hint = f"did you mean '{suggestion}'? " if suggestion else ""
        scope = f"'{prefix}'" if prefix else "the top level"
        self.errors.append(f"unknown key '{key}' [{self.where(key)}]; {hint}"
                           f"valid keys at {scope}: {', '.join(names)}")

    def build(self, cls: type, data: dict, prefix: str) -> Any:
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if not isinstance(key, str):
                self.errors.append(f"{dotted}: keys must be strings, got {_show(key)} "
                                   f"({_type_of(key)}) [{self.where(prefix)}]")
            elif key not in hints:
                self.unknown(dotted, cls, prefix)
            else:
                converted = self.convert(hints[key], value, dotted)
                if converted is not _INVALID:
                    kwargs[key] = converted
        return cls(**kwargs)

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                return self.type_error(key, tp, value)
            return self.build(tp, value, key)
        if origin in (Union, types.UnionType):
            if value is None:
                return None if type(None) in args else self.type_error(key, tp, value)
            sub = _dataclass_arm(tp)
            if sub is not None and isinstance(value, dict):
                return self.build(sub, value, key)
            for arm in args:
                if arm is type(None):
                    continue
                trial = _Converter(self.origins, self.default_source)
                result = trial.convert(arm, value, key)
                if not trial.errors:
                    return result
            return self.type_error(key, tp, value)
        if origin is Literal:
            if any(type(value) is type(a) and value == a for a in args):
                return value
            return self.type_error(key, tp, value)
        if origin is list:
            if not isinstance(value, list):
                return self.type_error(key, tp, value)
            items = [self.convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
            return _INVALID if any(x is _INVALID for x in items) else items
        if origin is tuple:
            if not isinstance(value, list | tuple):
                return self.type_error(key, tp, value)
            if len(args) == 2 and args[1] is Ellipsis:
                elem_types = [args[0]] * len(value)
            elif len(value) != len(args):
                return self.type_error(key, tp, value)
            else:
                elem_types = list(args)
            items = [self.convert(t, v, f"{key}[{i}]")
                     for i, (t, v) in enumerate(zip(elem_types, value, strict=True))]
            return _INVALID if any(x is _INVALID for x in items) else tuple(items)
        if tp is bool:
            return value if isinstance(value, bool) else self.type_error(key, tp, value)
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return self.type_error(key, tp, value)
        if tp is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                if math.isfinite(value):
                    return float(value)
                self.errors.append(f"{key}: expected a finite float, got {_show(value)} "
                                   f"[{self.where(key)}]")
                return _INVALID
            return self.type_error(key, tp, value)
        if tp is str:
            return value if isinstance(value, str) else self.type_error(key, tp, value)
        raise TypeError(f"gfldet.config: unsupported annotation {tp!r} for {key}")


def _report(header: str, errors: list[str]) -> str:
    if len(errors) == 1:
        return f"{header}: {errors[0]}"
    return f"{header} ({len(errors)} problems):\n" + "\n".join(f"  - {e}" for e in errors)


def _to_config(data: dict, origins: dict[str, str], name: str, default_source: str) -> Config:
    converter = _Converter(origins, default_source)
    cfg = converter.build(Config, data, "")
    if converter.errors:
        raise ConfigError(_report(f"invalid config {name}", converter.errors))
    problems = cfg.problems()
    if problems:
        raise ConfigError(_report(
            f"invalid config {name}",
            [f"{msg} [{converter.where(key)}]" for key, msg in problems]))
    return cfg


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (following ``base:`` chains), apply ``a.b.c=value`` overrides,
    type-check and validate it. Raises :class:`ConfigError` on any problem."""
    display = os.fspath(path)
    origins: dict[str, str] = {}
    data = _load_tree(Path(path), display, [], origins)
    _merge_into(data, parse_overrides(overrides), "", origins, OVERRIDE_SOURCE)
    return _to_config(data, origins, display, default_source="")


def config_from_dict(data: dict, source: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    """Strictly convert and validate a plain mapping (e.g. one stored in a checkpoint), with
    ``a.b.c=value`` overrides merged on top. Missing keys take their defaults; ``base`` is not
    followed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping, got {type(data).__name__}")
    origins: dict[str, str] = {}
    merged: dict = {}
    _merge_into(merged, data, "", origins, source)
    _merge_into(merged, parse_overrides(overrides), "", origins, OVERRIDE_SOURCE)
    return _to_config(merged, origins, source, default_source="")


def config_to_dict(cfg: Config) -> dict:
    """The config as plain YAML-able types (tuples become lists), in schema order."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value

    return convert(cfg)


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing mappings in block style and lists of scalars inline ([8, 11])."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
# so that a string such as "1e5" is quoted, as the loader would read it as a float
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


def config_to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML text (what :func:`dump_config` writes)."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True, width=100)


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config as YAML; ``load_config`` reads it back to an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Fully resolved gfldet config (written by gfldet.config.dump_config).\n"
    path.write_text(header + config_to_yaml(cfg), encoding="utf-8")
