"""Load an MMDetection GFL checkpoint (ResNet + FPN + GFLHead, or GFLv2's GFocalHead) into gfldet.

gfldet's modules carry the names of torchvision's ResNet and MMDetection's FPN and GFL head, so
an MMDetection key is its own gfldet key, with `bbox_head.` read as `head.`, except for:

    MMDetection                     gfldet
    backbone.fc.*                   dropped: no classifier in a detector
    bbox_head.integral.project      dropped: gfldet's bins 0..R are fixed (checked equal)
    bbox_head.scales.l.scale  []    element l of head.scales, one [L] parameter
    bbox_head.gfl_cls  [C + 1, ...] GFLv2 only: the last (background) channel dropped, see below
    *.num_batches_tracked (absent)  0, for a (very old) file without BatchNorm counters

The map is checked both ways: every MMDetection key is used or dropped on purpose, every gfldet
key is filled (the map is one-to-one, so at most once), and shapes are equal. Anything else is
a `ConversionError` listing the offending keys.

GFLv2 (implus/GFocalV2, `GFocalHead`) sets `QualityFocalLoss(use_sigmoid=False)`, so mmdet 2.x's
AnchorHead gives `gfl_cls` `num_classes + 1` outputs (`anchor_head.py`: `cls_out_channels`) and
the released COCO checkpoints have 81 channels. The last is no class: background (label 80)
trains it towards 0 everywhere and the official test code pads a background column after all 81.
gfldet drops it (`extra_class_channel`) and says so in the report.

MMDetection's BN eps (1e-5), GN eps (1e-5), `pytorch`-style ResNet (stride on the 3x3 conv) and
ImageNet mean/std match gfldet's, so the converted weights are used as they are.

Shape legend: `L` pyramid levels (5), `R` reg_max (16), `C` classes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gfldet.config import Config, DGQPConfig, config_to_dict
from gfldet.engine.build import dataset_paths
from gfldet.engine.checkpoint import MODEL_FORMAT, format_key_list, load_checkpoint, save_checkpoint

_DEPTHS = {  # (blocks per stage, bottleneck) -> ResNet depth
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
}


class ConversionError(ValueError):
    """The MMDetection state dict does not map exactly onto gfldet's model."""


@dataclass
class ConversionReport:
    mapped: int = 0  # gfldet keys filled from the MMDetection file
    dropped: list[str] = field(default_factory=list)  # MMDetection keys left out on purpose
    filled: list[str] = field(default_factory=list)  # num_batches_tracked absent, set to 0
    sliced: list[str] = field(default_factory=list)  # GFLv2's background class channel, cut
    class_names: str = ""  # one line: the names stored, where from; or what detections are named


# --------------------------------------------------------------------------- reading


