"""Priors (anchor points and anchor boxes) of a feature pyramid, as ATSS and GFL use them.

One square anchor of side `octave_base_scale * stride` per feature-map location, centred at
`(x * stride, y * stride)` (MMDetection >= 2.0, `center_offset=0`). Priors of all levels are
flattened row-major (y, then x) per level and concatenated P3 -> P7, the same order in which
the head's outputs are flattened (`permute(0, 2, 3, 1).reshape(B, -1, C)`).

Shape legend: `A` priors over all levels, `B` images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Priors:
    """The priors of one padded batch size."""

    boxes: Tensor  # [A, 4] anchor boxes, xyxy input pixels
    strides: Tensor  # [A] stride of each prior's level
    grid_xy: Tensor  # [A, 2] integer (x, y) position of each prior on its level's grid
    num_per_level: list[int]  # priors on each level, P3 first

    @property
    def centers(self) -> Tensor:
        """[A, 2] anchor centres in input pixels."""
        return (self.boxes[:, :2] + self.boxes[:, 2:]) * 0.5


def make_priors(feature_sizes: list[tuple[int, int]], strides: list[int],
                octave_base_scale: int, device: torch.device | str = "cpu") -> Priors:
    """Build the priors for feature maps of the given (height, width), one stride per level."""
    boxes, prior_strides, grid = [], [], []
    for (height, width), stride in zip(feature_sizes, strides, strict=True):
        ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                                torch.arange(width, device=device, dtype=torch.float32),
                                indexing="ij")
        xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)  # [H*W, 2], row-major
        half = octave_base_scale * stride / 2
        centers = xy * stride
        boxes.append(torch.cat([centers - half, centers + half], dim=1))
        prior_strides.append(torch.full((height * width,), float(stride), device=device))
        grid.append(xy)
    return Priors(boxes=torch.cat(boxes), strides=torch.cat(prior_strides),
                  grid_xy=torch.cat(grid), num_per_level=[h * w for h, w in feature_sizes])


def valid_prior_mask(priors: Priors, image_sizes: Tensor, size_divisor: int) -> Tensor:
    """[B, A] bool: which priors lie inside each image's own padded extent (not in the batch
    padding). image_sizes: [B, 2] (height, width) of each resized, unpadded image. A prior at
    grid (x, y) of stride s is valid iff x < ceil(W_pad / s) and y < ceil(H_pad / s), with the
    image's size padded to `size_divisor` (MMDetection `valid_flags`)."""
    padded = torch.ceil(image_sizes.float() / size_divisor) * size_divisor  # [B, 2] (h, w)
    limit_h = torch.ceil(padded[:, 0:1] / priors.strides)  # [B, A]
    limit_w = torch.ceil(padded[:, 1:2] / priors.strides)
    return (priors.grid_xy[:, 0] < limit_w) & (priors.grid_xy[:, 1] < limit_h)
