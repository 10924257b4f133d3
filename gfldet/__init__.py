"""gfldet: Generalized Focal Loss (GFL) one-stage object detectors in PyTorch."""

__version__ = "0.1.0"
