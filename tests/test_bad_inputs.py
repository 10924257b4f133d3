"""Bad input never ends in a traceback, never costs compute first, never touches a user's file.

Two parts:

1. The issue-15 cases one by one (eval on a damaged checkpoint, --resume without a checkpoint,
   GroupNorm groups of one value, a val split that is only looked at after an epoch, train/val
   categories that disagree, missing val images scored as misses, images dropped unnamed).
2. The adversarial matrix: one table of kinds of bad input (data, configs, checkpoints, run
   folders, signals, predict and export outputs), each run through every tool that reads that
   kind of input. Every run is in-process (`tool.main(argv)`, SystemExit caught, stdout/stderr
   captured) on a fresh copy of a tiny dataset (64x48 px images) with a tiny model, and asserts:
   the documented exit code, no traceback (an exception escaping `main` fails the test with it),
   the offending file/key/value named, and a snapshot (path -> size, mtime, sha256) of every
   user file identical before and after, with no new file outside the tool's fresh output places.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import checked_dataset
from PIL import Image
from test_data_reliability import CATS, _ann, _img, exif_jpeg, noisy_png, truncate
from test_export import load_tool

from gfldet.config import TOP_STRIDE, ConfigError, config_to_dict, dump_config, load_config
from gfldet.data import build_dataloader
from gfldet.data.coco import CocoDetection
from gfldet.engine.build import build_dataset
from gfldet.engine.checkpoint import save_checkpoint
from gfldet.engine.evaluator import evaluate
from gfldet.inference import build_inference_model
from gfldet.models.detector import STRIDES

# train's @record under capture
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

TOOL_NAMES = ("train", "eval", "predict", "export", "check_dataset", "convert_mmdet")
TOOLS = {name: load_tool(name) for name in TOOL_NAMES}
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_synthetic_cpu.yaml"

# The tiny run: 4 training and 2 val images of 64x48 px, ResNet-18 with a 32-channel FPN and a
# one-conv head; one epoch of one iteration. The frozen backbone keeps the optimizer state small.
TINY = [
    "data.synthetic=null", "data.train_short_side=[64,64]", "data.test_short_side=64",
    "data.max_size=96",
    "data.batch_size=4", "data.val_batch_size=2", "data.num_workers=0", "model.num_classes=2",
    "model.backbone.frozen_stages=4", "model.fpn.out_channels=32", "model.head.feat_channels=64",
    "model.head.stacked_convs=1", "optim.name=sgd", "schedule.epochs=1", "schedule.milestones=[]",
    "schedule.warmup_iters=1", "train.log_interval=1", "train.device=cpu", "train.amp=none",
    "train.channels_last=false", "train.deterministic=true", "model.test.score_thr=0.0",
    "train.report=false",
]


# --------------------------------------------------------------------------- the tiny world


def write_split(folder: Path, n: int, seed: int) -> None:
    """folder/images/N.png (noise, so that a cut file loses pixels) and folder/ann.json."""
    (folder / "images").mkdir(parents=True)
    images = [_img(i) for i in range(1, n + 1)]
    for i, im in enumerate(images):
        noisy_png(folder / "images" / im["file_name"], im["width"], im["height"], seed=seed + i)
    anns = [_ann(i, i, [4, 4, 30, 24], cat=3 if i % 2 else 7) for i in range(1, n + 1)]
    (folder / "ann.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS})
    )


def tiny_config(data: Path):
    return load_config(DEMO, [*TINY, f"data.train.images={data / 'train' / 'images'}",
                              f"data.train.annotations={data / 'train' / 'ann.json'}",
                              f"data.val.images={data / 'val' / 'images'}",
                              f"data.val.annotations={data / 'val' / 'ann.json'}"])


@pytest.fixture(scope="module")
def vault(tmp_path_factory) -> Path:
    """Read-only files shared by every case: the pristine dataset and a tiny checkpoint (random
    weights; model + stored config + class names, like an exported file). Part of every snapshot."""
    root = tmp_path_factory.mktemp("vault")
    write_split(root / "data" / "train", 4, seed=0)
    write_split(root / "data" / "val", 2, seed=10)
    cfg = tiny_config(root / "data")
    torch.manual_seed(0)
    model = build_inference_model(cfg)
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg),
                     "meta": {"class_names": ["c3", "c7"]}}, root / "tiny.pth")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the matrix runs ~100 tiny models, where a second thread fighting for a
    shared 2-core machine makes each run 3x slower instead of faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Snapshot:
    """path -> (size, mtime_ns, sha256) of every file below some folders. The sha256 of a file is
    reused while its (size, mtime_ns, inode) stay the same (the 40 MB checkpoint is hashed once);
    any write changes the mtime."""

    _hashes: dict[tuple[str, int, int, int], str] = {}

    @classmethod
    def take(cls, roots: list[Path], skip: list[Path]) -> dict[str, tuple[int, int, str]]:
        out = {}
        for root in roots:
            for path in sorted(root.rglob("*")):
                if any(path == s or s in path.parents for s in skip) or not path.is_file():
                    continue
                st = path.stat()
                key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
                if key not in cls._hashes:
                    cls._hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path)] = (st.st_size, st.st_mtime_ns, cls._hashes[key])
        return out


@dataclass
class World:
    """One case's files: a copy of the dataset, a config file, the tool arguments and the places
    the tools may write (`fresh`); everything else under `root` and the vault is the user's."""

    root: Path
    vault: Path
    ckpt: Path
    opts: list[str] = field(default_factory=list)  # --cfg-options
    train_flags: list[str] = field(default_factory=list)
    positional_config: bool = True  # eval/predict/export get CONFIG before the checkpoint
    input: Path | None = None  # predict's INPUT
    export_args: list[str] = field(default_factory=lambda: ["--format", "weights"])
    mmdet: Path | None = None  # convert_mmdet's input
    run_is_users: bool = False  # the run/out folders hold the user's files (part of the snapshot)
    # monkeypatched for the run
    patches: list[tuple[object, str, object]] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cfg(self) -> Path:
        return self.root / "cfg.yaml"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def split(self, name: str) -> tuple[Path, Path]:
        return self.data / name / "images", self.data / name / "ann.json"

    def edit_json(self, split: str, edit: Callable[[dict], object]) -> None:
        path = self.split(split)[1]
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    def fields(self) -> dict[str, str]:
        return {"cfg": str(self.cfg), "ckpt": str(self.ckpt), "run": str(self.run),
                "root": str(self.root),
                "train_ann": str(self.split("train")[1]), "val_ann": str(self.split("val")[1]),
                "train_images": str(self.split("train")[0]),
                "val_images": str(self.split("val")[0])}

    def argv(self, tool: str) -> list[str]:
        opts = ["--cfg-options", *self.opts] if self.opts else []
        lead = [str(self.cfg)] if self.positional_config else []
        if tool == "check_dataset":
            return [str(self.cfg), *opts]
        if tool in ("train", "train --resume", "train --load-from"):
            flags = {"train --resume": ["--resume", str(self.ckpt)],
                     "train --load-from": ["--load-from", str(self.ckpt)]}.get(
                         tool, self.train_flags)
            return [str(self.cfg), "--work-dir", str(self.run), *flags, *opts]
        if tool == "eval":
            return [*lead, str(self.ckpt), "--metrics", str(self.out / "metrics.json"), *opts]
        if tool == "predict":
            source = self.input or self.split("val")[0]
            return [*lead, str(self.ckpt), str(source), "--out", str(self.out / "predict"),
                    "--device", "cpu", *opts]
        if tool == "export":
            return [*lead, str(self.ckpt), *self.export_args, *opts]
        if tool == "convert_mmdet":
            return [str(self.mmdet or self.ckpt), str(self.out / "converted.pth"),
                    "--config", str(self.cfg)]
        raise ValueError(tool)


