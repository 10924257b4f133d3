"""Tests for gfldet.engine.checkpoint: atomic save, safe load, RNG state, weight loading."""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gfldet.engine import checkpoint as ckpt_mod
from gfldet.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _state(version: int) -> dict:
    return {
        "epoch": version,
        "model": {"w": torch.full((64, 64), float(version)), "b": torch.arange(3)},
        "meta": {"name": "gfl", "lr": 0.01, "milestones": [8, 11], "flag": True, "none": None},
    }


def _tmp_leftovers(d: Path) -> list[Path]:
    return sorted(d.glob(".*.tmp"))


# --------------------------------------------------------------------------- save / load


def test_save_load_roundtrip_creates_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "last.pth"
    save_checkpoint({**_state(1), "rng": capture_rng_state()}, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1
    assert torch.equal(loaded["model"]["w"], torch.full((64, 64), 1.0))
    assert loaded["meta"] == _state(1)["meta"]
    assert isinstance(loaded["rng"]["torch"], torch.Tensor)
    assert _tmp_leftovers(path.parent) == []
    assert path.stat().st_mode & 0o777 == 0o644


def test_crash_during_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint(_state(1), path)
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise RuntimeError("simulated crash (disk full)")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()

    assert load_checkpoint(path)["epoch"] == 1
    assert _tmp_leftovers(tmp_path) == []  # the half-written temp file was cleaned up


def test_hard_kill_during_write_keeps_previous_file(tmp_path: Path) -> None:
    """A process that dies mid-write (no cleanup, no exception handling) must not hurt last.pth."""
    path = tmp_path / "last.pth"
    save_checkpoint(_state(1), path)
    script = textwrap.dedent(
        f"""
        import io, os, torch
        from gfldet.engine.checkpoint import save_checkpoint
        real_save = torch.save
        def die_midway(obj, f, *a, **k):
            buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
            f.write(data[: len(data) // 3]); f.flush()
            os._exit(9)  # like SIGKILL / power loss: no finally blocks run
        torch.save = die_midway
        save_checkpoint({{"epoch": 2, "w": torch.zeros(4096)}}, {str(path)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()

    assert load_checkpoint(path)["epoch"] == 1
    leftovers = _tmp_leftovers(tmp_path)
    assert len(leftovers) == 1  # the orphaned temp file, invisible to the trainer's patterns
    assert find_latest_checkpoint(tmp_path) == path
    save_checkpoint(_state(3), path)  # a later save still works
    assert load_checkpoint(path)["epoch"] == 3


def test_missing_file_lists_available(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth") as exc:
        load_checkpoint(tmp_path / "nope.pth")
    assert "available" not in str(exc.value)
    save_checkpoint(_state(1), tmp_path / "epoch_1.pth")
    save_checkpoint(_state(2), tmp_path / "best.pth")
    with pytest.raises(FileNotFoundError) as exc:
        load_checkpoint(tmp_path / "nope.pth")
    assert "epoch_1.pth" in str(exc.value) and "best.pth" in str(exc.value)


class _Evil:
    """Pickle payload that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("fmt", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_malicious_pickle_refused(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.zeros(2)}, "extra": _Evil(marker)}
    if fmt.startswith("torch"):
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "torch_zip")
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f)

    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "non-tensor Python objects" in msg and "refused" in msg
    assert "system" in msg  # the offending global is named (for the legacy format, by torch)
    # The legacy format's first record holds no globals: no "It references:" with a filler.
    assert "pickle opcodes" not in msg
    assert "file an issue" not in msg  # torch's boilerplate is stripped
    assert not marker.exists()  # nothing in the file ran

    # Control: the payload is live, so the refusal above is what protected us.
    if fmt.startswith("torch"):
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_numpy_rng_state_raw_is_refused_but_captured_is_not(tmp_path: Path) -> None:
    """Why capture_rng_state converts numpy's state: the raw ndarray is refused by weights_only."""
    raw = tmp_path / "raw.pth"
    save_checkpoint({"np": np.random.get_state()}, raw)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(raw)
    ok = tmp_path / "ok.pth"
    save_checkpoint({"rng": capture_rng_state()}, ok)
    assert "numpy" in load_checkpoint(ok)["rng"]


