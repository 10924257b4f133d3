"""gfldet at COCO train2017's scale, with no download: memory of the training index, loader
workers' unique memory, time to the first iteration (first start and --resume), loader
throughput at 800x1333 and evaluation time. Prints one markdown table; it measures whatever
`gfldet` is importable (run it again after changing the data code).

    python benchmarks/coco_scale.py [--images 118287] [--out DIR]
        [--parts memory workers start throughput eval]

The generated set (kept in --out and reused when its parameters match; default: a temporary
folder, deleted afterwards):
  - DIR/annotations/instances_train.json with train2017's counts: `--images` images, 1 % of them
    without annotations, 7.3 boxes per annotated image (about 860k at full size), 80 categories
    with COCO's non-contiguous ids 1..90 and a skewed frequency (a third are "person"), 1 % crowd,
    a polygon of 8-24 points per box and the image fields train2017 has (coco_url, flickr_url,
    ...), since today's index keeps them all.
  - Image shapes as in COCO (640x480, 480x640, 640x427, ...) and box sizes drawn in those
    frames with COCO's spread (41 % small < 32², 34 % medium, 25 % large). The files on disk
    are those images at 1/8 scale (45-80 px; the JSON records the files' sizes and boxes scaled
    with them): hard links to 300 distinct JPEGs, so counting and memory are train2017's while
    decoding costs little.
  - What decoding real 640x480 JPEGs would add is extrapolated from `--sample` 640x480 images
    (gfldet's synthetic generator; drawn shapes, which decode somewhat faster than photos): the
    per-image decode time difference x images / cores, added to the measured start times.

Parts (`--parts`, or `--skip`):
  memory      RSS and USS (unique set size, /proc/PID/smaps_rollup) of a fresh process before and
              after building the training dataset as the trainer does (build_dataset: the check
              decodes every file).
  workers     in that same process, the USS of each of `--workers` loader workers (the recipe's
              800x1333 transform) after the loader delivered `--worker-samples` samples in all,
              and again after a gc.collect() in each worker (a full collection writes to every
              tracked object, which un-shares the pages it touches).
  start       seconds from launching tools/train.py (the 1x recipe with a tiny model:
              ResNet-18, small FPN/head, 128 px images, no validation) to its first iteration's
              log line, for a first start and for --resume of the last.pth that SIGTERM made
              the first run write after its first iteration.
  throughput  benchmarks/dataloader.py's measurement (decode + train transform at 800x1333 + flip
              + collate, batch 2) on the 640x480 sample with 0, 1, 2 workers.
  eval        one evaluate_coco (pycocotools) of benchmarks/coco_eval.py's synthetic 5,000
              images x 100 detections.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import machine, markdown_table
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("memory", "workers", "start", "throughput", "eval")
GENERATOR_VERSION = 3  # bump when the generated set changes, so that --out folders are rebuilt

# COCO's 80 category ids: 1..90 without the ten ids the 2014 paper listed but never annotated.
COCO_CAT_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
# (width, height) of the original images and their share, roughly train2017's most common shapes.
SHAPES = [((640, 480), 0.50), ((480, 640), 0.20), ((640, 427), 0.15), ((427, 640), 0.05),
          ((640, 360), 0.05), ((500, 375), 0.05)]
SCALE = 8  # files on disk are the original shapes / SCALE
DISTINCT_FILES = 300
EMPTY_FRACTION = 0.01  # train2017: 1,021 of 118,287 images have no annotation
BOXES_PER_ANNOTATED_IMAGE = 7.3  # 860,001 boxes / 117,266 annotated images
CROWD_FRACTION = 0.01
# COCO's areas: small < 32², medium < 96², large; shares of train2017's boxes.
AREA_CLASSES = [((4.0, 32.0), 0.41), ((32.0, 96.0), 0.34), ((96.0, 640.0), 0.25)]


def uss_mib(pid: int | str = "self") -> float:
    """Unique set size: pages no other process maps (Private_Clean + Private_Dirty)."""
    total_kib = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def rss_mib_of(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# ---------------------------------------------------------------------------------------- data


def write_image_files(image_dir: Path, base_dir: Path, shape_of: np.ndarray,
                      rng: np.random.Generator) -> None:
    """DISTINCT_FILES small JPEGs (noise, so each decodes like a photo of its size), then one hard
    link per image id to a file of its shape."""
    base_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    per_shape = DISTINCT_FILES // len(SHAPES)
    for s, ((w, h), _) in enumerate(SHAPES):
        for v in range(per_shape):
            pixels = rng.integers(0, 256, size=(h // SCALE, w // SCALE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base_dir / f"{s}_{v}.jpg", quality=90)
    variants = rng.integers(0, per_shape, size=len(shape_of))
    for index, (s, v) in enumerate(zip(shape_of.tolist(), variants.tolist(), strict=True)):
        link = image_dir / f"{index + 1:012d}.jpg"
        if not link.exists():
            os.link(base_dir / f"{s}_{v}.jpg", link)


def sample_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """[n, 4] xywh in the original frame with COCO's small/medium/large shares."""
    which = rng.choice(len(AREA_CLASSES), size=n, p=[p for _, p in AREA_CLASSES])
    lo = np.array([AREA_CLASSES[k][0][0] for k in which])
    hi = np.array([AREA_CLASSES[k][0][1] for k in which])
    side = np.exp(rng.uniform(np.log(lo), np.log(hi)))  # sqrt(area)
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=n))
    wh = np.stack([side * np.sqrt(aspect), side / np.sqrt(aspect)], axis=1)
    # Every side > SCALE: at 1/SCALE on disk it is still >= 1 px, the trainer's minimum
    # (MIN_BOX_SIDE), so that no box is dropped that train2017 would keep.
    wh = np.clip(wh, SCALE + 1, [width, height])
    xy = rng.uniform(0, 1, size=(n, 2)) * ([width, height] - wh)
    return np.concatenate([xy, wh], axis=1)


