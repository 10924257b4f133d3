"""The GFL model: priors, shapes, backbone freezing and weights, a training step, overfitting."""

import copy
import dataclasses
import math

import pytest
import torch
import torchvision
from conftest import build_from_options
from torch import nn

from gfldet.config import HeadConfig
from gfldet.models import GFL
from gfldet.models.backbone import ResNetBackbone
from gfldet.models.fpn import FPN
from gfldet.models.head import GFLHead, Integral
from gfldet.models.priors import make_priors, valid_prior_mask

STRIDES = [8, 16, 32, 64, 128]


def tiny_model(*options: str, num_classes: int = 3) -> GFL:
    return build_from_options(
        f"model.num_classes={num_classes}", "model.backbone.depth=18",
        "model.backbone.frozen_stages=-1", "model.backbone.norm_eval=false",
        "model.fpn.out_channels=32", "model.head.feat_channels=64", "model.head.stacked_convs=1",
        *options)


def make_head(num_classes: int, in_channels: int, num_levels: int = 5, **options) -> GFLHead:
    """A GFLHead with the config's defaults (HeadConfig) but for `options`."""
    args = {**dataclasses.asdict(HeadConfig()), **options}
    return GFLHead(num_classes=num_classes, in_channels=in_channels, num_levels=num_levels, **args)


def test_priors_for_800x1333_padded_to_1344():
    model = tiny_model()
    with torch.no_grad():
        features = model.neck(model.backbone(torch.zeros(1, 3, 800, 1344)))
    sizes = [tuple(f.shape[-2:]) for f in features]
    assert sizes == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    priors = make_priors(sizes, STRIDES, octave_base_scale=8)
    assert priors.boxes.shape == (22400, 4) and priors.num_per_level == [16800, 4200, 1050, 273, 77]
    # Row-major within a level: the second prior of P3 is at x = 1, the 169th at y = 1.
    assert priors.centers[1].tolist() == [8.0, 0.0] and priors.centers[168].tolist() == [0.0, 8.0]
    # Anchor side = 8 * stride: P7's first anchor is 1024 px wide.
    assert (priors.boxes[-1, 2] - priors.boxes[-1, 0]).item() == 1024
    # The first P4 prior follows the last P3 prior.
    assert priors.centers[16800].tolist() == [0.0, 0.0] and priors.strides[16800].item() == 16


def test_valid_priors_follow_each_images_own_padded_extent():
    priors = make_priors([(4, 6), (2, 3)], [8, 16], octave_base_scale=8)
    # An image of 20x30 padded to 32x32 inside a 32x48 batch: x < ceil(32/8) = 4 on P3.
    valid = valid_prior_mask(priors, torch.tensor([[20, 30], [32, 48]]), size_divisor=32)
    p3 = valid[0, :24].view(4, 6)
    assert p3[:, :4].all() and not p3[:, 4:].any()
    assert valid[1].all()


def test_head_output_shapes():
    head = make_head(80, 256)  # the recipe's head
    features = [torch.zeros(2, 256, h, w) for h, w in [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]]
    cls, reg = head(features)
    num = 16 * 24 + 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2
    assert cls.shape == (2, num, 80) and reg.shape == (2, num, 68) and reg.dtype == torch.float32
    # Initial class prior 0.01 everywhere (bias -log(99)).
    assert torch.sigmoid(head.gfl_cls.bias).allclose(torch.full((80,), 0.01))
    assert sum(isinstance(m, nn.GroupNorm) for m in head.cls_convs.modules()) == 4
    assert head.distances(reg).shape == (2, num, 4)


