"""GFLv2: the Distribution-Guided Quality Predictor, the QFL on the joint probability, and a GFLv2
model through every tool (config, train, eval, predict, export, resume, checkpoint import).

Shape legend: `B` images, `A` priors, `C` classes, `R` = reg_max, `N` rows of the loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, build_from_options, run_in_process, tiny_overrides
from test_convert_mmdet import mmdet_gfl_state_dict

from gfldet.config import DGQPConfig, HeadConfig, load_config
from gfldet.convert_mmdet import (
    ConversionError,
    config_from_settings,
    convert_state_dict,
    extra_class_channel,
    infer_model_settings,
)
from gfldet.engine.build import build_model
from gfldet.engine.checkpoint import load_checkpoint
from gfldet.inference import Detector
from gfldet.losses import quality_focal_loss
from gfldet.models.head import DGQP, GFLHead, joint_logit

TRAIN, EVAL, PREDICT, EXPORT, CONVERT = (
    str(ROOT / "tools" / f"{t}.py") for t in ("train", "eval", "predict", "export", "convert_mmdet")
)
DEMO = str(ROOT / "configs" / "demo_synthetic_cpu.yaml")


def _side_logits(*probs: list[float]) -> torch.Tensor:
    """[1, 4(R+1), 1, 1] regression logits whose per-side softmax is exactly `probs`."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).reshape(1, -1, 1, 1)


def test_dgqp_worked_by_hand():
    # R = 4 (5 bins). Softmax per side, its top-4 (descending) and their mean:
    #   side 0 [.10 .40 .20 .25 .05] -> .40 .25 .20 .10, mean .2375
    #   side 1 [.60 .30 .04 .03 .03] -> .60 .30 .04 .03, mean .2425
    #   sides 2, 3 uniform .2        -> .2 .2 .2 .2,     mean .2
    # 20 statistics, side-major: channel 5 * side + j (j = 0..3 top-k, 4 the mean).
    # hidden 0 = sum of the top-1s - 1 = (.4 + .6 + .2 + .2) - 1 = 0.4 (ReLU keeps it)
    # hidden 1 = -(sum of the means)  = -.88 -> ReLU 0 (without the ReLU u would be -3.6)
    # u = 2 * 0.4 + 5 * 0 + 0.2 = 1.0, quality q = sigmoid(1) = 0.7310585786300049
    # class logit z = 0: joint score s = 0.5 * q = 0.36552928931500245
    dgqp = DGQP(reg_max=4, topk=4, channels=2, add_mean=True).double()
    with torch.no_grad():
        dgqp[0].weight.zero_()
        dgqp[0].weight[0, [0, 5, 10, 15], 0, 0] = 1.0
        dgqp[0].weight[1, [4, 9, 14, 19], 0, 0] = -1.0
        dgqp[0].bias.copy_(torch.tensor([-1.0, 0.0]))
        dgqp[2].weight.copy_(torch.tensor([2.0, 5.0]).reshape(1, 2, 1, 1))
        dgqp[2].bias.fill_(0.2)
    reg = _side_logits(
        [0.10, 0.40, 0.20, 0.25, 0.05], [0.60, 0.30, 0.04, 0.03, 0.03], [0.2] * 5, [0.2] * 5
    )
    u = dgqp(reg)
    assert u.shape == (1, 1, 1, 1)
    assert u.item() == pytest.approx(1.0, abs=1e-12)
    s = torch.sigmoid(joint_logit(torch.zeros(1, 1, 1, 1, dtype=torch.float64), u))
    assert s.item() == pytest.approx(0.36552928931500245, abs=1e-12)


def test_dgqp_without_mean_has_4k_inputs_and_checks_topk():
    assert DGQP(reg_max=16, topk=3, channels=64, add_mean=False)[0].in_channels == 12
    paper = DGQP(reg_max=16, **dataclasses.asdict(DGQPConfig()))  # the config's defaults
    assert paper[0].in_channels == 20 and paper[2].out_channels == 1  # paper: 4 x (4 + 1)
    assert paper[0].out_channels == 64
    with pytest.raises(ValueError, match="topk"):
        DGQP(reg_max=2, topk=4, channels=64, add_mean=True)