def read_mmdet_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, meta) of an MMDetection checkpoint ({"state_dict": ..., "meta": ...} or a bare
    state dict), loaded with weights_only=True; a "module." prefix (DataParallel) is removed."""
    state = load_checkpoint(path)
    if "model_format" in state or (isinstance(state.get("model"), Mapping)
                                   and isinstance(state.get("config"), Mapping)):
        raise ConversionError(
            f"{path} is already a gfldet checkpoint (model format "
            f"{state.get('model_format', 1)}, with 'model' and 'config'): use it directly with "
            "tools/predict.py, tools/eval.py, tools/export.py or Detector.from_checkpoint. "
            "convert_mmdet reads MMDetection's files ('state_dict' and 'meta').")
    weights = state.get("state_dict", state)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    tensors = {k: v for k, v in weights.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ConversionError(f"{path}: no tensors found (keys: {sorted(weights)[:10]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors, meta


def _class_names_and_key(meta: Mapping[str, Any]) -> tuple[list[str] | None, str]:
    """(class names from MMDetection 2.x `meta.CLASSES` or 3.x `meta.dataset_meta.classes`, the
    meta key they came from, "" when none)."""
    if names := meta.get("CLASSES"):
        return [str(n) for n in names], "meta.CLASSES"
    dataset_meta = meta.get("dataset_meta")
    if isinstance(dataset_meta, dict) and (names := dataset_meta.get("classes")):
        return [str(n) for n in names], "meta.dataset_meta.classes"
    return None, ""


def class_names_line(names: list[str] | None, key: str, cfg: Config, src: str | Path) -> str:
    """What a conversion did about class names, in one line: how many from which meta key, or
    (none, or a count that differs from the model's) what detections will be named and how to
    give names. The fallback is `gfldet.inference.class_names_for`'s, at load time."""
    num = cfg.model.num_classes
    if names is not None and len(names) == num:
        shown = ", ".join(names[:3]) + (", ..." if num > 3 else "")
        return f"class names: {num} from {key} ({shown})"
    found = (f"{key} has {len(names)} for {num} classes, none stored" if names is not None
             else f"none in {src} (no meta.CLASSES or meta.dataset_meta.classes)")
    ann = dataset_paths(cfg.data, "val", generate=False).annotations
    return (f"class names: {found}; detections will be named class_0 .. class_{num - 1} unless "
            f"the config's data.val annotations ({ann}) list {num} categories (give such a "
            "config with --config, or as CONFIG to predict and eval)")


def infer_model_settings(state: Mapping[str, Tensor],
                         class_names: list[str] | None = None) -> dict[str, Any]:
    """Model settings implied by an MMDetection GFL state dict's keys and shapes (for
    `config_from_settings`).

    A GFLv2 state dict (`bbox_head.reg_conf.*`) adds the dgqp_* arguments. Its `gfl_cls` has one
    channel more than there are classes (see the module docstring) unless `class_names` (the
    checkpoint's meta) count as many classes as it has channels."""
    needed = ["backbone.conv1.weight", "neck.lateral_convs.0.conv.weight",
              "bbox_head.gfl_cls.weight", "bbox_head.gfl_reg.weight"]
    if absent := [k for k in needed if k not in state]:
        raise ConversionError(
            f"not an MMDetection GFL (ResNet + FPN) state dict: missing {absent}. Expected keys "
            "like backbone.layer1.0.conv1.weight, neck.fpn_convs.0.conv.weight, "
            "bbox_head.gfl_reg.weight.")
    if any("conv_offset" in k for k in state):
        raise ConversionError(
            "the backbone uses deformable convolutions (DCN: *.conv2.conv_offset.* keys); gfldet's "
            "ResNet has none, so the *-dcnv2 GFL checkpoints cannot be converted. Use a non-DCN "
            "one.")

    def count(prefix: str) -> int:  # blocks of a stage, convs of a tower
        return len({k.removeprefix(prefix).split(".")[0] for k in state if k.startswith(prefix)})

    blocks = tuple(count(f"backbone.layer{n}.") for n in range(1, 5))
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    conv1, conv2 = (state.get(f"backbone.layer1.0.conv{i}.weight") for i in (1, 2))
    if bottleneck and conv1 is not None and conv2 is not None and conv2.shape[1] != conv1.shape[0]:
        raise ConversionError("the backbone has grouped 3x3 convolutions (ResNeXt); gfldet "
                              "supports ResNet-18/34/50/101 only")
    if (depth := _DEPTHS.get((blocks, bottleneck))) is None:
        raise ConversionError(f"unsupported backbone: {blocks} blocks per stage "
                              f"({'bottleneck' if bottleneck else 'basic'} blocks); "
                              "gfldet supports ResNet-18/34/50/101")
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
        "stacked_convs": count("bbox_head.cls_convs."),
        "norm": "gn" if "bbox_head.cls_convs.0.gn.weight" in state else "none",
        "reg_max": int(reg_weight.shape[0]) // 4 - 1,
    }
    if dgqp:
        hidden = state["bbox_head.reg_conf.0.weight"]  # [channels, 4 (topk + 1), 1, 1]
        # Official add_mean=True (every released config): 4 x (topk + 1) inputs. A checkpoint
        # trained without the mean needs --config (20 inputs would read as topk 4 + mean).
        settings.update(dgqp=True, dgqp_topk=int(hidden.shape[1]) // 4 - 1,
                        dgqp_channels=int(hidden.shape[0]), dgqp_add_mean=True)
    return settings


def extra_class_channel(state: Mapping[str, Tensor],
                        num_classes: int) -> tuple[dict[str, Tensor], list[str]]:
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


_DROPPED = re.compile(r"backbone\.fc\.(weight|bias)|bbox_head\.integral\.project")
_SCALE = re.compile(r"bbox_head\.scales\.(\d+)\.scale")


def gfldet_key(mmdet_key: str) -> str | None:
    """The gfldet key of an MMDetection key, or None outside gfldet's `backbone.`, `neck.` and
    head (`bbox_head.`) prefixes. The table's exceptions are handled by `convert_state_dict`."""
    if mmdet_key.startswith(("backbone.", "neck.")):
        return mmdet_key
    if mmdet_key.startswith("bbox_head."):
        return "head." + mmdet_key.removeprefix("bbox_head.")
    return None


