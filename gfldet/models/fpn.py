"""Feature pyramid P3-P7 exactly as the GFL recipe (MMDetection `FPN(start_level=1,
add_extra_convs='on_output', num_outs=5)`): lateral 1x1 convs on C3-C5, a nearest-neighbour
top-down pathway, 3x3 output convs, then P6 by a stride-2 3x3 conv on the P5 *output* and P7 by
another on P6, with no ReLU in between. No normalisation, Xavier-uniform init. The names are
MMDetection's (`lateral_convs.i.conv`; `fpn_convs.0..2` give P3-P5, `.3` / `.4` P6 / P7).

torchvision's `FeaturePyramidNetwork` + `LastLevelP6P7` differs (ReLU before P7, Kaiming init),
hence this module.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gfldet.models.conv_module import ConvModule


class FPN(nn.Module):
    """forward: [C3, C4, C5] -> [P3, P4, P5, P6, P7], each with `out_channels` channels."""

    def __init__(self, in_channels: list[int], *, out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            [ConvModule(out_channels, out_channels, 3) for _ in in_channels]
            + [ConvModule(out_channels, out_channels, 3, stride=2) for _ in range(2)]  # P6, P7
        )
        self.out_channels = out_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        levels = len(laterals)
        outs = [conv(x) for conv, x in zip(self.fpn_convs[:levels], laterals, strict=True)]  # P3-P5
        for conv in self.fpn_convs[levels:]:  # P6 from the P5 output, P7 from P6
            outs.append(conv(outs[-1]))  # no ReLU before them (relu_before_extra_convs=False)
        return outs
