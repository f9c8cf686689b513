"""One image reader for the tools: every mode Pillow can return, to uint8 RGB or BGR, or a
clear refusal.

detectron2's ``read_image`` converts with ``Image.convert("RGB")``, which clips: a 16-bit PNG
("I;16", "I") came out all white and a float TIFF ("F", values in [0, 1]) all black, and the
model predicted on that without a word. :func:`read_image` scales instead:

==============================  ================================================================
mode                            to 8 bits
==============================  ================================================================
``RGB``, ``L``                  as they are
``1`` (1-bit)                   0 / 255
``P``, ``PA`` (palette)         the palette's colours (transparency dropped)
``RGBA``, ``LA``, ``RGBX``,     the colour channels (alpha dropped, as detectron2 does);
``CMYK``, ``YCbCr``, ``LAB``,   other colour spaces converted by Pillow
``HSV``, ``La``, ``RGBa``
``I;16`` (and ``;16B/L/N``)     ``value / 257`` (0..65535 to 0..255)
``I`` (32-bit integer)          values in 0..255: as they are; in 0..65535: ``value / 257``;
                                anything else is refused (no known scale)
``F`` (32-bit float)            values in [0, 1]: ``x 255``; in [0, 255]: as they are; NaN,
                                infinite or other ranges are refused
==============================  ================================================================

Any other mode is refused. EXIF orientation is applied (as detectron2 does); of a multi-frame
file the first frame is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..cli import UserError

__all__ = ["ImageReadError", "read_image", "SUPPORTED_MODES", "GREY_SCALED_MODES"]

_AS_RGB = ("RGB", "L", "1", "P", "PA", "RGBA", "LA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
           "La", "RGBa")
# Modes detectron2's own loader (Image.convert) reads wrongly: they need scaling.
GREY_SCALED_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
SUPPORTED_MODES = _AS_RGB + GREY_SCALED_MODES


class ImageReadError(UserError):
    """An image file that cannot be read, or whose values have no known 8-bit scale."""


def _scaled_grey(array: np.ndarray, mode: str, path: str | os.PathLike) -> np.ndarray:
    """A high-bit-depth grey image as uint8 (see the module table)."""
    if mode.startswith("I;16"):
        return (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    if not np.isfinite(array).all():
        raise ImageReadError(f"{path}: the image (mode {mode}) has NaN or infinite values; "
                             "save it as an 8-bit RGB or grey image")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if mode == "F" and low >= 0 and high <= 1:
        return (array * 255.0).round().astype(np.uint8)
    if low >= 0 and high <= 255:
        return array.round().astype(np.uint8) if mode == "F" else array.astype(np.uint8)
    if mode == "I" and low >= 0 and high <= 65535:
        return (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    expected = "[0, 1] or [0, 255]" if mode == "F" else "0..255 or 0..65535"
    raise ImageReadError(f"{path}: the image (mode {mode}) has values in [{low:g}, {high:g}], "
                         f"not {expected}: no known scale to 8 bits. Save it as an 8-bit RGB "
                         "or grey image")


def read_image(path: str | os.PathLike, format: str = "BGR") -> np.ndarray:
    """``(H, W, 3)`` uint8 in ``format`` ("BGR", as detectron2's models take, or "RGB").

    Raises:
        ImageReadError: naming the file: missing, not an image, truncated, or a mode or value
            range without a known 8-bit scale.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if format not in ("BGR", "RGB"):
        raise ValueError(f"read_image: format must be 'BGR' or 'RGB', got {format!r}")
    if not Path(path).is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = ImageOps.exif_transpose(image) or image
            image.load()
            mode = image.mode
            if mode in GREY_SCALED_MODES:
                grey = _scaled_grey(np.asarray(image), mode, path)
                rgb = np.repeat(grey[:, :, None], 3, axis=2)
            elif mode in _AS_RGB:
                rgb = np.asarray(image.convert("RGB"))
            else:
                raise ImageReadError(f"{path}: image mode {mode!r} is not supported (supported: "
                                     f"{', '.join(SUPPORTED_MODES)}); save it as an 8-bit RGB "
                                     "image")
    except ImageReadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as error:
        raise ImageReadError(f"{path}: cannot read it as an image ({type(error).__name__}: "
                             f"{error})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:  # pragma: no cover - Pillow's convert guarantees it
        raise ImageReadError(f"{path}: unexpected image shape {rgb.shape}")
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1]) if format == "BGR" else rgb