def polygon(rng: np.random.Generator, box: np.ndarray) -> list[float]:
    """A polygon of 8-24 points inside `box` (xywh): COCO keeps one per object."""
    k = int(rng.integers(8, 25))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
    cx, cy, rx, ry = box[0] + box[2] / 2, box[1] + box[3] / 2, box[2] / 2, box[3] / 2
    pts = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)
    return pts.round(2).ravel().tolist()


def write_annotations(path: Path, num_images: int, shape_of: np.ndarray,
                      rng: np.random.Generator) -> int:
    """Stream the COCO JSON (the whole dict would hold GBs here); returns the number of boxes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cat_p = 1.0 / np.arange(1, len(COCO_CAT_IDS) + 1) ** 0.9
    cat_p[0] = cat_p[1:].sum() / 2  # "person": a third of all boxes, as in COCO
    cat_p /= cat_p.sum()
    counts = np.minimum(1 + rng.negative_binomial(1.5, 1.5 / (1.5 + BOXES_PER_ANNOTATED_IMAGE - 1),
                                                  size=num_images), 92)
    counts[rng.random(num_images) < EMPTY_FRACTION] = 0
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with open(path, "w") as f:
        f.write('{"info":{"description":"gfldet coco_scale benchmark (synthetic)","year":2017},'
                '"licenses":[{"id":1,"name":"synthetic","url":""}],"images":[')
        for i in range(num_images):
            (w, h), _ = SHAPES[shape_of[i]]
            name = f"{i + 1:012d}.jpg"
            f.write(("," if i else "") + dumps({
                "license": 1, "file_name": name,
                "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                "height": h // SCALE, "width": w // SCALE, "date_captured": "2013-11-14 11:18:45",
                "flickr_url": f"http://farm{i % 9 + 1}.staticflickr.com/{i % 9000}/"
                              f"{i}_{i * 7919 % 10**10:010d}_z.jpg",
                "id": i + 1}))
        f.write('],"annotations":[')
        ann_id = 0
        for i in range(num_images):
            (w, h), _ = SHAPES[shape_of[i]]
            # The file's own scale per axis (500x375 -> 62x46), so that boxes stay inside it.
            to_file = np.array([w // SCALE / w, h // SCALE / h] * 2)
            boxes = sample_boxes(rng, int(counts[i]), w, h)
            cats = rng.choice(COCO_CAT_IDS, size=len(boxes), p=cat_p)
            crowd = rng.random(len(boxes)) < CROWD_FRACTION
            for box, cat, is_crowd in zip(boxes, cats.tolist(), crowd.tolist(), strict=True):
                points = np.asarray(polygon(rng, box)).reshape(-1, 2) * to_file[:2]
                seg = [points.round(2).ravel().tolist()]
                small = box * to_file
                f.write(("," if ann_id else "") + dumps({
                    "segmentation": seg, "area": round(float(small[2] * small[3]), 4),
                    "iscrowd": int(is_crowd), "image_id": i + 1, "bbox": small.round(2).tolist(),
                    "category_id": cat, "id": ann_id + 1}))
                ann_id += 1
        cats_json = [{"supercategory": "thing", "id": c, "name": f"class{c}"} for c in COCO_CAT_IDS]
        f.write('],"categories":' + dumps(cats_json) + "}")
    return ann_id


def ensure_dataset(out: Path, num_images: int, seed: int = 0) -> dict[str, Any]:
    """The benchmark set in `out` (reused when it was made with the same parameters)."""
    meta_path = out / "meta.json"
    wanted = {"version": GENERATOR_VERSION, "images": num_images, "seed": seed}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            return meta
    for sub in ("train", "base", "annotations"):
        shutil.rmtree(out / sub, ignore_errors=True)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    shape_of = rng.choice(len(SHAPES), size=num_images, p=[p for _, p in SHAPES])
    write_image_files(out / "train", out / "base", shape_of, rng)
    boxes = write_annotations(out / "annotations" / "instances_train.json", num_images, shape_of,
                              rng)
    meta = {**wanted, "boxes": boxes, "seconds": round(time.perf_counter() - start, 1)}
    meta_path.write_text(json.dumps(meta))
    return meta


def split_options(out: Path) -> list[str]:
    return [f"data.train.images={out / 'train'}",
            f"data.train.annotations={out / 'annotations' / 'instances_train.json'}"]


RECIPE = ROOT / "configs" / "gfl_r50_fpn_1x_coco.yaml"
# The recipe, with a model and images small enough that the first iteration costs well under a
# second on a CPU: start time is then the data path's.
TINY_MODEL = ["model.backbone.depth=18", "model.backbone.weights=null", "model.fpn.out_channels=32",
              "model.head.feat_channels=64", "model.head.stacked_convs=1",
              "data.train_short_side=[128,128]", "data.test_short_side=128", "data.max_size=192",
              "train.eval_interval=0", "train.device=cpu", "train.amp=none", "train.log_interval=1"]


# ------------------------------------------------------------------------------ memory, workers


class WorkerGc:
    """SIGUSR1 makes a forked loader worker run gc.collect() and then touch DIR/<pid> (the
    handler is installed before the workers fork, so they inherit it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        gc.collect()
        (self.folder / str(os.getpid())).touch()

    def collect(self, pids: list[int], timeout: float = 120.0) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not all((self.folder / str(p)).exists() for p in pids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {pids} did not answer SIGUSR1")
            time.sleep(0.05)


def child_memory(out: Path, workers: int, samples: int) -> dict[str, Any]:
    """Runs in a fresh interpreter: the dataset built as the trainer builds it, then the loader."""
    import gfldet.data.loader as loader_mod
    from gfldet.config import load_config
    from gfldet.data import build_dataloader
    from gfldet.engine.build import build_dataset

    cfg = load_config(RECIPE, split_options(out))
    gc.collect()
    result: dict[str, Any] = {"rss_before": rss_mib_of(), "uss_before": uss_mib()}
    start = time.perf_counter()
    dataset = build_dataset(cfg, "train")  # the recipe's 800x1333 train transform
    result["build_s"] = time.perf_counter() - start
    gc.collect()
    result.update(rss_after=rss_mib_of(), uss_after=uss_mib(), images=len(dataset))
    if workers <= 0:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        worker_gc = WorkerGc(Path(tmp))
        loader = build_dataloader(dataset, batch_size=cfg.data.batch_size, num_workers=workers,
                                  train=True, seed=0, distributed=False,
                                  size_divisor=cfg.data.size_divisor)
        epoch = 0
        loader.batch_sampler.set_epoch(epoch)
        if hasattr(loader_mod, "freeze_heap_for_workers"):  # as the trainer does, where it exists
            loader_mod.freeze_heap_for_workers()
        iterator = iter(loader)
        seen, start = 0, time.perf_counter()
        while seen < samples:
            try:
                _, targets = next(iterator)
            except StopIteration:  # a small set: the next epoch, on the same (persistent) workers
                epoch += 1
                loader.batch_sampler.set_epoch(epoch)
                iterator = iter(loader)
                continue
            seen += len(targets)
        result["worker_s"] = time.perf_counter() - start
        pids = [w.pid for w in iterator._workers]  # torch's worker processes (no public accessor)
        result["worker_uss"] = [uss_mib(p) for p in pids]
        result["worker_rss"] = [rss_mib_of(p) for p in pids]
        worker_gc.collect(pids)
        result["worker_uss_gc"] = [uss_mib(p) for p in pids]
        result["worker_samples"] = seen
        result["main_uss_loader"] = uss_mib()
        del iterator, loader
    return result


def measure_memory(out: Path, workers: int, samples: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child-memory", "--out", str(out), "--workers", str(workers),
           "--worker-samples", str(samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


# ----------------------------------------------------------------------------------- start time

FIRST_ITER = re.compile(r"epoch \[\d+/\d+\]\[\d+/\d+\]")
DATASETS_BUILT = re.compile(r"\d+ training images, \d+ iterations per epoch")


def time_to_first_iteration(cmd: list[str], timeout: float) -> dict[str, float]:
    """Launch `cmd` (tools/train.py), time its log lines, SIGTERM it after the first iteration
    (it then writes last.pth and exits 143) and wait for it."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    times: dict[str, float] = {}
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        now = time.perf_counter() - start
        if "built" not in times and DATASETS_BUILT.search(line):
            times["built"] = now
        if FIRST_ITER.search(line):
            times["first_iter"] = now
            proc.send_signal(signal.SIGTERM)
            break
        if now > timeout:
            proc.kill()
            break
    rest, _ = proc.communicate(timeout=timeout)
    lines.append(rest or "")
    if "first_iter" not in times or proc.returncode != 128 + signal.SIGTERM:
        raise RuntimeError(f"train.py gave no first iteration / did not stop cleanly "
                           f"(exit {proc.returncode}):\n{''.join(lines)[-3000:]}")
    return times


def measure_start(out: Path, timeout: float) -> dict[str, dict[str, float]]:
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), str(RECIPE), "--work-dir",
           str(run_dir), "--cfg-options", *split_options(out), *TINY_MODEL]
    first = time_to_first_iteration(cmd, timeout)
    if not (run_dir / "last.pth").exists():
        raise RuntimeError(f"SIGTERM after the first iteration left no {run_dir / 'last.pth'}")
    resumed = time_to_first_iteration(cmd[:3] + ["--resume"] + cmd[3:], timeout)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"first": first, "resume": resumed}


# ------------------------------------------------------------------------- decode, throughput


def median_decode_s(paths: list[Path]) -> float:
    from gfldet.data.images import load_image_rgb

    times = []
    for path in paths:
        start = time.perf_counter()
        load_image_rgb(path)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_throughput(sample_dir: Path, num_sample: int, workers: list[int],
                       passes: int) -> dict[str, Any]:
    from dataloader import pass_seconds

    from gfldet.data import CocoDetection, build_transforms, generate_synthetic_coco

    paths = generate_synthetic_coco(sample_dir, num_train=num_sample, num_val=0,
                                    image_size=(480, 640))
    dataset = CocoDetection(paths["train_images"], paths["train_ann"],
                            transform=build_transforms(True, 800, 1333), filter_empty=True)
    rates = {w: len(dataset) / statistics.median(pass_seconds(dataset, w, 2, passes))
             for w in workers}
    files = sorted(Path(paths["train_images"]).glob("*.jpg"))
    return {"rates": rates, "images": len(dataset), "decode_s": median_decode_s(files)}


def measure_eval(images: int, dets: int) -> float:
    from coco_eval import make_data

    from gfldet.engine.coco_eval import evaluate_coco

    coco, detections = make_data(images, dets)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate_coco(coco, detections, backend="pycocotools")
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------- main


def table(args: argparse.Namespace, meta: dict[str, Any], res: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    n = meta["images"]
    tiny_decode = res.get("tiny_decode_s")
    real_decode = res.get("throughput", {}).get("decode_s")
    cores = os.cpu_count() or 1
    # Seconds that decoding n real 640x480 files would add to the check, on every core.
    extra = n * (real_decode - tiny_decode) / cores if tiny_decode and real_decode else None
    if "memory" in res:
        m = res["memory"]
        rows.append(["training dataset in the main process: RSS before / after build",
                     f"{m['rss_before']:.0f} / {m['rss_after']:.0f} MB",
                     f"+{m['rss_after'] - m['rss_before']:.0f} MB; {m['images']:,} images kept; "
                     f"build + check {m['build_s']:.0f} s"])
        rows.append(["same, USS (unique)", f"{m['uss_before']:.0f} / {m['uss_after']:.0f} MB",
                     f"+{m['uss_after'] - m['uss_before']:.0f} MB"])
        if "worker_uss" in m:
            u, g = m["worker_uss"], m["worker_uss_gc"]
            rows.append([f"USS of each of {len(u)} loader workers after "
                         f"{m['worker_samples']:,} samples in all",
                         f"{min(u):.0f}-{max(u):.0f} MB",
                         f"800x1333 transform, batch 2; {m['worker_s']:.0f} s"])
            rows.append(["same, after gc.collect() in each worker", f"{min(g):.0f}-{max(g):.0f} MB",
                         f"RSS {min(m['worker_rss']):.0f}-{max(m['worker_rss']):.0f} MB before "
                         "the collection"])
    if "start" in res:
        for key, label in (("first", "first start"), ("resume", "--resume")):
            t = res["start"][key]
            est = ""
            if extra:
                est = (f"; with real 640x480 files ≈ {t['first_iter'] + extra:.0f} s "
                       "(extrapolated)")
            rows.append([f"launch to first iteration, {label}", f"{t['first_iter']:.1f} s",
                         f"datasets built at {t.get('built', float('nan')):.1f} s{est}"])
    if "throughput" in res:
        tp = res["throughput"]
        for w, rate in tp["rates"].items():
            rows.append([f"loader throughput, {w} workers", f"{rate:.1f} img/s",
                         f"{tp['images']} 640x480 JPEGs, 800x1333 + flip + collate, batch 2"])
        if tiny_decode:
            rows.append(["decode one file: 640x480 sample / on-disk set",
                         f"{real_decode * 1e3:.2f} / {tiny_decode * 1e3:.2f} ms",
                         f"extrapolated: real files add ≈ {extra:.0f} s to every full check of "
                         f"{n:,} images on {cores} cores"])
    if "eval" in res:
        rows.append([f"evaluate_coco, {args.eval_images:,} images x {args.eval_dets} detections",
                     f"{res['eval']:.1f} s", "pycocotools"])
    return markdown_table(["measurement", "value", "notes"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=118287, help="images in the generated set")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the generated set (kept, reused)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[])
    parser.add_argument("--workers", type=int, default=4, help="loader workers of the workers part")
    parser.add_argument("--worker-samples", type=int, default=2000,
                        help="samples the workers deliver in all")
    parser.add_argument("--sample", type=int, default=50,
                        help="640x480 JPEGs for decode and throughput")
    parser.add_argument("--throughput-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--eval-dets", type=int, default=100)
    parser.add_argument("--start-timeout", type=float, default=1800.0)
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(json.dumps(child_memory(args.out, args.workers, args.worker_samples)))
        return
    parts = [p for p in args.parts if p not in args.skip]

    with contextlib.ExitStack() as stack:
        out = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        meta = ensure_dataset(out, args.images)
        tiny_files = sorted((out / "base").glob("*.jpg"))
        res: dict[str, Any] = {"tiny_decode_s": median_decode_s(tiny_files)}
        if "memory" in parts or "workers" in parts:
            workers = args.workers if "workers" in parts else 0
            res["memory"] = measure_memory(out, workers, args.worker_samples)
        if "start" in parts:
            res["start"] = measure_start(out, args.start_timeout)
        if "throughput" in parts:
            sample_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            res["throughput"] = measure_throughput(sample_dir, args.sample,
                                                   args.throughput_workers, args.passes)
        if "eval" in parts:
            res["eval"] = measure_eval(args.eval_images, args.eval_dets)

    import gfldet

    print(f"machine: {machine()}; gfldet from {Path(gfldet.__file__).parent}")
    print(f"set: {meta['images']:,} images, {meta['boxes']:,} boxes, 80 categories (ids 1-90), "
          f"files {DISTINCT_FILES} distinct JPEGs of 45-80 px hard-linked; generated in "
          f"{meta['seconds']} s")
    print(table(args, meta, res))


if __name__ == "__main__":
    main()