def test_head_class_output_is_the_joint_logit():
    torch.manual_seed(0)
    options = {"feat_channels": 32, "stacked_convs": 1, "norm": "gn", "reg_max": 4,
               "box_repr": "distribution", "dgqp": {"topk": 4, "channels": 8, "add_mean": True}}
    head = GFLHead(3, in_channels=32, num_levels=1,
                   **{**dataclasses.asdict(HeadConfig()), **options}).double()
    for p in head.reg_conf.parameters():  # away from init: a quality not ~0.5 everywhere
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    cls_logits, reg_logits = head([x])  # [B, A, C], [B, A, 4(R+1)]
    z = head.gfl_cls(head.cls_convs(x)).permute(0, 2, 3, 1).flatten(1, 2)
    u = (
        head.reg_conf(head.gfl_reg(head.reg_convs(x)) * head.scales[0])
        .permute(0, 2, 3, 1)
        .flatten(1, 2)
    )
    expected = torch.sigmoid(z) * torch.sigmoid(u)  # [B, A, C]: one quality for all classes
    assert cls_logits.shape == (2, 15, 3) and reg_logits.shape == (2, 15, 20)
    torch.testing.assert_close(torch.sigmoid(cls_logits), expected, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(torch.sigmoid(cls_logits), torch.sigmoid(z))


def official_qfl_on_probabilities(
    prob: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, beta: float = 2.0
) -> torch.Tensor:
    """GFocalV2's `quality_focal_loss(use_sigmoid=False)`, restated: F.binary_cross_entropy on the
    joint probability [N, C], 0 targets everywhere but the labelled class of a positive. -> [N]"""
    loss = F.binary_cross_entropy(prob, torch.zeros_like(prob), reduction="none") * prob.pow(beta)
    pos = (labels >= 0) & (labels < prob.shape[1])
    rows, cols = pos.nonzero()[:, 0], labels[pos]
    p = prob[rows, cols]
    pos_loss = F.binary_cross_entropy(p, scores[rows], reduction="none") * (
        scores[rows] - p
    ).abs().pow(beta)
    return loss.index_put((rows, cols), pos_loss).sum(dim=1)


def _qfl_cases() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class logits z [N, C], quality logits u [N, 1], labels [N], IoU targets [N], float64:
    random rows plus joint scores near 0 (1e-17) and near 1 (1 - 4e-9), and targets 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, generator=gen, dtype=torch.float64) * 3
    u = torch.randn(8, 1, generator=gen, dtype=torch.float64) * 3
    z[0], u[0] = 20.0, 20.0  # s = sigmoid(20)^2 = 1 - 4.1e-9
    z[1], u[1] = -20.0, -20.0  # s = 4.2e-18
    z[2, 1], u[2] = 20.0, 20.0  # near 1 on the positive entry of a positive with target 1
    labels = torch.tensor([0, 4, 1, 2, 3, 4, 0, 1])  # 4 = background
    scores = torch.tensor([0.0, 0.0, 1.0, 0.7, 1.0, 0.0, 0.3, 0.0], dtype=torch.float64)
    return z, u, labels, scores


def test_log_space_qfl_equals_bce_qfl_on_the_joint_probability_values_and_gradients():
    z, u, labels, scores = _qfl_cases()
    z1, u1 = z.clone().requires_grad_(), u.clone().requires_grad_()
    ours = quality_focal_loss(joint_logit(z1, u1), labels, scores)
    z2, u2 = z.clone().requires_grad_(), u.clone().requires_grad_()
    reference = official_qfl_on_probabilities(torch.sigmoid(z2) * torch.sigmoid(u2), labels, scores)
    # near s = 1 the reference forms 1 - s from a rounded s: ~1e-16 / 4e-9 relative, so 1e-6
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(ours[3:], reference[3:], rtol=1e-12, atol=1e-14)  # ordinary rows
    weights = torch.linspace(0.5, 2.0, len(ours), dtype=torch.float64)
    gz1, gu1 = torch.autograd.grad((ours * weights).sum(), (z1, u1))
    gz2, gu2 = torch.autograd.grad((reference * weights).sum(), (z2, u2))
    torch.testing.assert_close(gz1, gz2, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gu1, gu2, rtol=1e-6, atol=1e-12)
    assert gu1.abs().sum() > 0  # the classification loss trains the quality branch


def test_joint_logit_is_finite_where_both_sigmoids_round_to_one():
    # float32: logsigmoid(z) rounds to 0 beyond z ~ 104, so log s = 0: log(1 - s) must not come
    # from s (log(-expm1(0)) = -inf, an infinite logit and a nan gradient)
    z = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
    u = torch.tensor([[200.0]], requires_grad=True)
    logit = joint_logit(z, u)
    loss = quality_focal_loss(logit, torch.tensor([0]), torch.tensor([1.0]))
    loss.backward()
    assert torch.isfinite(logit).all() and torch.isfinite(loss).all()
    assert torch.isfinite(z.grad).all() and torch.isfinite(u.grad).all()


