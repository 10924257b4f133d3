"""Accuracy under one fixed training budget: gfldet's GFL, its loss ablations (GFL paper Table 3)
and torchvision's FCOS and RetinaNet, each trained by gfldet's trainer on the bundled synthetic
dataset and scored with COCO box AP on its val split, over several seeds.

    python benchmarks/accuracy.py [--config configs/synthetic_accuracy.yaml]
        [--entrants gfl fcos ...]
        [--seeds 0 1 2] [--epochs N] [--work-dir work_dirs/accuracy] [--report-only]
        [--results-md benchmarks/RESULTS.md] [--cfg-options KEY=VALUE ...]

Every run is `gfldet.engine.trainer.train` on the config unchanged except `train.seed`, the
entrant's `model.loss.*` and `model.head.*` keys, `train.eval_interval` (one evaluation, at the
end),
`schedule.epochs` (only with `--epochs`) and `--cfg-options`; torchvision's detectors come in
through `train(model=...)` (`tv_detectors.py`), so data loader, augmentation, optimizer, lr
schedule, AMP, batch, iterations and seed are the same for every entrant. Runs go seed by seed
(every entrant once, then the next seed), so that stopping early leaves comparable results and
load on the machine hits every entrant alike.

Each finished run appends a record to `<work-dir>/results.json` (entrant, seed, epochs, overrides,
budget, wall seconds, AP, AP50, AP75, APs, APm, APl); a rerun skips the (entrant, seed, epochs)
combinations recorded there, and refuses to run if a recorded run's resolved config differs from
the one it would get now (an edited config file, other --cfg-options). Several processes may
train disjoint parts of the grid (other --entrants or --seeds) into one work-dir at once, e.g. two
with OMP_NUM_THREADS=1 on a 2-core machine: records are appended under a file lock, and each
process skips runs another has recorded. A run the trainer stops as diverged
(train.max_bad_steps non-finite steps) is recorded as failed and shown as such; a run stopped by a
signal is not recorded and starts over on the next invocation. Each run's folder
`<work-dir>/<entrant>/seed<S>_ep<E>/` keeps `last.pth` (a wrapper state dict for fcos/retinanet,
not loadable by tools/eval.py), `train.log`, the metrics JSON and TensorBoard events; the other
checkpoints are deleted (one evaluation, so best.pth is last.pth). At the end (or with
`--report-only`) the tables are printed and written to `--results-md`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from common import machine, markdown_table
from tv_detectors import build_torchvision_detector

from gfldet.config import Config, ConfigError, config_to_dict, load_config
from gfldet.engine.checkpoint import load_checkpoint
from gfldet.engine.trainer import train

HERE = Path(__file__).resolve().parent
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COCO_KEYS = dict(zip(METRICS, ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m",
                               "bbox_mAP_l"), strict=True))
# DFL needs the distribution. The boxes start at the ATSS anchor (4 strides per side), as ATSS's
# own regression does: spelt out, although it is the default, because it decides 10 AP here.
DIRAC = ("model.head.box_repr=dirac", "model.loss.dfl_weight=0", "model.head.dirac_init_distance=4")
ZERO_INIT_DIRAC = ("model.head.box_repr=dirac", "model.loss.dfl_weight=0",
                   "model.head.dirac_init_distance=0")


@dataclass(frozen=True)
class Entrant:
    name: str
    what: str  # one line for the tables
    overrides: tuple[str, ...] = ()  # --cfg-options of this entrant, applied after the user's
    torchvision: str | None = None  # "fcos" / "retinanet": torchvision's detector, gfldet's trunk
    retinanet_anchors: str = "torchvision"  # see tv_detectors.build_torchvision_detector


ENTRANTS = {e.name: e for e in (
    Entrant("gfl", "GFL: QFL + distribution + DFL (the config as is)"),
    Entrant("focal_dirac", "focal loss + Dirac boxes (ATSS baseline, no centerness)",
            ("model.loss.cls_loss=focal", *DIRAC)),
    Entrant("qfl_dirac", "QFL + Dirac boxes", ("model.loss.cls_loss=qfl", *DIRAC)),
    # Diagnostics: the Dirac rows with boxes starting at zero size (torchvision FCOS's init, about
    # 40 % of the sides in the ReLU's dead zone) instead of at the ATSS anchor.
    Entrant("focal_dirac_zero_init", "focal_dirac with boxes starting at zero size",
            ("model.loss.cls_loss=focal", *ZERO_INIT_DIRAC)),
    Entrant("qfl_dirac_zero_init", "qfl_dirac with boxes starting at zero size",
            ("model.loss.cls_loss=qfl", *ZERO_INIT_DIRAC)),
    Entrant("focal_dfl", "focal loss + distribution + DFL",
            ("model.loss.cls_loss=focal", "model.head.box_repr=distribution")),
    Entrant("qfl_nodfl", "QFL + distribution without DFL",
            ("model.loss.cls_loss=qfl", "model.head.box_repr=distribution",
             "model.loss.dfl_weight=0")),
    # GFLv2: the gfl entrant plus the Distribution-Guided Quality Predictor (paper defaults).
    Entrant("gflv2", "GFLv2: gfl + DGQP (distribution-guided quality)", ("model.head.dgqp={}",)),
    Entrant("fcos", "torchvision FCOS on gfldet's backbone + FPN", torchvision="fcos"),
    Entrant("retinanet", "torchvision RetinaNet on gfldet's backbone + FPN",
            torchvision="retinanet"),
    # Diagnostic: RetinaNet with one square anchor of 4 strides per location instead of 9.
    Entrant("retinanet_one_anchor", "retinanet with 1 anchor per location (a square of 4 strides)",
            torchvision="retinanet", retinanet_anchors="one_square"),
)}
# GFL paper Table 3 (QFL, DFL) rows with the paper's COCO AP / AP50 / AP75 (R-50, 1x), then the
# extra distribution-without-DFL row, which Table 3 does not have.
ABLATION = (("focal_dirac", "", "", "39.2 / 57.4 / 42.2"),
            ("qfl_dirac", "✓", "", "39.9 / 58.5 / 43.0"),
            ("focal_dfl", "", "✓", "39.5 / 57.3 / 42.8"),
            ("gfl", "✓", "✓", "40.2 / 58.6 / 43.4"),
            ("qfl_nodfl", "✓", "no (distribution, DFL weight 0)", "–"))
VERSUS = (("gfl", "fcos"), ("gfl", "retinanet"))
GFLV2_VERSUS = (("gflv2", "gfl"),)
DIRAC_INIT = (("focal_dirac", "focal_dirac_zero_init"), ("qfl_dirac", "qfl_dirac_zero_init"))
ONE_ANCHOR_DIAGNOSTIC = (("retinanet_one_anchor", "retinanet"),)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synthetic_accuracy.yaml")
    parser.add_argument("--entrants", nargs="+", choices=list(ENTRANTS), default=list(ENTRANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="override schedule.epochs "
                        "(quick runs; recorded, and reported separately)")
    parser.add_argument("--work-dir", default="work_dirs/accuracy")
    parser.add_argument("--results-md", default=str(HERE / "RESULTS.md"),
                        help="where the report is written")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; report the recorded runs")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="passed to every run (before the entrant's own keys)")
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, entrant: Entrant, seed: int, epochs: int) -> Config:
    """The config of one run: the user's options, the entrant's keys, then the budget's."""
    budget = [f"schedule.epochs={epochs}", f"train.eval_interval={epochs}", f"train.seed={seed}"]
    return load_config(args.config, [*args.cfg_options, *entrant.overrides, *budget])


