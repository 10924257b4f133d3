"""Every speed benchmark runs end to end on tiny inputs and prints its table (the measurements
themselves are not tests: see benchmarks/README.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

SMOKE_ARGS = {
    "loss_overhead.py": ["--case", "1", "64", "2", "--repeats", "1"],
    "train_step.py": ["--batch", "1", "--size", "64", "--boxes", "2", "--repeats", "1"],
    "inference.py": ["--batch", "1", "--repeats", "1", "--height", "64", "--width", "96"],
    "assigner.py": ["--boxes", "1", "2", "--repeats", "1", "--skip-memory"],
    "dataloader.py": ["--images", "4", "--workers", "0", "--passes", "1", "--short-side", "64", "--max-size", "96"],
    "bn_fold.py": ["--batch", "1", "--size", "64", "--boxes", "2", "--eval-size", "64", "96", "--repeats", "1"],
    "coco_eval.py": ["--images", "20", "--dets", "13", "--repeats", "1"],
}


RETAINING_MALLOC_SCRIPTS = {"loss_overhead.py", "train_step.py", "inference.py", "assigner.py", "bn_fold.py"}


@pytest.mark.parametrize("script", sorted(SMOKE_ARGS))
def test_benchmark_runs_and_prints_its_table(script: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *SMOKE_ARGS[script]],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "machine:" in proc.stdout
    if script in RETAINING_MALLOC_SCRIPTS:  # re-executed itself under common.RETAINING_MALLOC_ENV
        assert "malloc: freed memory retained" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) >= 3, proc.stdout  # header, separator and at least one row