@pytest.mark.parametrize(("init", "expected"), [(4.0, 4.0), (0.0, 0.0), (2.5, 2.5)])
def test_dirac_boxes_start_at_the_configured_distance(init, expected):
    torch.manual_seed(0)
    head = make_head(3, 32, feat_channels=32, stacked_convs=1, box_repr="dirac",
                     dirac_init_distance=init)
    features = [torch.randn(1, 32, 16 // 2**i + 2, 16 // 2**i + 2) for i in range(5)]
    distances = head.distances(head(features)[1])
    assert distances.shape[-1] == 4
    # The conv weights are N(0, 0.01): the bias sets where every box starts, in strides (the
    # config's default, the ATSS anchor, is tested in test_config).
    assert (distances - expected).abs().mean() < 0.2
    if expected > 0:  # no side starts in the ReLU's dead zone
        assert (distances > 0).all()
    with pytest.raises(ValueError, match="dirac_init_distance"):
        make_head(3, 32, feat_channels=32, dirac_init_distance=expected)
    with pytest.raises(ValueError, match="dirac_init_distance"):  # needed with dirac
        make_head(3, 32, feat_channels=32, box_repr="dirac", dirac_init_distance=None)


def test_integral_is_the_expectation():
    integral = Integral(reg_max=16)
    logits = torch.full((1, 68), -1e4)
    for side, (lo, weight) in enumerate([(7, 0.7), (0, 1.0), (15, 0.5), (3, 0.25)]):
        logits[0, side * 17 + lo] = math.log(weight)
        if weight < 1:
            logits[0, side * 17 + lo + 1] = math.log(1 - weight)
    assert integral(logits)[0].tolist() == pytest.approx([7.3, 0.0, 15.5, 3.75], abs=1e-5)


def test_scale_multiplies_regression_logits_before_softmax():
    head = make_head(2, 32, num_levels=1, feat_channels=32, stacked_convs=1)
    features = [torch.randn(1, 32, 4, 4)]
    _, reg = head(features)
    with torch.no_grad():
        head.scales[0] = 2.0
    _, reg2 = head(features)
    torch.testing.assert_close(reg2, 2 * reg)


def test_fpn_extra_levels_come_from_p5_output_without_relu():
    fpn = FPN([8, 16, 32], out_channels=32)
    feats = [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)]
    p3, p4, p5, p6, p7 = fpn(feats)
    torch.testing.assert_close(p6, fpn.fpn_convs[3](p5))
    torch.testing.assert_close(p7, fpn.fpn_convs[4](p6))  # P6 may be negative: no ReLU in between
    assert (p6 < 0).any()
    assert [p.shape[-1] for p in (p3, p4, p5, p6, p7)] == [16, 8, 4, 2, 1]


def test_backbone_freezing_and_norm_eval():
    backbone = ResNetBackbone(depth=18, weights=None, frozen_stages=1, norm_eval=True)
    backbone.train()
    assert not any(p.requires_grad for m in (backbone.conv1, backbone.bn1) for p in m.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())  # BN affine still trains
    assert all(not m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    scratch = ResNetBackbone(depth=18, weights=None, frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for p in scratch.parameters())
    assert all(m.training for m in scratch.modules() if isinstance(m, nn.BatchNorm2d))
    assert backbone.out_channels == [128, 256, 512]


def test_backbone_has_torchvisions_resnet_names():
    for depth, resnet in ((18, torchvision.models.resnet18), (50, torchvision.models.resnet50)):
        expected = [k for k in resnet(weights=None).state_dict() if not k.startswith("fc.")]
        backbone = ResNetBackbone(depth=depth, weights=None, frozen_stages=1, norm_eval=True)
        assert list(backbone.state_dict()) == expected  # same order too


def _torchvision_forward(backbone: ResNetBackbone, images: torch.Tensor) -> list[torch.Tensor]:
    """The unfolded reference: torchvision's own module forwards (conv, then BatchNorm)."""
    stem = torch.relu(backbone.bn1(backbone.conv1(images)))
    x = backbone.layer1(backbone.maxpool(stem))
    c3 = backbone.layer2(x)
    c4 = backbone.layer3(c3)
    return [c3, c4, backbone.layer4(c4)]


def _randomise_batchnorm(backbone: nn.Module, generator: torch.Generator) -> None:
    """Statistics and affine parameters away from their (0, 1) defaults, so a wrong fold shows."""
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=generator)
                m.running_var.uniform_(0.2, 3.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.3, generator=generator)


def _assert_close_to_scale(
    got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5, msg: str = ""
) -> None:
    """Equal up to float rounding relative to the tensor's scale (activations grow to ~1e3
    over R-50); rel=0: bit-identical."""
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= rel * scale, f"{msg}: max error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("scratch", [False, True], ids=["recipe", "scratch"])
def test_backbone_folds_frozen_batchnorm_into_convs(depth, scratch):
    """Recipe (frozen stem + layer1, norm_eval): every BatchNorm is folded, and features and
    gradients (conv weights and BN affine parameters) equal torchvision's unfolded forward: to
    1e-10 of their scale in float64, which only a correct fold gives, and the features to 1e-5 in
    float32. From scratch (BatchNorm in training mode): nothing is folded, so everything is
    bit-identical in float32.

    float32 gradients are not compared for the folded R-50: with these random weights they are
    ill-conditioned, and their error depends on the summation order. On an AVX2 CPU,
    layer3.5.bn3.bias is 2 % of its scale off float64 in the folded float32 backward, and so is
    torchvision's own unfolded float32 backward under ATEN_CPU_CAPABILITY=default."""
    generator = torch.Generator().manual_seed(depth)
    torch.manual_seed(depth)
    backbone = ResNetBackbone(depth=depth, weights=None, frozen_stages=-1 if scratch else 1,
                              norm_eval=not scratch).train()
    _randomise_batchnorm(backbone, generator)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    probes = [torch.randn(2, c, 64 // s, 96 // s, generator=generator)
              for c, s in zip(backbone.out_channels, (8, 16, 32), strict=True)]
    buffers = {n: b.clone() for n, b in backbone.named_buffers()}

    def run(model, forward, dtype):
        model.zero_grad(set_to_none=True)
        outputs = forward(model, images.to(dtype))
        sum((o * p.to(dtype)).sum() for o, p in zip(outputs, probes, strict=True)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return [o.detach() for o in outputs], grads

    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(backbone).to(dtype)
        folded, folded_grads = run(model, ResNetBackbone.forward, dtype)
        stats_after_folded = {n: b.clone() for n, b in model.named_buffers()}
        model.load_state_dict(
            {**model.state_dict(), **{n: b.to(dtype) for n, b in buffers.items()}}
        )
        reference, reference_grads = run(model, _torchvision_forward, dtype)
        rel = 0.0 if scratch else (1e-5 if dtype == torch.float32 else 1e-10)
        for got, want in zip(folded, reference, strict=True):
            _assert_close_to_scale(got, want, rel, msg=f"features {dtype}")
        assert folded_grads.keys() == reference_grads.keys()
        # BN affine params train
        assert any(".bn" in n or "downsample.1" in n for n in folded_grads)
        if scratch or dtype == torch.float64:
            for name, grad in reference_grads.items():
                _assert_close_to_scale(folded_grads[name], grad, rel, msg=f"{name} {dtype}")
        # running statistics move exactly as torchvision's
        for name, value in model.named_buffers():
            torch.testing.assert_close(stats_after_folded[name], value, msg=name)
        model.eval()
        with torch.no_grad():
            for got, want in zip(
                model(images.to(dtype)), _torchvision_forward(model, images.to(dtype)), strict=True
            ):
                _assert_close_to_scale(
                    got, want, 1e-5 if dtype == torch.float32 else 1e-10, msg="eval features"
                )


def test_backbone_weights_from_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone = ResNetBackbone(depth=18, weights=str(path), frozen_stages=-1, norm_eval=True)
    torch.testing.assert_close(backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ResNetBackbone(depth=18, weights=str(tmp_path / "missing.pth"), frozen_stages=1,
                       norm_eval=True)
    with pytest.raises(ValueError, match="ResNet-34"):  # a ResNet-18 file for a ResNet-34
        ResNetBackbone(depth=34, weights=str(path), frozen_stages=1, norm_eval=True)


def test_r50_recipe_training_step_is_finite():
    torch.manual_seed(0)
    model = build_from_options().train()  # the recipe, 80 classes
    images = torch.randn(2, 3, 256, 320)
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20, 200, 240], [50, 60, 120, 90]]),
            "labels": torch.tensor([3, 79]),
        },
        {
            "boxes": torch.tensor([[100.0, 100, 300, 250]]),
            "labels": torch.tensor([0]),
            "image_size": (200, 310),
        },
    ]
    targets[0]["image_size"] = (256, 320)
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_dfl"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head.gfl_cls.weight.grad.abs().sum() > 0
    assert model.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0