def config_digest(cfg: Config) -> str:
    """Identifies a run's resolved config, so that results of an edited config are never mixed."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


class Stopped(Exception):
    """A run was stopped by SIGTERM/SIGINT (the trainer wrote last.pth and returned)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def run_one(cfg: Config, entrant: Entrant, run_dir: Path) -> tuple[dict | None, float, str | None]:
    """Train and evaluate one run in `run_dir`; returns (metrics or None, wall seconds, failure).
    Raises `Stopped` when a signal stopped it."""
    if run_dir.exists():  # an unfinished attempt (finished ones are in results.json): start over
        shutil.rmtree(run_dir)
    model = None
    if entrant.torchvision is not None:
        # train() seeds exactly so before it builds a GFL model: same backbone + FPN init.
        torch.manual_seed(cfg.train.seed)
        model = build_torchvision_detector(entrant.torchvision, cfg.model, cfg.data,
                                           entrant.retinanet_anchors)
    tic = time.perf_counter()
    try:
        metrics, state = train(cfg, run_dir, model=model)
    except FloatingPointError as err:  # the trainer gave up after max_bad_steps non-finite steps
        return None, time.perf_counter() - tic, f"diverged: {err}"
    finally:
        logger = logging.getLogger("gfldet")
        for handler in list(logger.handlers):  # train.log of this run
            handler.close()
            logger.removeHandler(handler)
    wall = time.perf_counter() - tic
    if state.stopped_by is not None:
        raise Stopped(state.stopped_by)
    return metrics, wall, None


