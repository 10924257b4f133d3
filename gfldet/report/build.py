"""Write an evaluation report folder: `index.html` and the PNGs it shows, plus `report.json`.

Everything comes from one pycocotools `COCOeval` after `evaluate()` and `accumulate()`: the
numbers, the PR curves (its `eval['precision']`, shape [T, R, K, A, M]: IoU thresholds, 101
recall points, K classes, area ranges, max-detection settings), and its matches at IoU 0.5 for
the confusion matrix, the TIDE breakdown and the worst images.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gfldet.data.images import load_image_rgb
from gfldet.engine.coco_eval import STAT_NAMES, write_metrics_json
from gfldet.report import figures, html
from gfldet.report.curves import CurvesError, curves_figure, read_scalars
from gfldet.report.errors import ERROR_TYPES, confusion_matrix, tide_errors
from gfldet.report.matching import image_matches, iou_index
from gfldet.report.ranking import worst_images

log = logging.getLogger("gfldet")

SIZES = ("small", "medium", "large")
FIGURES = ("pr_curves.png", "sizes.png", "confusion.png", "tide.png", "curves.png")


class ReportDirError(FileExistsError):
    """The report folder holds files the report did not write (or is a file)."""


def check_report_dir(out_dir: Path) -> None:
    """Raise ReportDirError unless `out_dir` is new, empty, or an earlier report's folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportDirError(f"report folder {out_dir} is a file; give the report a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        index = out_dir / "index.html"
        head = index.read_text(encoding="utf-8", errors="replace")[:2000] if index.is_file() else ""
        if html.MARKER not in head:
            raise ReportDirError(f"report folder {out_dir} holds files the report did not write; "
                                 "give an empty or new folder")


def post_processing_settings(test) -> dict[str, float | int]:
    """The `model.test` settings (a `PostProcessSettings`) that produced the detections."""
    return {"score threshold": test.score_thr, "NMS IoU": test.nms_iou,
            "max detections per image": test.max_per_img,
            "top-k per level before NMS": test.nms_pre}


def curves_at(coco_eval, iou: float, area: str = "all") -> np.ndarray:
    """pycocotools' precision [R, K] at IoU `iou` for `area` and the last max-detection setting
    (-1 where a class has no ground truth)."""
    area_index = list(coco_eval.params.areaRngLbl).index(area)
    return np.asarray(coco_eval.eval["precision"])[iou_index(coco_eval, iou), :, :, area_index, -1]


def mean_valid(a: np.ndarray, axis=None) -> np.ndarray | float:
    """Mean over entries >= 0 (pycocotools marks "no ground truth" with -1); nan when none."""
    return np.ma.filled(np.ma.masked_less(a, 0).mean(axis=axis), np.nan)


def per_class_table(coco_eval, class_names: Sequence[str]) -> list[list[object]]:
    """Rows (class, AP, AP50, AP75, boxes) from the precision array: area all, max detections."""
    area_all = list(coco_eval.params.areaRngLbl).index("all")
    precision = np.asarray(coco_eval.eval["precision"])[:, :, :, area_all, -1]
    ap = mean_valid(precision.transpose(2, 0, 1).reshape(precision.shape[2], -1), axis=1)
    ap50 = mean_valid(curves_at(coco_eval, 0.5), axis=0)
    ap75 = mean_valid(curves_at(coco_eval, 0.75), axis=0)
    boxes = Counter(a["category_id"] for a in gt_annotations(coco_eval))
    return [[name, float(ap[k]), float(ap50[k]), float(ap75[k]), boxes[c]]
            for k, (name, c) in enumerate(zip(class_names, coco_eval.params.catIds, strict=True))]


def source_of_checkpoint(state: Mapping, checkpoint: str | Path) -> dict[str, object]:
    """What a report of `checkpoint` (its loaded `state`) describes: the path, the epochs it
    trained of its schedule's, the batch reached when it was saved mid-epoch, its iteration."""
    schedule = (state.get("config") or {}).get("schedule") or {}
    return {"checkpoint": str(checkpoint), "epoch": state.get("epoch"),
            "epochs": schedule.get("epochs"), "batch": state.get("batch") or None,
            "iteration": state.get("iteration")}


