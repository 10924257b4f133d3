"""Map an MMDetection GFL checkpoint (ResNet + FPN + GFLHead) onto gfldet's model.

The mapping is a list of explicit rules (`mapping_rules`), one regular expression per family of
MMDetection keys, and it is checked both ways: every MMDetection key must be mapped or dropped
on purpose, every gfldet key must receive exactly one tensor, and shapes must be equal.
Anything else is a `ConversionError` listing the offending keys.

    MMDetection                                   gfldet
    backbone.conv1 / bn1                          backbone.stem.0 / stem.1
    backbone.layerN.i.{conv,bn}{1,2,3},
      .downsample.{0,1}                           same names (torchvision's ResNet)
    neck.lateral_convs.i.conv        (i = 0..2)   neck.lateral_convs.i
    neck.fpn_convs.i.conv            (i = 0..2)   neck.output_convs.i
    neck.fpn_convs.3.conv / .4.conv  (P6, P7)     neck.p6 / neck.p7
    bbox_head.{cls,reg}_convs.i.conv / .gn        head.{cls,reg}_tower.<3i> / .<3i+1>  (conv, GN, ReLU)
    bbox_head.gfl_cls / gfl_reg                   head.cls_out / head.reg_out
    bbox_head.scales.l.scale         ([] each)    head.scales[l]  (one [L] parameter)
    bbox_head.integral.project       ([R + 1])    dropped: gfldet's bins are fixed (checked equal)
    bbox_head.reg_conf.0 / .2        (GFLv2)      head.dgqp.hidden / head.dgqp.out (DGQP's
                                                  1x1 convs; .1 ReLU, .3 Sigmoid: no tensors)
    backbone.fc.*                    (if present) dropped: no classifier in a detector

GFLv2 (implus/GFocalV2, `GFocalHead`): its configs set `QualityFocalLoss(use_sigmoid=False)`,
and mmdet 2.x's AnchorHead then gives the classification conv `num_classes + 1` outputs
(`anchor_head.py`: `cls_out_channels = num_classes if use_sigmoid_cls else num_classes + 1`), so
the released COCO checkpoints have an 81-channel `gfl_cls`. That last channel is no class: the
official QFL counts every label below the channel count as a positive, so background (label 80)
trains channel 80 towards a target of 0 everywhere, and its test code pads a background column
after all 81. gfldet drops that channel (`extra_class_channel`) and says so in the report.

BatchNorm `num_batches_tracked` buffers map like the other BN entries (torchvision's BN has
them); only when a (very old) checkpoint lacks them are they filled with 0 - a counter that
inference never reads - and listed in the report. MMDetection's BN eps (1e-5), GN eps (1e-5),
`pytorch`-style ResNet (stride on the 3x3 conv) and ImageNet mean/std match gfldet's, so the
converted weights are used as they are.

Shape legend: `L` pyramid levels (5), `R` reg_max (16), `C` classes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gfldet.config import Config, DGQPConfig, config_to_dict
from gfldet.engine.checkpoint import load_checkpoint, save_checkpoint

_BN_ENTRIES = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_DEPTHS = {  # (blocks per stage, bottleneck) -> ResNet depth
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
}
_MAX_LISTED = 25


class ConversionError(ValueError):
    """The MMDetection state dict does not map exactly onto gfldet's model."""


@dataclass(frozen=True)
class Target:
    """Where an MMDetection tensor goes: a gfldet key, or one element of it (`index`)."""

    key: str
    index: int | None = None


@dataclass(frozen=True)
class Rule:
    """MMDetection keys fully matching `pattern` go to `target(match)`; None drops them."""

    pattern: re.Pattern[str]
    target: Callable[[re.Match[str]], Target | None]
    description: str


def _rule(pattern: str, target: Callable[[re.Match[str]], Target | None], description: str) -> Rule:
    return Rule(re.compile(pattern), target, description)


