"""GFL model parts: backbone, FPN, head, priors, training criterion, and the detector."""

from gfldet.models.build import build_gfl
from gfldet.models.criterion import LossSettings
from gfldet.models.detector import GFL

__all__ = ["GFL", "LossSettings", "build_gfl"]