def describe_source(source: Mapping[str, object]) -> str:
    """The line under the report's title: checkpoint (after epoch N of M), config, val, date."""
    at = ""
    if source.get("epoch") is not None:
        at = f"after epoch {source['epoch']}" + (f" of {source['epochs']}"
                                                 if source.get("epochs") else "")
        at += f" + {source['batch']} batches" if source.get("batch") else ""
    parts = [f"{source['checkpoint']} ({at})" if at else source.get("checkpoint"),
             *(f"{name} {source[key]}" for key, name in (("config", "config"),
                                                       ("val_annotations", "val"))
               if source.get(key)), f"written {source['date']}"]
    return "; ".join(str(p) for p in parts if p)


def gt_annotations(coco_eval) -> list[dict]:
    """The non-crowd ground-truth annotations of the evaluated images and categories."""
    p, gt = coco_eval.params, coco_eval.cocoGt
    return [a for a in gt.loadAnns(gt.getAnnIds(imgIds=p.imgIds, catIds=p.catIds))
            if not a.get("iscrowd", 0)]


def overlap_note(anns: list[dict], ranges: Mapping[str, Sequence[float]]) -> str:
    """How many boxes the size counts hold twice (an area on a range's end), or ""."""
    ends = {ranges["small"][1], ranges["medium"][1]}
    twice = sum(a["area"] in ends for a in anns)
    return f" ({twice} box{'' if twice == 1 else 'es'} here)" if twice else ""


def without_ground_truth(rows: list[list[object]], dets: list[dict], cat_ids: Sequence[int],
                         score_thr: float) -> str:
    """A note naming the classes without ground truth here (rows of `per_class_table`), whose
    detections pycocotools leaves out of AP; "" when every class has some."""
    every = Counter(a["category_id"] for a in dets)
    high = Counter(a["category_id"] for a in dets if a["score"] >= score_thr)
    empty = [f"{row[0]} ({every[c]} detections, {high[c]} scoring at least {score_thr})"
             for row, c in zip(rows, cat_ids, strict=True) if row[4] == 0]
    return (f"<p>No ground truth in these images for {html.escape(', '.join(empty))}: "
            "pycocotools leaves such a class out of AP (\"-\" in the table), so its detections "
            "count in no AP; the confusion matrix shows them in its background row.</p>"
            if empty else "")


