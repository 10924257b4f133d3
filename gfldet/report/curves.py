"""Training curves from runs' `scalars.jsonl`: each loss term, the lr, AP per evaluation."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from gfldet.report.figures import plt, save_figure

SCALARS = "scalars.jsonl"


class CurvesError(ValueError):
    """A run folder without readable scalars (the message says which and what to do)."""


def read_scalars(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Tag -> (steps, values) of `run_dir/scalars.jsonl`, in the order written. A line that is
    not JSON (a run killed mid-write) is skipped; no file or no scalars raise CurvesError."""
    path = Path(run_dir) / SCALARS
    if not Path(run_dir).is_dir():
        raise CurvesError(f"{run_dir} is not a folder; give a training run folder (it holds "
                          f"{SCALARS})")
    if not path.is_file():
        raise CurvesError(f"{path} does not exist; is {run_dir} a gfldet run folder "
                          "(tools/train.py writes it)?")
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for tag, value in record.items():
            if tag not in ("step", "epoch") and isinstance(value, int | float):
                series[tag][0].append(record["step"])
                series[tag][1].append(float(value))
    if not series:
        raise CurvesError(f"{path} holds no scalars yet")
    return dict(series)


def curves_figure(runs: dict[str, dict[str, tuple[list[int], list[float]]]], path: Path,
                  mark: int | None = None) -> Path:
    """Panels: one per loss term, the learning rate, and AP / AP50 / AP75 per evaluation; each
    run (name -> scalars) in its own colour, so that several runs overlay. `mark`: the
    iteration of the checkpoint a report describes, a dotted line on the AP panel."""
    tags: list[str] = []  # the loss terms of every run, each run's total after its terms
    for series in runs.values():
        losses = sorted((t for t in series if t.startswith("train/loss")),
                        key=lambda t: (t == "train/loss", t))
        tags += [t for t in losses if t not in tags]
    panels = [*tags, "train/lr", "AP"]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels, strict=False):
        for (name, series), colour in zip(runs.items(), colours * len(runs), strict=False):
            if panel == "AP":
                for key, style in (("val/bbox_mAP", "-o"), ("val/bbox_mAP_50", "--s"),
                                   ("val/bbox_mAP_75", ":^")):
                    if key in series:
                        ax.plot(*series[key], style, color=colour, markersize=4,
                                label=f"{name} {key.removeprefix('val/bbox_m')}")
            elif panel in series:  # a marker, or a run of one logged step shows nothing
                ax.plot(*series[panel], color=colour, linewidth=1, label=name,
                        marker="o" if len(series[panel][0]) == 1 else None)
        if panel == "AP" and mark is not None:
            ax.axvline(mark, color="grey", linestyle=":", label="this report's checkpoint")
        ax.set(title="AP per evaluation" if panel == "AP" else panel, xlabel="iteration")
        ax.grid(alpha=0.3)
        if ax.has_data() and panel == "AP":  # below the panel: AP rises to the upper right
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        elif ax.has_data():  # "best" searches the data: slow on long runs
            ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, tight=False)
