"""Safe, atomic checkpoint I/O: weights_only loading, RNG state capture, partial weight loading,
and the model-format version of what gfldet saves (older formats are mapped when loaded)."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import pickletools
import random
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

_MAX_LISTED = 20
log = logging.getLogger("gfldet")

# The version of the state-dict names in a checkpoint's "model" (and "ema"), saved as
# "model_format". 1 (files without the entry): gfldet's own names (`backbone.stem.0`,
# `neck.output_convs.i`, `neck.p6`, `head.cls_tower.k`, `head.cls_out`, `head.dgqp.hidden`).
# 2: torchvision's ResNet and MMDetection's FPN and GFL head names.
MODEL_FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded (unsafe, corrupt, or incompatible with the model)."""


# --------------------------------------------------------------------------- save / load


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` to ``path``; a crash mid-write leaves the old file intact."""
    path = Path(path)
    if path.is_dir():  # else the rename below fails only after the whole file was written
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory so os.replace is a same-filesystem atomic rename;
    # the leading dot keeps it out of the epoch_*.pth / last.pth patterns.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600; give checkpoints the usual 0644 like torch.save would.
            with contextlib.suppress(AttributeError, OSError):
                os.fchmod(f.fileno(), 0o644)
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    # Persist the directory entry os.replace created (skipped where dirs can't be opened).
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _short_reason(err: BaseException, limit: int = 200) -> str:
    """The informative part of a torch.load error, without its "retry with
    weights_only=False" boilerplate (bad advice for both unsafe and damaged files)."""
    text = re.sub(r"Please file an issue with the following[^:]*:\s*", "", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines
            if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    text = " ".join(keep or lines) or "no details"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scan_pickle_globals(path: Path) -> list[str] | None:
    """Statically list the globals a checkpoint's pickle imports (nothing is executed), for torch's
    zip format those weights_only does not allow; None when the pickle does not parse, i.e. the
    file is damaged."""
    try:
        if zipfile.is_zipfile(path):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        names: list[str] = []
        strings: list[str] = []
        with path.open("rb") as stream:  # plain pickle / first record of the legacy torch format
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(arg, str):
                    strings.append(arg)
        return names
    except Exception:
        return None


def is_torch_file(path: str | Path) -> bool:
    """Whether ``path`` begins as torch.save writes a file: a zip archive, or a pickle of protocol
    2 or later (torch's legacy format, plain pickles). Only the first bytes are read."""
    try:
        with Path(path).open("rb") as f:
            return _torch_header(f.read(4))
    except OSError:
        return False


def _torch_header(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80
                                               and 2 <= head[1] <= 5)


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    """The error for a file torch.load could not read, by what its bytes say it is: no torch.save
    file at all, a TorchScript archive, or one that begins as a checkpoint but is cut short or
    damaged."""
    head = b""
    with contextlib.suppress(OSError), path.open("rb") as f:  # unreadable: torch's error says why
        head = f.read(16)
    if head and not _torch_header(head):
        return CheckpointError(
            f"{path} is not a PyTorch checkpoint (torch.save file): it begins with {head!r}. "
            "Check the path: a checkpoint is a .pth that gfldet (or MMDetection) wrote.")
    with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as archive:
        if any(n.endswith("/constants.pkl") for n in archive.namelist()):
            return CheckpointError(
                f"{path} is a TorchScript archive (torch.jit.save, tools/export.py --format "
                "torchscript), not a checkpoint: run it with torch.jit.load, and give gfldet's "
                "tools the .pth it was exported from.")
    return CheckpointError(
        f"checkpoint {path} is incomplete or corrupt (was the write interrupted?): "
        f"{type(err).__name__}: {_short_reason(err)}")


def find_checkpoint_file(path: str | Path) -> Path:
    """``path`` if it is a file; else FileNotFoundError naming it and the checkpoints beside it."""
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint {'is a folder, not a file' if path.is_dir() else 'not found'}: {path}"
        if path.parent.is_dir():
            others = sorted(p.name for p in path.parent.glob("*.pth") if p.is_file())
            if others:
                msg += f" (available in {path.parent}: {', '.join(others)})"
        raise FileNotFoundError(msg)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; never executes pickled code."""
    path = find_checkpoint_file(path)
    try:
        with warnings.catch_warnings():
            # A plain pickle (not torch's zip format) makes torch warn about its protocol before
            # the refusal below, which says all there is to say.
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            # Likewise for a TorchScript archive, which `_unreadable` names.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive",
                                    category=UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # Code execution in a pickle needs an import of a callable (GLOBAL/STACK_GLOBAL): a
        # global torch refused, or a well-formed pickle the safe loader will not run (e.g.
        # protocol-4 framing ahead of a code-executing global), marks the file as unsafe; other
        # failures may mean damaged bytes.
        globals_ = _scan_pickle_globals(path)
        msg = str(e).lower()
        if globals_ is None and not ("weights only load failed" in msg and "global" in msg):
            raise _unreadable(path, e) from e
        # (A legacy-format file's scan sees only its first record, so it may name nothing.)
        foreign = [g for g in globals_ or [] if not g.startswith(("torch.", "collections."))]
        named = f"It references: {', '.join(dict.fromkeys(foreign[:5]))}. " if foreign else ""
        raise CheckpointError(
            f"refused to load {path}: it contains non-tensor Python objects that a weights_only "
            f"load will not unpickle, so it was refused for safety (nothing in it was executed). "
            f"{named}Only load checkpoints written by gfldet, or re-save the weights as a plain "
            f"state dict in a trusted environment. ({_short_reason(e)})") from e
    except Exception as e:
        # Truncated zip archives surface as RuntimeError from the stream reader, cut-short
        # legacy pickles as EOFError, other bytes as decode errors of many kinds.
        raise _unreadable(path, e) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return _to_current_format(obj, path)


# --------------------------------------------------------------------------- model format


def _to_current_format(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """`state` with its model (and EMA) keys in MODEL_FORMAT names, said once in the log when
    names were mapped. Files without a "model" entry (MMDetection's, bare state dicts) are left
    as they are; a format newer than this gfldet's is a CheckpointError naming both."""
    version = state.get("model_format", 1)
    if not isinstance(state.get("model"), Mapping) or version == MODEL_FORMAT:
        return state
    if version != 1:
        raise CheckpointError(
            f"{path} holds model format {version!r}, written by another gfldet version; this one "
            f"reads model formats 1 to {MODEL_FORMAT}. Load it with the gfldet that wrote it.")
    mapped = {k: format_1_to_current(state[k]) for k in ("model", "ema")
              if isinstance(state.get(k), Mapping)}
    renamed = [k for k, sd in mapped.items() if list(sd) != list(state[k])]
    if not renamed:
        return state
    # Once per file and process: a tool that reads the file twice (export) says it once.
    noted = (str(path.resolve()), path.stat().st_mtime_ns)
    if noted not in _FORMAT_NOTED:
        _FORMAT_NOTED.add(noted)
        log.warning("%s: model format 1 (gfldet's module names before torchvision's and "
                    "MMDetection's): the keys of its %s are mapped to model format %d on every "
                    "load. To stop this note, `python tools/export.py %s --format weights` "
                    "writes an inference copy in the current format (config included); keep "
                    "this file to resume training.", path, " and ".join(renamed), MODEL_FORMAT,
                    path)
    return {**state, **mapped, "model_format": MODEL_FORMAT}


_FORMAT_NOTED: set[tuple[str, int]] = set()  # (file, mtime) whose model-format note was logged


_FORMAT_1_RENAMES = [  # (model format 1 pattern, MODEL_FORMAT replacement), for re.sub
    (r"backbone\.stem\.0\.", "backbone.conv1."),
    (r"backbone\.stem\.1\.", "backbone.bn1."),
    (r"neck\.lateral_convs\.(\d+)\.(weight|bias)$", r"neck.lateral_convs.\1.conv.\2"),
    (r"neck\.output_convs\.(\d+)\.", r"neck.fpn_convs.\1.conv."),
    (r"neck\.p6\.", "neck.fpn_convs.3.conv."),
    (r"neck\.p7\.", "neck.fpn_convs.4.conv."),
    (r"head\.cls_out\.", "head.gfl_cls."),
    (r"head\.reg_out\.", "head.gfl_reg."),
    (r"head\.dgqp\.hidden\.", "head.reg_conf.0."),
    (r"head\.dgqp\.out\.", "head.reg_conf.2."),
]
_FORMAT_1_TOWER = re.compile(r"head\.(cls|reg)_tower\.(\d+)\.(weight|bias)")


def format_1_to_current(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict (a model's, or an EMA's with its "module." prefix) with model format 1 names
    renamed to MODEL_FORMAT's, in the same order; other keys are kept as they are.

    A format-1 head tower was one Sequential of (conv, GroupNorm, ReLU) x n, or (conv, ReLU) x n
    without norm: its entry k is conv k // 3 (or k // 2), the GroupNorm when k % 3 == 1."""
    with_gn = any(re.search(r"head\.cls_tower\.1\.weight$", k) for k in state_dict)
    slots = 3 if with_gn else 2

    def rename(key: str) -> str:
        prefix = "module." if key.startswith("module.") else ""
        name = key.removeprefix(prefix)
        tower = _FORMAT_1_TOWER.fullmatch(name)
        if tower:
            branch, k, entry = tower[1], int(tower[2]), tower[3]
            layer = "gn" if with_gn and k % slots == 1 else "conv"
            return f"{prefix}head.{branch}_convs.{k // slots}.{layer}.{entry}"
        for pattern, replacement in _FORMAT_1_RENAMES:
            name = re.sub(f"^{pattern}", replacement, name)
        return prefix + name

    return {rename(k): v for k, v in state_dict.items()}


# What tools/train.py writes into a checkpoint, and --resume reads back.
TRAINING_STATE = ("model", "optimizer", "scheduler", "scaler", "epoch", "iteration", "rng",
                  "config")


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """``load_checkpoint`` for --resume: CheckpointError unless the file is a training
    checkpoint."""
    state = load_checkpoint(path)
    missing = [k for k in TRAINING_STATE if k not in state]
    if missing:
        held = ", ".join(sorted(map(str, state))[:8]) or "nothing"
        raise CheckpointError(
            f"{path} is not a training checkpoint of tools/train.py (it has no "
            f"{', '.join(missing)}; it holds {held}): --resume continues a run from its last.pth "
            f"or epoch_N.pth. To start a new run from these weights, use --load-from {path}")
    return state


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU + all CUDA), ``random`` and numpy, in weights_only-safe types."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [int(version), [int(v) for v in internal], gauss_next],
        # numpy's state holds an ndarray (refused by weights_only): store plain Python types.
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; absent entries are left untouched."""
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if torch.cuda.is_available():
        # Resuming on a different GPU count: restore the devices both sides have.
        for dev, s in enumerate((state.get("cuda") or [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), dev)
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))


# --------------------------------------------------------------------------- model weights


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def format_key_list(title: str, items: list[str]) -> str:
    """``title (N):`` and the first 20 items, one per line, for the key lists of load errors."""
    shown = "\n".join(f"    {s}" for s in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


_LOAD_FROM_ADVICE = (
    "To load only the matching weights (e.g. fine-tuning with a different number of classes) use "
    "--load-from, which calls load_model_weights(..., strict=False).")


def foreign_model_advice(state: Mapping[str, Any], source: str | Path) -> str | None:
    """The load error's advice for a checkpoint that `train(model=...)` wrote with a model its
    config does not describe (meta "model_matches_config": false); None for any other."""
    meta = state.get("meta")
    if not isinstance(meta, Mapping) or meta.get("model_matches_config") is not False:
        return None
    return (f"{source} was written by train(model=...) with a model its config does not "
            "describe: load it into that model, model.load_state_dict(torch.load(path)['model']) "
            "(resume: train(..., model=that model)), or give a YAML config that describes it.")


def load_model_weights(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True,
                       source: str | Path | None = None,
                       advice: str | None = None) -> dict[str, list[str]]:
    """Load ``state_dict`` into ``model`` after checking keys and shapes (``source``: the file
    it came from, named in the error; ``advice``: the error's last line, by default training's
    --load-from).

    strict=True raises :class:`CheckpointError` on any missing/unexpected/mismatched key.
    strict=False loads only the tensors whose name and shape match and returns a report
    ``{"loaded", "missing", "unexpected", "mismatched"}`` for the caller to log.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    model_sd = model.state_dict()
    sd = dict(state_dict)
    # DDP-saved state dicts prefix every key with "module."; our models never do.
    if (sd and all(k.startswith("module.") for k in sd)
            and not any(k.startswith("module.") for k in model_sd)):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}

    matched = {k: v for k, v in sd.items() if k in model_sd and _shape(v) == _shape(model_sd[k])}
    report = {
        "loaded": list(matched),
        "missing": [k for k in model_sd if k not in sd],
        "unexpected": [k for k in sd if k not in model_sd],
        "mismatched": [f"{k}: checkpoint {_shape(v)} vs model {_shape(model_sd[k])}"
                       for k, v in sd.items() if k in model_sd and k not in matched],
    }
    titles = {"mismatched": "shape mismatches", "missing": "missing in checkpoint",
              "unexpected": "unexpected in checkpoint"}
    if strict and any(report[key] for key in titles):
        parts = [f"the weights in {source} do not match the model:" if source is not None
                 else "state dict does not match the model:"]
        parts += [format_key_list(title, report[key]) for key, title in titles.items()
                  if report[key]]
        if not matched and any(k in sd for k in ("model", "state_dict")):
            parts.append(
                "  hint: this looks like a full training checkpoint; pass checkpoint['model'].")
        if list(format_1_to_current(sd)) != list(sd):
            parts.append(
                f"  hint: these are model format 1 names (gfldet's before format {MODEL_FORMAT}); "
                "read the file with load_checkpoint, which maps them, or map them with "
                "format_1_to_current.")
        parts.append(advice or _LOAD_FROM_ADVICE)
        raise CheckpointError("\n".join(parts))

    # strict=False here is safe: we already filtered to the exact matching keys/shapes.
    model.load_state_dict(matched, strict=False)
    return report


# --------------------------------------------------------------------------- work_dir helpers


def _epoch_checkpoints(work_dir: str | Path) -> list[Path]:
    """Every ``epoch_N.pth`` in ``work_dir``, sorted by N."""
    found = [p for p in Path(work_dir).glob("epoch_*.pth")
             if re.fullmatch(r"epoch_\d+\.pth", p.name) and p.is_file()]
    return sorted(found, key=lambda p: int(p.stem.removeprefix("epoch_")))


def find_latest_checkpoint(work_dir: str | Path, end_of_epoch: bool = False) -> Path | None:
    """``work_dir/last.pth`` if present, else the ``epoch_N.pth`` with the largest N;
    ``end_of_epoch``: always the latter, the newest written at the end of an epoch (``last.pth``
    may be mid-epoch)."""
    last = Path(work_dir) / "last.pth"
    if last.is_file() and not end_of_epoch:
        return last
    return next(reversed(_epoch_checkpoints(work_dir)), None)


def prune_checkpoints(work_dir: str | Path, keep: int) -> list[Path]:
    """Delete the oldest ``epoch_N.pth`` beyond the newest ``keep`` (keep<=0 keeps all), each
    with a log line; ``last.pth`` and ``best.pth`` are never touched. Returns the deleted paths."""
    removed = _epoch_checkpoints(work_dir)[:-keep] if keep > 0 else []
    for p in removed:
        p.unlink(missing_ok=True)
        log.info("removed %s: train.keep_checkpoints=%d keeps the newest %d epoch_N.pth besides "
                 "last.pth and best.pth (0 keeps all)", p.name, keep, keep)
    return removed