def make_world(tmp_path: Path, vault: Path) -> World:
    world = World(root=tmp_path / "w", vault=vault, ckpt=vault / "tiny.pth")
    shutil.copytree(vault / "data", world.data)
    dump_config(tiny_config(world.data), world.cfg)
    return world


def run_tool(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    """`main(argv)` of a tool in this process: (exit code, stdout + stderr). Any exception that
    escapes `main` is what a user would see as a traceback: the test fails with it."""
    module = TOOLS[tool.split()[0]]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = module.main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - KeyboardInterrupt too: that is a traceback as well
        captured = capsys.readouterr()
        pytest.fail(f"{tool} {argv} raised:\n{traceback.format_exc()}\n"
                    f"{captured.out[-2000:]}{captured.err[-2000:]}")
    finally:
        for sig, handler in handlers.items():  # train() installs its stop handlers
            signal.signal(sig, handler)
    captured = capsys.readouterr()
    return (0 if code is None else code), captured.out + captured.err


# --------------------------------------------------------------------------- the kinds of bad input


@dataclass(frozen=True)
class Kind:
    """A kind of bad input: how to make it, and per tool the exit code and what the output names.
    `names` are format strings over `World.fields()`."""

    name: str
    make: Callable[[World], None]
    expect: dict[str, int]
    names: tuple[str, ...] = ()
    # must not appear in the output of a refusal (e.g. a training step)
    absent: tuple[str, ...] = ()
    # named by that tool as well
    tool_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    check: Callable[[World, str, str], None] | None = None  # extra assertions (world, tool, output)


KINDS: list[Kind] = []
DATA_VAL = {"check_dataset": 1, "train": 2, "eval": 2}  # fatal problem in the val split
# fatal problem in the train split (eval reads val only)
DATA_TRAIN = {"check_dataset": 1, "train": 2}
# accepted (fixed or worked around, and said)
FIXED_VAL = {"check_dataset": 0, "train": 0, "eval": 0}
FIXED_TRAIN = {"check_dataset": 0, "train": 0}
CONFIG_TOOLS = {"check_dataset": 2, "train": 2, "eval": 2, "predict": 2, "export": 2,
                "convert_mmdet": 2}
CKPT_TOOLS = {"eval": 2, "predict": 2, "export": 2, "train --resume": 2, "train --load-from": 2,
              "convert_mmdet": 2}
STEP = "] lr: "  # in every training log line: nothing may be trained before bad data is found


def kind(name: str, expect: dict[str, int], *names: str, **extra) -> Callable:
    def register(make: Callable[[World], None]) -> Callable[[World], None]:
        KINDS.append(Kind(name, make, expect, names, **extra))
        return make

    return register


# ---- data: the annotation file


@kind("ann_missing", DATA_VAL, "{val_ann}", "not found", absent=(STEP,),
      tool_names={"check_dataset": ("check data.val.annotations",)})
def _(w):
    w.split("val")[1].unlink()


@kind("ann_not_json", DATA_VAL, "{val_ann}", "invalid JSON at line 1", absent=(STEP,))
def _(w):
    w.split("val")[1].write_text('{"images": [')


@kind("ann_not_utf8", DATA_VAL, "{val_ann}", "UTF-8", absent=(STEP,))
def _(w):
    w.split("val")[1].write_bytes(b'{"images": "\xff\xfe"}')


@kind("ann_a_list", DATA_VAL, "{val_ann}", "got a list", absent=(STEP,))
def _(w):
    w.split("val")[1].write_text("[1, 2]")


@kind("ann_missing_key", DATA_VAL, "{val_ann}", "'annotations' is missing", absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d.pop("annotations"))


@kind("ann_is_a_folder", DATA_VAL, "{val_ann}", absent=(STEP,))
def _(w):
    w.split("val")[1].unlink()
    w.split("val")[1].mkdir()


@kind("duplicate_image_ids", DATA_VAL, "image id 1 appears 2 times", absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["images"].append({**d["images"][0], "file_name": "2.png"}))


@kind("duplicate_annotation_ids", DATA_VAL, "annotation id 1 appears 2 times", absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["annotations"].append({**d["annotations"][0], "image_id": 2}))


@kind("annotation_of_unknown_image", DATA_VAL, "image id 99, which is not in images",
      absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["annotations"].append(_ann(50, 99, [1, 1, 5, 5])))


@kind("category_not_in_categories", DATA_VAL, "category_id 42", absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["annotations"].append(_ann(50, 1, [1, 1, 5, 5], cat=42)))


@kind("bbox_nan", DATA_VAL, "annotation id 1", "4 finite numbers", absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["annotations"][0].update(bbox=[float("nan"), 1, 5, 5]))


@kind("bbox_three_numbers", DATA_VAL, "annotation id 1", "[x, y, width, height]", absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["annotations"][0].update(bbox=[1, 1, 5]))


@kind("iscrowd_a_string", DATA_VAL, "annotation id 1", "'iscrowd' must be 0 or 1", 'got "0"',
      absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["annotations"][0].update(iscrowd="0"))


@kind("image_without_width", DATA_VAL, "image id 1", "'width' must be a positive integer",
      absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["images"][0].pop("width"))


@kind("images_list_empty", DATA_VAL, "{val_ann}", "'images' is empty", absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d.update(images=[], annotations=[]))


@kind("recorded_size_wrong", DATA_VAL, "1.png (image id 1)", "the JSON says 100x48", absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["images"][0].update(width=100))


# a typo in data.val.images
@kind("image_folder_missing", DATA_VAL, "{val_images}", "not found", absent=(STEP,))
def _(w):
    shutil.rmtree(w.split("val")[0])


@kind("all_val_images_unreadable", DATA_VAL, "2 of 2 image files", "1.png", absent=(STEP,))
def _(w):
    for path in w.split("val")[0].iterdir():
        path.write_bytes(b"")


@kind("categories_disagree", DATA_TRAIN, "train and val categories differ", "c7", "seven",
      absent=(STEP,))
def _(w):
    w.edit_json("val", lambda d: d["categories"][1].update(name="seven"))


@kind("num_classes_wrong", {**DATA_VAL, "train": 2}, "model.num_classes", "2 categories",
      absent=(STEP,))
def _(w):
    w.opts = ["model.num_classes=5"]


@kind("no_training_box_left", DATA_TRAIN, "{train_ann}", "no annotations", absent=(STEP,))
def _(w):
    w.edit_json("train", lambda d: d.update(annotations=[]))


# ---- data accepted: fixed in memory or worked around, and said so with the file or id


def _strip_area_and_iscrowd(w: World) -> None:
    """A script-written COCO file: no `area`, no `iscrowd` (COCOeval reads both)."""
    for split in ("train", "val"):
        w.edit_json(split, lambda d: [(a.pop("area"), a.pop("iscrowd")) for a in d["annotations"]])


def _evaluated(w: World, tool: str, out: str) -> None:
    if tool != "check_dataset":
        assert "bbox AP" in out and "KeyError" not in out, out[-3000:]


KINDS.append(Kind("ann_without_area_and_iscrowd", _strip_area_and_iscrowd, FIXED_VAL,
                  ("annotations without 'iscrowd': 2 (0 is used", "without 'area': 2"),
                  check=_evaluated))


@kind("box_negative_width", FIXED_TRAIN, "annotation id 50", "zero or negative width/height")
def _(w):
    w.edit_json("train", lambda d: d["annotations"].append(_ann(50, 1, [10, 10, -5, 5])))


@kind("box_zero_height", FIXED_TRAIN, "annotation id 50", "zero or negative width/height")
def _(w):
    w.edit_json("train", lambda d: d["annotations"].append(_ann(50, 1, [10, 10, 5, 0])))


@kind("box_outside_image", FIXED_TRAIN, "annotation id 50", "wholly outside the image")
def _(w):
    w.edit_json("train", lambda d: d["annotations"].append(_ann(50, 1, [200, 200, 5, 5])))


@kind("train_image_1x1", FIXED_TRAIN, "tiny.png (image id 9)", "1x1")
def _(w):
    Image.new("RGB", (1, 1)).save(w.split("train")[0] / "tiny.png")
    w.edit_json("train", lambda d: (d["images"].append(_img(9, 1, 1, "tiny.png")),
                                    d["annotations"].append(_ann(90, 9, [0, 0, 1, 1]))))


@kind("train_image_without_boxes", FIXED_TRAIN, "empty.png (image id 9)", "no annotations")
def _(w):
    noisy_png(w.split("train")[0] / "empty.png")
    w.edit_json("train", lambda d: d["images"].append(_img(9, name="empty.png")))


def bad_val_image(name: str, damage: Callable[[Path], None], named: str = "2.png (image id 2)"
                  ) -> None:
    """One of the two val images unreadable: within the budget, left out and named, not scored."""

    def make(w: World) -> None:
        damage(w.split("val")[0] / "2.png")

    def check(w: World, tool: str, out: str) -> None:
        if tool != "check_dataset":
            assert "left out of the evaluation" in out and "2.png" in out, out[-3000:]

    KINDS.append(Kind(name, make, FIXED_VAL, (named,), check=check))


# A missing file's path is quoted (repr), so that whitespace in its name shows.
bad_val_image("val_image_missing", lambda p: p.unlink(), named="2.png' (image id 2)")
bad_val_image("val_image_truncated", truncate)
bad_val_image("val_image_zero_bytes", lambda p: p.write_bytes(b""))
bad_val_image("val_image_is_text", lambda p: p.write_text("not an image\n"))


def val_image_variant(
    name: str, write: Callable[[Path], str], size: tuple[int, int] = (64, 48)
) -> None:
    """Image 2 of the val split replaced by a file in another form, which must simply work."""

    def make(w: World) -> None:
        folder = w.split("val")[0]
        (folder / "2.png").unlink()
        new_name = write(folder)
        w.edit_json("val", lambda d: d["images"][1].update(file_name=new_name, width=size[0],
                                                           height=size[1]))

    KINDS.append(Kind(name, make, FIXED_VAL, absent=("cannot decode", "left out")))


def _mode(mode: str, ext: str) -> Callable[[Path], str]:
    def write(folder: Path) -> str:
        rgb = np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(rgb).convert(mode).save(folder / f"2{ext}")
        return f"2{ext}"

    return write


def _png16(folder: Path) -> str:
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).save(folder / "2.png")
    return "2.png"