def make_record(args: argparse.Namespace, cfg: Config, entrant: Entrant, seed: int, run_dir: Path,
                metrics: dict | None, wall: float, failure: str | None) -> dict:
    last = run_dir / "last.pth"
    iterations = load_checkpoint(last)["iteration"] if last.is_file() else None
    return {
        "entrant": entrant.name,
        "seed": seed,
        "epochs": cfg.schedule.epochs,
        "status": "ok" if failure is None else "failed",
        "failure": failure,
        "metrics": {m: metrics[COCO_KEYS[m]] for m in METRICS} if metrics else None,
        "wall_seconds": round(wall, 1),
        "config": args.config,
        "cfg_options": list(args.cfg_options),
        "config_digest": config_digest(cfg),
        "entrant_overrides": list(entrant.overrides),
        "budget": {
            "iterations": iterations,
            "batch_size": cfg.data.batch_size,
            "train_short_side": list(cfg.data.train_short_side),
            "test_short_side": cfg.data.test_short_side,
            "max_size": cfg.data.max_size,
            "amp": cfg.train.amp,
        },
        "machine": machine(),
        "commit": git_commit(),  # the code that trained it
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": args.command,
        "run_dir": str(run_dir),
    }


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def save_results(records: list[dict], path: Path) -> None:
    """Atomically: a killed process leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)


def append_result(record: dict, path: Path) -> None:
    """Add `record` to the file under an exclusive lock, re-reading it first: processes training
    disjoint parts of the grid into one work-dir keep each other's records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        save_results([*load_results(path), record], path)


def prune_run_dir(run_dir: Path) -> None:
    """Keep last.pth only: the epoch checkpoints are intermediate, best.pth equals last.pth."""
    for path in [*run_dir.glob("epoch_*.pth"), run_dir / "best.pth"]:
        path.unlink(missing_ok=True)


def check_recorded(
    args: argparse.Namespace, records: Sequence[dict], epochs: int, results_path: Path
) -> None:
    """Every recorded run of this budget must have the config this invocation would give it, so
    that a report never mixes configs (e.g. a config file edited since, other --cfg-options)."""
    for r in records:
        if r["epochs"] == epochs and r["config_digest"] != config_digest(
                run_config(args, ENTRANTS[r["entrant"]], r["seed"], epochs)):
            raise ConfigError(
                f"{results_path} holds {r['entrant']} seed {r['seed']} trained with another "
                f"config ({r['config']} with --cfg-options {r['cfg_options']}, "
                "or the file was edited since); "
                "use another --work-dir"
            )