def test_image_without_boxes_gives_zero_box_losses():
    model = tiny_model().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(torch.randn(2, 3, 64, 64), empty)
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_dfl"].item() == 0.0
    sum(losses.values()).backward()


def test_ablation_switches_change_the_losses():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8, 40, 50]]), "labels": torch.tensor([1])}]
    focal = tiny_model("model.loss.cls_loss=focal").train()(images, targets)
    dirac = tiny_model("model.head.box_repr=dirac", "model.loss.dfl_weight=0").train()(
        images, targets)
    no_dfl = tiny_model("model.loss.dfl_weight=0").train()(images, targets)
    assert set(focal) == {"loss_cls", "loss_bbox", "loss_dfl"}
    assert set(dirac) == {"loss_cls", "loss_bbox"} and set(no_dfl) == {"loss_cls", "loss_bbox"}


def synthetic_pair():
    """Two 128x128 images with bright rectangles (class 0) and dark squares (class 1)."""
    images = torch.full((2, 3, 128, 128), -1.0)
    boxes = [
        torch.tensor([[10.0, 20, 70, 60], [80, 80, 120, 120]]),
        torch.tensor([[30.0, 30, 100, 90]]),
    ]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    for i in range(2):
        for box, label in zip(boxes[i].long(), labels[i], strict=True):
            images[i, :, box[1] : box[3], box[0] : box[2]] = 2.0 if label == 0 else 0.5
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]


