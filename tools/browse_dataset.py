"""Look at a config's training data: the ground truth as annotated, and the training batches after
augmentation exactly as the model receives them, boxes drawn.

    python tools/browse_dataset.py CONFIG [--out DIR] [--images 8] [--batches 4] [--epoch 0]
                                   [--cfg-options KEY=VALUE ...]

Writes into DIR (default outputs/browse_dataset):
  annotated_NN.png  a training image as decoded, with its annotated boxes and class names, and
                    its crowd boxes (iscrowd: 1, which training ignores) dashed in grey;
  batch_NN.png      one training batch of epoch --epoch: the padded uint8 images the loader yields
                    (before normalisation) with each image's target boxes and class names;
  browse.json       what was drawn: per annotated image, its title, boxes and crowd boxes
                    (x1, y1, x2, y2 in its pixels); per batch, its panels' titles and per image
                    image_id, image_size ([height, width], the trainer's order) and the boxes
                    (x1, y1, x2, y2 in the batch's pixels) and labels. Titles give sizes as
                    width x height, as image viewers do, and say so.
The batches come from the trainer's own code (`build_dataset`, `build_dataloader`, the sampler's
`set_epoch`), so they are the ones a run of this config trains on, on one process.

DIR must be new, empty or a folder this tool wrote (it holds browse.json); anything else is
refused before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gfldet.config import ConfigError, load_config
from gfldet.data.images import DatasetError, load_image_rgb
from gfldet.report.figures import draw_box, plt, save_figure

MANIFEST = "browse.json"


def check_out_dir(out: Path) -> None:
    """FileExistsError unless `out` is new, empty or an earlier output of this tool."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise FileExistsError(f"--out {out} holds files browse_dataset did not write; "
                              "choose another --out folder")


def draw_panel(ax, image: np.ndarray, boxes_xyxy: np.ndarray, names: list[str], title: str,
               crowd: Sequence[tuple[list[float], str]] = ()) -> None:
    """`image` (uint8 [H, W, 3]) with boxes (x1, y1, x2, y2) and names on a matplotlib axis, and
    the `crowd` boxes ((x1, y1, x2, y2), name) dashed in grey."""
    ax.imshow(image)
    for (x1, y1, x2, y2), name in zip(boxes_xyxy.tolist(), names, strict=True):
        draw_box(ax, (x1, y1, x2 - x1, y2 - y1), "tab:green", "-", name, above=True)
    for (x1, y1, x2, y2), name in crowd:
        draw_box(ax, (x1, y1, x2 - x1, y2 - y1), "tab:gray", "--", f"{name} (crowd)", above=False)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def crowd_boxes(dataset, image_ids: set[int]) -> dict[int, list[tuple[list[float], str]]]:
    """The crowd boxes (iscrowd: 1) of `image_ids` as ((x1, y1, x2, y2), class name), read from
    the annotation file: the dataset's index holds only the boxes training uses."""
    coco = json.loads(Path(dataset.ann_file).read_bytes())
    out: dict[int, list[tuple[list[float], str]]] = defaultdict(list)
    for a in coco["annotations"]:
        label = dataset.cat_id_to_label.get(a["category_id"])
        if a.get("iscrowd", 0) == 1 and a["image_id"] in image_ids and label is not None:
            x, y, w, h = (float(v) for v in a["bbox"])
            out[a["image_id"]].append(([x, y, x + w, y + h], dataset.class_names[label]))
    return out