def _exif(folder: Path) -> str:
    # stored 48x64, upright 64x48 as in the JSON
    exif_jpeg(folder / "2.jpg", (48, 64), orientation=6)
    return "2.jpg"


def _non_ascii(folder: Path) -> str:
    noisy_png(folder / "bild_ä_猫.png")
    return "bild_ä_猫.png"


val_image_variant("val_image_grayscale", _mode("L", ".png"))
val_image_variant("val_image_cmyk_jpeg", _mode("CMYK", ".jpg"))
val_image_variant("val_image_16bit_png", _png16)
val_image_variant("val_image_exif_rotated", _exif)
val_image_variant("val_image_non_ascii_name", _non_ascii)


# ---- configs (every tool reads one; eval/predict/export get it before the checkpoint)


def config_kind(name: str, text: str | bytes | None, *names: str, opts: tuple[str, ...] = (),
                expect: dict[str, int] = CONFIG_TOOLS) -> None:
    """A config file with `text` appended (None: the file as written), or --cfg-options `opts`."""

    def make(w: World) -> None:
        if isinstance(text, bytes):
            w.cfg.write_bytes(text)
        elif text is not None:
            w.cfg.write_text(w.cfg.read_text() + text)
        w.opts = list(opts)

    KINDS.append(Kind(name, make, expect, names, absent=(STEP,)))


