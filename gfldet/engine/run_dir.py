"""The run folder's contract: a run never writes over another run's results.

A folder "holds a run" once a run has logged a step in it or written a checkpoint. Training
into such a folder needs `--resume` (continue it) or `--overwrite` (delete that run's outputs
first and start again); otherwise it stops with a message before anything is written. Files in
the folder that a run does not write are never touched.

A checkpoint is written to a hidden temporary file and then renamed (`save_checkpoint`); a
process killed mid-save leaves that temporary file behind, and the next start removes it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

# What a training run writes into its folder (glob patterns); `--overwrite` deletes these only.
_CHECKPOINTS = ("epoch_*.pth", "last.pth", "best.pth")  # other .pth files (exports, a user's) stay
# The dataset check's cache (gfldet.data.checks), one JSON file per split.
CHECK_CACHE_DIR = "dataset_check"
# tools/eval.py's metrics of a checkpoint (CHECKPOINT.metrics.json) go with the checkpoint.
RUN_OUTPUTS = (*_CHECKPOINTS, *(f"{c}.metrics.json" for c in _CHECKPOINTS), "scalars.jsonl",
               "train.log", "config.yaml", "metrics_epoch_*.json", "tb", CHECK_CACHE_DIR, "report")
# Signs that a run trained here: a checkpoint, a logged step, or an evaluation.
_RUN_EVIDENCE = (*_CHECKPOINTS, "scalars.jsonl", "metrics_epoch_*.json")
# Temporary files of `save_checkpoint` (".NAME.XXXX.tmp") and of `publish_weights`.
_STALE_PATTERNS = (".*.tmp", ".*.unhashed.pth")


class RunDirError(RuntimeError):
    """The run folder holds an earlier run, and neither --resume nor --overwrite was given."""


def _glob(work_dir: Path, pattern: str) -> list[Path]:
    """`work_dir.glob(pattern)`, where `epoch_*` matches a number only: the names a run writes
    (a user's epoch_12_backup.pth is not the run's)."""
    found = list(work_dir.glob(pattern))
    if "epoch_*" in pattern:
        rule = re.escape(pattern).replace(r"epoch_\*", r"epoch_\d+").replace(r"\*", ".*")
        found = [p for p in found if re.fullmatch(rule, p.name)]
    return found


def _files(work_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The files in `work_dir` (none if it is not a folder) matching any of `patterns`, sorted."""
    return sorted({p for pattern in patterns for p in _glob(work_dir, pattern) if p.is_file()})


def remove_stale_temporaries(work_dir: Path) -> list[Path]:
    """Delete the temporary files a process killed mid-save left in `work_dir`; returns them."""
    stale = _files(work_dir, _STALE_PATTERNS)
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def remove_run_outputs(work_dir: Path) -> list[Path]:
    """Delete what a run wrote into `work_dir` (RUN_OUTPUTS), nothing else; returns what went."""
    removed = sorted({p for pattern in RUN_OUTPUTS for p in _glob(work_dir, pattern)})
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return removed


def check_run_dir(work_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """Refuse to start a new run over an earlier one; with `overwrite`, clear the earlier run.

    Returns a message describing what `overwrite` removed (None if nothing). Raises
    `RunDirError` naming the files found, `--resume` and `--overwrite` (with the keyword
    arguments of `train()`, for a run started from Python)."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other (resume= and "
                          "overwrite=True in train()): continue the run, or start it again")
    if resume:
        return None
    scalars = work_dir / "scalars.jsonl"  # an empty one: the run logged no step
    found = [p for p in _files(work_dir, _RUN_EVIDENCE) if p != scalars or p.stat().st_size > 0]
    if not found:
        return None
    if overwrite:
        removed = remove_run_outputs(work_dir)
        return (f"--overwrite: removed the earlier run's {len(removed)} outputs in {work_dir}: "
                + ", ".join(p.name for p in removed))
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    keep = "give this run its own folder with --work-dir DIR (train()'s work_dir)"
    if any(p.suffix == ".pth" for p in found):
        keep = f"continue it with --resume (resume=True in train()), or {keep}"
    raise RunDirError(
        f"{work_dir} already holds a run ({names}); nothing was changed. To keep it, {keep}; to "
        "delete that run's outputs and start again in the same folder, pass --overwrite "
        "(overwrite=True)."
    )