def test_tiny_model_overfits_two_images():
    torch.manual_seed(0)
    model = tiny_model(num_classes=2).train()
    images, targets = synthetic_pair()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for _ in range(40):
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert last["loss_bbox"] < 0.5 * first["loss_bbox"]
    assert sum(last.values()) < 0.5 * sum(first.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    # Every object is found: its best detection of the right class overlaps it with IoU > 0.5.
    for det, target in zip(out, targets, strict=True):
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            same = det["labels"] == label
            assert same.any()
            assert torchvision.ops.box_iou(det["boxes"][same], box[None]).max().item() > 0.5


def test_eval_output_contract_and_rescaling():
    torch.manual_seed(0)
    model = tiny_model(num_classes=2).eval()
    nn.init.constant_(model.head.gfl_cls.bias, 2.0)  # make every prior a confident detection
    images = torch.randn(2, 3, 64, 96)
    meta = [
        {"image_size": (64, 96), "orig_size": (128, 192)},
        {"image_size": (40, 60), "orig_size": (40, 60)},
    ]
    with torch.no_grad():
        out = model(images, meta)
    assert len(out) == 2
    for det, (h, w) in zip(out, [(128, 192), (40, 60)], strict=True):
        assert set(det) == {"boxes", "scores", "labels"}
        assert 0 < len(det["boxes"]) <= 100 and det["labels"].dtype == torch.int64
        assert (
            (det["boxes"][:, 2] <= w).all()
            and (det["boxes"][:, 3] <= h).all()
            and (det["boxes"] >= 0).all()
        )
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
    assert out[0]["boxes"][:, 2].max() > 96  # rescaled beyond the resized width


def test_bf16_autocast_training_step_on_cpu():
    # The GPU AMP path, exercised on CPU with bf16: losses stay fp32 and finite.
    torch.manual_seed(0)
    model = tiny_model(num_classes=2).train().to(memory_format=torch.channels_last)
    images, targets = synthetic_pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images.contiguous(memory_format=torch.channels_last), targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
