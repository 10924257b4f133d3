"""Run a trained detector on images: `Detector.from_checkpoint(path)(image)`, and draw the result.

A `Detector` does the test-time pipeline of evaluation (gfldet.data's keep-ratio resize,
ImageNet normalisation, zero padding to a multiple of 32) and returns detections in the pixels
of the image it was given.

Shape legend: `N` detections of one image, `H`, `W` the image's own size.
Per image, `Detector` returns a dict:
    boxes        float32 [N, 4]  xyxy, original image pixels
    scores       float32 [N]     joint class-quality score, descending
    labels       int64   [N]     class index in [0, C)
    class_names  list[str] of N  name of each detection's class
"""

from __future__ import annotations

import colorsys
import copy
import glob
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

from gfldet.config import Config, ConfigError, config_from_dict, config_to_dict, load_config
from gfldet.data import build_transforms, collate, load_image_rgb, normalize_batch, pil_to_rgb_array
from gfldet.engine.build import build_model, dataset_paths
from gfldet.engine.checkpoint import (
    CheckpointError,
    foreign_model_advice,
    is_torch_file,
    load_checkpoint,
    load_model_weights,
)
from gfldet.models.detector import GFL

ImageInput = str | Path | Image.Image | np.ndarray


# --------------------------------------------------------------------------- checkpoints