# convert_mmdet has no --cfg-options
CFG_OPTIONS_TOOLS = {k: v for k, v in CONFIG_TOOLS.items() if k != "convert_mmdet"}
config_kind("cfg_unknown_key", "batch_sise: 2\n", "batch_sise", "batch_size")
config_kind("cfg_duplicate_key", "train:\n  seed: 1\n", "duplicate key 'train'")
config_kind("cfg_yaml_syntax", "oops: [1, 2\n", "{cfg}", "malformed YAML")
config_kind("cfg_python_tag", "evil: !!python/object/apply:os.system ['touch pwned']\n", "{cfg}",
            "tags such as !!python")
config_kind("cfg_not_utf8", b"model:\n  num_classes: \xff\n", "{cfg}", "cannot read")
config_kind("cfg_empty", b"", "{cfg}", "empty")
config_kind("cfg_a_list", b"- a\n- b\n", "{cfg}", "top level must be a YAML mapping")
config_kind("cfg_options_no_equals", None, "'model.num_classes' is not of the form key=value",
            opts=("model.num_classes",), expect=CFG_OPTIONS_TOOLS)
config_kind("cfg_options_unknown_key", None, "model.nun_classes", "num_classes",
            opts=("model.nun_classes=2",), expect=CFG_OPTIONS_TOOLS)
