"""The evaluation report (gfldet.report) and the tools around it: tools/eval.py --report, the
report written by training, tools/browse_dataset.py and tools/plot_curves.py."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_in_process, tiny_overrides
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gfldet.report import ReportDirError, write_report
from gfldet.report.errors import confusion_matrix, tide_errors
from gfldet.report.matching import image_matches
from gfldet.report.ranking import worst_images

CONFIG = ROOT / "configs" / "demo_synthetic_cpu.yaml"

# One 200x200 image, classes A (1), B (2), C (3); boxes (x, y, w, h). One detection of each TIDE
# error type and one missed box (g5), besides five true positives.
HAND_GT = [  # (id, category, box)
    (1, 1, [10, 10, 40, 40]), (2, 2, [100, 10, 40, 40]), (3, 3, [10, 100, 40, 40]),
    (4, 1, [100, 100, 40, 40]), (5, 2, [150, 150, 40, 40]), (6, 2, [60, 150, 30, 30]),
    (7, 1, [60, 60, 30, 30]), (8, 3, [10, 160, 30, 30])]
HAND_DT = [  # (category, score, box)
    (1, 0.90, [10, 10, 40, 40]),    # TP of g1
    (1, 0.80, [12, 10, 40, 40]),    # Dupe: IoU 1520/1680 = 0.90 with g1, already matched
    (3, 0.70, [100, 10, 40, 40]),   # Cls: IoU 1 with g2 (B)
    (1, 0.60, [125, 100, 40, 40]),  # Loc: IoU 600/2600 = 0.23 with g4 (A)
    (2, 0.88, [25, 100, 40, 40]),   # Both: IoU 1000/2200 = 0.45 with g3 (C), no B box near
    (3, 0.40, [160, 50, 20, 20]),   # Bkg: overlaps nothing
    (3, 0.95, [10, 100, 40, 40]),   # TP of g3
    (2, 0.85, [60, 150, 30, 30]),   # TP of g6
    (1, 0.30, [60, 60, 30, 30]),    # TP of g7
    (3, 0.35, [10, 160, 30, 30])]   # TP of g8


def coco_files(folder: Path, gt: list, dt: list,
               images: dict[int, tuple[int, int]]) -> tuple[Path, Path]:
    """A COCO annotation file, a result file and the images (flat grey PNGs) in `folder`.
    gt: (annotation id, image id, category, box); dt: (image id, category, score, box)."""
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, (w, h) in images.items():
        Image.new("RGB", (w, h), (128, 128, 128)).save(folder / f"{image_id}.png")
    gt_file, dt_file = folder / "gt.json", folder / "dt.json"
    gt_file.write_text(json.dumps({
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.png"}
                   for i, (w, h) in images.items()],
        "categories": [{"id": c, "name": n} for c, n in ((1, "A"), (2, "B"), (3, "C"))],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                         "iscrowd": 0, "segmentation": [corners(b)]} for a, i, c, b in gt]}))
    dt_file.write_text(json.dumps([{"image_id": i, "category_id": c, "score": s, "bbox": b}
                                   for i, c, s, b in dt]))
    return gt_file, dt_file


def corners(b: list) -> list:
    """The polygon of an xywh box."""
    x, y, w, h = b
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def run_cocoeval(gt_file: Path, dt_file: Path) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(dt_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture
def hand_case(tmp_path) -> tuple[Path, Path]:
    return coco_files(tmp_path / "hand", [(a, 1, c, b) for a, c, b in HAND_GT],
                      [(1, c, s, b) for c, s, b in HAND_DT], {1: (200, 200)})


def random_case(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """8 images, 3 classes, boxes of all sizes; detections jittered, some of the wrong class, some
    random, scores rounded to 2 digits so that ties occur."""
    rng = np.random.default_rng(seed)
    gt, dt, images = [], [], {}
    for i in range(1, 9):
        images[i] = (320, 240)
        for _ in range(rng.integers(1, 7)):
            w, h = rng.uniform(8, 150, 2).round(1)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            c = int(rng.integers(1, 4))
            gt.append((len(gt) + 1, i, c, [x, y, w, h]))
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
                dt.append((i, c if rng.random() < 0.8 else int(rng.integers(1, 4)),
                           round(float(rng.random()), 2),
                           [x + jitter[0], y + jitter[1], max(w + jitter[2], 2),
                            max(h + jitter[3], 2)]))
        for _ in range(rng.integers(0, 3)):
            dt.append((i, int(rng.integers(1, 4)), round(float(rng.random()), 2),
                       [*rng.uniform(0, 200, 2), 30, 30]))
    return coco_files(tmp_path / "random", gt, dt, images)


def test_the_reports_pr_curves_are_pycocotools_arrays(tmp_path: Path) -> None:
    gt_file, dt_file = random_case(tmp_path)
    write_report(tmp_path / "report", run_cocoeval(gt_file, dt_file), ["A", "B", "C"],
                 gt_file.parent, thresholds={"score threshold": 0.05})
    written = json.loads((tmp_path / "report" / "report.json").read_text())["pr_curves"]
    ev = run_cocoeval(gt_file, dt_file)  # a fresh evaluation, not the report's object
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    assert written["recall"] == ev.params.recThrs.tolist()
    for iou, t in (("0.5", 0), ("0.75", 5)):
        for k, name in enumerate("ABC"):
            assert written[iou][name] == precision[t, :, k, 0, -1].tolist()
        per_class = precision[t, :, :, 0, -1]
        assert (per_class >= 0).all()  # every class has ground truth here: the mean is a plain one
        np.testing.assert_allclose(written[iou]["all classes (mean)"], per_class.mean(axis=1),
                                   rtol=0, atol=1e-15)


def test_the_breakdowns_base_ap_is_pycocotools_ap50(tmp_path: Path) -> None:
    ev = run_cocoeval(*random_case(tmp_path, seed=1))
    assert tide_errors(image_matches(ev, 0.5)).ap == pytest.approx(ev.stats[1], abs=1e-12)


def test_confusion_matrix_of_the_hand_built_case(hand_case) -> None:
    counts = confusion_matrix(image_matches(run_cocoeval(*hand_case), 0.5), 3, score_thr=0.0)
    # Rows: true A, B, C, background; columns: detected A, B, C, background (missed).
    # A: g1 and g7 found, g4 missed (the Loc detection is too far off). B: g6 found, g2 detected
    # as C (the Cls detection), g5 missed. C: g3 and g8 found. Background: the Dupe and the Loc
    # detection (A), the Both detection (B, 0.45 < 0.5 with g3) and the Bkg detection (C).
    assert counts.tolist() == [[2, 0, 0, 1],
                               [0, 1, 1, 1],
                               [0, 0, 2, 0],
                               [2, 1, 1, 0]]
    # From score 0.5 on, the Bkg detection and the TPs of g7 and g8 drop out: g7 and g8 are missed.
    counts = confusion_matrix(image_matches(run_cocoeval(*hand_case), 0.5), 3, score_thr=0.5)
    assert counts.tolist() == [[1, 0, 0, 2], [0, 1, 1, 1], [0, 0, 1, 1], [2, 1, 0, 0]]


# The hand-built case worked out (COCO's AP: precision made non-increasing, read at the 101
# recall points 0, 0.01, ..., 1; a class's AP = sum of those / 101; mAP over A, B, C = sum / 303):
#   A (3 boxes): .90 TP, .80 FP, .60 FP, .30 TP -> recall 1/3 at precision 1 (34 points), 2/3
#     at 2/4 (33 points): 34 + 16.5 = 50.5
#   B (3 boxes): .88 FP, .85 TP -> 34 points at 1/2: 17
#   C (2 boxes): .95 TP, .70 FP, .40 FP, .35 TP -> 51 points at 1, 50 at 2/4: 76
#   base = (50.5 + 17 + 76) / 303 = 143.5 / 303
# Cls: the C detection on g2 becomes a B TP at .70: B 67 points at 2/3 = 44.667, C loses an FP
#   (51 + 50 * 2/3 = 84.333): +(27.667 + 8.333) = 36 / 303
# Loc: the .60 A detection becomes a TP: A 34 at 1 + 67 at 3/4 = 84.25: +33.75 / 303
# Both: the .88 B detection goes: B 34 at 1: +17 / 303
# Dupe: the .80 A detection goes: A 34 at 1 + 33 at 2/3 = 56: +5.5 / 303
# Bkg: the .40 C detection goes: C 51 + 50 * 2/3 = 84.333: +8.333 / 303
# Miss: g5 leaves B's ground truth: B 2 boxes, 51 points at 1/2 = 25.5: +8.5 / 303
HAND_DELTA_AP = {"Cls": 36 / 303, "Loc": 33.75 / 303, "Both": 17 / 303, "Dupe": 5.5 / 303,
                 "Bkg": 25 / 3 / 303,
                 "Miss": 8.5 / 303}


def test_tide_errors_of_the_hand_built_case(hand_case) -> None:
    result = tide_errors(image_matches(run_cocoeval(*hand_case), 0.5))
    assert result.ap == pytest.approx(143.5 / 303, abs=1e-12)
    assert result.counts == dict.fromkeys(("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"), 1)
    assert result.delta_ap == pytest.approx(HAND_DELTA_AP, abs=1e-12)


@pytest.mark.parametrize("reference", ["hotcoco", "tidecv"])
def test_tide_errors_agree_with_the_reference_implementations(hand_case, tmp_path,
                                                              reference) -> None:
    """Optional: hotcoco (maintained, Rust) and tidecv (the paper's code) are not dependencies."""
    gt_file, dt_file = hand_case
    mine = tide_errors(image_matches(run_cocoeval(gt_file, dt_file), 0.5))
    pytest.importorskip(reference)
    if reference == "hotcoco":
        import hotcoco

        gt = hotcoco.COCO(str(gt_file))
        ev = hotcoco.COCOeval(gt, gt.load_res(str(dt_file)), "bbox")
        ev.evaluate()
        theirs = ev.tide_errors(pos_thr=0.5, bg_thr=0.1)
        delta, counts = theirs["delta_ap"], theirs["counts"]
    else:
        from tidecv import TIDE, datasets

        tide = TIDE()
        with contextlib.redirect_stdout(io.StringIO()):
            run = tide.evaluate(datasets.COCO(str(gt_file)), datasets.COCOResult(str(dt_file)),
                                mode=TIDE.BOX)
        delta = {k: v / 100 for k, v in tide.get_main_errors()[run.preds.name].items()}
        counts = {e.short_name: n for e, n in run.count_errors().items()}
    for kind in mine.delta_ap:
        assert mine.delta_ap[kind] == pytest.approx(delta[kind], abs=1e-9), kind
        assert mine.counts[kind] == counts[kind], kind


def test_worst_images_rank_a_case_with_a_known_answer(tmp_path: Path) -> None:
    box = [10, 10, 40, 40]
    far = [100, 100, 40, 40]
    gt = [(1, 1, 1, box), (2, 2, 1, box), (3, 2, 2, far), (4, 3, 1, box), (5, 5, 1, box),
          (6, 5, 1, far)]
    dt = [(1, 1, 0.9, box),  # image 1: all found: F1 1
          (2, 1, 0.9, box),  # image 2: 1 of 2 found: F1 2/3
          (3, 2, 0.9, box),  # image 3: wrong class, box missed: F1 0
          (4, 1, 0.2, box),  # image 4: no ground truth, a detection under 0.3: F1 1
          (5, 1, 0.9, box), (5, 1, 0.8, [12, 10, 40, 40])]  # image 5: 1 found, 1 dupe, 1 missed
    ev = run_cocoeval(*coco_files(tmp_path, gt, dt, {i: (200, 200) for i in range(1, 6)}))
    ranked = worst_images(image_matches(ev, 0.5), score_thr=0.3, n=5)
    assert [s.image_id for s in ranked] == [3, 5, 2, 1, 4]
    assert [s.f1 for s in ranked] == pytest.approx([0, 0.5, 2 / 3, 1, 1])
    assert (ranked[1].true_positives, ranked[1].false_positives, ranked[1].missed) == (1, 1, 1)


def test_report_page_shows_every_part_and_keeps_a_users_folder(hand_case, tmp_path: Path) -> None:
    gt_file, dt_file = hand_case
    out = tmp_path / "report"
    thresholds = {"score threshold": 0.05, "NMS IoU": 0.6, "max detections per image": 100}
    index = write_report(out, run_cocoeval(gt_file, dt_file), ["A", "B", "C"], gt_file.parent,
                         thresholds=thresholds, num_worst=1, score_thr=0.0)
    page = index.read_text()
    for text in ("score threshold 0.05", "NMS IoU 0.6", "max detections per image 100",
                 "Precision-recall", "AP by object size", "Confusion matrix", "background row",
                 "TIDE", "localisation error", "duplicate", "missed box", "Worst images (1)"):
        assert text in page, text
    sources = [s.split('"')[0] for s in page.split('<img src="')[1:]]
    assert sources == ["pr_curves.png", "sizes.png", "confusion.png", "tide.png", "worst_01.png"]
    assert all((out / s).is_file() for s in sources)
    data = json.loads((out / "report.json").read_text())
    # 30x30 = 900 px² is small (< 32²), 40x40 medium
    assert [data["sizes"][s]["boxes"] for s in ("small", "medium", "large")] == [3, 5, 0]
    write_report(out, run_cocoeval(gt_file, dt_file), ["A", "B", "C"], gt_file.parent,
                 thresholds={})  # its own folder: rewritten
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(ReportDirError, match="did not write"):
        write_report(user, run_cocoeval(gt_file, dt_file), ["A", "B", "C"], gt_file.parent,
                     thresholds={})
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_sizes_are_the_annotations_area_with_both_ends_included(tmp_path: Path) -> None:
    # g1: a 40x40 box whose object covers exactly 32² = 1024 px: small and medium, as pycocotools
    # counts it. g2: a 100x100 box (large by w x h) whose object covers 5000 px: medium.
    gt_file, dt_file = coco_files(tmp_path, [(1, 1, 1, [10, 10, 40, 40]),
                                             (2, 1, 2, [60, 60, 100, 100])],
                                  [(1, 1, 0.9, [10, 10, 40, 40])], {1: (200, 200)})
    anns = json.loads(gt_file.read_text())
    for a, area in zip(anns["annotations"], (1024, 5000), strict=True):
        a["area"] = area
    gt_file.write_text(json.dumps(anns))
    index = write_report(tmp_path / "r", run_cocoeval(gt_file, dt_file), ["A", "B", "C"],
                         tmp_path, thresholds={})
    sizes = json.loads((tmp_path / "r" / "report.json").read_text())["sizes"]
    assert [sizes[s]["boxes"] for s in ("small", "medium", "large")] == [1, 2, 0]
    page = index.read_text()
    assert "box area" not in page
    for text in ("the annotations' <code>area</code>", "w &times; h where a file leaves it out",
                 "both ends included", "exactly 32&sup2; or 96&sup2; counts in two sizes",
                 "(1 box here)"):
        assert text in page, text


def test_the_report_names_what_it_describes(hand_case, tmp_path: Path) -> None:
    from gfldet.report import source_of_checkpoint

    gt_file, dt_file = hand_case
    state = {"epoch": 1, "batch": 0, "config": {"schedule": {"epochs": 3}}}
    source = source_of_checkpoint(state, "run/epoch_1.pth") | {
        "config": "c.yaml", "val_annotations": "val.json"}
    index = write_report(tmp_path / "r", run_cocoeval(gt_file, dt_file), ["A", "B", "C"],
                         gt_file.parent, thresholds={}, source=source)
    line = index.read_text().split("</h1>")[1].split("<ul>")[0]
    assert "run/epoch_1.pth (after epoch 1 of 3); config c.yaml; val val.json; written 20" in line
    written = json.loads((tmp_path / "r" / "report.json").read_text())["source"]
    assert written.pop("date").endswith("UTC")
    assert written == {"checkpoint": "run/epoch_1.pth", "epoch": 1, "epochs": 3, "batch": None,
                       "iteration": None, "config": "c.yaml", "val_annotations": "val.json"}


def no_detections_eval(gt_file: Path):
    """gfldet's COCOeval of no detections at all (pycocotools' loadRes cannot take [])."""
    from gfldet.engine.coco_eval import evaluate_coco

    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate_coco(COCO(str(gt_file)), [], keep_eval=True)["coco_eval"]


@pytest.mark.parametrize("case", ["no detections", "none above the threshold"])
def test_a_report_without_detections_says_so(case, hand_case, tmp_path: Path, caplog) -> None:
    gt_file, dt_file = hand_case
    ev, thr = ((no_detections_eval(gt_file), 0.3) if case == "no detections"
               else (run_cocoeval(gt_file, dt_file), 0.99))
    with caplog.at_level("INFO", logger="gfldet"):
        index = write_report(tmp_path / "r", ev, ["A", "B", "C"], gt_file.parent,
                             thresholds={}, score_thr=thr)
    page = index.read_text()
    count = 0 if case == "no detections" else len(HAND_DT)
    assert f"1 images, {count} detections (0 scoring at least {thr}" in page
    assert f"{count} detections, 0 of them scoring at least {thr}" in caplog.text
    assert page.count(f"No detection scores at least {thr}") == 2  # confusion, worst images
    assert "Worst images (0)" in page
    pngs = {p.name for p in (tmp_path / "r").glob("*.png")}
    if case == "no detections":
        assert "The model made no detection" in page and "all 8 boxes are missed" in page
        assert pngs == {"pr_curves.png", "sizes.png"}
    else:
        assert pngs == {"pr_curves.png", "sizes.png", "tide.png"}


def test_a_class_without_ground_truth_is_said_to_be_out_of_ap(tmp_path: Path) -> None:
    # Class C has detections but no box; one class-C detection scores >= 0.3.
    gt_file, dt_file = coco_files(tmp_path, [(1, 1, 1, [10, 10, 40, 40]),
                                             (2, 1, 2, [100, 100, 40, 40])],
                                  [(1, 1, 0.9, [10, 10, 40, 40]), (1, 3, 0.5, [60, 60, 30, 30]),
                                   (1, 3, 0.1, [150, 10, 30, 30])], {1: (200, 200)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "No artists with labels"
        index = write_report(tmp_path / "r", run_cocoeval(gt_file, dt_file), ["A", "B", "C"],
                             tmp_path, thresholds={})
    assert ("No ground truth in these images for C (2 detections, 1 scoring at least 0.3): "
            "pycocotools leaves such a class out of AP") in index.read_text()


def test_a_one_class_report_draws_one_pr_panel(tmp_path: Path) -> None:
    gt_file, dt_file = coco_files(tmp_path, [(1, 1, 1, [10, 10, 40, 40])],
                                  [(1, 1, 0.9, [10, 10, 40, 40])], {1: (200, 200)})
    ev = run_cocoeval(gt_file, dt_file)
    ev.params.catIds = [1]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    write_report(tmp_path / "r", ev, ["A"], tmp_path, thresholds={})
    assert Image.open(tmp_path / "r" / "pr_curves.png").size[0] < 400  # one 3.2-inch panel


def test_curves_show_one_point_runs_and_the_last_ap(tmp_path: Path, monkeypatch) -> None:
    from gfldet.report import curves

    figures = []
    monkeypatch.setattr(curves, "save_figure", lambda fig, path, tight=True: figures.append(fig))
    ap = ([100, 200, 300], [0.1, 0.2, 0.3])  # rising: the last points are in the upper right
    curves.curves_figure({"one step": {"train/loss": ([1], [2.0]), "train/lr": ([1], [0.01])},
                          "run": {"val/bbox_mAP": ap, "val/bbox_mAP_50": ap,
                                  "val/bbox_mAP_75": ap}}, tmp_path / "c.png", mark=200)
    fig = figures[0]
    fig.canvas.draw()
    loss, lr, ap_axis = fig.axes[:3]
    assert [line.get_marker() for line in loss.lines + lr.lines] == ["o", "o"]
    assert list(ap_axis.lines[-1].get_xdata()) == [200, 200]  # the report's checkpoint
    legend = ap_axis.get_legend().get_window_extent()
    for line in ap_axis.lines[:-1]:
        for x, y in ap_axis.transData.transform(line.get_xydata()):
            assert not legend.contains(x, y), (line.get_label(), x, y)


@pytest.fixture(scope="module")
def tiny_run(tiny_coco, tmp_path_factory) -> Path:
    """A 1-epoch tiny run with the report on (the suite's other runs turn it off)."""
    work = tmp_path_factory.mktemp("report_run") / "run"
    run_in_process(ROOT / "tools" / "train.py", str(CONFIG), "--work-dir", str(work),
                   "--cfg-options", *tiny_overrides(tiny_coco, epochs=1), "train.report=true")
    return work


def test_training_and_eval_write_the_report(tiny_run: Path, tiny_coco, tmp_path: Path) -> None:
    page = (tiny_run / "report" / "index.html").read_text()
    assert "Training curves" in page and (tiny_run / "report" / "curves.png").is_file()
    # The 1-epoch tiny model detects nothing: the page says so instead of drawing its 4 val
    # images with nothing found (the hand-built cases draw worst images).
    assert "4 images, 0 detections (0 scoring at least 0.3" in page
    assert "The model made no detection" in page and "worst_01.png" not in page
    assert (f"training run {tiny_run} (after epoch 1 of 1); config "
            f"{tiny_run / 'config.yaml'}; val {tiny_coco['val_ann']}; written 20") in page
    source = json.loads((tiny_run / "report" / "report.json").read_text())["source"]
    assert (source["epoch"], source["epochs"]) == (1, 1) and source["iteration"] > 0
    out = tmp_path / "eval_report"
    proc = run_in_process(ROOT / "tools" / "eval.py", str(tiny_run / "last.pth"), "--report",
                          str(out), "--metrics", str(tmp_path / "m.json"))
    assert f"report: {out / 'index.html'}" in proc.stdout
    page = (out / "index.html").read_text()
    assert "Training curves" in page  # the checkpoint's run folder
    assert "dotted line at the checkpoint this report describes" in page
    assert (f"{tiny_run / 'last.pth'} (after epoch 1 of 1); config stored in the checkpoint; "
            f"val {tiny_coco['val_ann']}; written 20") in page


def test_report_off_writes_none(tiny_coco, tmp_path: Path) -> None:
    work = tmp_path / "run"
    run_in_process(ROOT / "tools" / "train.py", str(CONFIG), "--work-dir", str(work),
                   "--cfg-options", *tiny_overrides(tiny_coco, epochs=1), "train.report=false")
    assert (work / "last.pth").is_file() and not (work / "report").exists()


def test_browse_dataset_draws_the_targets_the_trainer_trains_on(tiny_coco, tmp_path: Path,
                                                                monkeypatch) -> None:
    from gfldet.config import load_config
    from gfldet.engine import trainer

    overrides = tiny_overrides(tiny_coco, epochs=1)
    run_in_process(ROOT / "tools" / "browse_dataset.py", str(CONFIG), "--out",
                   str(tmp_path / "browse"), "--images", "1", "--batches", "2", "--cfg-options",
                   *overrides)
    manifest = json.loads((tmp_path / "browse" / "browse.json").read_text())
    drawn = manifest["batches"]
    first = drawn[0]["images"][0]  # the title says w x h, image_size is [h, w]
    assert manifest["image_size"] == "[height, width]"
    assert (f"{first['image_size'][1]}x{first['image_size'][0]} (w x h) in "
            in drawn[0]["titles"][0])
    assert {p.name for p in (tmp_path / "browse").iterdir()} == {
        "annotated_00.png", "batch_00.png", "batch_01.png", "browse.json"}

    received = []

    class Enough(Exception):
        pass

    def record_step(self, images, targets, it):  # what the model would receive at iteration `it`
        received.append([{"image_id": t["image_id"], "image_size": list(t["image_size"]),
                          "boxes": t["boxes"].tolist(), "labels": t["labels"].tolist()}
                         for t in targets])
        if len(received) == 2:
            raise Enough

    monkeypatch.setattr(trainer.TrainLoop, "step", record_step)
    with pytest.raises(Enough):
        trainer.train(load_config(CONFIG, overrides), tmp_path / "run")
    assert [b["images"] for b in drawn] == received
    assert sum(len(i["boxes"]) for b in drawn for i in b["images"]) > 0


def test_plot_curves_overlays_runs(tiny_run: Path, tmp_path: Path) -> None:
    from gfldet.report.curves import read_scalars

    other = tmp_path / "other"
    other.mkdir()
    lines = (tiny_run / "scalars.jsonl").read_text().splitlines()
    torn = '\n{"step": 9, "train/lo'  # a torn last line
    (other / "scalars.jsonl").write_text("\n".join(lines) + torn)
    assert read_scalars(other) == read_scalars(tiny_run)
    tags = read_scalars(tiny_run).keys()
    assert {"train/loss", "train/loss_cls", "train/lr", "val/bbox_mAP"} <= tags
    out = tmp_path / "curves.png"
    proc = run_in_process(ROOT / "tools" / "plot_curves.py", str(tiny_run), str(other), "--out",
                          str(out))
    assert "2 run(s)" in proc.stdout and Image.open(out).size[0] > 400


@pytest.mark.parametrize("case", ["eval_missing_checkpoint", "eval_report_into_users_folder",
                                  "eval_report_is_file", "curves_missing_run", "curves_out_exists",
                                  "browse_missing_config", "browse_users_folder"])
def test_bad_input_exits_2_with_a_message(case: str, tiny_run: Path, tmp_path: Path) -> None:
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    afile = tmp_path / "file.png"
    afile.write_text("keep")
    tools = ROOT / "tools"
    last = str(tiny_run / "last.pth")
    args, message = {
        "eval_missing_checkpoint": (
            (tools / "eval.py", str(tmp_path / "nope.pth"), "--report", str(tmp_path / "r")),
            "nope.pth"),
        "eval_report_into_users_folder": (
            (tools / "eval.py", last, "--report", str(user)), "did not write"),
        "eval_report_is_file": ((tools / "eval.py", last, "--report", str(afile)), "is a file"),
        "curves_missing_run": (
            (tools / "plot_curves.py", str(tmp_path / "nope"), "--out", str(tmp_path / "c.png")),
            "not a folder"),
        "curves_out_exists": (
            (tools / "plot_curves.py", str(tiny_run), "--out", str(afile)), "--overwrite"),
        "browse_missing_config": (
            (tools / "browse_dataset.py", str(tmp_path / "nope.yaml")), "nope.yaml"),
        "browse_users_folder": (
            (tools / "browse_dataset.py", str(CONFIG), "--out", str(user)), "did not write"),
    }[case]
    proc = run_in_process(*args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert (user / "notes.txt").read_text() == "keep" and afile.read_text() == "keep"
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("options", "named", "not_named"), [
    (["--report-images", "3"], "--report-images sets up the report", "--run-dir"),
    (["--report-score-thr", "0.5"], "--report-score-thr sets up the report", "--report-images"),
    (["--run-dir", "x"], "--run-dir sets up the report", "--report-images"),
    (["--report", "r", "--report-images", "-1"], "--report-images must be >= 0, got -1",
     "--report-score-thr"),
    (["--report", "r", "--report-score-thr", "30"], "--report-score-thr must be in [0, 1]",
     "--report-images")])
def test_eval_refuses_report_options_it_would_ignore(options, named, not_named,
                                                     tmp_path: Path) -> None:
    proc = run_in_process(ROOT / "tools" / "eval.py", str(tmp_path / "any.pth"), *options,
                          check=False)
    assert proc.returncode == 2 and named in proc.stderr and not_named not in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("report_screenshot",
                                                  ROOT / "benchmarks" / "report_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_renders_in_headless_chromium(hand_case, tmp_path: Path) -> None:
    shot = _screenshot_module()
    chromium = shot.find_chromium()
    if chromium is None:
        pytest.skip("no Chromium binary on PATH (Debian: apt-get install chromium); the page is "
                    "not rendered")
    gt_file, dt_file = hand_case
    out = tmp_path / "report"
    write_report(out, run_cocoeval(gt_file, dt_file), ["A", "B", "C"], gt_file.parent,
                 thresholds={}, num_worst=1)
    states = shot.image_load_states(out, chromium)
    assert len(states) == 5 and all(width > 0 for _, width in states), states
    png = shot.screenshot(out, tmp_path / "shot.png", chromium, 900, 1200)
    assert Image.open(png).size == (900, 1200)
    assert shot.blank_share(png) < 0.95  # text, tables and figures, not one colour
    # The check sees a broken image: one PNG gone, its naturalWidth is 0.
    (out / "tide.png").unlink()
    assert dict(shot.image_load_states(out, chromium))["tide.png"] == 0
    pages = sorted(p.name for p in out.iterdir() if p.suffix == ".html")
    assert pages == ["index.html"]  # the probe page removed
    shutil.rmtree(out)


def test_report_cost_benchmark_prints_its_table(tiny_run: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report_cost.py"),
                           str(tiny_run / "last.pth"), "--repeats", "1", "--warmup", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 3 and table[2].startswith("| 4 |"), proc.stdout  # the 4 val images