def mapping_rules(norm: str = "gn") -> list[Rule]:
    """The MMDetection -> gfldet key rules. `norm` is the head's tower normalisation: with "gn"
    each tower conv occupies three Sequential slots (conv, GroupNorm, ReLU), with "none" two
    (conv with bias, ReLU)."""
    slots = 3 if norm == "gn" else 2

    def tower(name: str) -> Callable[[re.Match[str]], Target]:
        def target(m: re.Match[str]) -> Target:
            i, layer, entry = int(m[1]), m[2], m[3]
            return Target(f"head.{name}_tower.{slots * i + (1 if layer == 'gn' else 0)}.{entry}")

        return target

    return [
        _rule(r"backbone\.conv1\.weight", lambda m: Target("backbone.stem.0.weight"), "stem conv"),
        _rule(rf"backbone\.bn1\.{_BN_ENTRIES}", lambda m: Target(f"backbone.stem.1.{m[1]}"), "stem BN"),
        _rule(  # same names on both sides
            rf"backbone\.(layer[1-4]\.\d+\.(?:conv[1-3]\.weight|bn[1-3]\.{_BN_ENTRIES}"
            rf"|downsample\.(?:0\.weight|1\.{_BN_ENTRIES})))",
            lambda m: Target(f"backbone.{m[1]}"), "residual block and shortcut conv / BN",
        ),
        _rule(r"backbone\.fc\.(weight|bias)", lambda m: None, "ImageNet classifier (dropped)"),
        _rule(
            r"neck\.lateral_convs\.([0-2])\.conv\.(weight|bias)",
            lambda m: Target(f"neck.lateral_convs.{m[1]}.{m[2]}"), "FPN lateral 1x1 conv",
        ),
        _rule(
            r"neck\.fpn_convs\.([0-2])\.conv\.(weight|bias)",
            lambda m: Target(f"neck.output_convs.{m[1]}.{m[2]}"), "FPN output 3x3 conv (P3-P5)",
        ),
        _rule(r"neck\.fpn_convs\.3\.conv\.(weight|bias)", lambda m: Target(f"neck.p6.{m[1]}"), "FPN extra conv P6"),
        _rule(r"neck\.fpn_convs\.4\.conv\.(weight|bias)", lambda m: Target(f"neck.p7.{m[1]}"), "FPN extra conv P7"),
        _rule(r"bbox_head\.cls_convs\.(\d+)\.(conv|gn)\.(weight|bias)", tower("cls"), "classification tower"),
        _rule(r"bbox_head\.reg_convs\.(\d+)\.(conv|gn)\.(weight|bias)", tower("reg"), "regression tower"),
        _rule(r"bbox_head\.gfl_cls\.(weight|bias)", lambda m: Target(f"head.cls_out.{m[1]}"), "class-quality output conv"),
        _rule(r"bbox_head\.gfl_reg\.(weight|bias)", lambda m: Target(f"head.reg_out.{m[1]}"), "distribution output conv"),
        _rule(r"bbox_head\.scales\.(\d+)\.scale", lambda m: Target("head.scales", int(m[1])), "per-level scale"),
        _rule(r"bbox_head\.integral\.project", lambda m: None, "Integral bins 0..R (dropped, checked)"),
        _rule(r"bbox_head\.reg_conf\.0\.(weight|bias)",
              lambda m: Target(f"head.dgqp.hidden.{m[1]}"), "GFLv2 DGQP first 1x1 conv"),
        _rule(r"bbox_head\.reg_conf\.2\.(weight|bias)", lambda m: Target(f"head.dgqp.out.{m[1]}"),
              "GFLv2 DGQP second 1x1 conv"),
    ]


@dataclass
class ConversionReport:
    mapped: int = 0  # gfldet keys filled from the MMDetection file
    dropped: list[str] = field(default_factory=list)  # MMDetection keys left out on purpose
    filled: list[str] = field(default_factory=list)  # num_batches_tracked absent from the file, set to 0
    sliced: list[str] = field(default_factory=list)  # GFLv2's background class channel, cut


# --------------------------------------------------------------------------- reading


