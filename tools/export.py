"""Export a trained GFL detector for deployment, and check the export against PyTorch.

    python tools/export.py CHECKPOINT --format weights      # inference-only .pth
    python tools/export.py CHECKPOINT --format onnx [--nms] [--dynamic] [--shape H W]
    python tools/export.py CHECKPOINT --format torchscript [--nms]
    python tools/export.py CONFIG CHECKPOINT --format ...   # a YAML config, not the checkpoint's

The checkpoint's stored config is used unless a YAML CONFIG is given before it; --cfg-options
apply to either. Export runs on the CPU (graphs traced there run anywhere).

weights: drops optimizer/scheduler/RNG state (EMA weights become the model when the run kept
an EMA), writes NAME-<sha256[:8]>.pth and the config as NAME-<sha256[:8]>.yaml beside it.

onnx / torchscript: the graph takes normalised, padded images [B, 3, H, W] with each image's
resized size image_sizes [B, 2] and original size orig_sizes [B, 2] (gfldet.export.graph_inputs
prepares them) and returns every prior's boxes [B, A, 4] (original pixels) and scores [B, A, C],
0 outside each image; with --nms, evaluation's detections padded to boxes [B, K, 4],
scores [B, K], labels [B, K] and num_dets [B]. Without --dynamic the ONNX graph has the fixed
shape --shape (images are letterboxed into it). The export is run on real images
(--verify-images, default the config's val images), each alone and two of different sizes in one
batch, and compared with evaluation (GFL.forward, as tools/eval.py runs it); it fails (exit 1)
when the largest difference exceeds --rtol (scores) or --rtol x image side (boxes, pixels), or a
detection is found on one side only. ONNX needs the optional extra: pip install -e ".[export]".
An existing onnx/torchscript output file is not replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

from gfldet.config import Config, ConfigError, load_config
from gfldet.data import build_transforms
from gfldet.data.synthetic import SynthParams, render_image
from gfldet.engine.checkpoint import CheckpointError, load_checkpoint
from gfldet.export import (
    DEFAULT_OPSET,
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT",
                        help="checkpoint written by tools/train.py (or an exported .pth), "
                             "optionally preceded by a YAML config to use instead of its own")
    parser.add_argument("--format", required=True, choices=("weights", "onnx", "torchscript"))
    parser.add_argument("--out",
                        help="output file (default: beside the checkpoint, named after the config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing onnx/torchscript output file")
    parser.add_argument("--no-ema", action="store_true",
                        help="export the raw weights even if EMA weights exist")
    parser.add_argument("--nms", action="store_true",
                        help="onnx/torchscript: include post-processing and NMS")
    parser.add_argument("--dynamic", action="store_true",
                        help="onnx: free batch, height and width axes")
    parser.add_argument("--shape", nargs=2, type=int, metavar=("H", "W"),
                        help="fixed input shape, multiples of 32 (default: the largest landscape "
                             "test input, data.test_short_side x data.max_size rounded up to 32)")
    parser.add_argument("--verify-images",
                        help="image file, folder or glob to verify on (default: config's val "
                             "images)")
    parser.add_argument("--num-verify", type=int, default=4, help="images to verify on")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="tolerance: scores absolute, boxes relative to the largest original "
                             "image side")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--score-thr", type=float,
                        help="--nms: score threshold baked into the graph "
                             "(default: model.test.score_thr)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        args.config, (args.checkpoint,) = split_config_argument(args.paths, ["CHECKPOINT"])
    except ValueError as err:
        parser.error(str(err))
    if args.shape is not None and any(s % 32 for s in args.shape):
        parser.error(f"--shape {args.shape[0]} {args.shape[1]}: both sides must be multiples of 32")
    return args


def default_output(args: argparse.Namespace) -> Path:
    """Beside the checkpoint, named after the config (or the run folder for a run's config.yaml)."""
    folder = Path(args.checkpoint).resolve().parent
    name = Path(args.config).stem if args.config else "config"
    base = folder / (folder.name if name == "config" else name)
    if args.format == "weights":
        return base.with_suffix(".pth")
    dynamic = args.dynamic and args.format == "onnx"
    tags = ("_nms" if args.nms else "") + ("_dynamic" if dynamic else "")
    suffix = ".onnx" if args.format == "onnx" else ".torchscript.pt"
    return base.with_name(base.name + tags + suffix)


def verification_images(cfg: Config, source: str | None,
                        count: int) -> tuple[list[np.ndarray], str]:
    """RGB images to verify on, and where they came from."""
    if source is not None:
        paths = list_images(source)[:count]
        return [to_rgb_array(p) for p in paths], source
    folders = [Path(cfg.data.synthetic.root) / "val"] if cfg.data.synthetic is not None else []
    folders.append(Path(cfg.data.val.images))
    for folder in folders:
        if folder.is_dir():
            try:
                paths = list_images(folder)[:count]
            except FileNotFoundError:
                continue
            return [to_rgb_array(p) for p in paths], str(folder)
    # No dataset on this machine: synthetic scenes (shapes on textured backgrounds), as the
    # bundled dataset renders them, at a few sizes and aspect ratios.
    sizes = [(320, 416), (416, 320), (288, 288), (352, 480)]
    images = [render_image(np.random.default_rng(i), *sizes[i % len(sizes)], SynthParams())[0]
              for i in range(count)]
    return images, "generated synthetic scenes (no val images found)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else default_output(args)
    if args.format != "weights" and out.exists() and not args.overwrite:  # weights: hash-named
        print(f"error: {out} exists; pass --overwrite to replace it, or --out another file",
              file=sys.stderr)
        return 2
    use_ema = not args.no_ema
    try:
        # The config before the checkpoint; weights that do not fit: an error naming the file.
        cfg = load_config(args.config, args.cfg_options) if args.config else None
        state = load_checkpoint(args.checkpoint)
        cfg = cfg or config_for_checkpoint(state, None, args.checkpoint, args.cfg_options)
        model = load_inference_model(cfg, state, args.checkpoint, use_ema)
        if args.format == "weights":
            weights_path, config_path = publish_weights(args.checkpoint, cfg, out, use_ema)
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
        images, origin = verification_images(cfg, args.verify_images, args.num_verify)
    except FileNotFoundError as err:
        print(f"error: --verify-images: {err}", file=sys.stderr)
        return 2
    transform = build_transforms(train=False, short_side=cfg.data.test_short_side,
                                 max_size=cfg.data.max_size)
    inputs = verification_inputs(images, transform, cfg.data.size_divisor, shape)
    example = feeds_from_batch(*inputs[0])

    try:
        if args.format == "onnx":
            export_onnx(model, out, example, args.nms, args.dynamic, settings, args.opset)
            runner = onnx_runner(out)
        else:
            export_torchscript(model, out, example, args.nms, settings)
            runner = torchscript_runner(out)
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = f"{args.format} export {out}"
    dynamic = args.dynamic and args.format == "onnx"
    print(f"wrote {out} (input {'dynamic' if dynamic else list(example['images'].shape)}"
          f"{', with NMS' if args.nms else ''})")
    try:
        report = verify(runner, model, inputs, args.nms, settings, args.rtol, what)
    except ExportVerificationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sizes = ", ".join("+".join("x".join(map(str, t["image_size"])) for t in targets)
                      for _, targets in inputs)
    print(f"verified against PyTorch evaluation (GFL.forward) on {len(inputs)} input(s) (resized "
          f"sizes {sizes}) from {origin}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