def draw_annotated(dataset, count: int, out: Path) -> list[dict]:
    """The first `count` training images as decoded, with their annotations; returns what was
    drawn."""
    names = dataset.class_names
    shown = range(min(count, len(dataset)))
    crowd = crowd_boxes(dataset, {int(dataset.image_ids[i]) for i in shown}) if count else {}
    drawn = []
    for i in shown:
        record = dataset.index[i]
        image = load_image_rgb(dataset.image_dir / record.file_name, apply_exif=record.apply_exif)
        boxes, labels = dataset.get_annotations(i)
        crowds = crowd.get(record.image_id, [])
        title = (f"{record.file_name} (id {record.image_id}), as annotated: {len(labels)} "
                 f"box{'' if len(labels) == 1 else 'es'}"
                 + (f" + {len(crowds)} crowd" if crowds else ""))
        fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
        draw_panel(ax, image, np.asarray(boxes).reshape(-1, 4), [names[k] for k in labels],
                   title, crowds)
        save_figure(fig, out / f"annotated_{i:02d}.png")
        drawn.append({"image_id": record.image_id, "title": title,
                      "boxes": np.asarray(boxes).reshape(-1, 4).tolist(),
                      "labels": np.asarray(labels).tolist(), "crowd": [b for b, _ in crowds]})
    return drawn


def draw_batches(cfg, dataset, count: int, epoch: int, out: Path) -> list[dict]:
    """The first `count` batches of `epoch` as the trainer's loader yields them; returns what
    was drawn."""
    from gfldet.data import build_dataloader

    d = cfg.data
    loader = build_dataloader(dataset, d.batch_size, d.num_workers, train=True, seed=cfg.train.seed,
                              distributed=False, aspect_ratio_grouping=d.aspect_ratio_grouping,
                              size_divisor=d.size_divisor)
    loader.batch_sampler.set_epoch(epoch)
    drawn = []
    for b, (images, targets) in enumerate(loader):
        if b == count:
            break
        columns = min(4, len(targets))
        rows = -(-len(targets) // columns)
        height, width = images.shape[2:]
        fig, axes = plt.subplots(
            rows, columns, figsize=(3.5 * columns, 3.5 * rows * height / width), squeeze=False
        )
        record, titles = [], []
        for ax, image, t in zip(axes.flat, images, targets, strict=False):
            boxes, labels = t["boxes"].numpy(), t["labels"].tolist()
            titles.append(f"id {t['image_id']}, {t['image_size'][1]}x{t['image_size'][0]} "
                          f"(w x h) in {width}x{height}")
            draw_panel(ax, image.permute(1, 2, 0).numpy(), boxes,
                       [dataset.class_names[k] for k in labels], titles[-1])
            record.append({"image_id": t["image_id"], "image_size": list(t["image_size"]),
                           "boxes": boxes.tolist(), "labels": labels})
        for ax in list(axes.flat)[len(targets):]:
            ax.axis("off")
        fig.suptitle(f"epoch {epoch}, batch {b}: "
                     "what the model receives (padded, before normalisation)", fontsize=9)
        save_figure(fig, out / f"batch_{b:02d}.png")
        drawn.append({"batch": b, "titles": titles, "images": record})
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--out", default="outputs/browse_dataset", help="output folder")
    parser.add_argument("--images", type=int, default=8,
                        help="training images drawn as annotated (default 8)")
    parser.add_argument("--batches", type=int, default=4,
                        help="augmented training batches drawn (default 4)")
    parser.add_argument("--epoch", type=int, default=0,
                        help="the epoch whose batches are drawn (0 = the first)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if min(args.images, args.batches, args.epoch) < 0:
        parser.error("--images, --batches and --epoch must be >= 0")
    out = Path(args.out)
    try:
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"config {args.config} does not exist")
        check_out_dir(out)
        cfg = load_config(args.config, args.cfg_options)
        from gfldet.engine.build import build_dataset

        dataset = build_dataset(cfg, "train")
    except (ConfigError, DatasetError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("annotated_*.png"), *out.glob("batch_*.png")]:  # an earlier run's
        old.unlink()
    annotated = draw_annotated(dataset, args.images, out)
    batches = draw_batches(cfg, dataset, args.batches, args.epoch, out)
    (out / MANIFEST).write_text(json.dumps(
        {"config": str(args.config), "epoch": args.epoch, "image_size": "[height, width]",
         "annotated": annotated, "batches": batches}, indent=1) + "\n")
    print(f"{len(annotated)} annotated image(s) and {len(batches)} batch(es) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
