"""The report's evaluation figures as PNG files (matplotlib, Agg backend: no display needed).

Shape legend: R recall thresholds (101), K classes, G / D boxes of one image. Boxes are COCO
`(x, y, w, h)` in original-image pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from gfldet.report.matching import ImageMatches  # noqa: E402


def save_figure(fig, path: Path, tight: bool = True) -> Path:
    """Write `fig` as PNG and free it. `tight=False` for a figure laid out already
    (`tight_layout`): trimming it would draw it once more, most of the cost of a figure."""
    fig.savefig(path, dpi=100, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return path


def pr_curves_figure(recall: np.ndarray, curves: dict[str, dict[float, np.ndarray]], path: Path,
                     columns: int = 4) -> Path:
    """One panel per entry of `curves` (name -> {IoU: precision [R]}), first the overall one.
    Precision -1 (pycocotools: no ground truth) is not drawn."""
    columns = min(columns, len(curves))
    rows = math.ceil(len(curves) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for ax, (name, by_iou) in zip(axes.flat, curves.items(), strict=False):
        for iou, precision in by_iou.items():
            valid = precision >= 0
            if valid.any():
                ax.plot(recall[valid], precision[valid], label=f"IoU {iou:.2f}")
        ax.set(title=name, xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower left")
        else:  # pycocotools gives such a class no curve and no AP
            ax.text(0.5, 0.5, "no ground truth\nin these images", ha="center", va="center")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, tight=False)


def size_figure(sizes: dict[str, dict[str, float | int]], path: Path) -> Path:
    """AP and AP50 per object size (name -> {"AP", "AP50", "boxes"}), with each size's
    ground-truth count under its bars."""
    x = np.arange(len(sizes))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for offset, key in ((-0.2, "AP"), (0.2, "AP50")):
        ax.bar(x + offset, np.nan_to_num([s[key] for s in sizes.values()]), 0.4, label=key)
    ax.set_xticks(x, [f"{name}\n{s['boxes']} boxes" for name, s in sizes.items()])
    ax.set(ylim=(0, 1), ylabel="AP")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def confusion_figure(counts: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """The [K + 1, K + 1] counts, coloured by share of their row, with the counts written in."""
    names = [*class_names, "background"]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="detected as", ylabel="ground truth")
    if len(names) <= 30:  # beyond that the numbers would not be legible
        for (r, c), n in np.ndenumerate(counts):
            if n:
                ax.text(c, r, str(n), ha="center", va="center", fontsize=8,
                        color="white" if shares[r, c] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    return save_figure(fig, path)


def tide_figure(delta_ap: dict[str, float], path: Path) -> Path:
    """Horizontal bars: the AP50 points gained by fixing each error type alone."""
    kinds = list(delta_ap)
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    ax.barh(kinds[::-1], [100 * delta_ap[k] for k in kinds[::-1]], color="tab:red")
    ax.set(xlabel="dAP50 (points) when fixed")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def draw_box(ax, box: Sequence[float], colour, style: str, text: str, above: bool) -> None:
    x, y, w, h = box
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linestyle=style,
                           linewidth=2))
    ax.text(x, y if above else y + h, text, fontsize=7, color="white",
            va="bottom" if above else "top",
            bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})


def image_figure(image: np.ndarray, m: ImageMatches, class_names: Sequence[str], title: str,
                 path: Path) -> Path:
    """An image with its ground truth (solid lines, name above; green found, orange missed) and
    the detections of `m` (dashed, name and score below; blue correct, red false positive)."""
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(min(8.0, w / 60 + 1), min(8.0, w / 60 + 1) * h / w))
    ax.imshow(image)
    for box, k, found in zip(m.gt_boxes, m.gt_labels, m.gt_matched, strict=True):
        draw_box(ax, box, "tab:green" if found else "tab:orange", "-", class_names[k], above=True)
    for box, k, score, j in zip(m.det_boxes, m.det_labels, m.det_scores, m.det_gt, strict=True):
        draw_box(ax, box, "tab:blue" if j >= 0 else "tab:red", "--",
                 f"{class_names[k]} {score:.2f}", above=False)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return save_figure(fig, path)
