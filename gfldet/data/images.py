"""Image files: decode any PIL mode to RGB uint8 with EXIF orientation, under a per-file size
limit, and the errors a dataset reports. A leaf module: nothing else in gfldet is imported.

Shape legend: H, W = image height/width in pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Largest image (width * height) gfldet decodes, checked from the header so that the error names
# the file and the knob. It replaces PIL's process-global guard (which warns above ~89 MP and
# refuses, naming no file, above this default, PIL's own threshold). ~540 MB decoded as RGB.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
Image.MAX_IMAGE_PIXELS = None  # enforced per file by `open_image` instead


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the files/ids and what to do."""


class ImageTooLargeError(DatasetError):
    """An image has more pixels than the configured ``max_image_pixels``."""


def open_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """``Image.open`` (lazy: header only) plus gfldet's size limit. Use as a context manager.

    Raises FileNotFoundError, PIL.UnidentifiedImageError (an OSError) for non-images, and
    ImageTooLargeError above ``max_pixels`` (None = no limit).
    """
    img = Image.open(path)
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (max_image_pixels). If the image is genuine, raise max_image_pixels "
            "(CocoDetection(max_image_pixels=...), tools/check_dataset.py --max-image-pixels); "
            "otherwise downscale it and its boxes, or tile it"
        )
    return img


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(w, h) of the image after ``exif_transpose`` given its stored (w, h) and EXIF orientation
    (5..8 transpose, swapping w and h; 2..4 only flip or rotate by 180 degrees)."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def load_image_rgb(path: str | Path, *, apply_exif: bool = True,
                   max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to RGB uint8 [H, W, 3], EXIF orientation applied unless
    ``apply_exif=False`` (images whose boxes were drawn on the stored pixels; the check finds them).

    Every PIL mode is mapped to 8-bit RGB; alpha is dropped (like cv2.IMREAD_COLOR, which
    MMDetection uses). Truncated files raise (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False).
    """
    with open_image(path, max_pixels) as img:
        if apply_exif:
            img = ImageOps.exif_transpose(img)  # annotations refer to the upright image
        else:
            img.load()
        return pil_to_rgb_array(img)


def pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert any PIL image mode to an RGB uint8 array [H, W, 3]."""
    if img.mode.startswith(("I", "F")):
        # High-bit-depth single channel: PIL's convert("RGB") would clip at 255 instead of
        # rescaling, turning most of a 16-bit image white.
        arr = np.asarray(img).astype(np.float64)
        peak = arr.max() if arr.size else 0.0
        if img.mode.startswith("I;16"):
            full_scale = 65535.0  # genuine 16-bit data: scale the full range
        elif img.mode == "F" and peak <= 1.0:
            full_scale = 1.0  # float images in [0, 1]
        else:
            # Mode "I" (32-bit) / "F": the bit depth is not recorded, so infer it. Values that
            # fit in 8 bits are taken as-is; anything larger is assumed to be 16-bit data.
            full_scale = 255.0 if peak <= 255.0 else 65535.0
        gray = np.rint(np.clip(arr, 0.0, full_scale) * (255.0 / full_scale)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("P", "PA"):
        # Going through RGBA avoids PIL's "palette with transparency" warning; the alpha
        # channel is then dropped like every other alpha channel.
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
