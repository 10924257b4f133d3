"""MMDetection GFL checkpoint -> gfldet: every key mapped both ways, loud failures otherwise.

The MMDetection state dicts here are written from MMDetection's module layout (ResNet
`conv1/bn1/layerN.i.convK/bnK/downsample`, FPN `lateral_convs/fpn_convs` ConvModules, GFLHead
`cls_convs/reg_convs` ConvModules with GN, `gfl_cls`, `gfl_reg`, `scales.l.scale`,
`integral.project`), not from gfldet's model, so the mapping is checked against an independent
description.
"""

from __future__ import annotations

import pytest
import torch
from test_export import load_tool

from gfldet.convert_mmdet import (
    ConversionError,
    config_from_settings,
    convert_state_dict,
    infer_model_settings,
)
from gfldet.engine.build import build_model
from gfldet.engine.checkpoint import load_checkpoint

STAGES = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}


def _bn(sd: dict, name: str, channels: int, tracked: bool = True) -> None:
    sd[f"{name}.weight"] = torch.rand(channels) + 0.5
    sd[f"{name}.bias"] = torch.randn(channels)
    sd[f"{name}.running_mean"] = torch.randn(channels)
    sd[f"{name}.running_var"] = torch.rand(channels) + 0.5
    if tracked:
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1234)


def _conv(sd: dict, name: str, out: int, inp: int, k: int, bias: bool = False) -> None:
    sd[f"{name}.weight"] = torch.randn(out, inp, k, k) * 0.05
    if bias:
        sd[f"{name}.bias"] = torch.randn(out) * 0.01


def mmdet_gfl_state_dict(
    depth: int = 50, num_classes: int = 80, fpn: int = 256, feat: int = 256, stacked: int = 4,
    reg_max: int = 16, tracked: bool = True,
) -> dict[str, torch.Tensor]:
    """An MMDetection GFL (ResNet-`depth`, FPN start_level=1 with 2 extra convs, GN head)
    state dict."""
    blocks, bottleneck = STAGES[depth]
    expansion = 4 if bottleneck else 1
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "backbone.conv1", 64, 3, 7)
    _bn(sd, "backbone.bn1", 64, tracked)
    inp, stage_out = 64, []
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        for i in range(count):
            p = f"backbone.layer{stage}.{i}"
            if bottleneck:
                _conv(sd, f"{p}.conv1", width, inp, 1)
                _conv(sd, f"{p}.conv2", width, width, 3)
                _conv(sd, f"{p}.conv3", width * 4, width, 1)
                for j, c in ((1, width), (2, width), (3, width * 4)):
                    _bn(sd, f"{p}.bn{j}", c, tracked)
            else:
                _conv(sd, f"{p}.conv1", width, inp, 3)
                _conv(sd, f"{p}.conv2", width, width, 3)
                _bn(sd, f"{p}.bn1", width, tracked)
                _bn(sd, f"{p}.bn2", width, tracked)
            if i == 0 and (inp != width * expansion or stage > 1):
                _conv(sd, f"{p}.downsample.0", width * expansion, inp, 1)
                _bn(sd, f"{p}.downsample.1", width * expansion, tracked)
            inp = width * expansion
        stage_out.append(inp)
    for i, c in enumerate(stage_out[1:]):  # start_level=1: C3, C4, C5
        _conv(sd, f"neck.lateral_convs.{i}.conv", fpn, c, 1, bias=True)
    for i in range(5):  # 3 output convs, then P6 and P7 (add_extra_convs='on_output')
        _conv(sd, f"neck.fpn_convs.{i}.conv", fpn, fpn, 3, bias=True)
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked):
            # no bias with GN
            _conv(sd, f"bbox_head.{tower}.{i}.conv", feat, fpn if i == 0 else feat, 3)
            sd[f"bbox_head.{tower}.{i}.gn.weight"] = torch.rand(feat) + 0.5
            sd[f"bbox_head.{tower}.{i}.gn.bias"] = torch.randn(feat)
    _conv(sd, "bbox_head.gfl_cls", num_classes, feat, 3, bias=True)
    _conv(sd, "bbox_head.gfl_reg", 4 * (reg_max + 1), feat, 3, bias=True)
    for level in range(5):
        # 0-dim, as mmcv's Scale
        sd[f"bbox_head.scales.{level}.scale"] = torch.tensor(1.0 + 0.1 * level)
    sd["bbox_head.integral.project"] = torch.linspace(0, reg_max, reg_max + 1)
    return sd


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    mmdet = mmdet_gfl_state_dict()
    cfg = config_from_settings(infer_model_settings(mmdet))
    model = build_model(cfg.model, size_divisor=cfg.data.size_divisor).eval()
    return mmdet, model.state_dict(), model


