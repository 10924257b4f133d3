"""`ConvModule`: a convolution with an optional GroupNorm and ReLU, under the attribute names of
MMCV's ConvModule (`conv`, `gn`), so that the FPN and head state dicts have MMDetection's keys."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gfldet.config import GN_GROUPS  # the schema's feat_channels rules count these groups


class ConvModule(nn.Module):
    """conv (k x k, 'same' padding) -> GroupNorm(32) if `norm == "gn"` -> ReLU if `relu`.

    The conv has a bias only without a norm, as in MMCV (the norm's bias takes its place)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 norm: str = "none", relu: bool = False) -> None:
        super().__init__()
        if norm not in ("gn", "none"):
            raise ValueError(f"norm must be 'gn' or 'none', got {norm!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                              bias=norm == "none")
        self.gn = nn.GroupNorm(GN_GROUPS, out_channels) if norm == "gn" else None
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        return F.relu(x, inplace=True) if self.relu else x
