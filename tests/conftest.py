"""Shared fixtures: a tiny synthetic COCO-format dataset and a tiny training config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep the 2-core CI machine responsive and runs comparable.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> dict[str, Path]:
    """16 training and 4 validation images of 128-160 px, generated once per test session."""
    from gfldet.data import generate_synthetic_coco

    out = tmp_path_factory.mktemp("tiny_coco")
    return generate_synthetic_coco(out, num_train=16, num_val=4, image_size=(128, 160), seed=3, num_workers=1)


def tiny_overrides(data: dict[str, Path], epochs: int = 2) -> list[str]:
    """--cfg-options turning the demo config into a model and schedule that run in seconds."""
    return [
        f"data.train.images={data['train_images']}",
        f"data.train.annotations={data['train_ann']}",
        f"data.val.images={data['val_images']}",
        f"data.val.annotations={data['val_ann']}",
        "data.synthetic=null",
        "data.train_short_side=[128,128]",
        "data.test_short_side=128",
        "data.max_size=192",
        "data.batch_size=4",
        "data.val_batch_size=2",
        "data.num_workers=0",
        "model.fpn.out_channels=32",
        "model.head.feat_channels=64",
        "model.head.stacked_convs=1",
        "optim.name=sgd",
        "optim.lr=0.01",
        "optim.weight_decay=0.0001",
        "schedule.policy=step",
        f"schedule.epochs={epochs}",
        f"schedule.milestones={[1] if epochs > 1 else []}",
        "schedule.warmup_iters=2",
        "train.log_interval=1",
        "train.device=cpu",
        "train.deterministic=true",
        "train.amp=none",
    ]


@pytest.fixture(autouse=True)
def _gfldet_logger_as_before():
    """`train()` run in-process sets up the "gfldet" logger (its own handlers, no propagation);
    put it back after each test so that later tests' caplog sees its records."""
    logger = logging.getLogger("gfldet")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level