def write_report(out_dir: str | Path, coco_eval, class_names: Sequence[str],
                 image_dir: str | Path, *, thresholds: Mapping[str, float | int],
                 run_dir: str | Path | None = None, score_thr: float = 0.3, num_worst: int = 12,
                 title: str = "gfldet evaluation report",
                 source: Mapping[str, object] | None = None) -> Path:
    """Write the report of `coco_eval` (pycocotools, after evaluate/accumulate/summarize) into
    `out_dir` and return its `index.html`. `thresholds`: the post-processing that produced the
    detections (shown with the numbers). `score_thr`: detections drawn and counted in the
    confusion matrix and the worst-image score. `run_dir`: a training run folder whose
    `scalars.jsonl` gives the training curves. `source`: what was evaluated, shown under the
    title and kept in report.json (keys checkpoint, epoch, epochs, batch, iteration, config,
    val_annotations; `source_of_checkpoint` gives the first five); the date is added. Refuses
    (ReportDirError) a folder holding files it did not write."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_report_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = out_dir / "index.html"
    # First a placeholder page, so that a report that fails half-way can be written again.
    placeholder = [("Not finished", "<p>This report is being written.</p>")]
    index.write_text(html.page(title, placeholder), encoding="utf-8")
    # An earlier report's figures: this one may draw fewer.
    for old in [*out_dir.glob("worst_*.png"), *(out_dir / name for name in FIGURES)]:
        old.unlink(missing_ok=True)
    if len(class_names) != len(coco_eval.params.catIds):
        raise ValueError(f"{len(class_names)} class names for {len(coco_eval.params.catIds)} "
                         "categories")
    sections: list[tuple[str, str]] = []
    source = {**(source or {}), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    data: dict = {"source": source, "thresholds": dict(thresholds), "report_score_thr": score_thr}

    # The numbers.
    stats = dict(zip(STAT_NAMES, (float(s) for s in coco_eval.stats[: len(STAT_NAMES)]),
                     strict=True))
    rows = per_class_table(coco_eval, class_names)
    # A model that finds nothing (at the report's threshold) must say so, not draw empty charts.
    dt = coco_eval.cocoDt
    dets = dt.loadAnns(dt.getAnnIds(imgIds=coco_eval.params.imgIds))
    high = sum(a["score"] >= score_thr for a in dets)
    num_dets = {"all": len(dets), "at_least_report_score_thr": high}
    data |= {"stats": stats, "per_class": rows, "images": len(coco_eval.params.imgIds),
             "detections": num_dets}
    setting = ", ".join(f"{k} {v}" for k, v in thresholds.items())
    below = (f"No detection scores at least {score_thr} (the report's score threshold, "
             "--report-score-thr), so there is nothing to draw here.")
    sections.append(("Numbers", (
        f"<p>{len(coco_eval.params.imgIds)} images, {len(dets)} detections "
        f"({high} scoring at least {score_thr}, the threshold "
        "of the confusion matrix and the worst images), from post-processing with "
        f"{html.escape(setting)}. Published results are often measured with a lower score "
        "threshold (0.001) and more detections per image (300), which raises AP a little.</p>"
        + ("" if dets else "<p><b>The model made no detection</b> on these images, "
           "so every AP is 0: an untrained model's scores stay below the post-processing's "
           "score threshold.</p>")
        + without_ground_truth(rows, dets, coco_eval.params.catIds, score_thr)
        + html.table(["metric", "value"], [[k, v] for k, v in stats.items()])
        + html.table(["class", "AP", "AP50", "AP75", "boxes"], rows))))

    # Precision-recall curves, pycocotools' own arrays.
    recall = np.asarray(coco_eval.params.recThrs)
    at50, at75 = curves_at(coco_eval, 0.5), curves_at(coco_eval, 0.75)
    curves = {"all classes (mean)": {0.5: mean_valid(at50, axis=1), 0.75: mean_valid(at75, axis=1)}}
    curves |= {n: {0.5: at50[:, k], 0.75: at75[:, k]} for k, n in enumerate(class_names)}
    # With one class the mean is that class's curve: one panel.
    panels = dict(list(curves.items())[1:]) if len(class_names) == 1 else curves
    figures.pr_curves_figure(recall, panels, out_dir / "pr_curves.png")
    data["pr_curves"] = {"recall": recall.tolist(),
                         **{str(iou): {n: c[iou].tolist() for n, c in curves.items()}
                            for iou in (0.5, 0.75)}}
    sections.append(("Precision-recall curves", (
        "<p>From pycocotools' <code>eval['precision']</code> (area all, at most "
        f"{coco_eval.params.maxDets[-1]} detections per image), at IoU 0.5 and 0.75; the first "
        "panel is the mean over the classes that have ground truth. Precision is made "
        "non-increasing in recall, as COCO's AP reads it.</p>"
        + html.image("pr_curves.png", "precision-recall curves"))))

    # AP by object size.
    anns = gt_annotations(coco_eval)
    ranges = dict(zip(coco_eval.params.areaRngLbl, coco_eval.params.areaRng, strict=True))
    sizes = {s: {"AP": stats[f"bbox_mAP_{s[0]}"],
                 "AP50": float(mean_valid(curves_at(coco_eval, 0.5, s))),
                 # by the annotation's `area` field, as COCOeval
                 "boxes": sum(ranges[s][0] <= a["area"] <= ranges[s][1] for a in anns)}
             for s in SIZES}
    figures.size_figure(sizes, out_dir / "sizes.png")
    data["sizes"] = sizes
    sections.append(("AP by object size", (
        "<p>The size is the object's area: the annotations' <code>area</code>, which "
        "pycocotools reads (in COCO the mask's area, smaller than the box's; w &times; h where "
        "a file leaves it out), in original-image pixels. COCO's ranges as pycocotools applies "
        "them, both ends included: small 0-32&sup2;, medium 32&sup2;-96&sup2;, large 96&sup2; "
        "and more, so an area of exactly 32&sup2; or 96&sup2; counts in two sizes"
        f"{overlap_note(anns, ranges)}.</p>"
        + html.table(["size", "AP", "AP50", "boxes"],
                     [[s, *row.values()] for s, row in sizes.items()])
        + html.image("sizes.png", "AP by object size"))))

    # Confusion matrix and TIDE, from the matches at IoU 0.5.
    matches = image_matches(coco_eval, 0.5)
    confusion = confusion_matrix(matches, len(class_names), score_thr)
    data["confusion_matrix"] = confusion.tolist()
    sections.append(("Confusion matrix (IoU 0.5)", f"<p>{below}</p>" if not high else (
        f"<p>Detections scoring at least {score_thr}. Rows: the ground truth's class; columns: "
        "the class detected. A detection matched to a box of its class counts on the diagonal; "
        "one that is not takes the box of another class it overlaps most (IoU &ge; 0.5) that no "
        "detection took; else it is in the <b>background row</b> (false positives, duplicates "
        "included). The <b>background column</b> counts the boxes nothing found. Colours: share "
        "of the row.</p>"
        + html.image(figures.confusion_figure(confusion, class_names,
                                              out_dir / "confusion.png").name,
                     "confusion matrix"))))

    tide = tide_errors(matches)
    data["tide"] = {"ap50": tide.ap, "delta_ap": tide.delta_ap, "counts": tide.counts}
    sections.append(("Errors (TIDE)", (
        f"<p>No detections: all {len(anns)} boxes are missed, and there is no false positive "
        "to break down.</p>") if not dets else (
        "<p>As in Bolya et al., <i>TIDE: A General Toolbox for Identifying Object Detection "
        f"Errors</i> (ECCV 2020): the AP50 ({100 * tide.ap:.1f} here) gained by fixing each error "
        "type alone, all detections counted (no score threshold). Each false positive gets one "
        "type, from its highest IoU with the ground truth:</p>" + html.definitions(ERROR_TYPES)
        + html.table(["error", "dAP50 (points)", "count"],
                     [[k, 100 * tide.delta_ap[k], tide.counts[k]] for k in tide.delta_ap])
        + "<p>The counts equal those of tidecv (the paper's code) and hotcoco; dAP50 equals "
        "hotcoco's (Cls within 0.01 point) and can be about 0.1 point above tidecv's, which "
        "interpolates AP slightly differently from COCO (measured on the demo's val set).</p>"
        + html.image(figures.tide_figure(tide.delta_ap, out_dir / "tide.png").name,
                     "TIDE error breakdown"))))

    # The worst images.
    worst = worst_images(matches, score_thr, num_worst)
    data["worst_images"] = [vars(s) for s in worst]
    by_id = {m.image_id: m for m in matches}
    gallery = []
    for rank, s in enumerate(worst if high else [], start=1):
        info = coco_eval.cocoGt.imgs[s.image_id]
        try:
            pixels = load_image_rgb(Path(image_dir) / info["file_name"])
        except Exception as err:  # PIL raises many types for a bad file; the report goes on
            log.warning("report: cannot draw image %s: %s", info["file_name"], err)
            continue
        caption = (f"#{rank} {info['file_name']} (id {s.image_id}): F1 {s.f1:.2f}, "
                   f"{s.true_positives} found, {s.false_positives} false positive, "
                   f"{s.missed} missed")
        name = f"worst_{rank:02d}.png"
        figures.image_figure(pixels, by_id[s.image_id].scoring_at_least(score_thr), class_names,
                             caption, out_dir / name)
        gallery.append(f"<figure>{html.image(name, caption)}"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    sections.append((f"Worst images ({len(gallery)})", (
        f"<p>Ranked by the F1 of the detections scoring at least {score_thr} (matched as COCO "
        "matches them, IoU 0.5); ties go to more errors. Ground truth: solid lines, name above "
        "(green found, orange missed). Detections: dashed, name and score below (blue correct, "
        "red false positive).</p>"
        f'<div class="gallery">{"".join(gallery)}</div>') if high else f"<p>{below}</p>"))

    # Training curves.
    if run_dir is not None:
        try:
            curves_figure({Path(run_dir).name: read_scalars(run_dir)}, out_dir / "curves.png",
                          mark=source.get("iteration"))
            sections.append(("Training curves", (
                f"<p>From {html.escape(str(Path(run_dir) / 'scalars.jsonl'))}: every logged loss "
                "term, the learning rate, and AP / AP50 / AP75 at each evaluation"
                + (", with a dotted line at the checkpoint this report describes"
                   if source.get("iteration") is not None else "") + ".</p>"
                + html.image("curves.png", "training curves"))))
        except CurvesError as err:
            log.warning("report: no training curves: %s", err)

    write_metrics_json(data, out_dir / "report.json")  # strict JSON: nan -> null
    index.write_text(html.page(title, sections, describe_source(source)), encoding="utf-8")
    log.log(logging.INFO if high else logging.WARNING,
            "report written to %s in %.1f s: %d detections, %d of them scoring at least %s",
            index, time.perf_counter() - start, len(dets), high, score_thr)
    return index
