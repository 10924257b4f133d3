"""ResNet backbone from torchvision, returning C3, C4, C5 (strides 8, 16, 32).

As in the reference recipe (MMDetection `ResNet(depth=50, frozen_stages=1, norm_eval=True)`):
the stem and the first `frozen_stages` stages are frozen (no gradients, eval mode), and with
`norm_eval` every BatchNorm keeps its ImageNet running statistics while its affine parameters
still train. Both are switchable off for training from scratch.

A BatchNorm in eval mode is an affine map per channel, so it is folded into the convolution
before it (`conv_bn`), saving two passes over the activation; the fold is recomputed at every
call, so its affine parameters still train. Module names are torchvision's (no `fc`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

_RESNETS = {
    18: (torchvision.models.resnet18, "ResNet18_Weights"),
    34: (torchvision.models.resnet34, "ResNet34_Weights"),
    50: (torchvision.models.resnet50, "ResNet50_Weights"),
    101: (torchvision.models.resnet101, "ResNet101_Weights"),
}


class ResNetBackbone(nn.Module):
    """ResNet-18/34/50/101 trunk. forward: [B, 3, H, W] -> [C3, C4, C5] at strides 8, 16, 32."""

    def __init__(self, *, depth: int, weights: str | None, frozen_stages: int,
                 norm_eval: bool) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        build, _ = _RESNETS[depth]
        resnet = build(weights=None)
        if weights is not None:
            resnet.load_state_dict(load_imagenet_weights(depth, weights))
        self.conv1, self.bn1, self.maxpool = resnet.conv1, resnet.bn1, resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        # Channels of C3, C4, C5: 128/256/512 (ResNet-18/34) or 512/1024/2048 (50/101).
        self.out_channels = [_last_conv(s).out_channels
                             for s in (self.layer2, self.layer3, self.layer4)]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze_stages()

    def _stages(self) -> list[list[nn.Module]]:
        """The stem (conv1, bn1) and the four residual stages, the units `frozen_stages` counts."""
        return [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def _freeze_stages(self) -> None:
        for stage in self._stages()[: self.frozen_stages + 1]:
            for module in stage:
                module.eval()
                for param in module.parameters():
                    param.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.maxpool(F.relu(conv_bn(self.conv1, self.bn1, images), inplace=True))  # stride 4
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = _residual_block(block, x)
            outputs.append(x)
        return outputs[1:]  # C3, C4, C5


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """`bn(conv(x))`; with `bn` in eval mode, one convolution with the BatchNorm folded in:
    y = conv(x, W * s) + (beta - mean * s) (+ conv.bias * s), s = gamma / sqrt(var + eps),
    equal to the two-module path up to float rounding."""
    if bn.training:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _residual_block(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision's BasicBlock / Bottleneck forward, through `conv_bn`."""
    if isinstance(block, Bottleneck):
        out = F.relu(conv_bn(block.conv1, block.bn1, x), inplace=True)
        out = F.relu(conv_bn(block.conv2, block.bn2, out), inplace=True)
        out = conv_bn(block.conv3, block.bn3, out)
    elif isinstance(block, BasicBlock):
        out = F.relu(conv_bn(block.conv1, block.bn1, x), inplace=True)
        out = conv_bn(block.conv2, block.bn2, out)
    else:
        raise TypeError(f"unexpected ResNet block {type(block).__name__}")
    out += x if block.downsample is None else conv_bn(block.downsample[0], block.downsample[1], x)
    return F.relu(out, inplace=True)


def _last_conv(stage: nn.Sequential) -> nn.Conv2d:
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1]


def load_imagenet_weights(depth: int, weights: str) -> dict[str, Tensor]:
    """ImageNet weights for torchvision's ResNet: `"torchvision"` downloads torchvision's
    IMAGENET1K_V1 weights (what MMDetection's `torchvision://resnet50` is; needs internet), any
    other string is a local file holding a state dict (optionally under a "state_dict" key).
    The classifier (`fc.*`) is dropped; any other missing, unexpected or reshaped key is an error.
    """
    _, enum_name = _RESNETS[depth]
    if weights == "torchvision":
        enum = getattr(torchvision.models, enum_name).IMAGENET1K_V1
        try:
            state = enum.get_state_dict(progress=False)
        except Exception as err:  # network errors come in many types
            raise RuntimeError(
                f"could not download torchvision's {enum_name}.IMAGENET1K_V1 ({err}). On a machine "
                "without internet, download the file elsewhere and set model.backbone.weights to "
                "its local path, or set it to null to train from scratch.") from err
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone weights file not found: {path} (model.backbone.weights). Give the "
                f"path to a torchvision ResNet-{depth} state dict, 'torchvision' to download it, "
                "or null.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    reference = _RESNETS[depth][0](weights=None).state_dict()
    expected = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [f"{k}: file {tuple(state[k].shape)} vs ResNet-{depth} {tuple(v.shape)}"
                for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"backbone weights {weights!r} do not match torchvision's ResNet-{depth}: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, "
            f"reshaped {reshaped[:10]}. Check model.backbone.depth against the file.")
    fc = _RESNETS[depth][0](weights=None).fc.state_dict()
    state.update({f"fc.{k}": v for k, v in fc.items()})  # keep torchvision's strict load happy
    return state