def test_r50_maps_every_key_both_ways(r50):
    mmdet, target, _ = r50
    settings = infer_model_settings(mmdet)
    assert settings == {"num_classes": 80, "depth": 50, "fpn_channels": 256, "feat_channels": 256,
                        "stacked_convs": 4, "norm": "gn", "reg_max": 16}
    converted, report = convert_state_dict(mmdet, target, reg_max=16)
    assert set(converted) == set(target)  # none missing
    assert all(converted[k].shape == target[k].shape for k in target)
    assert report.dropped == ["bbox_head.integral.project"] and report.filled == []
    # None left over: every other mmdet key is used once (the 5 scales become one tensor).
    assert len(mmdet) - 1 == len(converted) + 4 == report.mapped + 4
    # Keys whose shapes cannot tell them apart go where MMDetection's forward uses them.
    pairs = {
        "backbone.conv1.weight": "backbone.conv1.weight",
        "backbone.bn1.running_var": "backbone.bn1.running_var",
        "backbone.bn1.num_batches_tracked": "backbone.bn1.num_batches_tracked",
        "backbone.layer3.5.bn2.bias": "backbone.layer3.5.bn2.bias",
        "backbone.layer2.0.downsample.1.running_mean": (
            "backbone.layer2.0.downsample.1.running_mean"
        ),
        "neck.lateral_convs.2.conv.weight": "neck.lateral_convs.2.conv.weight",
        "neck.fpn_convs.0.conv.weight": "neck.fpn_convs.0.conv.weight",
        "neck.fpn_convs.2.conv.bias": "neck.fpn_convs.2.conv.bias",
        "neck.fpn_convs.3.conv.weight": "neck.fpn_convs.3.conv.weight",
        "neck.fpn_convs.4.conv.weight": "neck.fpn_convs.4.conv.weight",
        "head.cls_convs.0.conv.weight": "bbox_head.cls_convs.0.conv.weight",
        "head.cls_convs.1.gn.bias": "bbox_head.cls_convs.1.gn.bias",
        "head.reg_convs.3.conv.weight": "bbox_head.reg_convs.3.conv.weight",
        "head.reg_convs.3.gn.weight": "bbox_head.reg_convs.3.gn.weight",
        "head.gfl_cls.bias": "bbox_head.gfl_cls.bias",
        "head.gfl_reg.weight": "bbox_head.gfl_reg.weight",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(converted[ours], mmdet[theirs]), f"{ours} should come from {theirs}"
    assert torch.allclose(converted["head.scales"], torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4]))


def test_gfldet_keys_are_mmdetections_but_for_the_exception_table(r50):
    """Apart from the table in gfldet.convert_mmdet's docstring (the 5 scalar scales are one
    tensor, the Integral's bins are not saved), every MMDetection key is a gfldet key with
    `bbox_head.` read as `head.`, and the other way round."""
    mmdet, target, _ = r50
    exceptions = {k for k in mmdet if k.startswith("bbox_head.scales.")}
    exceptions.add("bbox_head.integral.project")
    assert {k.replace("bbox_head.", "head.", 1) for k in set(mmdet) - exceptions} == set(target) - {
        "head.scales"
    }


def test_converted_weights_load_and_run(r50):
    mmdet, target, model = r50
    converted, _ = convert_state_dict(mmdet, target, reg_max=16)
    model.load_state_dict(converted, strict=True)
    with torch.no_grad():
        (det,) = model(torch.randn(1, 3, 64, 96))
    assert det["boxes"].shape[1] == 4