def convert_state_dict(mmdet_state: Mapping[str, Tensor], target_state: Mapping[str, Tensor],
                       reg_max: int) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map `mmdet_state` onto the keys and shapes of `target_state` (a gfldet model's state dict).

    Raises ConversionError listing every MMDetection key gfldet's model has no place for
    (unmapped), every gfldet key left without a tensor (missing) and every shape difference
    (reshaped).
    """
    bins = torch.arange(reg_max + 1, dtype=torch.float32)  # gfldet's Integral: fixed 0..R
    project = mmdet_state.get("bbox_head.integral.project")
    if project is not None and (project.shape != bins.shape
                                or not torch.allclose(project.float(), bins)):
        raise ConversionError(
            f"bbox_head.integral.project is {project.flatten()[:20].tolist()} (shape "
            f"{list(project.shape)}); gfldet's Integral uses the fixed bins 0..{reg_max}, so "
            "this checkpoint's regression outputs would be decoded differently")
    report, out = ConversionReport(), {}
    scales: dict[int, Tensor] = {}  # level -> its mmcv Scale, one element of head.scales
    levels = target_state["head.scales"].numel()
    unmapped, missing, reshaped = [], [], []
    for key, value in mmdet_state.items():
        if _DROPPED.fullmatch(key):
            report.dropped.append(key)
        elif scale := _SCALE.fullmatch(key):
            if value.numel() != 1:
                reshaped.append(f"{key} {list(value.shape)} -> one element of head.scales")
            elif int(scale[1]) >= levels:
                unmapped.append(f"{key} -> head.scales[{scale[1]}] of {levels} levels")
            else:
                scales[int(scale[1])] = value.detach().reshape(1)
        elif (ours := gfldet_key(key)) not in target_state:
            unmapped.append(f"{key} -> {ours or 'no gfldet prefix'} {list(value.shape)}")
        elif value.shape != target_state[ours].shape:
            reshaped.append(f"{key} {list(value.shape)} -> {ours} {list(target_state[ours].shape)}")
        else:
            out[ours] = value.detach().to(target_state[ours].dtype).clone()
    if len(scales) == levels:
        out["head.scales"] = torch.cat([scales[i] for i in range(levels)]).to(
            target_state["head.scales"].dtype)

    counters = any(k.endswith("num_batches_tracked") for k in mmdet_state)
    for key, expected in target_state.items():
        if key in out:
            continue
        if key.endswith("num_batches_tracked") and not counters:
            out[key] = torch.zeros_like(expected)
            report.filled.append(key)
        elif key == "head.scales" and scales:
            missing.append(f"{key} {list(expected.shape)} (only elements {sorted(scales)} given)")
        else:
            missing.append(f"{key} {list(expected.shape)}")
    if unmapped or missing or reshaped:
        hint = ""
        dgqp_in_file = any(k.startswith("bbox_head.reg_conf.") for k in mmdet_state)
        if dgqp_in_file != any(k.startswith("head.reg_conf.") for k in target_state):
            hint = ("This is a GFLv2 (DGQP: bbox_head.reg_conf.*) checkpoint and the config a "
                    "GFLv1 one: use a configs/gflv2_*.yaml or set model.head.dgqp: {}."
                    if dgqp_in_file else "This is a GFLv1 checkpoint (no bbox_head.reg_conf.*) "
                    "and the config a GFLv2 one: use a configs/gfl_*.yaml or set "
                    "model.head.dgqp: null.")
        raise ConversionError(_error_text(unmapped, missing, reshaped, hint))
    report.mapped = len(out) - len(report.filled)
    return out, report


def _error_text(unmapped: list[str], missing: list[str], reshaped: list[str], hint: str) -> str:
    parts = ["the MMDetection state dict does not map exactly onto gfldet's model:"]
    parts += [format_key_list(title, items) for title, items in [
        ("MMDetection keys with no place in gfldet's model (unmapped; other depth, levels?)",
         unmapped),
        ("gfldet keys no MMDetection key provides (missing)", missing),
        ("shape differences (reshaped)", reshaped),
    ] if items]
    parts.append(
        "Only MMDetection GFL models with a ResNet-18/34/50/101 backbone (no DCN, no ResNeXt), "
        "FPN P3-P7 and GFLHead (or GFLv2's GFocalHead) convert. If you passed --config, check "
        "that it describes the same model (depth, channels, stacked convs, classes) or leave it "
        "out to infer the model.")
    return "\n".join(parts + [hint] if hint else parts)


# --------------------------------------------------------------------------- whole files


def convert_checkpoint(src: str | Path, dst: str | Path,
                       config: Config | None = None) -> tuple[Path, ConversionReport, Config]:
    """Convert an MMDetection GFL checkpoint file into a gfldet checkpoint at `dst`.

    The model is built from `config` when given (its model section must describe the same
    network), else inferred from the file's keys and shapes on top of the R-50 1x COCO recipe.
    The output holds `model`, `config` and `meta` (class names, source, MMDetection version) and
    loads with tools/eval.py, tools/predict.py and `Detector.from_checkpoint`.
    """
    from gfldet.inference import build_inference_model  # inference imports the model stack

    src, dst = Path(src), Path(dst)
    mmdet_state, meta = read_mmdet_checkpoint(src)
    names, names_key = _class_names_and_key(meta)
    cfg = config or config_from_settings(infer_model_settings(mmdet_state, names))
    model = build_inference_model(cfg)
    mmdet_state, sliced = extra_class_channel(mmdet_state, cfg.model.num_classes)
    converted, report = convert_state_dict(mmdet_state, model.state_dict(), cfg.model.head.reg_max)
    report.sliced = sliced
    model.load_state_dict(converted, strict=True)  # cannot fail after the checks; a last guard
    report.class_names = class_names_line(names, names_key, cfg, src)
    if names is not None and len(names) != cfg.model.num_classes:
        names = None
    meta = {"class_names": names, "source": src.name,
            "mmdet_version": str(meta.get("mmdet_version", "")),
            "converted_by": "gfldet.convert_mmdet"}
    save_checkpoint({"model": converted, "model_format": MODEL_FORMAT,
                     "config": config_to_dict(cfg), "meta": meta}, dst)
    return dst, report, cfg
