"""Strict, typed configuration for gfldet: the schema, its cross-field rules and the public API.

The schema is the tree of pydantic dataclasses below; each key has a type, a default and a
comment, and the defaults *are* the GFL R-50 FPN 1x COCO recipe (MMDetection
``gfl_r50_fpn_1x_coco``). The model sections are the keyword arguments of the parts they
configure, passed straight to their constructors by gfldet.engine.build: a knob is its field here
(its one default) and the constructor's argument. gfldet.config_io reads the YAML (``base:``
chains, ``--cfg-options``, where each key was set, keys that moved) and words pydantic's errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, Strict, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from gfldet import config_io
from gfldet.config_io import ConfigError, parse_overrides

__all__ = [
    "AssignerConfig", "BackboneConfig", "Config", "ConfigError", "DGQPConfig", "DataConfig",
    "DatasetConfig", "FPNConfig", "HeadConfig", "LossSettings", "ModelConfig", "OptimConfig",
    "PostProcessSettings", "PriorsConfig", "ScheduleConfig", "SyntheticConfig", "TrainConfig",
    "config_from_dict", "config_to_dict", "dump_config", "load_config", "load_config_or_exit",
    "parse_overrides",
]

GN_GROUPS = 32  # GroupNorm groups used by the head when norm == "gn"
TOP_STRIDE = 128  # P7's stride, models.detector.STRIDES[-1] (a test checks; no torch import here)

# Leaf types. Strict: no "8" for an int, no 1 for a bool; a float still takes an int (`lr: 1`).
Int, Float, Bool = Annotated[int, Strict()], Annotated[float, Strict()], Annotated[bool, Strict()]
Count, NonNegInt = Annotated[int, Strict(), Field(ge=1)], Annotated[int, Strict(), Field(ge=0)]
Positive, NonNeg = Annotated[float, Strict(), Field(gt=0)], Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]
Text = Annotated[str, Strict(), Field(pattern=r"\S", description="a non-empty string")]
Device = Annotated[str, Strict(), Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                                        description="one of 'auto', 'cpu', 'cuda', 'cuda:N'")]
_SCHEMA = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(config=_SCHEMA)
class BackboneConfig:
    """ResNetBackbone(**backbone) (gfldet.models.backbone)."""

    depth: Literal[18, 34, 50, 101] = 50  # ResNet depth: 18, 34, 50 or 101
    # "torchvision" (ImageNet weights, downloaded), a local .pth path, or null (from scratch)
    weights: Text | None = "torchvision"
    frozen_stages: Annotated[Int, Field(ge=-1, le=4)] = 1  # -1 none; 0 stem; 1 +layer1; <= 4
    norm_eval: Bool = True  # keep BatchNorm in eval mode (frozen statistics), as the recipe


@dataclass(config=_SCHEMA)
class FPNConfig:
    """FPN(in_channels=<the backbone's>, **fpn): the feature pyramid P3-P7."""

    out_channels: Count = 256  # channels of every pyramid level


@dataclass(config=_SCHEMA)
class DGQPConfig:
    """DGQP(reg_max=<the head's>, **dgqp): GFLv2's quality from each side's top-k bin
    probabilities (gfldet.models.head); the head then emits the joint score's logit."""

    topk: Count = 4  # top-k probabilities per side (GFLv2 paper: 4)
    channels: Count = 64  # hidden channels of the two 1x1 convs (GFLv2 paper: 64)
    add_mean: Bool = True  # append the mean of the top-k to each side (GFLv2 paper: true)


@dataclass(config=_SCHEMA)
class HeadConfig:
    """GFLHead(num_classes, in_channels=<the FPN's>, num_levels=5, **head), shared over levels."""

    feat_channels: Count = 256  # channels of the stacked convs
    stacked_convs: NonNegInt = 4  # conv layers in each of the cls and reg towers
    norm: Literal["gn", "none"] = "gn"  # normalization in the towers: GroupNorm(32) or none
    reg_max: Count = 16  # box sides are distributions over reg_max + 1 bins (stride units)
    # a general distribution (GFL), or Dirac: 4 plain distances (ablation baseline, GFL Table 3)
    box_repr: Literal["distribution", "dirac"] = "distribution"
    # "dirac" only: each side's initial distance in strides (the 4 ReLU outputs' bias); unset:
    # octave_base_scale / 2 (boxes at their ATSS anchor); 0 = FCOS's (benchmarks: accuracy.py)
    dirac_init_distance: NonNeg | None = None
    dgqp: DGQPConfig | None = None  # GFLv2's DGQP ({} = the paper's settings); null = GFLv1


@dataclass(config=_SCHEMA)
class PriorsConfig:
    """GFL(..., **priors): one square ATSS prior (anchor) per location and level."""

    octave_base_scale: Count = 8  # prior side = octave_base_scale * stride


@dataclass(config=_SCHEMA)
class AssignerConfig:
    """GFL(..., **assigner): the ATSS assigner (gfldet.assigner.atss_assign)."""

    topk: Count = 9  # candidate priors per level nearest to each gt centre


@dataclass(config=_SCHEMA)
class LossSettings:
    """GFL(..., loss=...): the losses' choices and weights (gfldet.models.criterion.gfl_loss)."""

    cls_loss: Literal["qfl", "focal"] = "qfl"  # or focal loss, binary targets (GFL Table 3)
    qfl_beta: NonNeg = 2.0  # Quality Focal Loss modulating exponent
    focal_alpha: Fraction = 0.25  # focal loss alpha (cls_loss == "focal" only)
    focal_gamma: NonNeg = 2.0  # focal loss gamma (cls_loss == "focal" only)
    cls_weight: Positive = 1.0  # weight of the classification loss
    giou_weight: NonNeg = 2.0  # weight of the GIoU box loss
    dfl_weight: NonNeg = 0.25  # weight of Distribution Focal Loss; 0 = distribution without DFL


@dataclass(config=_SCHEMA)
class PostProcessSettings:
    """GFL(..., test=...): inference post-processing (gfldet.postprocess)."""

    score_thr: Annotated[Float, Field(ge=0, lt=1)] = 0.05  # drop detections scoring below this
    nms_pre: Count = 1000  # top-k (prior, class) pairs per level before NMS
    nms_iou: Annotated[Float, Field(gt=0, le=1)] = 0.6  # IoU threshold of the (class-wise) NMS
    max_per_img: Count = 100  # detections kept per image after NMS


@dataclass(config=_SCHEMA)
class ModelConfig:
    """Detector: ResNet + FPN + GFL head with ATSS assignment (gfldet.engine.build_model)."""

    num_classes: Count = 80  # object classes (no background class)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # ResNet backbone
    fpn: FPNConfig = field(default_factory=FPNConfig)  # feature pyramid
    head: HeadConfig = field(default_factory=HeadConfig)  # GFL head
    priors: PriorsConfig = field(default_factory=PriorsConfig)  # ATSS priors
    assigner: AssignerConfig = field(default_factory=AssignerConfig)  # ATSS assigner
    loss: LossSettings = field(default_factory=LossSettings)  # losses
    test: PostProcessSettings = field(default_factory=PostProcessSettings)  # post-processing


@dataclass(config=_SCHEMA)
class DatasetConfig:
    """A COCO-format dataset split (relative paths are resolved against the working directory)."""

    images: Text = "data/coco/train2017"  # image directory
    annotations: Text = "data/coco/annotations/instances_train2017.json"  # COCO-format json


@dataclass(config=_SCHEMA)
class SyntheticConfig:
    """The bundled synthetic dataset (generated into `root` on first use)."""

    root: Text = "data/synthetic"  # where the images and COCO jsons are generated
    num_train: Count = 2000  # training images
    num_val: Count = 300  # validation images
    seed: NonNegInt = 0  # generator seed (same seed -> same dataset)
    min_object_size: Float = 16.0  # px, sqrt(w*h) of the smallest shapes; lower is harder


@dataclass(config=_SCHEMA)
class DataConfig:
    """Data loading and augmentation."""

    train: DatasetConfig = field(default_factory=DatasetConfig)  # training split
    val: DatasetConfig = field(default_factory=lambda: DatasetConfig(  # validation split
        "data/coco/val2017", "data/coco/annotations/instances_val2017.json"))
    # the bundled demo set, generated into `root` on first use; null to name your own train/val
    synthetic: SyntheticConfig | None = None
    train_short_side: tuple[Count, Count] = (800, 800)  # sampled in [lo, hi] (multi-scale)
    test_short_side: Count = 800  # short side at test time
    max_size: Int = 1333  # cap on the long side (train and test)
    flip_prob: Fraction = 0.5  # horizontal flip probability (train)
    filter_empty: Bool = True  # drop training images without annotations
    min_size: NonNegInt = 32  # drop training images whose width or height is below this
    size_divisor: Count = 32  # pad batched images to a multiple of this
    batch_size: Count = 2  # images per process (GPU)
    val_batch_size: Count = 1  # images per process at evaluation
    num_workers: NonNegInt = 2  # data loader workers per process
    aspect_ratio_grouping: Bool = True  # batch landscape and portrait images separately


@dataclass(config=_SCHEMA)
class OptimConfig:
    """Optimizer."""

    name: Literal["sgd", "adamw"] = "sgd"  # optimizer
    lr: Positive = 0.01  # for reference_batch_size images; scaled linearly to the total batch
    reference_batch_size: Count = 16  # total batch size `lr` is given for
    scale_lr: Bool = True  # scale lr by total_batch / reference_batch_size
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.9  # SGD momentum (AdamW: beta1)
    weight_decay: NonNeg = 0.0001  # L2 / decoupled weight decay
    # Parameter groups as MMEngine's paramwise_cfg (gfldet.engine.build.param_groups): norm layers'
    # weights and biases, the other layers' biases, and the rest (lr and weight_decay).
    norm_weight_decay: NonNeg | None = None  # null = weight_decay; Detectron2 recipes often use 0
    bias_weight_decay: NonNeg | None = None  # null = weight_decay; official GFocal: 0
    bias_lr_factor: Positive = 1.0  # lr multiplier of the non-norm biases; official GFocal: 2
    grad_clip: Positive | None = None  # max global grad norm, null = off


@dataclass(config=_SCHEMA)
class ScheduleConfig:
    """Learning-rate schedule (epoch based, with linear warmup in iterations)."""

    epochs: Count = 12  # training epochs
    policy: Literal["step", "cosine"] = "step"  # step decay at milestones, or cosine
    milestones: list[Int] = field(default_factory=lambda: [8, 11])  # lr *= gamma ("step")
    gamma: Annotated[Float, Field(gt=0, le=1)] = 0.1  # step decay factor
    warmup_iters: NonNegInt = 500  # linear warmup iterations (0 = none)
    warmup_ratio: Annotated[Float, Field(gt=0, le=1)] = 0.001  # start lr = ratio * lr (GFocal: 1/3)
    min_lr_ratio: Annotated[Float, Field(ge=0, lt=1)] = 0.0  # cosine floor, as a fraction of lr


@dataclass(config=_SCHEMA)
class TrainConfig:
    """Training loop."""

    seed: NonNegInt = 0  # global random seed
    deterministic: Bool = False  # deterministic cuDNN / algorithms (slower)
    # Mixed precision. auto: bf16 on CPUs with native bf16 (AVX512-BF16/AMX) and GPUs that have it,
    # fp16 (scaled) on other GPUs, else fp32. none = fp32, as the COCO recipe (MMDetection's).
    amp: Literal["auto", "none", "fp16", "bf16"] = "none"
    channels_last: Bool = False  # channels_last memory format
    compile: Bool = False  # torch.compile the model
    ema: Bool = False  # keep an exponential moving average of the weights
    ema_decay: Annotated[Float, Field(gt=0, lt=1)] = 0.9998  # decay per iteration, ramped up
    # update t decays by ema_decay * (1 - exp(-t / ema_warmup_iters)) (YOLOX); 0 = constant
    ema_warmup_iters: NonNegInt = 2000
    log_interval: Count = 20  # iterations between log lines
    eval_interval: NonNegInt = 1  # epochs between evaluations; 0 = never
    report: Bool = True  # write the evaluation report into work_dir/report after the last eval
    checkpoint_interval: Count = 1  # epochs between checkpoints
    keep_checkpoints: NonNegInt = 3  # newest epoch_N.pth kept besides last/best; 0 = all
    max_bad_steps: Count = 5  # consecutive non-finite steps before the run stops
    max_decode_failures: Fraction = 0.01  # fraction of images that may fail to decode, else stop
    device: Device = "auto"  # auto | cpu | cuda | cuda:N
    work_dir: Text | None = None  # null = work_dirs/<config name>


@dataclass(config=_SCHEMA)
class Config:
    """A complete gfldet experiment. ``Config()`` is the GFL R-50 FPN 1x COCO recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)  # detector
    data: DataConfig = field(default_factory=DataConfig)  # datasets and loading
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # lr schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # training loop

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Config:
        """Rules tying keys together, all broken ones reported; run once every key is valid."""
        loss, head, d, s = self.model.loss, self.model.head, self.data, self.schedule
        dirac, (lo, hi), ms = head.box_repr == "dirac", d.train_short_side, s.milestones
        step, g, t = s.policy == "step", GN_GROUPS, TOP_STRIDE  # cosine ignores milestones
        dgqp = head.dgqp and config_io.as_data(head.dgqp)  # GFLv2's settings; GFLv1: None
        k = dgqp["topk"] if dgqp else 1
        own = [f"data.{n}" for n in ("train", "val") if getattr(d, n) != getattr(DataConfig(), n)]
        small = [f"{key}={config_io.show(value)}" for key, value, side in (
            ("data.test_short_side", d.test_short_side, d.test_short_side),
            ("data.train_short_side", d.train_short_side, lo)) if side <= t]
        rules = [  # (holds, key, value, allowed)
            (head.norm != "gn" or head.feat_channels % g == 0, "model.head.feat_channels",
             head.feat_channels, f"a multiple of {g} when model.head.norm is 'gn' "
             f"(GroupNorm({g})); or set model.head.norm: none"),
            (not dirac or loss.dfl_weight == 0, "model.loss.dfl_weight", loss.dfl_weight,
             "0 when model.head.box_repr is 'dirac' (DFL needs the distribution)"),
            (dirac or head.dirac_init_distance is None, "model.head.dirac_init_distance",
             head.dirac_init_distance, "unset unless model.head.box_repr is 'dirac' (the "
             "distribution has no such bias)"),
            (loss.giou_weight > 0 or loss.dfl_weight > 0, "model.loss.giou_weight",
             loss.giou_weight, "> 0 when model.loss.dfl_weight is 0 (otherwise no box loss is "
             "trained)"),
            (k <= head.reg_max + 1, "model.head.dgqp.topk", k,
             f"<= model.head.reg_max + 1 = {head.reg_max + 1} (the bins)"),
            (dgqp is None or not dirac, "model.head.dgqp", dgqp,
             "null when model.head.box_repr is 'dirac' (DGQP reads the distribution)"),
            (dgqp is None or loss.cls_loss == "qfl", "model.head.dgqp", dgqp,
             "null when model.loss.cls_loss is 'focal' (DGQP learns the IoU from QFL)"),
            (lo <= hi, "data.train_short_side", d.train_short_side, "[lo, hi] with lo <= hi"),
            (not (d.synthetic and own), "data.synthetic", d.synthetic and config_io.as_data(
                d.synthetic), f"null when {' and '.join(own)} name{'s' * (len(own) == 1)} your own "
             "files: the demo set it generates would replace them"),
            (d.max_size >= max(hi, d.test_short_side), "data.max_size", d.max_size,
             f">= the largest short side ({max(hi, d.test_short_side)}); it caps the long side"),
            (not step or all(a < b for a, b in zip(ms, ms[1:])),  # noqa: B905
             "schedule.milestones", ms, "strictly increasing"),
            (not step or all(1 <= x < s.epochs for x in ms), "schedule.milestones", ms,
             f"epochs in [1, schedule.epochs) = [1, {s.epochs}) (lower them or raise epochs)"),
            (head.norm != "gn" or head.stacked_convs == 0 or head.feat_channels != g or not small,
             "model.head.feat_channels", head.feat_channels, f"at least {2 * g} with "
             f"{' and '.join(small)}: GroupNorm({g}) then has one channel per group, and an "
             f"image of {t}x{t} px or less a 1x1 P7 (stride {t}): one value per group, which "
             "torch refuses ('Expected more than 1 value per channel'). Set "
             f"model.head.feat_channels: {2 * g}, or the short sides above {t}, or norm: none"),
        ]
        broken = [(key, value, allowed) for holds, key, value, allowed in rules if not holds]
        if broken:
            raise PydanticCustomError(config_io.RULES_ERROR, "rules", {"problems": broken})
        return self

    def problems(self) -> list[tuple[str, str]]:
        """Every problem as ``(dotted_key, message)``, misspelt attributes too; [] when valid."""
        return config_io.check(Config, config_io.as_data(self, extras=True))[1]

    def validate(self) -> Config:
        """A checked copy, or ConfigError naming every problem (train() calls it). A dict replaces
        a section: optional ones get defaults (dgqp = {}); required ones need every key (optim)."""
        cfg, problems = config_io.check(Config, config_io.as_data(self, extras=True))
        if problems:
            raise ConfigError(config_io.report("invalid config", [msg for _, msg in problems]))
        return cfg


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (following ``base:`` chains), apply ``a.b.c=value`` overrides,
    type-check and validate it. Raises :class:`ConfigError` on any problem."""
    return config_io.build(Config, *config_io.read(path, overrides), os.fspath(path))


def config_from_dict(data: dict, source: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    """Strictly convert and validate a mapping (old keys moved, and logged; `source` names a
    checkpoint by its path) with ``a.b.c=value`` overrides on top; defaults fill in, no ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping, got {type(data).__name__}")
    data = config_io.migrate(data, source)
    return config_io.build(Config, *config_io.read(data, overrides, source), source)


def load_config_or_exit(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """`load_config` for the tools: a bad config prints its error and exits with status 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def config_to_dict(cfg: Config) -> dict:
    """The config as plain YAML-able types (tuples become lists), in schema order."""
    return config_io.as_data(cfg)


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config as YAML; ``load_config`` reads it back to an equal Config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("# Fully resolved gfldet config (written by gfldet.config.dump_config)"
                          ".\n" + config_io.to_yaml(config_to_dict(cfg)), encoding="utf-8")