def model_weights(state: Mapping[str, Any], use_ema: bool = True,
                  source: str = "checkpoint") -> dict[str, Tensor]:
    """The model state dict inside any gfldet checkpoint.

    Training checkpoints hold `model` and `ema` (a `torch.optim.swa_utils.AveragedModel` state
    dict: "module." + model keys, plus "n_averaged"); the EMA weights are the ones evaluated,
    so they win when present and `use_ema`. Exported and converted files hold `model` only; a
    bare state dict (tensors only) is accepted as is.
    """
    if use_ema and state.get("ema") is not None:
        return {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    if "model" in state:
        return dict(state["model"])
    if "state_dict" in state:
        return dict(state["state_dict"])
    if state and all(isinstance(v, Tensor) for v in state.values()):
        return dict(state)
    raise CheckpointError(
        f"{source} holds no model weights (no 'model', 'ema' or 'state_dict' entry; keys: "
        f"{sorted(state)[:10]}). Pass a checkpoint written by tools/train.py, tools/export.py "
        "or tools/convert_mmdet.py."
    )


def config_for_checkpoint(state: Mapping[str, Any], config: Config | str | Path | None, source: str,
                          overrides: Sequence[str] = ()) -> Config:
    """`config` if given (a Config, checked as train() checks it, or a YAML path), else the config
    stored in the checkpoint; `overrides` (``a.b=c``, as --cfg-options) are merged onto it."""
    refuse_mmdet_checkpoint(state, source)
    if isinstance(config, Config):
        return config_from_dict(config_to_dict(config.validate()), PYTHON_CONFIG, overrides)
    if config is not None and not isinstance(config, str | Path):
        raise ConfigError(f"config= takes a YAML path, a Config or None, got "
                          f"{type(config).__name__}" + (": for a dict, pass "
                          "gfldet.config.config_from_dict(it)" if isinstance(config, dict) else ""))
    if config is not None and _is_checkpoint(str(config)):  # as the tools: never read as YAML
        raise ConfigError(f"{config} is a checkpoint, not a YAML config: the checkpoint goes "
                          "first, config= a YAML path or a Config (None: the one it stores)")
    if config is not None:
        return load_config(config, overrides)
    if not isinstance(state.get("config"), dict):
        raise ConfigError(
            f"{source} stores no config; pass the YAML config it was trained with "
            "(tools: before the checkpoint; Python: config='configs/....yaml')"
        )
    return config_from_dict(state["config"], f"{source} (stored config)", overrides)


def refuse_mmdet_checkpoint(state: Mapping[str, Any], source: str | Path) -> None:
    """A CheckpointError saying to convert an unconverted MMDetection checkpoint (head keys
    `bbox_head.*`, gfldet's `head.*`, under `state_dict` or bare): its keys and missing config
    would otherwise get advice about configs that cannot help. Here, not in convert_mmdet.py,
    which imports this module."""
    weights = state.get("state_dict", state) if "model" not in state else {}
    if any(isinstance(k, str) and k.removeprefix("module.").startswith("bbox_head.")
           for k in weights):
        raise CheckpointError(f"{source} is an MMDetection checkpoint: convert it first: "
                              f"python tools/convert_mmdet.py {source} OUT.pth")


PYTHON_CONFIG = "the Config passed as config="  # where its problems come from, in messages
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
CONFIG_SUFFIXES = (".yaml", ".yml")


def _is_checkpoint(arg: str, by_content: bool = True) -> bool:
    """A checkpoint by its suffix or, `by_content`, by its first bytes (a torch.save file named
    otherwise; off for INPUTs, where a zip of images would begin as one does)."""
    path = Path(arg)
    return path.suffix.lower() in CHECKPOINT_SUFFIXES or (
        by_content and path.is_file() and is_torch_file(path))


def split_config_argument(positionals: Sequence[str], names: Sequence[str],
                          repeat_last: bool = False) -> tuple[str | None, list[str]]:
    """A tool's positional arguments `[CONFIG] NAMES...`: the config is optional (the checkpoint
    stores one), so one extra leading argument is the config. `repeat_last`: the last name takes
    one or more arguments (predict's INPUT...), and the config is the first argument when it is
    a .yaml/.yml or is followed by a checkpoint. Returns (config or None, the rest).

    Raises ValueError with the usage when the count is wrong, or when a checkpoint stands where
    the config goes (never read as YAML), or, with `repeat_last`, a checkpoint or config among
    the last name's arguments."""
    args, count = list(positionals), len(names)
    usage = " ".join(["[CONFIG]", *names]) + (f" [{names[-1]} ...]" if repeat_last else "")
    shown = " ".join(args[:6]) + (f" ... ({len(args) - 6} more)" if len(args) > 6 else "")
    got = f"got {len(args)} argument(s): {shown or '(none)'}"
    first = args[0] if args else ""
    is_yaml = Path(first).suffix.lower() in CONFIG_SUFFIXES
    if repeat_last:
        followed = len(args) > count and not _is_checkpoint(first) and _is_checkpoint(args[1])
    else:
        followed = len(args) == count + 1
    has_config = is_yaml or followed
    config, rest = (first, args[1:]) if has_config else (None, args)
    if config is not None and _is_checkpoint(config):
        order = ("; the config goes first" if any(Path(a).suffix.lower() in CONFIG_SUFFIXES
                                                  for a in rest) else "")
        raise ValueError(f"{config} is a checkpoint, not a YAML config: expected {usage}, with "
                         f"one checkpoint{order}; {got}")
    if len(rest) < count and is_yaml:
        raise ValueError(f"{first} is a YAML config, so expected "
                         f"{' '.join(['CONFIG', *names])}; got only {len(args)} argument(s)")
    if len(rest) < count or (len(rest) > count and not repeat_last):
        raise ValueError(f"expected {usage}, {got}")
    for arg in rest[count - 1:] if repeat_last else ():
        if _is_checkpoint(arg, by_content=False):
            raise ValueError(f"{arg} is a checkpoint, given as an {names[-1]}: expected {usage}, "
                             f"with one checkpoint; {got}")
        if Path(arg).suffix.lower() in CONFIG_SUFFIXES:
            raise ValueError(f"{arg} is a YAML config, given as an {names[-1]}: expected {usage}, "
                             f"the config first; {got}")
    return config, rest


def default_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when CUDA is available, else "cpu"; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`default_device` as a torch.device; CUDA that is not available here (or a cuda:N beyond
    its devices) is a ValueError naming it, as the tools' --device check, rather than torch's
    driver error at the first tensor moved."""
    try:
        dev = torch.device(default_device(device) if isinstance(device, str) else device)
    except (RuntimeError, TypeError):  # torch's list of a dozen backends gfldet does not run on
        raise ValueError(f"device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto' "
                         "(CUDA when available), lower case") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: CUDA is not available here; "
                             "use device='cpu' (or 'auto': CUDA when available)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return dev


def build_inference_model(cfg: Config) -> GFL:
    """`build_model` without fetching ImageNet backbone weights (the checkpoint replaces them)."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.weights = None
    return build_model(model_cfg, size_divisor=cfg.data.size_divisor).eval()


def load_inference_model(cfg: Config, state: Mapping[str, Any], source: str | Path,
                         use_ema: bool = True) -> GFL:
    """`build_inference_model(cfg)` with the weights of checkpoint `state` (`model_weights`);
    every weight must fit, else a CheckpointError naming `source`."""
    refuse_mmdet_checkpoint(state, source)
    model = build_inference_model(cfg)
    # Partly loaded weights are no detector: the config, not the weights, is what to change.
    advice = (f"The config does not describe the model of {source} (its num_classes, reg_max, "
              "depth or channels differ): drop the override that changes the model "
              "(--cfg-options, overrides=), or use the checkpoint's own config (no CONFIG "
              "argument, config=None).")
    load_model_weights(model, model_weights(state, use_ema, str(source)), strict=True,
                       source=source, advice=foreign_model_advice(state, source) or advice)
    return model


def class_names_for(cfg: Config, state: Mapping[str, Any] | None = None) -> list[str]:
    """Class names, first found of: the checkpoint's `meta.class_names`, the categories of the
    config's val (then train) annotation file (the synthetic dataset's, if it is generated);
    else "class_0", "class_1", ... Names are in label order (sorted category id, as
    CocoDetection)."""
    num_classes = cfg.model.num_classes
    meta = (state or {}).get("meta") or {}
    names = meta.get("class_names") if isinstance(meta, dict) else None
    for split in ("val", "train"):
        if names is None:
            names = _category_names(dataset_paths(cfg.data, split, generate=False).annotations)
    if names is None or len(names) != num_classes:
        return [f"class_{i}" for i in range(num_classes)]
    return [str(n) for n in names]


def _category_names(ann_file: Path) -> list[str] | None:
    """The category names of a COCO annotation file in id order, or None if it has none."""
    if not ann_file.is_file():
        return None
    try:
        categories = json.loads(ann_file.read_text()).get("categories", [])
    except (OSError, ValueError, AttributeError):
        return None
    return [str(c["name"]) for c in sorted(categories, key=lambda c: int(c["id"]))] or None


# --------------------------------------------------------------------------- images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(source: str | Path) -> list[Path]:
    """An image file, a folder (its images, not recursive) or a glob pattern -> image paths,
    sorted."""
    path = Path(source)
    if path.is_file():
        return [path]
    is_dir = path.is_dir()
    candidates = path.iterdir() if is_dir else map(Path, glob.glob(str(source), recursive=True))
    found = sorted(p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if found:
        return found
    if is_dir:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
    raise FileNotFoundError(f"{source}: not an image file, a folder, or a glob matching images")


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """A path, PIL image or [H, W, 3] uint8 RGB array -> uint8 [H, W, 3] RGB array; a
    ValueError saying what to change for any other array, and for an image without pixels."""
    if isinstance(image, str | Path):
        path = Path(image)
        if path.is_dir() or (not path.exists() and glob.has_magic(str(image))):
            raise ValueError(f"{image} is a {'folder' if path.is_dir() else 'glob'}: Detector "
                             "takes image files, arrays or PIL images (list_images(source) lists "
                             "a folder's or glob's; tools/predict.py takes both)")
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        array, what = load_image_rgb(path), f"image {path}"
    elif isinstance(image, Image.Image):
        # As for a path: pixels upright by the EXIF orientation (a no-op without the tag).
        array, what = pil_to_rgb_array(ImageOps.exif_transpose(image)), "the PIL image"
    elif isinstance(image, np.ndarray):
        if image.size and (hints := _array_hints(image)):
            raise ValueError(f"a numpy image must be uint8 [H, W, 3] RGB, got {image.dtype} "
                             f"{list(image.shape)}: {'; '.join(hints)}")
        # A read-only array (np.asarray of a PIL image, a memory map) would reach torch un-copied
        # when no resize is needed; torch warns about non-writable tensors.
        array = np.ascontiguousarray(image) if image.flags.writeable else image.copy()
        what = "the numpy image"
    else:
        raise TypeError(
            "expected an image path, a PIL image or a uint8 [H, W, 3] numpy array, "
            f"got {type(image).__name__}"
        )
    if array.size == 0:  # the resize would divide by its zero side
        raise ValueError(f"{what} is empty: shape {list(array.shape)} has no pixels")
    return array


def _array_hints(image: np.ndarray) -> list[str]:
    """What to change in a non-empty array to make it uint8 [H, W, 3] RGB (none: it is one)."""
    hints, shape = [], image.shape
    channels = shape[2] if image.ndim == 3 else 1 if image.ndim == 2 else 3
    if image.ndim == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4):
        hints.append("channels first [C, H, W]: transpose it to [H, W, C] with "
                     "image.transpose(1, 2, 0)")
        channels = shape[0]
    elif image.ndim == 4:
        hints.append("a batch [B, H, W, C]: pass a list of images, list(batch)")
    elif image.ndim not in (2, 3):
        hints.append(f"{image.ndim} dimensions: an image has [H, W, 3]")
    if channels == 1:
        hints.append("grayscale: stack it to 3 channels with np.stack([image] * 3, axis=-1), or "
                     "pass a PIL image (Image.fromarray)" if image.ndim == 2 else
                     "one channel: repeat it to 3 with np.repeat(image, 3, axis=-1)")
    elif channels == 4:
        hints.append("4 channels (RGBA): drop the alpha channel with image[..., :3]")
    elif channels != 3:
        hints.append(f"{channels} channels: an RGB image has 3")
    if image.dtype != np.uint8:
        kind = image.dtype.kind
        peak = float(np.nanmax(image)) if kind in "fiu" else None
        if kind == "f" and peak <= 1.0:
            hints.append("floats in 0..1: scale to 0..255 and cast to uint8, "
                         "(image * 255).round().astype(np.uint8)")
        elif peak is not None and peak <= 255:
            rounded = "image.round()" if kind == "f" else "image"
            hints.append(f"{image.dtype} values in 0..255: cast them to uint8, "
                         f"{rounded}.astype(np.uint8)")
        elif peak is not None:
            hints.append(f"values up to {peak:g}: scale them to 0..255 (16-bit: image / 257) "
                         "and cast to uint8")
        else:
            hints.append(f"{image.dtype}: convert it to uint8 values 0..255")
    return hints


# --------------------------------------------------------------------------- detector


def prepare_batch(images: Sequence[np.ndarray], transform: Any, size_divisor: int,
                  device: str | torch.device = "cpu") -> tuple[Tensor, list[dict[str, Any]]]:
    """uint8 RGB arrays -> (normalised batch [B, 3, H', W'] on `device`, zero-padded to
    `size_divisor`, and one target per image with `image_size` (resized, unpadded) and
    `orig_size`), exactly as the val loader and the evaluator batch them. `transform` is
    `gfldet.data.build_transforms(train=False, ...)`."""
    no_boxes, no_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    samples = []
    for image in images:
        tensor = torch.as_tensor(transform(image=image, bboxes=no_boxes, labels=no_labels)["image"])
        target = {"image_size": tuple(tensor.shape[1:]), "orig_size": image.shape[:2]}
        samples.append((tensor.contiguous(), target))
    batch, targets = collate(samples, size_divisor)
    return normalize_batch(batch.to(device), [t["image_size"] for t in targets]), targets


class Detector:
    """A GFL model with its test-time preprocessing; call it on one image or a list of images.

    Args:
        model: the detector (put in eval mode and moved to `device`).
        short_side, max_size: the test-time resize (config `data.*`); images are padded to a
            multiple of the model's own `size_divisor`, as in evaluation.
        class_names: one name per class; defaults to "class_<i>".
        batch_size: images per forward pass. 1 reproduces evaluation exactly; larger batches pad
            images to a common size, which changes features near the padding slightly.
    """

    def __init__(self, model: GFL, short_side: int, max_size: int,
                 class_names: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 1) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        num_classes = model.num_classes
        self.class_names = list(class_names or [f"class_{i}" for i in range(num_classes)])
        if len(self.class_names) != num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for a model of {num_classes} classes"
            )
        self.batch_size = max(1, int(batch_size))
        self.transform = build_transforms(train=False, short_side=short_side, max_size=max_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: Config | str | Path | None = None,
                        device: str | torch.device = "cpu", score_thr: float | None = None,
                        use_ema: bool = True, batch_size: int = 1,
                        overrides: Sequence[str] = ()) -> Detector:
        """Load any gfldet checkpoint (training, exported weights, converted MMDetection).

        config: a Config or YAML path; by default the config stored in the checkpoint.
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available); CUDA that is not
            available here is a ValueError.
        score_thr: keep detections scoring above this, in 0..1 (default: the config's
            model.test.score_thr).
        overrides: ``a.b=c`` items merged onto the YAML or stored config (as --cfg-options).
        """
        device = resolve_device(device)  # before the checkpoint is read
        if isinstance(score_thr, bool):  # float(True) would be 1.0
            raise ValueError(f"score_thr={score_thr}: expected a number in 0..1")
        if score_thr is not None and not 0.0 <= float(score_thr) <= 1.0:  # also NaN
            raise ValueError(f"score_thr={score_thr} is outside 0..1, the range of the scores "
                             "(a percentage p is p / 100)")
        state = load_checkpoint(path)
        cfg = config_for_checkpoint(state, config, str(path), overrides)
        model = load_inference_model(cfg, state, path, use_ema)
        if score_thr is not None:  # the model's own copy of model.test
            model.test_settings.score_thr = float(score_thr)
        return cls(
            model, cfg.data.test_short_side, cfg.data.max_size, class_names_for(cfg, state),
            device, batch_size,
        )

    @property
    def score_thr(self) -> float:
        return self.model.test_settings.score_thr

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[Tensor, list[dict[str, Any]]]:
        """RGB arrays -> a normalised, padded batch [B, 3, H', W'] on the detector's device and
        targets with image_size / orig_size."""
        # The model's divisor: it also decides which priors lie inside each padded image.
        return prepare_batch(images, self.transform, self.model.size_divisor, self.device)

    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput]) -> list[dict[str, Any]]:
        """Detections of each image (see the module docstring for the dict)."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), self.batch_size):
            arrays = [to_rgb_array(im) for im in images[start : start + self.batch_size]]
            batch, targets = self.preprocess(arrays)
            for det in self.model(batch, targets):
                labels = det["labels"].cpu().numpy().astype(np.int64)
                results.append({
                    "boxes": det["boxes"].float().cpu().numpy(),
                    "scores": det["scores"].float().cpu().numpy(),
                    "labels": labels,
                    "class_names": [self.class_names[int(i)] for i in labels],
                })
        return results

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> dict | list[dict]:
        """One image -> one dict; a list or tuple of images -> a list of dicts.

        A numpy image is uint8 [H, W, 3] in RGB order. BGR (cv2.imread) cannot be told apart
        and would be read as RGB: convert it first with image[..., ::-1]."""
        if isinstance(images, list | tuple):
            return self.predict(images)
        return self.predict([images])[0]


# --------------------------------------------------------------------------- output


def detections_to_json(det: Mapping[str, Any], decimals: int = 2) -> list[dict[str, Any]]:
    """One image's detections as JSON-able dicts: box [x1, y1, x2, y2] pixels, score, label,
    class_name."""
    fields = zip(det["boxes"], det["scores"], det["labels"], det["class_names"], strict=True)
    return [{"box": [round(float(v), decimals) for v in box], "score": round(float(score), 4),
             "label": int(label), "class_name": name} for box, score, label, name in fields]


def draw_detections(
    image: ImageInput, det: Mapping[str, Any], class_names: Sequence[str] | None = None
) -> Image.Image:
    """A copy of `image` with each detection's box and "name score" label drawn (PIL only).

    class_names: names by label; by default the detection dict's own `class_names`.
    """
    if not isinstance(det, Mapping):  # e.g. the list that detector([a, b]) returns
        raise TypeError(f"det must be one image's detections (a dict), got {type(det).__name__}: "
                        "for dets = detector([a, b]), draw_detections(a, dets[0]) and so on")
    canvas = Image.fromarray(to_rgb_array(image))
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    width = max(1, round(side / 250))
    try:
        font = ImageFont.load_default(size=max(10, round(side / 45)))  # scalable with FreeType
    except (TypeError, OSError):
        font = ImageFont.load_default()
    boxes, scores, labels = np.asarray(det["boxes"]).reshape(-1, 4), det["scores"], det["labels"]
    names = det.get("class_names") if class_names is None else [class_names[int(i)] for i in labels]
    # Weakest first, so the strongest detections' labels end up on top.
    for i in np.argsort(np.asarray(scores), kind="stable"):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        # A distinct, saturated colour per class: hues spaced by the golden angle.
        hue = (int(labels[i]) * 0.618034) % 1.0
        colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        name = names[i] if names is not None else str(int(labels[i]))
        text = f"{name} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        # Above the box when there is room, else just inside its top edge.
        ty = y1 - text_h - 2 * width if y1 - text_h - 2 * width >= 0 else y1
        tx = min(max(x1, 0), max(canvas.width - text_w - 2 * width, 0))
        draw.rectangle([tx, ty, tx + text_w + 2 * width, ty + text_h + 2 * width], fill=colour)
        draw.text((tx + width - left, ty + width - top), text, fill=(0, 0, 0), font=font)
    return canvas