@pytest.mark.parametrize("key", ["neck.fpn_convs.4.conv.bias", "bbox_head.scales.2.scale",
                                 "backbone.layer4.2.bn3.running_var"])
def test_missing_key_is_refused(r50, key):
    mmdet, target, _ = r50
    broken = {k: v for k, v in mmdet.items() if k != key}
    with pytest.raises(ConversionError, match="missing") as err:
        convert_state_dict(broken, target, reg_max=16)
    expected = {"neck.fpn_convs.4.conv.bias": "neck.fpn_convs.4.conv.bias",
                "bbox_head.scales.2.scale": "head.scales",
                "backbone.layer4.2.bn3.running_var": "backbone.layer4.2.bn3.running_var"}[key]
    assert expected in str(err.value)


def test_reshaped_key_is_refused(r50):
    mmdet, target, _ = r50
    broken = dict(mmdet)
    broken["backbone.layer2.0.conv2.weight"] = torch.zeros(128, 64, 3, 3)
    with pytest.raises(ConversionError, match=r"reshaped") as err:
        convert_state_dict(broken, target, reg_max=16)
    assert "backbone.layer2.0.conv2.weight [128, 64, 3, 3]" in str(err.value)
    assert "[128, 128, 3, 3]" in str(err.value)


def test_unknown_key_is_refused(r50):
    mmdet, target, _ = r50
    broken = {**mmdet, "backbone.layer2.0.conv2.conv_offset.weight": torch.zeros(27, 128, 3, 3)}
    with pytest.raises(ConversionError, match="unmapped") as err:
        convert_state_dict(broken, target, reg_max=16)
    assert "conv_offset" in str(err.value)
    with pytest.raises(ConversionError, match="DCN"):
        infer_model_settings(broken)


def test_a_gflv1_gflv2_mix_up_is_named(r50):
    mmdet, target, _ = r50
    gflv2 = {**mmdet, "bbox_head.reg_conf.0.weight": torch.zeros(64, 20, 1, 1)}
    with pytest.raises(ConversionError, match=r"GFLv2 \(DGQP.*configs/gflv2_\*\.yaml"):
        convert_state_dict(gflv2, target, reg_max=16)
    gflv2_target = {**target, "head.reg_conf.0.weight": torch.zeros(64, 20, 1, 1)}
    with pytest.raises(ConversionError, match=r"GFLv1 checkpoint.*dgqp: null"):
        convert_state_dict(mmdet, gflv2_target, reg_max=16)


def test_unexpected_project_bins_are_refused(r50):
    mmdet, target, _ = r50
    broken = {**mmdet, "bbox_head.integral.project": torch.linspace(0, 1, 17)}
    with pytest.raises(ConversionError, match="project"):
        convert_state_dict(broken, target, reg_max=16)


def test_checkpoint_without_bn_counters_is_filled():
    mmdet = mmdet_gfl_state_dict(depth=18, num_classes=3, fpn=32, feat=64, stacked=1, tracked=False)
    settings = infer_model_settings(mmdet)
    assert settings["depth"] == 18 and settings["stacked_convs"] == 1
    cfg = config_from_settings(settings)
    target = build_model(cfg.model, size_divisor=cfg.data.size_divisor).state_dict()
    converted, report = convert_state_dict(mmdet, target, reg_max=16)
    assert report.filled and all(k.endswith("num_batches_tracked") for k in report.filled)
    assert set(converted) == set(target)