def test_box_weights_are_the_max_joint_probability():
    # The criterion weighs each positive's GIoU and DFL by sigmoid(max over classes of the class
    # output); with DGQP that is max_c sigmoid(z_c) * q, the official `cls_score.max(dim=1)`.
    z, u, _, _ = _qfl_cases()
    weight = joint_logit(z, u).amax(dim=1).sigmoid()
    torch.testing.assert_close(
        weight, (torch.sigmoid(z) * torch.sigmoid(u)).amax(dim=1), rtol=1e-12, atol=0
    )


def _tiny_batch() -> tuple[torch.Tensor, list[dict]]:
    images = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 60, 70]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[30.0, 20, 100, 90], [5, 5, 40, 30]]),
            "labels": torch.tensor([2, 0]),
        },
    ]
    return images, targets


def _tiny_model(dgqp: bool, seed: int = 0):
    torch.manual_seed(seed)
    return build_from_options(
        "model.num_classes=3", "model.backbone.depth=18", "model.fpn.out_channels=32",
        "model.head.feat_channels=32", "model.head.stacked_convs=1",
        f"model.head.dgqp={'{}' if dgqp else 'null'}",
    )


def test_gflv2_trains_under_bf16_autocast_with_finite_losses_and_gradients():
    model = _tiny_model(dgqp=True).train()
    images, targets = _tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.head.reg_conf[0].weight.grad.abs().sum() > 0


def test_gflv2_starts_with_a_gflv1_sized_classification_loss():
    # GFocalV2#5: QFL given probabilities as if they were logits starts at 700-800. Here the head
    # emits a logit whenever DGQP is on, so the loss starts where GFLv1's does (same trunk draws:
    # the quality 0.5 halves the initial 0.01 scores, which lowers the negatives' loss).
    images, targets = _tiny_batch()
    v1 = _tiny_model(dgqp=False).train()(images, targets)["loss_cls"]
    v2 = _tiny_model(dgqp=True).train()(images, targets)["loss_cls"]
    assert 0.2 * v1 < v2 < 1.5 * v1 < 5


def test_dgqp_off_builds_exactly_the_gflv1_model():
    v1, off = _tiny_model(dgqp=False), _tiny_model(dgqp=False)
    assert off.head.reg_conf is None
    v2 = _tiny_model(dgqp=True)
    extra = set(v2.state_dict()) - set(v1.state_dict())
    assert extra == {
        "head.reg_conf.0.weight",
        "head.reg_conf.0.bias",
        "head.reg_conf.2.weight",
        "head.reg_conf.2.bias",
    }
    assert sum(v2.state_dict()[k].numel() for k in extra) == 20 * 64 + 64 + 64 + 1  # 1,409 (paper)
    assert math.isclose(v2.head.reg_conf[0].weight.std().item(), 0.01, rel_tol=0.2)  # N(0, 0.01)
    assert v2.head.reg_conf[2].bias.abs().sum() == 0


# --------------------------------------------------------------------------- every tool, GFLv2


@pytest.fixture(scope="module")
def v2_run(tiny_coco, tmp_path_factory):
    """A tiny GFLv2 model trained 2 epochs by tools/train.py (fp32, every detection kept)."""
    work = tmp_path_factory.mktemp("gflv2_run")
    run_in_process(TRAIN, DEMO, "--work-dir", str(work), "--cfg-options", *V2_OPTIONS(tiny_coco))
    return work


def V2_OPTIONS(data) -> list[str]:  # noqa: N802 - reads as the constant it is
    return [*tiny_overrides(data), "model.head.dgqp={}", "model.test.score_thr=0.0"]


