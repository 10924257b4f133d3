"""Export a trained GFL detector for deployment, and check the export against PyTorch.

    python tools/export.py CHECKPOINT --format weights      # inference-only .pth
    python tools/export.py CHECKPOINT --format onnx [--nms] [--dynamic] [--shape H W]
    python tools/export.py CHECKPOINT --format torchscript [--nms]
    python tools/export.py CONFIG CHECKPOINT --format ...   # a YAML config, not the checkpoint's

The checkpoint's stored config is used unless a YAML CONFIG is given before it; --cfg-options
apply to either (train.* ones are refused: export runs in fp32). Export runs on the CPU (graphs
traced there run anywhere).

weights: drops optimizer/scheduler/RNG state (EMA weights become the model when the run kept
an EMA), writes NAME-<sha256[:8]>.pth and the config as NAME-<sha256[:8]>.yaml beside it.
--out DIR/NAME.pth names them DIR/NAME-<sha256[:8]>.*; --out DIR (an existing folder, or a path
ending in /) puts them inside DIR, named as by default (the run folder's or the config's name).

onnx / torchscript: the graph takes normalised, padded images [B, 3, H, W] with each image's
resized size image_sizes [B, 2] and original size orig_sizes [B, 2] (gfldet.export.graph_inputs
prepares them) and returns every prior's boxes [B, A, 4] (original pixels) and scores [B, A, C],
0 outside each image; with --nms, evaluation's detections padded to boxes [B, K, 4],
scores [B, K], labels [B, K] and num_dets [B]. Without --dynamic the ONNX graph has the fixed
shape --shape (images are letterboxed into it). The export is run on real images
(--verify-images, default the config's val images), each alone and two of different sizes in one
batch, and compared with evaluation (GFL.forward, as tools/eval.py runs it); it fails (exit 1)
when the largest difference exceeds --rtol (scores) or --rtol x image side (boxes, pixels), or a
detection is found on one side only; the file is then kept as OUT.unverified for inspection,
and OUT is written only once verified. Unreadable verification images are skipped and named.
ONNX needs the optional extra: pip install -e ".[export]". An existing onnx/torchscript output
file is not replaced without --overwrite; --out is never the input checkpoint or config.
Options that would do nothing for the chosen format (--dynamic or --shape with torchscript,
--score-thr without --nms, any graph option with weights) are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np

from gfldet.config import Config, ConfigError, load_config
from gfldet.data import build_transforms
from gfldet.data.synthetic import SynthParams, render_image
from gfldet.engine.checkpoint import CheckpointError, load_checkpoint
from gfldet.export import (
    DEFAULT_OPSET,
    INSTALL_EXPORT,
    ExportVerificationError,
    export_onnx,
    export_torchscript,
    feeds_from_batch,
    onnx_runner,
    publish_weights,
    torchscript_runner,
    verification_inputs,
    verify,
)
from gfldet.inference import (
    config_for_checkpoint,
    list_images,
    load_inference_model,
    split_config_argument,
    to_rgb_array,
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def unit_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1] (scores are sigmoids)")
    return value


# Options that matter for graphs only, and when a graph ignores them (they would do nothing).
GRAPH_OPTIONS = ("nms", "dynamic", "shape", "score_thr", "verify_images", "num_verify", "rtol",
                 "opset")
UNUSED_WHEN = {
    "dynamic": ("with torchscript", "TorchScript files are traced and accept any input size and "
                "batch; --dynamic is for onnx"),
    "shape": ("with torchscript or --dynamic", "only an ONNX graph exported without --dynamic "
              "has a fixed input shape; the others accept any size"),
    "opset": ("with torchscript", "--opset is for onnx"),
    "score_thr": ("without --nms", "the threshold is baked into the graph only with --nms; the raw "
                  "graph returns every prior's scores"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, usage="%(prog)s [CONFIG] CHECKPOINT "
                                     "--format {weights,onnx,torchscript} [options]  (one "
                                     "checkpoint; --help lists the options)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT",
                        help="checkpoint written by tools/train.py (or an exported .pth), "
                             "optionally preceded by a YAML config to use instead of its own")
    parser.add_argument("--format", required=True, choices=("weights", "onnx", "torchscript"))
    parser.add_argument("--out",
                        help="output file (default: beside the checkpoint, named after the config)"
                             "; weights: a folder, or DIR/NAME.pth for DIR/NAME-<sha256[:8]>.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing onnx/torchscript output file")
    parser.add_argument("--no-ema", action="store_true",
                        help="export the raw weights even if EMA weights exist")
    parser.add_argument("--nms", action="store_true",
                        help="onnx/torchscript: include post-processing and NMS")
    parser.add_argument("--dynamic", action="store_true",
                        help="onnx: free batch, height and width axes")
    parser.add_argument("--shape", nargs=2, type=int, metavar=("H", "W"),
                        help="onnx without --dynamic: the graph's fixed input shape, multiples "
                             "of 32 (default: the largest landscape "
                             "test input, data.test_short_side x data.max_size rounded up to 32)")
    parser.add_argument("--verify-images",
                        help="image file, folder or glob to verify on (default: config's val "
                             "images)")
    parser.add_argument("--num-verify", type=positive_int, default=4,
                        help="images to verify on (>= 1)")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="tolerance: scores absolute, boxes relative to the largest original "
                             "image side")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--score-thr", type=unit_float,
                        help="--nms: score threshold in [0, 1] baked into the graph "
                             "(default: model.test.score_thr)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        args.config, (args.checkpoint,) = split_config_argument(args.paths, ["CHECKPOINT"])
    except ValueError as err:
        parser.error(str(err))
    if args.shape is not None and any(s % 32 for s in args.shape):
        parser.error(f"--shape {args.shape[0]} {args.shape[1]}: both sides must be multiples of 32")
    # The export and its verification run in fp32: a train.amp=bf16 here would do nothing.
    train_options = [o for o in args.cfg_options if o.partition("=")[0].strip()
                     .split(".")[0] == "train"]
    if train_options:
        parser.error(f"--cfg-options {' '.join(train_options)}: export runs in fp32 and reads "
                     "no train.* setting; train.amp applies to training and tools/eval.py")
    given = [d for d in GRAPH_OPTIONS if getattr(args, d) != parser.get_default(d)]
    flags = ", ".join(f"--{d.replace('_', '-')}" for d in given)
    if args.format == "weights" and given:
        parser.error(f"{flags}: only for --format onnx or torchscript (graph and verification "
                     "options; --format weights writes the model's weights as they are)")
    unused = {"dynamic": args.format == "torchscript",
              "shape": args.format == "torchscript" or args.dynamic,
              "opset": args.format == "torchscript", "score_thr": not args.nms}
    for dest in given:
        if unused.get(dest):
            when, why = UNUSED_WHEN[dest]
            parser.error(f"--{dest.replace('_', '-')} does nothing {when}: {why}")
    return args


def default_output(args: argparse.Namespace) -> Path:
    """Beside the checkpoint, named after the config (or the run folder for a run's config.yaml)."""
    folder = Path(args.checkpoint).resolve().parent
    name = Path(args.config).stem if args.config else "config"
    base = folder / (folder.name if name == "config" else name)
    if args.format == "weights":
        return base.with_name(base.name + ".pth")  # not with_suffix: NAME may hold dots
    tags = ("_nms" if args.nms else "") + ("_dynamic" if args.dynamic else "")
    suffix = ".onnx" if args.format == "onnx" else ".torchscript.pt"
    return base.with_name(base.name + tags + suffix)


def same_file(a: Path, b: Path) -> bool:
    """Whether a and b name one file: another spelling of the path, a symlink or a hard link."""
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def output_path(args: argparse.Namespace) -> Path:
    """The file to write (weights: the NAME.pth whose NAME-<hash> names the files); ValueError
    saying why when --out names an input, a folder for a graph, or an existing file."""
    default = default_output(args)
    out = Path(args.out) if args.out else default
    if args.format == "weights" and args.out:
        if out.is_dir() or args.out.endswith(("/", os.sep)):
            out = out / default.name
        elif out.suffix != ".pth":
            raise ValueError(
                f"--out {args.out}: for --format weights, --out is a folder to write "
                f"{default.stem}-<sha256[:8]>.pth and .yaml into (an existing one, or ending in /)"
                ", or DIR/NAME.pth to write DIR/NAME-<sha256[:8]>.pth and .yaml")
    elif out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name (e.g. {out / default.name})")
    # What the user named: weights' own NAME.pth only prefixes the hashed files, no need to check.
    named = Path(args.out) if args.out else None if args.format == "weights" else out
    for name, path in (("checkpoint", args.checkpoint), ("config", args.config)):
        if named and path and same_file(named, Path(path)):
            raise ValueError(f"--out {named} is the input {name} {path} itself; give another --out")
    if args.format != "weights" and out.exists() and not args.overwrite:  # weights: hash-named
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or --out another file")
    return out


def read_images(paths: list[Path], count: int) -> tuple[list[np.ndarray], list[str]]:
    """The first `count` readable images of `paths` as RGB arrays, and the files skipped before
    them as "path: reason" (predict skips the same files)."""
    images, unreadable = [], []
    for path in paths:
        if len(images) == count:
            break
        try:
            images.append(to_rgb_array(path))
        except Exception as err:  # PIL raises many types for a bad file (OSError, SyntaxError, ...)
            unreadable.append(f"{path}: {type(err).__name__}: {err}")
    return images, unreadable


def verification_images(cfg: Config, source: str | None,
                        count: int) -> tuple[list[np.ndarray], str, list[str]]:
    """RGB images to verify on, where they came from, and the unreadable files skipped."""
    if source is not None:
        images, unreadable = read_images(list_images(source), count)
        return images, source, unreadable
    folders = [Path(cfg.data.synthetic.root) / "val"] if cfg.data.synthetic is not None else []
    folders.append(Path(cfg.data.val.images))
    for folder in folders:
        if folder.is_dir():
            try:
                paths = list_images(folder)
            except FileNotFoundError:
                continue
            images, unreadable = read_images(paths, count)
            return images, str(folder), unreadable
    # No dataset on this machine: synthetic scenes (shapes on textured backgrounds), as the
    # bundled dataset renders them, at a few sizes and aspect ratios.
    sizes = [(320, 416), (416, 320), (288, 288), (352, 480)]
    images = [render_image(np.random.default_rng(i), *sizes[i % len(sizes)], SynthParams())[0]
              for i in range(count)]
    return images, "generated synthetic scenes (no val images found)", []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = output_path(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if args.format == "onnx" and missing:  # before the minutes a large model takes to load
        print(f"error: ONNX export needs {' and '.join(missing)}, not installed here: "
              f"{INSTALL_EXPORT}", file=sys.stderr)
        return 2
    use_ema = not args.no_ema
    try:
        # The config before the checkpoint; weights that do not fit: an error naming the file.
        cfg = load_config(args.config, args.cfg_options) if args.config else None
        state = load_checkpoint(args.checkpoint)
        cfg = cfg or config_for_checkpoint(state, None, args.checkpoint, args.cfg_options)
        model = load_inference_model(cfg, state, args.checkpoint, use_ema)
        if args.format == "weights":
            weights_path, config_path = publish_weights(args.checkpoint, cfg, out, use_ema,
                                                        state=state)
            print(f"weights: {weights_path}\nconfig:  {config_path}")
            return 0
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    settings = None
    if args.score_thr is not None:
        settings = dataclasses.replace(model.test_settings, score_thr=args.score_thr)
    shape = tuple(args.shape) if args.shape else None
    if shape is None and args.format == "onnx" and not args.dynamic:
        divisor = cfg.data.size_divisor
        shape = (math.ceil(cfg.data.test_short_side / divisor) * divisor,
                 math.ceil(cfg.data.max_size / divisor) * divisor)
    if shape is not None and any(s % 32 for s in shape):
        print(f"error: --shape {shape[0]} {shape[1]}: both sides must be multiples of 32",
              file=sys.stderr)
        return 2
    try:
        images, origin, unreadable = verification_images(cfg, args.verify_images, args.num_verify)
    except FileNotFoundError as err:
        print(f"error: --verify-images: {err}", file=sys.stderr)
        return 2
    skipped = "; ".join(unreadable[:10]) + (" ..." if len(unreadable) > 10 else "")
    if not images:
        print(f"error: no image to verify on: none of the {len(unreadable)} file(s) of {origin} "
              f"could be read: {skipped}", file=sys.stderr)
        return 2
    if unreadable:
        print(f"warning: skipped {len(unreadable)} file(s) of {origin} that could not be read: "
              f"{skipped}", file=sys.stderr)
    transform = build_transforms(train=False, short_side=cfg.data.test_short_side,
                                 max_size=cfg.data.max_size)
    inputs = verification_inputs(images, transform, cfg.data.size_divisor, shape)
    example = feeds_from_batch(*inputs[0])

    # Written under a temporary name, and moved to `out` only once verified: a deploy script
    # that checks for the file must never find an unverified one there.
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    unverified = out.with_name(out.name + ".unverified")
    try:
        if args.format == "onnx":
            export_onnx(model, staging, example, args.nms, args.dynamic, settings, args.opset)
            runner = onnx_runner(staging)
        else:
            export_torchscript(model, staging, example, args.nms, settings)
            runner = torchscript_runner(staging)
        report = verify(runner, model, inputs, args.nms, settings, args.rtol,
                        f"{args.format} export {out}")
        staging.replace(out)
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExportVerificationError as err:
        staging.replace(unverified)
        print(f"error: {err}\nThe export is kept as {unverified} for inspection; {out} was "
              f"{'left as it was' if out.exists() else 'not written'}.", file=sys.stderr)
        return 1
    finally:
        staging.unlink(missing_ok=True)
    print(f"wrote {out} (input {'dynamic' if args.dynamic else list(example['images'].shape)}"
          f"{', with NMS' if args.nms else ''})")
    sizes = ", ".join("+".join("x".join(map(str, t["image_size"])) for t in targets)
                      for _, targets in inputs)
    print(f"verified against PyTorch evaluation (GFL.forward) on {len(inputs)} input(s) (resized "
          f"sizes {sizes}) from {origin}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