config_kind("cfg_options_bad_yaml", None, "optim.lr=[1,", opts=("optim.lr=[1,",),
            expect=CFG_OPTIONS_TOOLS)
config_kind("cfg_wrong_type", None, "optim.lr", "expected float", opts=("optim.lr=fast",),
            expect=CFG_OPTIONS_TOOLS)
config_kind("cfg_out_of_range", None, "data.flip_prob=2.0", "in [0, 1]", opts=("data.flip_prob=2",),
            expect=CFG_OPTIONS_TOOLS)
config_kind("cfg_gn_one_channel_per_group", None, "model.head.feat_channels=32",
            "data.test_short_side=128", "GroupNorm",
            opts=("model.head.feat_channels=32", "data.test_short_side=128",
                  "data.train_short_side=[128,128]", "data.max_size=192"),
            expect=CFG_OPTIONS_TOOLS)


@kind("cfg_missing", CONFIG_TOOLS, "{cfg}", "not found", absent=(STEP,))
def _(w):
    w.cfg.unlink()


@kind("cfg_is_a_folder", CONFIG_TOOLS, "{cfg}", absent=(STEP,))
def _(w):
    w.cfg.unlink()
    w.cfg.mkdir()


@kind("cfg_base_missing", CONFIG_TOOLS, "base file 'nowhere.yaml' not found", absent=(STEP,))
def _(w):
    w.cfg.write_text("base: nowhere.yaml\n" + w.cfg.read_text())


@kind("cfg_base_cycle", CONFIG_TOOLS, "base cycle", "other.yaml", absent=(STEP,))
def _(w):
    (w.root / "other.yaml").write_text("base: cfg.yaml\n")
    w.cfg.write_text("base: other.yaml\n" + w.cfg.read_text())


# ---- checkpoints (eval, predict, export, train --resume / --load-from, convert_mmdet read them)


def ckpt_kind(name: str, write: Callable[[Path, World], None] | None, *names: str,
              expect: dict[str, int] = CKPT_TOOLS,
              tool_names: dict[str, tuple[str, ...]] | None = None,
              shared: Callable[[Path], None] | None = None) -> None:
    """A bad checkpoint written by `write` into the world, or made once by `shared` in the vault."""

    def make(w: World) -> None:
        if shared is not None:
            w.ckpt = in_vault(w, f"{name}.pth", shared)
            return
        w.ckpt = w.root / "model.pth"
        write(w.ckpt, w)

    def check(w: World, tool: str, out: str) -> None:
        assert not (w.root / "pwned").exists(), "the pickle's payload ran"

    KINDS.append(Kind(name, make, expect, names or ("{ckpt}",), absent=(STEP,), check=check,
                      tool_names=tool_names or {}))


