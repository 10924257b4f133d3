"""The one place that turns model settings into modules (plain keyword arguments, no registry)."""

from __future__ import annotations

from gfldet.models.backbone import ResNetBackbone
from gfldet.models.criterion import LossSettings
from gfldet.models.detector import GFL, STRIDES
from gfldet.models.fpn import FPN
from gfldet.models.head import DGQP, GFLHead
from gfldet.postprocess import PostProcessSettings


def build_gfl(
    num_classes: int = 80,
    depth: int = 50,
    backbone_weights: str | None = None,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    fpn_channels: int = 256,
    feat_channels: int = 256,
    stacked_convs: int = 4,
    norm: str = "gn",
    reg_max: int = 16,
    box_repr: str = "distribution",
    dirac_init_distance: float | None = None,
    octave_base_scale: int = 8,
    dgqp: bool = False,
    dgqp_topk: int = 4,
    dgqp_channels: int = 64,
    dgqp_add_mean: bool = True,
    loss: LossSettings | None = None,
    test: PostProcessSettings | None = None,
) -> GFL:
    """A GFL detector; the defaults are the R-50-FPN recipe (backbone weights aside).

    dirac_init_distance: box_repr "dirac" only; None starts every box at its ATSS anchor
    (octave_base_scale / 2 strides per side).
    dgqp: GFLv2 (the Distribution-Guided Quality Predictor with the dgqp_* settings), else GFLv1."""
    if box_repr == "dirac" and dirac_init_distance is None:
        dirac_init_distance = octave_base_scale / 2
    backbone = ResNetBackbone(depth, backbone_weights, frozen_stages, norm_eval)
    neck = FPN(backbone.out_channels, fpn_channels)
    quality = DGQP(reg_max, dgqp_topk, dgqp_channels, dgqp_add_mean) if dgqp else None
    head = GFLHead(
        num_classes, fpn_channels, feat_channels, stacked_convs, reg_max, len(STRIDES), norm, box_repr,
        dirac_init_distance, quality,
    )
    return GFL(backbone, neck, head, loss, test, octave_base_scale)