def test_cli_converts_a_wrapped_checkpoint_and_detector_loads_it(tmp_path, capsys):
    from gfldet.inference import Detector

    torch.manual_seed(1)
    mmdet = mmdet_gfl_state_dict(depth=18, num_classes=3, fpn=32, feat=64, stacked=1)
    src, out = tmp_path / "gfl_r18_mmdet.pth", tmp_path / "gfl_r18_gfldet.pth"
    torch.save({"meta": {"mmdet_version": "2.3.0", "CLASSES": ("cat", "dog", "bird")},
                "state_dict": mmdet}, src)
    convert = load_tool("convert_mmdet")
    assert convert.main([str(src), str(out)]) == 0
    text = capsys.readouterr().out
    assert "ResNet-18" in text and "integral.project" in text
    state = load_checkpoint(out)
    assert state["meta"]["class_names"] == ["cat", "dog", "bird"] and state["model_format"] == 2
    detector = Detector.from_checkpoint(out)  # the config stored in the file describes the model
    assert detector.class_names == ["cat", "dog", "bird"]
    p7 = "neck.fpn_convs.4.conv.weight"  # the same name on both sides
    assert torch.equal(detector.model.state_dict()[p7], mmdet[p7])

    # A refused conversion writes nothing and names the key.
    del mmdet["bbox_head.gfl_cls.bias"]
    torch.save({"state_dict": mmdet}, src)
    bad = tmp_path / "bad.pth"
    assert convert.main([str(src), str(bad)]) == 1
    assert "head.gfl_cls.bias" in capsys.readouterr().err and not bad.exists()


def test_cli_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  num_clases: 3\n")  # misspelt key
    convert = load_tool("convert_mmdet")
    with pytest.raises(SystemExit) as exit_info:
        convert.main(
            [str(tmp_path / "any.pth"), str(tmp_path / "out.pth"), "--config", str(config)]
        )
    assert exit_info.value.code == 2
    assert "num_clases" in capsys.readouterr().err


def _tiny_mmdet_file(path, meta=None):
    torch.manual_seed(1)
    mmdet = mmdet_gfl_state_dict(depth=18, num_classes=3, fpn=32, feat=64, stacked=1)
    torch.save(mmdet if meta is None else {"meta": meta, "state_dict": mmdet}, path)
    return path


def test_cli_says_a_gfldet_checkpoint_is_one(tmp_path, capsys):
    """Finding 8: a converted (or trained) gfldet file is named as such, not 'no tensors found'."""
    convert = load_tool("convert_mmdet")
    converted = tmp_path / "gfldet.pth"
    assert convert.main([str(_tiny_mmdet_file(tmp_path / "mm.pth")), str(converted)]) == 0
    state = load_checkpoint(converted)
    trained = tmp_path / "last.pth"  # as tools/train.py writes it: no model_format entry
    torch.save({"model": state["model"], "config": state["config"], "epoch": 1}, trained)
    capsys.readouterr()
    for source in (converted, trained):
        out = tmp_path / f"again_{source.name}"
        assert convert.main([str(source), str(out)]) == 1
        err = capsys.readouterr().err
        assert f"{source} is already a gfldet checkpoint" in err and "use it directly" in err
        assert "no tensors found" not in err and not out.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_cli_refuses_a_folder_as_out(tmp_path, capsys, overwrite):
    """Finding 9: OUT a folder is refused before converting, --overwrite or not."""
    src = _tiny_mmdet_file(tmp_path / "mm.pth")
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    argv = [str(src), str(folder)] + (["--overwrite"] if overwrite else [])
    assert load_tool("convert_mmdet").main(argv) == 2
    err = capsys.readouterr().err
    assert f"OUT {folder} is a folder; give a file name" in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(("meta", "line"), [
    ({"CLASSES": ("cat", "dog", "bird")}, "class names: 3 from meta.CLASSES (cat, dog, bird)"),
    ({"dataset_meta": {"classes": ["a", "b", "c"]}},
     "class names: 3 from meta.dataset_meta.classes (a, b, c)"),
    ({"CLASSES": ("cat", "dog")}, "class names: meta.CLASSES has 2 for 3 classes, none stored; "
                                  "detections will be named class_0 .. class_2"),
    (None, "class names: none in {src} (no meta.CLASSES or meta.dataset_meta.classes); "
           "detections will be named class_0 .. class_2"),
])
def test_cli_says_where_the_class_names_came_from(tmp_path, capsys, meta, line):
    """Finding 16: one line about the class names, also when there are none."""
    src = _tiny_mmdet_file(tmp_path / "mm.pth", meta)
    assert load_tool("convert_mmdet").main([str(src), str(tmp_path / "out.pth")]) == 0
    lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("class names:")]
    assert len(lines) == 1 and line.format(src=src) in lines[0]
    if "class_0" in line:
        assert "data.val annotations" in lines[0] and "--config" in lines[0]