class Payload:
    """Unpickling this runs a shell command (creates the file `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _copy_cut(path: Path, w: World) -> None:
    path.write_bytes(w.vault.joinpath("tiny.pth").read_bytes()[: 1 << 20])


def _evil_zip(path: Path, w: World) -> None:
    torch.save({"model": {}, "x": Payload(w.root / "pwned")}, path)


def _evil_pickle(path: Path, w: World) -> None:
    path.write_bytes(pickle.dumps({"model": {}, "x": Payload(w.root / "pwned")}))


def _other_model(path: Path, w: World) -> None:
    torch.save({"model": {"fc.weight": torch.zeros(3, 4)},
                "config": config_to_dict(tiny_config(w.data))}, path)


def in_vault(w: World, name: str, make: Callable[[Path], None]) -> Path:
    """A checkpoint made once per module (a 40 MB model takes a while to build and save), in the
    vault, which every snapshot covers."""
    path = w.vault / "kinds" / name
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        make(path)
    return path


def _five_classes(path: Path) -> None:
    cfg = tiny_config(path.parents[1] / "data")
    cfg.model.num_classes = 5
    torch.save({"model": build_inference_model(cfg).state_dict(), "config": config_to_dict(cfg)},
               path)


ckpt_kind("ckpt_missing", lambda p, w: None, "{ckpt}", "not found")
ckpt_kind("ckpt_truncated", _copy_cut, "{ckpt}", "incomplete or corrupt")
ckpt_kind("ckpt_zero_bytes", lambda p, w: p.write_bytes(b""), "{ckpt}", "incomplete or corrupt")
ckpt_kind("ckpt_text_file", lambda p, w: p.write_text("hello\n"), "{ckpt}",
          "not a PyTorch checkpoint")
ckpt_kind("ckpt_malicious_torch_zip", _evil_zip, "{ckpt}", "refused", "nothing in it was executed")
ckpt_kind("ckpt_malicious_pickle", _evil_pickle, "{ckpt}", "refused", "nothing in it was executed")
ckpt_kind("ckpt_is_a_folder", lambda p, w: p.mkdir(), "{ckpt}")
ckpt_kind("ckpt_a_tensor", lambda p, w: torch.save(torch.zeros(3), p), "{ckpt}", "expected a dict")
ckpt_kind("ckpt_without_weights", lambda p, w: torch.save({"epoch": 3}, p), "{ckpt}",
          # not an MMDetection checkpoint: a conversion error
          expect={**CKPT_TOOLS, "convert_mmdet": 1})
WEIGHTS_READERS = ("eval", "predict", "export", "train --load-from")
ckpt_kind("ckpt_of_another_model", _other_model, "{ckpt}",
          expect={**CKPT_TOOLS, "convert_mmdet": 1},  # a conversion error, documented as exit 1
          tool_names={t: ("fc.weight",) for t in WEIGHTS_READERS})
ckpt_kind("ckpt_wrong_num_classes", None, "{ckpt}", shared=_five_classes,
          expect={"eval": 2, "predict": 2, "export": 2, "train --resume": 2,
                  "train --load-from": 0},  # --load-from is how one fine-tunes to other classes
          tool_names={t: ("head.gfl_cls.weight: checkpoint (5, 64, 3, 3) vs model (2, 64, 3, 3)",)
                      for t in WEIGHTS_READERS})


def _without_config(path: Path) -> None:
    torch.save({"model": build_inference_model(tiny_config(path.parents[1] / "data")).state_dict()},
               path)


def _stored_config_invalid(path: Path) -> None:
    cfg = tiny_config(path.parents[1] / "data")
    stored = config_to_dict(cfg)
    stored["data"]["batch_sise"] = 2
    torch.save({"model": build_inference_model(cfg).state_dict(), "config": stored}, path)


@kind("ckpt_without_config", {"eval": 2, "predict": 2, "export": 2}, "{ckpt}", "stores no config",
      absent=(STEP,))
def _(w):
    w.ckpt = in_vault(w, "bare.pth", _without_config)
    w.positional_config = False


@kind("ckpt_stored_config_invalid", {"eval": 2, "predict": 2, "export": 2}, "batch_sise",
      absent=(STEP,))
def _(w):
    w.ckpt = in_vault(w, "stored_config_invalid.pth", _stored_config_invalid)
    w.positional_config = False


# ---- run folders (train)


@kind("run_folder_used", {"train": 2}, "{run}", "--resume", "--overwrite", absent=(STEP,))
def _(w):
    w.run.mkdir()
    shutil.copy(w.vault / "tiny.pth", w.run / "last.pth")
    (w.run / "scalars.jsonl").write_text('{"step": 1}\n')
    w.run_is_users = True


def _nothing_created(w: World, tool: str, out: str) -> None:
    assert not w.run.exists(), "the run folder was created"


@kind("resume_without_checkpoint", {"train": 2}, "{run}", "start without --resume",
      absent=(STEP, "dataset "), check=_nothing_created)
def _(w):
    w.train_flags = ["--resume"]


@kind("resume_path_missing", {"train": 2}, "{root}/nope.pth", absent=(STEP, "dataset "),
      check=_nothing_created)
def _(w):
    w.train_flags = ["--resume", str(w.root / "nope.pth")]


@kind("resume_and_overwrite", {"train": 2}, "--resume and --overwrite", absent=(STEP,),
      check=_nothing_created)
def _(w):
    w.train_flags = ["--resume", "--overwrite"]


@kind("load_from_missing", {"train": 2}, "{root}/nope.pth", absent=(STEP, "dataset "),
      check=_nothing_created)
def _(w):
    w.train_flags = ["--load-from", str(w.root / "nope.pth")]


@kind("work_dir_is_a_file", {"train": 2}, "{run}", absent=(STEP,))
def _(w):
    w.run.write_text("my notes\n")
    w.run_is_users = True


# ---- signals (train): a stop request mid-epoch writes last.pth; a second Ctrl-C stops at once


def _signal_at_first_step(signals: tuple[int, ...]) -> Callable[[World], None]:
    def make(w: World) -> None:
        from gfldet.engine import trainer

        original = trainer.TrainLoop.step

        def step(self, images, targets, it):
            if it == 0:
                for sig in signals:
                    os.kill(os.getpid(), sig)
            return original(self, images, targets, it)

        w.patches = [(trainer.TrainLoop, "step", step)]
        w.opts = ["data.batch_size=2"]  # two iterations: the stop comes mid-epoch

    return make


def _last_written(w: World, tool: str, out: str) -> None:
    assert (w.run / "last.pth").is_file() and not (w.run / "epoch_1.pth").exists()


KINDS.append(Kind("sigterm_mid_epoch", _signal_at_first_step((signal.SIGTERM,)),
                  {"train": 128 + signal.SIGTERM},
                  ("last.pth written; continue with --resume",), check=_last_written))
KINDS.append(Kind("sigint_twice", _signal_at_first_step((signal.SIGINT, signal.SIGINT)),
                  {"train": 128 + signal.SIGINT}, ("second Ctrl-C", "{run}")))


# ---- predict: its input images and its output folder


@kind("predict_input_missing", {"predict": 2}, "{root}/nope.jpg")
def _(w):
    w.input = w.root / "nope.jpg"


@kind("predict_input_not_an_image", {"predict": 2}, "{root}/notes.jpg")
def _(w):
    w.input = w.root / "notes.jpg"
    w.input.write_text("not an image\n")


@kind("predict_input_truncated", {"predict": 2}, "{root}/cut.png", "1 of 1 image")
def _(w):
    w.input = w.root / "cut.png"
    noisy_png(w.input)
    truncate(w.input)


@kind("predict_input_folder_without_images", {"predict": 2}, "{root}/empty", "no images")
def _(w):
    w.input = w.root / "empty"
    w.input.mkdir()


@kind("predict_out_is_a_file", {"predict": 2}, "{root}/out/predict")
def _(w):
    w.out.mkdir()
    (w.out / "predict").write_text("my file\n")
    w.run_is_users = True  # out/ holds the user's file


@kind("predict_out_is_the_input_folder", {"predict": 2}, "1.png")
def _(w):
    w.input = w.out / "predict"
    shutil.copytree(w.split("val")[0], w.input)
    w.run_is_users = True


@kind("predict_out_holds_a_users_file", {"predict": 2}, "1.json")
def _(w):
    (w.out / "predict").mkdir(parents=True)
    (w.out / "predict" / "1.json").write_text('{"mine": true}\n')
    w.run_is_users = True


# ---- export: its output and its arguments


@kind("export_out_exists", {"export": 2}, "{root}/model.pt", "--overwrite")
def _(w):
    (w.root / "model.pt").write_text("my model\n")
    w.export_args = ["--format", "torchscript", "--out", str(w.root / "model.pt")]


@kind("export_shape_not_multiple_of_32", {"export": 2}, "--shape 100 100")
def _(w):
    w.export_args = ["--format", "onnx", "--shape", "100", "100", "--out", str(w.out / "m.onnx")]


@kind("export_verify_images_missing", {"export": 2}, "{root}/nope")
def _(w):
    w.export_args = ["--format", "torchscript", "--verify-images", str(w.root / "nope"), "--out",
                     str(w.out / "m.pt")]


@kind("convert_out_exists", {"convert_mmdet": 2}, "{root}/out/converted.pth", "--overwrite")
def _(w):
    w.out.mkdir()
    (w.out / "converted.pth").write_text("my converted model\n")
    w.mmdet = w.root / "mmdet.pth"
    w.mmdet.write_text("an MMDetection checkpoint\n")
    w.run_is_users = True


MATRIX = [(k, tool) for k in KINDS for tool in k.expect]


@pytest.mark.parametrize(("kind", "tool"), MATRIX,
                         ids=[f"{k.name}-{t.replace(' ', '')}" for k, t in MATRIX])
def test_bad_input(kind: Kind, tool: str, vault, tmp_path, capsys, monkeypatch) -> None:
    world = make_world(tmp_path, vault)
    kind.make(world)
    for owner, attr, value in world.patches:
        monkeypatch.setattr(owner, attr, value)
    monkeypatch.chdir(world.root)  # a stray relative write would land in the snapshot
    fresh = [] if world.run_is_users else [world.run, world.out]
    before = Snapshot.take([world.root, vault], skip=fresh)
    code, out = run_tool(tool, world.argv(tool), capsys)
    assert code == kind.expect[tool], f"exit {code}, expected {kind.expect[tool]}:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    for name in kind.names:
        assert name.format(**world.fields()) in out, (
            f"{name.format(**world.fields())!r} not named:\n{out[-4000:]}"
        )
    for name in kind.tool_names.get(tool, ()):
        assert name in out, f"{name!r} not named:\n{out[-4000:]}"
    for text in kind.absent if kind.expect[tool] else ():
        assert text not in out, f"{text!r} in the output:\n{out[-4000:]}"
    if kind.check is not None:
        kind.check(world, tool, out)
    after = Snapshot.take([world.root, vault], skip=fresh)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"user files changed, lost or added: {changed}"


def test_the_matrix_is_wide_enough() -> None:
    """The issue asks for at least 50 kinds across data, configs, checkpoints and signals."""
    assert len(KINDS) >= 50 and len({k.name for k in KINDS}) == len(KINDS)
    assert len(MATRIX) >= 150


# --------------------------------------------------------------------------- issue 15, one by one
# (The matrix rows that are the other items: eval on a damaged or malicious checkpoint,
# ckpt_truncated-eval and ckpt_malicious_*-eval; --resume without a checkpoint,
# resume_without_checkpoint-train; a typo in data.val.images, image_folder_missing-train; train
# and val categories that disagree, categories_disagree-train.)


@pytest.mark.parametrize("feat_channels", [32, 64])
def test_the_groupnorm_rule_is_exactly_where_the_model_fails(feat_channels, vault):
    """A config is refused exactly when a square image at its short side, alone in a batch (as
    predict and the last evaluation batch give it), makes a GroupNorm group hold one value."""
    assert STRIDES[-1] == TOP_STRIDE
    cfg = tiny_config(vault / "data")
    cfg.model.head.feat_channels = feat_channels
    model = build_inference_model(cfg)
    for side in (64, 128, 129, 160):
        padded = math.ceil(side / 32) * 32
        try:
            model(torch.zeros(1, 3, padded, padded), [{"image_size": (side, side)}])
            works = True
        except ValueError as err:
            assert "Expected more than 1 value per channel" in str(err)
            works = False
        options = [f"model.head.feat_channels={feat_channels}", "data.max_size=512"]
        for key, value in (("data.test_short_side", side), ("data.train_short_side", [side, side])):
            other = ("data.train_short_side=[256,256]" if key == "data.test_short_side"
                     else "data.test_short_side=256")
            try:
                load_config(DEMO, [*TINY, *options, other, f"{key}={value}"])
                accepted = True
            except ConfigError as err:
                assert f"{key}=" in str(err) and "model.head.feat_channels=32" in str(err)
                accepted = False
            assert accepted == works, (feat_channels, side, key)
    # Without GroupNorm in the towers there is nothing to refuse.
    load_config(DEMO, [*TINY, "model.head.feat_channels=32", "model.head.norm=none"])
    load_config(DEMO, [*TINY, "model.head.feat_channels=32", "model.head.stacked_convs=0"])


class PerfectDetector(torch.nn.Module):
    """Returns each image's ground truth (original pixels) with score 1: AP 1 on what it sees."""

    def __init__(self, dataset: CocoDetection) -> None:
        super().__init__()
        self.dataset = dataset
        self.ground_truth = dataset.ground_truth()

    def forward(self, images, targets):
        out = []
        for t in targets:
            anns = self.ground_truth.imgToAnns[t["image_id"]]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
            labels = torch.tensor([self.dataset.cat_id_to_label[a["category_id"]] for a in anns])
            out.append({"boxes": boxes.float(), "scores": torch.ones(len(anns)), "labels": labels})
        return out


