"""GFL model parts: backbone, FPN, head, priors, training criterion, and the detector (built
from a config by gfldet.engine.build.build_model)."""

from gfldet.models.criterion import LossSettings
from gfldet.models.detector import GFL

__all__ = ["GFL", "LossSettings"]