def run_all(args: argparse.Namespace, epochs: int) -> int:
    """Train the runs of (seeds x entrants) not yet in results.json; returns the exit status."""
    work_dir = Path(args.work_dir)
    results_path = work_dir / "results.json"
    records = load_results(results_path)
    check_recorded(args, records, epochs, results_path)  # before any training
    plan = [(seed, name) for seed in args.seeds for name in args.entrants]
    for i, (seed, name) in enumerate(plan, start=1):
        step = f"[{i}/{len(plan)}] {name} seed {seed}, {epochs} epoch{'s' * (epochs != 1)}"
        # Re-read: another process on this work-dir may have recorded it meanwhile.
        finished = {(r["entrant"], r["seed"]) for r in load_results(results_path)
                    if r["epochs"] == epochs}
        if (name, seed) in finished:
            print(f"{step}: recorded, skipped", flush=True)
            continue
        print(f"{step}: training", flush=True)
        entrant = ENTRANTS[name]
        cfg = run_config(args, entrant, seed, epochs)
        run_dir = work_dir / name / f"seed{seed}_ep{epochs}"
        try:
            metrics, wall, failure = run_one(cfg, entrant, run_dir)
        except Stopped as stop:
            print(f"{step}: {stop}; not recorded (a rerun starts it over)", file=sys.stderr)
            return 128 + stop.signum  # the shell's convention for "ended by signal N"
        append_result(make_record(args, cfg, entrant, seed, run_dir, metrics, wall, failure),
                      results_path)
        prune_run_dir(run_dir)
        result = f"AP {100 * metrics['bbox_mAP']:.1f}" if metrics else failure
        print(f"{step}: {result}, {wall / 60:.1f} min", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None below 2 values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def measured(value: float) -> bool:
    """False for pycocotools' -1 (no ground truth in that size range)."""
    return value >= 0 and not math.isnan(value)


def cell(values: Sequence[float | None], signed: bool = False) -> str:
    """Fractions as percent with 1 decimal, "mean ± sample std" ("mean" for one value);
    "n/a" when a value is None (not measured)."""
    if not values:
        return "–"
    if any(v is None for v in values):
        return "n/a"
    mean, std = mean_std([100 * v for v in values])
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text if std is None else f"{text} ± {std:.1f}"


def by_seed(records: Sequence[dict], name: str) -> dict[int, dict]:
    """The successful runs of an entrant, by seed."""
    return {r["seed"]: r["metrics"] for r in records
            if r["entrant"] == name and r["status"] == "ok"}


def runs_cell(records: Sequence[dict], name: str) -> str:
    ok = len(by_seed(records, name))
    failed = sum(r["entrant"] == name and r["status"] != "ok" for r in records)
    if ok == 0 and failed == 0:
        return "not run"
    return f"{ok}" + (f" (+{failed} failed)" if failed else "")


def metric_cells(records: Sequence[dict], name: str) -> list[str]:
    runs = list(by_seed(records, name).values())
    return [cell([m[k] if measured(m[k]) else None for m in runs]) for k in METRICS]


def entrant_table(records: Sequence[dict], names: Sequence[str]) -> str:
    rows = []
    for name in names:
        walls = [r["wall_seconds"] / 60 for r in records
                 if r["entrant"] == name and r["status"] == "ok"]
        wall = f"{statistics.fmean(walls):.1f}" if walls else "–"
        rows.append([f"`{name}`", ENTRANTS[name].what, runs_cell(records, name),
                     *metric_cells(records, name), wall])
    return markdown_table(["entrant", "what", "n", *METRICS, "min/run"], rows)


def versus_table(records: Sequence[dict], pairs: Sequence[tuple[str, str]]) -> str:
    """Differences paired by seed (same data order, augmentation and trunk initialisation)."""
    rows = []
    for a, b in pairs:
        runs_a, runs_b = by_seed(records, a), by_seed(records, b)
        seeds = sorted(set(runs_a) & set(runs_b))
        diffs = [
            cell([runs_a[s][k] - runs_b[s][k]
                  if measured(runs_a[s][k]) and measured(runs_b[s][k]) else None
                  for s in seeds], signed=True)
            for k in METRICS
        ]
        rows.append([f"`{a}` − `{b}`", str(len(seeds)) if seeds else "not run", *diffs])
    return markdown_table(["difference", "n (paired seeds)", *METRICS], rows)


def ablation_table(records: Sequence[dict]) -> str:
    rows = [[qfl, dfl, f"`{name}`", runs_cell(records, name), *metric_cells(records, name), paper]
            for name, qfl, dfl, paper in ABLATION]
    return markdown_table(["QFL", "DFL", "entrant", "n", *METRICS, "paper, COCO: AP / AP50 / AP75"],
                          rows)


def budget_lines(records: Sequence[dict], epochs: int) -> list[str]:
    budgets = {json.dumps(r["budget"], sort_keys=True) for r in records if r["status"] == "ok"}
    lines = []
    for text in sorted(budgets):
        b = json.loads(text)
        lo, hi = b["train_short_side"]
        train_side = f"{lo}" if lo == hi else f"{lo}-{hi}"
        lines.append(
            f"{epochs} epoch{'s' * (epochs != 1)} = {b['iterations']} iterations "
            f"× {b['batch_size']} images "
            f"({b['iterations'] * b['batch_size']:,} images); short side {train_side} px (train) / "
            f"{b['test_short_side']} px (val), long side ≤ {b['max_size']} px; AMP {b['amp']}"
        )
    return lines or [f"{epochs} epochs (iterations known once a run has finished)"]


def report(records: Sequence[dict], epochs: int, results_path: str, date: str | None = None,
           commit: str | None = None) -> str:
    """Markdown report of the runs of `epochs` epochs among `records`."""
    records = [r for r in records if r["epochs"] == epochs]
    date = date or datetime.now().strftime("%Y-%m-%d %H:%M")
    configs = sorted({f"`{r['config']}`" + (f" with `--cfg-options {' '.join(r['cfg_options'])}`"
                                             if r["cfg_options"] else "") for r in records})
    commands = sorted({f"`{r['command']}`" for r in records})
    machines = sorted({r["machine"] for r in records}) or [machine()]
    seeds = sorted({r["seed"] for r in records})
    runs_per_commit: dict[str, int] = {}
    for r in records:
        key = r.get("commit") or "not recorded"
        runs_per_commit[key] = runs_per_commit.get(key, 0) + 1
    lines = [
        "# Accuracy under one fixed budget",
        "",
        f"Written by `benchmarks/accuracy.py` on {date} from `{results_path}`; regenerate with "
        "`python benchmarks/accuracy.py --report-only` (same `--work-dir` and `--epochs`).",
        "",
        *([f"- Report written at commit: {commit}"] if commit else []),
        "- Runs trained at commit(s): "
        f"{'; '.join(f'{c} ({n} runs)' for c, n in runs_per_commit.items()) or 'none yet'}",
        f"- Command(s): {'; '.join(commands) or 'none yet'}",
        f"- Machine: {'; '.join(machines)}",
        f"- Config: {'; '.join(configs) or 'none yet'}",
        *(f"- Budget: {line}" for line in budget_lines(records, epochs)),
        f"- Seeds: {' '.join(map(str, seeds)) or 'none yet'}",
        "",
        "COCO box AP on the val split in percent: mean ± sample standard deviation over the seeds "
        "(n runs). \"not run\": no recorded run of this entrant with this budget; \"n/a\": no "
        "ground truth in that size range. min/run is wall time on a possibly shared machine, not a "
        "speed benchmark.",
        "",
        "## All entrants",
        "",
        entrant_table(records, list(ENTRANTS)),
        "",
        "## GFL against torchvision's detectors",
        "",
        "Per-seed differences (the same seed gives both the same data order, augmentation and "
        "backbone + FPN initialisation), mean ± sample standard deviation, in AP points.",
        "",
        versus_table(records, VERSUS),
        "",
        "## GFLv2 against GFLv1",
        "",
        "Per-seed differences, AP points. The GFLv2 paper reports +0.8 AP at R-50 1x on COCO "
        "(40.2 -> 41.0); PaddleDetection's reproduction +0.2.",
        "",
        versus_table(records, GFLV2_VERSUS),
        "",
        "## Ablation (GFL paper Table 3 layout)",
        "",
        "QFL: quality focal loss (else focal loss with binary targets); DFL: general distribution "
        "boxes trained with distribution focal loss (else Dirac boxes, 4 plain distances starting "
        "at the ATSS anchor). The baseline row is ATSS without its centerness branch; the paper's "
        "baseline has it (its ATSS without any quality branch, Table 1a: 38.0 AP).",
        "",
        ablation_table(records),
        "",
        "## Where the Dirac boxes start (diagnostic)",
        "",
        "The Dirac rows above start every box at its ATSS anchor (4 strides per side); the "
        "`_zero_init` runs start them at zero size, as torchvision's FCOS head does. Per-seed "
        "differences, AP points.",
        "",
        versus_table(records, DIRAC_INIT),
        "",
        "## RetinaNet's anchors (diagnostic)",
        "",
        "torchvision's RetinaNet labels each of its 9 anchors per location (sizes 4, 5 and 6.3 "
        "strides × aspect ratios 0.5, 1, 2) by IoU with the boxes: ≥ 0.5 positive, < 0.4 "
        "background, plus each box's best anchors. `retinanet_one_anchor` keeps only the square "
        "of 4 strides. Per-seed differences, AP points.",
        "",
        versus_table(records, ONE_ANCHOR_DIAGNOSTIC),
        "",
    ]
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=HERE, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/accuracy.py", *argv])
    status = 0
    try:
        epochs = args.epochs or load_config(args.config, args.cfg_options).schedule.epochs
        if not args.report_only:
            status = run_all(args, epochs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results_path = Path(args.work_dir) / "results.json"
    text = report(load_results(results_path), epochs, str(results_path), commit=git_commit())
    print(text)
    Path(args.results_md).write_text(text)
    print(f"written to {args.results_md}")
    return status


if __name__ == "__main__":
    sys.exit(main())