@pytest.mark.parametrize("damage", ["half", "head", "empty", "legacy_half", "garbage"])
def test_corrupt_file_raises_checkpoint_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint(_state(1), path)
    data = path.read_bytes()
    legacy = io.BytesIO()
    torch.save(_state(1), legacy, _use_new_zipfile_serialization=False)
    damaged = {
        "half": data[: len(data) // 2],
        "head": data[:100],
        "empty": b"",
        "legacy_half": legacy.getvalue()[: len(legacy.getvalue()) // 2],
        "garbage": bytes(random.Random(0).randrange(256) for _ in range(4096)),
    }[damage]
    path.write_bytes(damaged)
    # Bytes that begin as no torch.save file does are named as such (finding 17), not as a
    # checkpoint whose write was interrupted.
    expected = ("not a PyTorch checkpoint" if damage == "garbage"
                else r"incomplete or corrupt \(was the write interrupted\?\)")
    with pytest.raises(CheckpointError, match=expected) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)


def _jpeg_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["text", "jpeg", "npy"])
def test_a_file_that_is_no_checkpoint_is_called_so(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.pth"
    if kind == "npy":
        np.save(tmp_path / "a.npy", np.zeros(3))
        path.write_bytes((tmp_path / "a.npy").read_bytes())
    else:
        path.write_bytes(b"hello\n" if kind == "text" else _jpeg_bytes())
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert f"{path} is not a PyTorch checkpoint (torch.save file)" in msg
    assert repr(path.read_bytes()[:5])[2:-1] in msg  # what the file begins with
    assert "incomplete" not in msg and "interrupted" not in msg


def test_a_torchscript_archive_is_named_so(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
        torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2)).save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "looks like a TorchScript archive" is muted
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(path)
    msg = str(exc.value)
    assert f"{path} is a TorchScript archive" in msg and "torch.jit.load" in msg
    assert "incomplete" not in msg


def test_non_dict_payload_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- RNG


def _draws() -> tuple[torch.Tensor, list[float], np.ndarray]:
    return (
        torch.randn(5),
        [random.random(), random.gauss(0, 1), random.gauss(0, 1)],
        np.concatenate([np.random.rand(3), np.random.normal(size=3)]),
    )


def test_rng_roundtrip_through_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    # Consume an odd number of gaussians so both cached-gaussian states are non-trivial.
    random.gauss(0, 1)
    np.random.normal()
    path = tmp_path / "rng.pth"
    save_checkpoint({"rng": capture_rng_state()}, path)
    expected = _draws()

    # Scramble every generator, then restore from the file loaded with weights_only=True.
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    got = _draws()

    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])


# --------------------------------------------------------------------------- model weights


