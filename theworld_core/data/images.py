"""Reading and normalising one image: every failure becomes a counted `SampleProblem`."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from theworld_core.data.types import SampleProblem

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited onto white (dropping alpha would expose arbitrary colours)."""


def read_image_bytes(load: Callable[[], bytes]) -> bytes:
    """Call a record's loader, turning I/O failures into `SampleProblem`s."""
    try:
        data = load()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
        raise SampleProblem("missing_file", type(error).__name__) from None
    except OSError as error:
        raise SampleProblem("unreadable_file", f"{type(error).__name__}: {error.strerror or error}") from None
    if not data:
        raise SampleProblem("empty_file")
    return data


def normalise_image(data: bytes) -> bytes:
    """Check that `data` decodes completely and return the bytes of an upright RGB image.

    Images that are already RGB and upright keep their original bytes (no re-encoding, no size
    change); anything else (grayscale, alpha, palette, 16-bit, CMYK, EXIF-rotated) is converted and
    stored as PNG, which is lossless.
    """
    image = _decode(data)
    rgb = _upright(image)
    rgb = to_rgb(rgb)
    if rgb is image:
        return data
    buffer = io.BytesIO()
    # Level 1: re-encoding happens once per preparation and speed matters more than a few bytes.
    rgb.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    """Open and fully decode (`load`) so truncated files fail here rather than during training."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise SampleProblem("not_an_image", f"{len(data)} bytes starting {data[:16]!r}") from None
    except Image.DecompressionBombError as error:
        raise SampleProblem("too_large", str(error)) from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL's plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        raise SampleProblem("corrupt_image", f"{type(error).__name__}: {error}") from None
    return image


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation: captions like 'on the left' refer to what a viewer sees."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the pixels
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; returns `image` itself when it already is RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode in _SIXTEEN_BIT_MODES:
            return _sixteen_bit_to_rgb(image)
        if mode == "F":
            return _float_to_rgb(image)
        if mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as error:  # e.g. a mode PIL can open but not convert
        raise SampleProblem("unsupported_mode", f"{mode}: {error}") from None


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale to 8 bits (PIL's own convert clips everything above 255 to white)."""
    values = np.asarray(image).astype(np.float64)
    # Mode "I" is 32-bit; it holds 8-bit data as often as 16-bit, so only rescale when needed.
    if image.mode != "I" or values.max(initial=0) > 255:
        values = np.clip(values, 0, 65535) / 257.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
    """Float images are taken as [0, 1] when they fit in it, else as [0, 255]."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