def read_mmdet_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, meta) of an MMDetection checkpoint, loaded with weights_only=True.

    MMDetection wraps the weights as {"state_dict": ..., "meta": ...} (plus "optimizer" in
    training checkpoints); a bare state dict is accepted too. A "module." prefix (DataParallel)
    is removed.
    """
    state = load_checkpoint(path)
    weights = state.get("state_dict", state)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    tensors = {k: v for k, v in weights.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ConversionError(f"{path}: no tensors found (keys: {sorted(weights)[:10]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors, meta


def mmdet_class_names(meta: Mapping[str, Any]) -> list[str] | None:
    """Class names from MMDetection 2.x (`meta.CLASSES`) or 3.x (`meta.dataset_meta.classes`)."""
    names = meta.get("CLASSES")
    dataset_meta = meta.get("dataset_meta")
    if names is None and isinstance(dataset_meta, dict):
        names = dataset_meta.get("classes")
    return [str(n) for n in names] if names else None


def infer_model_settings(
    state: Mapping[str, Tensor], class_names: list[str] | None = None
) -> dict[str, Any]:
    """Model settings implied by an MMDetection GFL state dict's keys and shapes (for
    `config_from_settings`).

    A GFLv2 state dict (`bbox_head.reg_conf.*`) adds the dgqp_* arguments. Its `gfl_cls` has one
    channel more than there are classes (see the module docstring) unless `class_names` (the
    checkpoint's meta) count as many classes as it has channels."""
    needed = ["backbone.conv1.weight", "neck.lateral_convs.0.conv.weight", "bbox_head.gfl_cls.weight",
              "bbox_head.gfl_reg.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise ConversionError(
            f"not an MMDetection GFL (ResNet + FPN) state dict: missing {absent}. Expected keys like "
            "backbone.layer1.0.conv1.weight, neck.fpn_convs.0.conv.weight, bbox_head.gfl_reg.weight."
        )
    if any("conv_offset" in k for k in state):
        raise ConversionError(
            "the backbone uses deformable convolutions (DCN: *.conv2.conv_offset.* keys); gfldet's "
            "ResNet has none, so the *-dcnv2 GFL checkpoints cannot be converted. Use a non-DCN one."
        )
    blocks = tuple(
        len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{n}.")}) for n in range(1, 5)
    )
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    conv1, conv2 = state.get("backbone.layer1.0.conv1.weight"), state.get("backbone.layer1.0.conv2.weight")
    if bottleneck and conv1 is not None and conv2 is not None and conv2.shape[1] != conv1.shape[0]:
        raise ConversionError(
            "the backbone has grouped 3x3 convolutions (ResNeXt); gfldet supports ResNet-18/34/50/101 only"
        )
    depth = _DEPTHS.get((blocks, bottleneck))
    if depth is None:
        raise ConversionError(
            f"unsupported backbone: {blocks} blocks per stage ({'bottleneck' if bottleneck else 'basic'} "
            "blocks); gfldet supports ResNet-18/34/50/101"
        )
    cls_weight, reg_weight = state["bbox_head.gfl_cls.weight"], state["bbox_head.gfl_reg.weight"]
    num_classes = int(cls_weight.shape[0])
    dgqp = "bbox_head.reg_conf.0.weight" in state
    if dgqp and (class_names is None or len(class_names) != num_classes):
        num_classes -= 1  # the official GFLv2 background channel
    settings = {
        "num_classes": num_classes,
        "depth": depth,
        "fpn_channels": int(state["neck.lateral_convs.0.conv.weight"].shape[0]),
        "feat_channels": int(cls_weight.shape[1]),
        "stacked_convs": len({k.split(".")[2] for k in state if k.startswith("bbox_head.cls_convs.")}),
        "norm": "gn" if any(re.fullmatch(r"bbox_head\.cls_convs\.\d+\.gn\.weight", k) for k in state) else "none",
        "reg_max": int(reg_weight.shape[0]) // 4 - 1,
    }
    if dgqp:
        hidden = state["bbox_head.reg_conf.0.weight"]  # [channels, 4 (topk + 1), 1, 1]
        # Official add_mean=True (every released config): 4 x (topk + 1) inputs. A checkpoint
        # trained without the mean needs --config (20 inputs would read as topk 4 + mean).
        settings.update(dgqp=True, dgqp_topk=int(hidden.shape[1]) // 4 - 1,
                        dgqp_channels=int(hidden.shape[0]), dgqp_add_mean=True)
    return settings


def extra_class_channel(
    state: Mapping[str, Tensor], num_classes: int
) -> tuple[dict[str, Tensor], list[str]]:
    """`state` without the official GFLv2 background channel of `gfl_cls` (the last of
    num_classes + 1), and the keys cut; unchanged when `gfl_cls` has `num_classes` channels or
    the state dict has no DGQP (GFLv1 checkpoints use sigmoid QFL: exactly one per class)."""
    out = dict(state)
    if "bbox_head.reg_conf.0.weight" not in state:
        return out, []
    cut = []
    for key in ("bbox_head.gfl_cls.weight", "bbox_head.gfl_cls.bias"):
        if key in state and state[key].shape[0] == num_classes + 1:
            out[key] = state[key][:num_classes]
            cut.append(f"{key} {list(state[key].shape)} -> first {num_classes}")
    return out, cut


def config_from_settings(settings: Mapping[str, Any], base: Config | None = None) -> Config:
    """`base` (default: the R-50 1x COCO recipe) with the model fields of `settings`."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    m = cfg.model
    m.num_classes = settings["num_classes"]
    m.backbone.depth = settings["depth"]
    m.backbone.weights = None  # the converted file holds the backbone weights
    m.fpn.out_channels = settings["fpn_channels"]
    m.head.feat_channels = settings["feat_channels"]
    m.head.stacked_convs = settings["stacked_convs"]
    m.head.norm = settings["norm"]
    m.head.reg_max = settings["reg_max"]
    m.head.dgqp = DGQPConfig(topk=settings["dgqp_topk"], channels=settings["dgqp_channels"],
                             add_mean=settings["dgqp_add_mean"]) if settings.get("dgqp") else None
    return cfg


# --------------------------------------------------------------------------- mapping


def convert_state_dict(
    mmdet_state: Mapping[str, Tensor], target_state: Mapping[str, Tensor], norm: str = "gn", reg_max: int = 16
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map `mmdet_state` onto the keys and shapes of `target_state` (a gfldet model's state dict).

    Raises ConversionError listing every MMDetection key no rule maps, every mapped key gfldet's
    model does not have, every gfldet key left without a tensor, and every shape difference.
    """
    rules = mapping_rules(norm)
    report = ConversionReport()
    out: dict[str, Tensor] = {}
    elements: dict[str, dict[int, Tensor]] = {}
    source_of: dict[str, str] = {}
    unmapped, no_target, reshaped, duplicated = [], [], [], []

    for key, value in mmdet_state.items():
        rule = next((r for r in rules if r.pattern.fullmatch(key)), None)
        if rule is None:
            unmapped.append(f"{key} {list(value.shape)}")
            continue
        target = rule.target(rule.pattern.fullmatch(key))
        if target is None:
            if key == "bbox_head.integral.project":
                _check_project(value, reg_max)
            report.dropped.append(key)
            continue
        if target.key not in target_state:
            no_target.append(f"{key} -> {target.key} ({rule.description})")
            continue
        expected = target_state[target.key]
        slot = target.key if target.index is None else f"{target.key}[{target.index}]"
        if slot in source_of:
            duplicated.append(f"{slot} <- {source_of[slot]} and {key}")
            continue
        source_of[slot] = key
        if target.index is None:
            if value.shape != expected.shape:
                reshaped.append(f"{key} {list(value.shape)} -> {target.key} {list(expected.shape)}")
                continue
            out[target.key] = value.detach().to(expected.dtype).clone()
        else:
            if value.numel() != 1 or not 0 <= target.index < expected.numel():
                reshaped.append(
                    f"{key} {list(value.shape)} -> element {target.index} of {target.key} {list(expected.shape)}"
                )
                continue
            elements.setdefault(target.key, {})[target.index] = value.detach().reshape(())

    for key, parts in elements.items():
        expected = target_state[key]
        if len(parts) == expected.numel():
            out[key] = torch.stack([parts[i] for i in range(expected.numel())]).to(expected.dtype).reshape(expected.shape)
        # else: reported below as missing, with the indices that came

    missing = []
    for key, expected in target_state.items():
        if key in out:
            continue
        if key.endswith("num_batches_tracked") and not any(k.endswith("num_batches_tracked") for k in mmdet_state):
            out[key] = torch.zeros_like(expected)
            report.filled.append(key)
            continue
        got = sorted(elements.get(key, {}))
        missing.append(f"{key} {list(expected.shape)}" + (f" (only elements {got} given)" if got else ""))

    if unmapped or no_target or reshaped or duplicated or missing:
        raise ConversionError(_error_text(unmapped, no_target, missing, reshaped, duplicated))
    report.mapped = len(out) - len(report.filled)
    return out, report


def _check_project(value: Tensor, reg_max: int) -> None:
    expected = torch.arange(reg_max + 1, dtype=torch.float32)
    if value.shape != expected.shape or not torch.allclose(value.float(), expected):
        raise ConversionError(
            f"bbox_head.integral.project is {value.flatten()[:20].tolist()} (shape {list(value.shape)}); "
            f"gfldet's Integral uses the fixed bins 0..{reg_max}, so this checkpoint's regression "
            "outputs would be decoded differently"
        )


def _error_text(
    unmapped: list[str], no_target: list[str], missing: list[str], reshaped: list[str], duplicated: list[str]
) -> str:
    parts = ["the MMDetection state dict does not map exactly onto gfldet's model:"]
    sections = [
        ("MMDetection keys no rule maps (unmapped)", unmapped),
        ("mapped to keys gfldet's model does not have (different depth/levels?)", no_target),
        ("gfldet keys no MMDetection key provides (missing)", missing),
        ("shape differences (reshaped)", reshaped),
        ("several MMDetection keys for one gfldet key", duplicated),
    ]
    for title, items in sections:
        if items:
            shown = "\n".join(f"    {s}" for s in items[:_MAX_LISTED])
            more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            parts.append(f"  {title} ({len(items)}):\n{shown}{more}")
    parts.append(
        "Only MMDetection GFL models with a ResNet-18/34/50/101 backbone (no DCN, no ResNeXt), "
        "FPN P3-P7 and GFLHead (or GFLv2's GFocalHead) convert. If you passed --config, check "
        "that it describes the same model (depth, channels, stacked convs, classes) or leave it "
        "out to infer the model."
    )
    return "\n".join(parts)


# --------------------------------------------------------------------------- whole files


def convert_checkpoint(
    src: str | Path, dst: str | Path, config: Config | None = None
) -> tuple[Path, ConversionReport, Config]:
    """Convert an MMDetection GFL checkpoint file into a gfldet checkpoint at `dst`.

    The model is built from `config` when given (its model section must describe the same
    network), else inferred from the file's keys and shapes on top of the R-50 1x COCO recipe.
    The output holds `model`, `config` and `meta` (class names, source, MMDetection version) and
    loads with tools/eval.py, tools/predict.py and `Detector.from_checkpoint`.
    """
    from gfldet.inference import build_inference_model  # inference imports the model stack

    src, dst = Path(src), Path(dst)
    mmdet_state, meta = read_mmdet_checkpoint(src)
    names = mmdet_class_names(meta)
    if config is None:
        config = config_from_settings(infer_model_settings(mmdet_state, names))
    cfg = config
    model = build_inference_model(cfg)
    mmdet_state, sliced = extra_class_channel(mmdet_state, cfg.model.num_classes)
    converted, report = convert_state_dict(mmdet_state, model.state_dict(), cfg.model.head.norm, cfg.model.head.reg_max)
    report.sliced = sliced
    model.load_state_dict(converted, strict=True)  # cannot fail after the checks; a last guard
    if names is not None and len(names) != cfg.model.num_classes:
        names = None
    save_checkpoint(
        {
            "model": converted,
            "config": config_to_dict(cfg),
            "meta": {
                "class_names": names,
                "source": src.name,
                "mmdet_version": str(meta.get("mmdet_version", "")),
                "converted_by": "gfldet.convert_mmdet",
            },
        },
        dst,
    )
    return dst, report, cfg