class _Head(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.gfl_cls = nn.Conv2d(8, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(8, 4, 3, padding=1)


class _Det(nn.Module):
    def __init__(self, num_classes: int, extra: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.head = _Head(num_classes)
        if extra:
            self.neck = nn.Linear(4, 4)


def test_strict_mismatch_lists_keys_and_shapes() -> None:
    torch.manual_seed(0)
    src = _Det(81, extra=True).state_dict()
    model = _Det(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    del src["head.gfl_reg.bias"]
    with pytest.raises(CheckpointError) as exc:
        load_model_weights(model, src, strict=True)
    msg = str(exc.value)
    assert "head.gfl_cls.weight: checkpoint (81, 8, 3, 3) vs model (6, 8, 3, 3)" in msg
    assert "head.gfl_cls.bias: checkpoint (81,) vs model (6,)" in msg
    assert "head.gfl_reg.bias" in msg  # missing
    assert "neck.weight" in msg and "neck.bias" in msg  # unexpected
    assert "--load-from" in msg and "strict=False" in msg
    # Nothing was loaded by the failed strict call.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_non_strict_loads_matching_only() -> None:
    torch.manual_seed(0)
    src_model = _Det(81, extra=True)
    src = src_model.state_dict()
    model = _Det(6)
    head_before = model.head.gfl_cls.weight.detach().clone()
    report = load_model_weights(model, src, strict=False)
    assert torch.equal(model.backbone[0].weight, src["backbone.0.weight"])
    assert torch.equal(model.backbone[1].running_mean, src["backbone.1.running_mean"])
    assert torch.equal(model.head.gfl_reg.weight, src["head.gfl_reg.weight"])
    assert torch.equal(model.head.gfl_cls.weight, head_before)  # shape mismatch: untouched
    assert "backbone.0.weight" in report["loaded"]
    assert sorted(report["unexpected"]) == ["neck.bias", "neck.weight"]
    assert report["missing"] == []
    assert [m.split(":")[0] for m in report["mismatched"]] == [
        "head.gfl_cls.weight",
        "head.gfl_cls.bias",
    ]


def test_ddp_prefix_and_wrapped_model() -> None:
    torch.manual_seed(0)
    src = {f"module.{k}": v for k, v in _Det(6).state_dict().items()}
    model = _Det(6)
    report = load_model_weights(model, src, strict=True)
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert torch.equal(model.head.gfl_cls.weight, src["module.head.gfl_cls.weight"])
    # A DataParallel-wrapped model is unwrapped too.
    wrapped = nn.DataParallel(_Det(6))
    load_model_weights(wrapped, src, strict=True)
    assert torch.equal(wrapped.module.head.gfl_cls.weight, src["module.head.gfl_cls.weight"])


def test_long_lists_are_truncated() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    src = {f"other.{i}": torch.zeros(1) for i in range(30)}
    with pytest.raises(CheckpointError) as exc:
        load_model_weights(model, src)
    msg = str(exc.value)
    assert "missing in checkpoint (60)" in msg and "... and 40 more" in msg
    assert "unexpected in checkpoint (30)" in msg and "... and 10 more" in msg


def test_full_checkpoint_passed_by_mistake_gets_hint() -> None:
    model = _Det(6)
    with pytest.raises(CheckpointError, match=r"checkpoint\['model'\]"):
        load_model_weights(model, {"model": model.state_dict(), "epoch": 3})


# --------------------------------------------------------------------------- work_dir helpers


def _touch(d: Path, *names: str) -> None:
    for n in names:
        (d / n).write_bytes(b"x")


def test_find_latest_checkpoint(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    _touch(tmp_path, "epoch_2.pth", "epoch_10.pth", "epoch_9.pth", "best.pth", "epoch_x.pth")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "epoch_10.pth"  # numeric order
    _touch(tmp_path, "last.pth")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "last.pth"


def test_prune_checkpoints(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"epoch_{i}.pth" for i in (1, 2, 3, 10, 11)), "last.pth", "best.pth")
    assert prune_checkpoints(tmp_path, keep=0) == []
    assert len(list(tmp_path.iterdir())) == 7
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pth",
        "epoch_10.pth",
        "epoch_11.pth",
        "last.pth",
    ]
    assert prune_checkpoints(tmp_path, keep=5) == []


def test_module_exports_checkpoint_error_as_runtime_error() -> None:
    assert issubclass(ckpt_mod.CheckpointError, RuntimeError)


# --------------------------------------------------------------------------- model format


def _tiny_gfl(*variant: str) -> nn.Module:
    from conftest import build_from_options

    torch.manual_seed(0)
    model = build_from_options(
        "model.num_classes=3", "model.backbone.depth=18", "model.backbone.frozen_stages=-1",
        "model.backbone.norm_eval=false", "model.fpn.out_channels=32",
        "model.head.feat_channels=32", "model.head.stacked_convs=2", *variant,
    )
    with torch.no_grad():  # away from the initialisation, so that every tensor matters
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
    return model.eval()


def _outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [*model.head(model.neck(model.backbone(images)))]


@pytest.mark.parametrize("variant", [(), ("model.head.dgqp={}",), ("model.head.norm=none",)])
def test_model_format_1_checkpoint_loads_through_the_key_map(tmp_path, caplog, variant) -> None:
    """A checkpoint as gfldet wrote it before the MMDetection names (no "model_format", old keys
    in "model" and in the EMA's "module."-prefixed state) loads into today's model, with its EMA,
    and gives the same outputs; the log says so once."""
    from conftest import to_format_1

    from gfldet.engine.ema import build_ema
    from gfldet.inference import model_weights

    model = _tiny_gfl(*variant)
    ema = build_ema(model, 0.9, 10)
    with torch.no_grad():
        for tensor in ema.module.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(0.5)
    old = {"model": to_format_1(model.state_dict()), "ema": to_format_1(ema.state_dict()),
           "epoch": 1}
    assert "head.cls_out.weight" in old["model"] and "module.backbone.stem.0.weight" in old["ema"]
    save_checkpoint(old, tmp_path / "old.pth")
    caplog.set_level("WARNING", logger="gfldet")
    with_propagation = ckpt_mod.log.propagate
    ckpt_mod.log.propagate = True
    try:
        state = load_checkpoint(tmp_path / "old.pth")
    finally:
        ckpt_mod.log.propagate = with_propagation
    notes = [r.getMessage() for r in caplog.records if "model format 1" in r.getMessage()]
    assert len(notes) == 1 and "model and ema" in notes[0] and "old.pth" in notes[0]
    assert list(state["model"]) == list(model.state_dict()) and state["model_format"] == 2
    assert list(state["ema"]) == list(ema.state_dict())
    images = torch.randn(1, 3, 128, 160)  # P7 2 x 3: GroupNorm needs more than one value
    for use_ema, reference in ((False, model), (True, ema.module)):
        fresh = _tiny_gfl(*variant)
        with torch.no_grad():
            for tensor in fresh.state_dict().values():
                tensor.zero_()
        load_model_weights(fresh, model_weights(state, use_ema=use_ema), strict=True)
        for got, expected in zip(_outputs(fresh, images), _outputs(reference, images), strict=True):
            assert torch.equal(got, expected)


def test_model_format_note_is_logged_once_per_file_and_says_how_to_stop_it(tmp_path, caplog):
    """Finding 13: the note says what rewrites the file in the current format, and a tool that
    reads the same file twice (export) logs it once; another old file gets its own note."""
    from conftest import to_format_1

    state = {"model": to_format_1(_tiny_gfl().state_dict()), "epoch": 1}
    for name in ("old.pth", "other.pth"):
        save_checkpoint(state, tmp_path / name)
    caplog.set_level("WARNING", logger="gfldet")
    ckpt_mod.log.propagate, before = True, ckpt_mod.log.propagate
    try:
        for name in ("old.pth", "old.pth", "other.pth"):
            assert load_checkpoint(tmp_path / name)["model_format"] == 2
    finally:
        ckpt_mod.log.propagate = before
    notes = [r.getMessage() for r in caplog.records if "model format 1" in r.getMessage()]
    assert len(notes) == 2 and "old.pth" in notes[0] and "other.pth" in notes[1]
    assert f"tools/export.py {tmp_path / 'old.pth'} --format weights" in notes[0]


def test_current_format_and_plain_checkpoints_load_unchanged_and_unannounced(
    tmp_path, caplog
) -> None:
    model = _tiny_gfl()
    save_checkpoint({"model": model.state_dict(), "model_format": 2}, tmp_path / "new.pth")
    save_checkpoint(_state(1), tmp_path / "plain.pth")  # no format entry, no old names
    caplog.set_level("WARNING", logger="gfldet")
    ckpt_mod.log.propagate, before = True, ckpt_mod.log.propagate
    try:
        assert list(load_checkpoint(tmp_path / "new.pth")["model"]) == list(model.state_dict())
        assert "model_format" not in load_checkpoint(tmp_path / "plain.pth")
    finally:
        ckpt_mod.log.propagate = before
    assert not [r for r in caplog.records if "model format" in r.getMessage()]


def test_newer_model_format_is_refused_naming_the_versions(tmp_path) -> None:
    save_checkpoint({"model": {"w": torch.zeros(1)}, "model_format": 3}, tmp_path / "future.pth")
    with pytest.raises(CheckpointError, match=r"model format 3.*model formats 1 to 2"):
        load_checkpoint(tmp_path / "future.pth")


def test_format_1_state_dict_given_directly_gets_a_hint() -> None:
    from conftest import to_format_1

    model = _tiny_gfl()
    with pytest.raises(CheckpointError, match=r"model format 1 names .*load_checkpoint"):
        load_model_weights(model, to_format_1(model.state_dict()))


def test_save_checkpoint_refuses_a_folder_before_writing(tmp_path: Path) -> None:
    """Finding 9: the rename onto a folder used to fail only after the whole file was written."""
    folder = tmp_path / "d"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="d is a folder; give a file name"):
        save_checkpoint(_state(1), folder)
    assert not list(folder.iterdir()) and not _tmp_leftovers(tmp_path)