@pytest.mark.parametrize("when", ["before the check", "after the check"])
def test_an_unreadable_val_image_is_left_out_of_the_score_not_scored_as_missed(
    when, vault, tmp_path, caplog
):
    world = make_world(tmp_path, vault)
    cfg = tiny_config(world.data)
    missing = world.split("val")[0] / "2.png"  # the only image of category 7
    if when == "before the check":
        missing.unlink()
    dataset = build_dataset(cfg, "val")
    if when == "after the check":
        missing.unlink()  # e.g. a network drive gone between the check and the evaluation
    loader = build_dataloader(dataset, 2, 0, train=False, seed=0, distributed=False,
                              size_divisor=32)
    with caplog.at_level(logging.WARNING, logger="gfldet"):
        metrics = evaluate(PerfectDetector(dataset), loader, torch.device("cpu"))
    # Scored as a miss, category 7 would have AP 0 and the mean 0.5.
    assert metrics["bbox_mAP"] == pytest.approx(1.0)
    # The check quotes a missing file's path (whitespace shows); a failed decode names it as is.
    named = f"{str(missing)!r} (image id 2)" if when == "before the check" else (
        f"{missing} (image id 2)")
    assert [name.split(": ")[0] for name in metrics["images_left_out"]] == [named]
    assert f"1 of 2 images left out of the evaluation: {named}" in caplog.text