def test_gflv2_trains_saves_its_switch_and_eval_reproduces_the_training_ap(v2_run, tmp_path):
    state = load_checkpoint(v2_run / "last.pth")
    assert state["config"]["model"]["head"]["dgqp"] == {"topk": 4, "channels": 64, "add_mean": True}
    assert "head.reg_conf.0.weight" in state["model"]
    assert load_config(v2_run / "config.yaml").model.head.dgqp
    run_in_process(
        EVAL,
        str(v2_run / "config.yaml"),
        str(v2_run / "last.pth"),
        "--metrics",
        str(tmp_path / "m.json"),
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    trained = json.loads((v2_run / "metrics_epoch_2.json").read_text())
    assert trained["bbox_mAP"] > 0 and trained["AR_100"] > 0
    for key in ("bbox_mAP", "bbox_mAP_50", "AR_100"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-9), key


def test_gflv2_resume_gives_the_same_weights_as_an_uninterrupted_run(v2_run, tiny_coco, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pth").write_bytes((v2_run / "epoch_1.pth").read_bytes())
    shutil.copytree(v2_run / "dataset_check", resumed / "dataset_check")
    run_in_process(
        TRAIN,
        DEMO,
        "--work-dir",
        str(resumed),
        "--resume",
        "--cfg-options",
        *V2_OPTIONS(tiny_coco),
        "train.eval_interval=0",
    )
    a, b = (
        load_checkpoint(v2_run / "last.pth")["model"],
        load_checkpoint(resumed / "last.pth")["model"],
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gflv2_detector_and_predict(v2_run, tiny_coco, tmp_path):
    detector = Detector.from_checkpoint(v2_run / "last.pth", score_thr=0.0)
    assert detector.model.head.reg_conf is not None
    paths = sorted(tiny_coco["val_images"].iterdir())
    got = detector(paths)
    assert sum(len(d["scores"]) for d in got) > 0
    # The scores are joint probabilities sigmoid(z) * quality, so they lie in (0, 1).
    assert all(((d["scores"] > 0) & (d["scores"] < 1)).all() for d in got)
    out = tmp_path / "predict"
    run_in_process(
        PREDICT,
        str(v2_run / "config.yaml"),
        str(v2_run / "last.pth"),
        str(tiny_coco["val_images"]),
        "--out",
        str(out),
        "--score-thr",
        "0.0",
    )
    records = [json.loads((out / f"{p.stem}.json").read_text()) for p in paths]
    for record, det in zip(records, got, strict=True):
        # the JSON keeps 4 decimals
        assert [d["score"] for d in record["detections"]] == pytest.approx(
            det["scores"].tolist(), abs=5.1e-5
        )


@pytest.mark.parametrize("nms", [False, True], ids=["raw", "nms"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_gflv2_exports_and_verifies_against_evaluation(v2_run, tiny_coco, tmp_path, fmt, nms):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"gflv2.{'onnx' if fmt == 'onnx' else 'pt'}"
    args = [
        str(v2_run / "config.yaml"),
        str(v2_run / "last.pth"),
        "--format",
        fmt,
        "--out",
        str(out),
        "--verify-images",
        str(tiny_coco["val_images"]),
        "--num-verify",
        "2",
        *(["--nms"] * nms),
        *(["--dynamic"] * (fmt == "onnx")),
    ]
    proc = run_in_process(EXPORT, *args)
    assert out.is_file()
    assert "verified against PyTorch evaluation (GFL.forward)" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- official checkpoints


def official_gflv2_state_dict(
    num_classes: int = 3, fpn: int = 32, feat: int = 64, channels: int = 64
):
    """An implus/GFocalV2 `GFocalHead` state dict (ResNet-18 trunk, one tower conv): GFLv1's keys
    plus `reg_conf.0` (20 -> channels) and `reg_conf.2` (channels -> 1), and `gfl_cls` with
    num_classes + 1 outputs (use_sigmoid=False in mmdet 2.x's AnchorHead)."""
    sd = mmdet_gfl_state_dict(depth=18, num_classes=num_classes + 1, fpn=fpn, feat=feat, stacked=1)
    sd["bbox_head.reg_conf.0.weight"] = torch.randn(channels, 20, 1, 1) * 0.3
    sd["bbox_head.reg_conf.0.bias"] = torch.randn(channels) * 0.1
    sd["bbox_head.reg_conf.2.weight"] = torch.randn(1, channels, 1, 1) * 0.3
    sd["bbox_head.reg_conf.2.bias"] = torch.randn(1)
    return sd


def official_head_scores(sd: dict, x: torch.Tensor, level: int) -> torch.Tensor:
    """GFocalHead.forward_single restated on the official tensors: [B, F, H, W] -> cls_score
    [B, C + 1, H, W], the joint probability of every official channel."""

    def tower(name: str) -> torch.Tensor:
        y = F.conv2d(x, sd[f"bbox_head.{name}.0.conv.weight"], padding=1)
        return F.relu(
            F.group_norm(
                y, 32, sd[f"bbox_head.{name}.0.gn.weight"], sd[f"bbox_head.{name}.0.gn.bias"]
            )
        )

    cls_feat, reg_feat = tower("cls_convs"), tower("reg_convs")
    bbox_pred = F.conv2d(
        reg_feat, sd["bbox_head.gfl_reg.weight"], sd["bbox_head.gfl_reg.bias"], padding=1
    )
    bbox_pred = bbox_pred * sd[f"bbox_head.scales.{level}.scale"]
    n, _, h, w = bbox_pred.shape
    prob = F.softmax(bbox_pred.reshape(n, 4, 17, h, w), dim=2)
    top = prob.topk(4, dim=2).values
    stat = torch.cat([top, top.mean(dim=2, keepdim=True)], dim=2).reshape(n, -1, h, w)
    hidden = F.relu(
        F.conv2d(stat, sd["bbox_head.reg_conf.0.weight"], sd["bbox_head.reg_conf.0.bias"])
    )
    quality = torch.sigmoid(
        F.conv2d(hidden, sd["bbox_head.reg_conf.2.weight"], sd["bbox_head.reg_conf.2.bias"])
    )
    cls = F.conv2d(
        cls_feat, sd["bbox_head.gfl_cls.weight"], sd["bbox_head.gfl_cls.bias"], padding=1
    )
    return torch.sigmoid(cls) * quality


def test_official_gflv2_state_dict_maps_one_to_one_and_scores_as_the_official_head():
    torch.manual_seed(0)
    sd = official_gflv2_state_dict()
    settings = infer_model_settings(sd)  # no class names: the official 81-for-80 layout
    assert settings["num_classes"] == 3 and settings["dgqp"] and settings["dgqp_topk"] == 4
    assert settings["dgqp_channels"] == 64 and settings["dgqp_add_mean"]
    assert infer_model_settings(sd, ["a", "b", "c", "d"])["num_classes"] == 4  # meta says 4 classes
    cfg = config_from_settings(settings)
    model = build_model(cfg.model, size_divisor=cfg.data.size_divisor).eval()
    target = model.state_dict()
    stripped, cut = extra_class_channel(sd, 3)
    assert len(cut) == 2 and stripped["bbox_head.gfl_cls.weight"].shape[0] == 3
    converted, report = convert_state_dict(stripped, target, reg_max=16)
    assert set(converted) == set(target) and report.dropped == ["bbox_head.integral.project"]
    assert len(sd) - 1 == report.mapped + 4  # every official tensor used once (5 scales -> 1)
    for ours, theirs in (
        ("head.reg_conf.0.weight", "bbox_head.reg_conf.0.weight"),
        ("head.reg_conf.0.bias", "bbox_head.reg_conf.0.bias"),
        ("head.reg_conf.2.weight", "bbox_head.reg_conf.2.weight"),
        ("head.reg_conf.2.bias", "bbox_head.reg_conf.2.bias"),
    ):
        assert torch.equal(converted[ours], sd[theirs])
    assert torch.equal(converted["head.gfl_cls.weight"], sd["bbox_head.gfl_cls.weight"][:3])

    model.load_state_dict(converted, strict=True)
    x = torch.randn(2, 32, 6, 7)
    with torch.no_grad():
        cls_logits, _ = model.head([x])  # [B, A, C] with one level
        expected = official_head_scores(sd, x, level=0)  # [B, C + 1, H, W]
    expected = expected[:, :3].permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(torch.sigmoid(cls_logits), expected, rtol=1e-5, atol=1e-7)

    # Without the channel cut the class conv has 4 outputs for 3 classes: refused, named.
    with pytest.raises(ConversionError, match="bbox_head.gfl_cls.weight"):
        convert_state_dict(sd, target, reg_max=16)


def test_gflv1_model_refuses_an_official_gflv2_state_dict_naming_reg_conf():
    sd = official_gflv2_state_dict()
    settings = {**infer_model_settings(sd), "dgqp": False}
    cfg = config_from_settings(settings)
    target = build_model(cfg.model, size_divisor=cfg.data.size_divisor).state_dict()
    with pytest.raises(
        ConversionError, match=r"bbox_head\.reg_conf\.0\.weight -> head\.reg_conf\.0\.weight"
    ):
        convert_state_dict(extra_class_channel(sd, 3)[0], target, reg_max=16)


def test_cli_converts_an_official_gflv2_checkpoint_and_detector_loads_it(tmp_path):
    torch.manual_seed(1)
    sd = official_gflv2_state_dict()
    src, out = tmp_path / "gfocal_r18.pth", tmp_path / "gflv2_r18.pth"
    torch.save(
        {"meta": {"mmdet_version": "2.6.0", "CLASSES": ("cat", "dog", "bird")}, "state_dict": sd},
        src,
    )
    proc = run_in_process(CONVERT, str(src), str(out))
    assert "GFLv2: DGQP (top-4 + mean, 64 channels)" in proc.stdout
    assert "background class channel" in proc.stdout and "[4, 64, 3, 3] -> first 3" in proc.stdout
    detector = Detector.from_checkpoint(out)
    assert detector.class_names == ["cat", "dog", "bird"]
    assert detector.model.head.reg_conf is not None
    assert torch.equal(
        detector.model.state_dict()["head.reg_conf.2.bias"], sd["bbox_head.reg_conf.2.bias"]
    )


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("v2", "v1", "train_sides"),
    [
        ("gflv2_r50_fpn_1x_coco.yaml", "gfl_r50_fpn_1x_coco.yaml", None),
        ("gflv2_r50_fpn_ms_2x_coco.yaml", "gfl_r50_fpn_ms_2x_coco.yaml", [480, 960]),
        ("gflv2_r101_fpn_ms_2x_coco.yaml", "gfl_r101_fpn_ms_2x_coco.yaml", [480, 960]),
        ("gflv2_demo_synthetic_cpu.yaml", "demo_synthetic_cpu.yaml", None),
    ],
)
def test_gflv2_configs_are_their_gflv1_recipe_plus_dgqp(v2, v1, train_sides):
    from gfldet.config import config_to_dict

    a, b = load_config(ROOT / "configs" / v2), load_config(ROOT / "configs" / v1)
    assert a.model.head.dgqp == DGQPConfig(topk=4, channels=64, add_mean=True)
    assert b.model.head.dgqp is None
    if train_sides is not None:
        assert list(a.data.train_short_side) == train_sides  # the official GFLv2 2x range
        assert list(b.data.train_short_side) == [480, 800]  # GFLv1's
    for cfg in (a, b):
        cfg.model.head.dgqp = None
        if train_sides is not None:
            cfg.data.train_short_side = a.data.train_short_side
    assert config_to_dict(a) == config_to_dict(b)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["model.loss.cls_loss=focal"], "model.head.dgqp"),
        (["model.head.box_repr=dirac", "model.loss.dfl_weight=0"], "model.head.dgqp"),
        (["model.head.dgqp.topk=18"], "model.head.dgqp.topk"),
        (["model.head.dgqp.channels=0"], "model.head.dgqp.channels"),
    ],
)
def test_bad_dgqp_settings_are_refused_naming_the_key(options, named):
    from gfldet.config import ConfigError

    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(ROOT / "configs" / "gflv2_demo_synthetic_cpu.yaml", options)


# --------------------------------------------------------------------------- accuracy entrant


def test_gflv2_accuracy_entrant_is_gfl_plus_dgqp_and_reported_against_gfl():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy
    from test_accuracy_bench import record, table_rows

    from gfldet.config import config_to_dict

    args = accuracy.parse_args(["--config", str(ROOT / "configs" / "synthetic_accuracy.yaml")])
    v2 = accuracy.run_config(args, accuracy.ENTRANTS["gflv2"], seed=1, epochs=2)
    v1 = accuracy.run_config(args, accuracy.ENTRANTS["gfl"], seed=1, epochs=2)
    assert v2.model.head.dgqp and v1.model.head.dgqp is None
    v2.model.head.dgqp = None
    assert config_to_dict(v2) == config_to_dict(v1)  # the switch is the only difference

    records = [
        record("gfl", 0, 0.10),
        record("gfl", 1, 0.12),
        record("gflv2", 0, 0.11),
        record("gflv2", 1, 0.15),
    ]
    text = accuracy.report(records, epochs=2, results_path="results.json")
    versus = table_rows(text, "GFLv2 against GFLv1")  # paired by seed: +1 and +3 points
    assert versus["`gflv2` − `gfl`"][1:3] == ["2", "+2.0 ± 1.4"]
    assert table_rows(text, "All entrants")["`gflv2`"][2:4] == ["2", "13.0 ± 2.8"]
