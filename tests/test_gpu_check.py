"""benchmarks/gpu_check.py on a machine without CUDA: its arguments, its table, its no-CUDA exit,
and its timing core run once on the CPU with a tiny model (the GPU numbers themselves are not
tests: see benchmarks/README.md)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # scripts, not a package (as `python benchmarks/x.py`)
import gpu_check  # noqa: E402
from gpu_check import Row, format_table, measure, parse_args  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_a_bad_part_exits_2_and_names_it(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--parts", "step", "nccll"])
    assert exc.value.code == 2
    assert "'nccll'" in capsys.readouterr().err


def test_steps_below_one_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--steps", "0"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_arguments_and_their_defaults(tmp_path) -> None:
    args = parse_args([])
    assert args.parts == ["step", "loader", "decode", "nccl"] and args.out is None
    args = parse_args(["--parts", "decode", "step", "--steps", "3", "--warmup", "0", "--out",
                       str(tmp_path / "t.md")])
    assert (args.parts, args.steps, args.warmup, args.out) == (["decode", "step"], 3, 0,
                                                               tmp_path / "t.md")


OOM = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_table_shows_measured_skipped_and_failed_rows() -> None:
    rows = [
        Row("step fp32", 12.345, 3071.6, "recipe"),
        Row("step fp16 compile", error=OOM),
        Row("loader 2 workers", 40.04, None, "240 JPEGs"),
        Row("nccl DDP step, 2 processes", notes="skipped: 1 GPU, 2 needed"),
    ]
    assert format_table(rows) == "\n".join([
        "| configuration | img/s | peak MiB | notes |",
        "|---|---|---|---|",
        "| step fp32 | 12.3 | 3072 | recipe |",
        f"| step fp16 compile | failed | - | {OOM} |",
        "| loader 2 workers | 40.0 | - | 240 JPEGs |",
        "| nccl DDP step, 2 processes | - | - | skipped: 1 GPU, 2 needed |",
    ])


def test_a_failing_configuration_becomes_a_row_with_its_first_line() -> None:
    def fails() -> Row:
        raise RuntimeError("compile unsupported | on this GPU\nTraceback detail\nmore")

    row = measure("step bf16 compile", fails)
    assert row == Row("step bf16 compile",
                      error="RuntimeError: compile unsupported \\| on this GPU")
    # The error's own "|" is escaped, so the row keeps its four cells.
    assert format_table([row]).splitlines()[-1] == (
        "| step bf16 compile | failed | - | RuntimeError: compile unsupported \\| on this GPU |")


def test_without_cuda_it_says_so_exits_0_and_runs_nothing(monkeypatch, capsys, tmp_path) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("a part ran without CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("step_row", "data_rows", "loader_row", "time_decode", "nccl_row",
                 "generate_synthetic_coco", "environment_lines"):
        monkeypatch.setattr(gpu_check, name, must_not_run)
    out = tmp_path / "table.md"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out == "no CUDA device: nothing to check\n"
    assert not out.exists()


def test_script_exits_0_without_cuda() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA even where there is a GPU
    proc = subprocess.run([sys.executable, str(SCRIPT), "--parts", "decode"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "no CUDA device: nothing to check\n"), (
        proc.stderr[-2000:])


def test_the_training_step_core_runs_on_cpu_with_a_tiny_model() -> None:
    tiny = ["model.backbone.depth=18", "model.fpn.out_channels=32", "model.head.feat_channels=64",
            "model.head.stacked_convs=1", "data.batch_size=1"]
    cfg = gpu_check.recipe_config("fp32", True, False, tiny)
    assert (cfg.train.amp, cfg.train.channels_last, cfg.train.compile,
            cfg.model.backbone.weights) == ("none", True, False, None)
    seconds, peak = gpu_check.time_step(cfg, torch.device("cpu"), steps=1, warmup=1,
                                        size=(128, 192))
    assert math.isfinite(seconds) and seconds > 0
    assert peak is None  # peak memory is CUDA's max_memory_allocated only


def test_jpegs_that_cannot_be_generated_are_one_failed_row(monkeypatch) -> None:
    def no_space(*args, **kwargs):
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(gpu_check, "generate_synthetic_coco", no_space)
    rows: list[Row] = []
    gpu_check.data_rows(["loader", "decode"], torch.device("cpu"), 1, 0, rows.append)
    assert rows == [Row("loader and decode: generating the JPEGs",
                        error="OSError: [Errno 28] No space left on device")]


def test_decode_rows_on_cpu(tiny_coco) -> None:
    files = sorted(tiny_coco["train_images"].glob("*.jpg"))[:2]
    rows = gpu_check.time_decode(files, torch.device("cpu"), steps=1, warmup=0)
    assert [r.config for r in rows] == ["decode torchvision cpu", "decode PIL"]
    assert all(r.error is None and r.img_s > 0 for r in rows), rows


def test_a_failed_configuration_does_not_stop_the_run(monkeypatch, capsys, tmp_path) -> None:
    """main() on a pretended GPU with the step timed by a stub: the fp16 + compile configuration
    runs out of memory, every other one is measured, nccl is skipped (no second GPU), and --out
    holds the header and the whole table."""
    def fake_time_step(cfg, device, steps, warmup):
        assert (steps, warmup) == (3, 1)
        if cfg.train.amp == "fp16" and cfg.train.compile:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return 0.5, 1000.0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu_check, "environment_lines", lambda: ["device: pretend GPU"])
    monkeypatch.setattr(gpu_check, "time_step", fake_time_step)
    out = tmp_path / "table.md"
    assert gpu_check.main(["--parts", "step", "nccl", "--steps", "3", "--warmup", "1", "--out",
                           str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 12 + 1
    assert rows[0].startswith(
        "| step fp32 | 4.0 | 1000 | recipe, 2x800x1333, median of 3 after 1 |")
    failed = f"| step fp16 channels_last compile | failed | - | {OOM} |"
    assert failed in rows
    assert sum("| failed |" in r for r in rows) == 2  # fp16 compile with and without channels_last
    assert rows[-1] == "| nccl DDP step, 2 processes | - | - | skipped: 1 GPU, 2 needed |"
    table = "\n".join(printed.splitlines()[-15:])
    assert out.read_text() == "device: pretend GPU\n\n" + table + "\n"