def test_every_image_training_leaves_out_is_named_with_why(tmp_path, caplog):
    write_split(tmp_path, 2, seed=0)
    data = json.loads((tmp_path / "ann.json").read_text())
    Image.new("RGB", (1, 1)).save(tmp_path / "images" / "dot.png")
    data["images"].append(_img(3, 1, 1, "dot.png"))
    data["annotations"].append(_ann(3, 3, [0, 0, 1, 1]))
    for i in range(4, 15):  # 11 images without annotations
        noisy_png(tmp_path / "images" / f"{i}.png", seed=i)
        data["images"].append(_img(i))
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="gfldet"):
        dataset = checked_dataset(tmp_path / "images", tmp_path / "ann.json", min_size=32)
    assert len(dataset) == 2 and len(dataset.left_out) == 12
    assert dataset.left_out[0] == "dot.png (image id 3): 1x1 px, a side below data.min_size=32"
    assert dataset.left_out[1] == "4.png (image id 4): no annotations"
    line = next(r.getMessage() for r in caplog.records if "left out of training" in r.getMessage())
    assert line.startswith("12 of 14 images left out of training: dot.png (image id 3): 1x1 px")
    assert line.endswith("12.png (image id 12): no annotations; ... and 2 more")


def test_train_refuses_disagreeing_categories_with_check_datasets_words(vault, tmp_path, capsys):
    world = make_world(tmp_path, vault)
    world.edit_json("val", lambda d: d["categories"][1].update(name="seven"))
    code, checked = run_tool("check_dataset", world.argv("check_dataset"), capsys)
    assert code == 1
    problem = next(line.strip(" -") for line in checked.splitlines() if "categories differ" in line)
    code, trained = run_tool("train", world.argv("train"), capsys)
    assert code == 2 and problem in trained and STEP not in trained
