"""Encoded image bytes <-> pixel arrays, with one explicit policy for sizes and channels.

Policy (also in the README):
- an image whose size differs from the model's input is resized to it with Lanczos (as the
  official CIFAR-10 preparation does);
- grayscale modes ("1", "L", "LA") give one channel, colour modes ("RGB", "RGBA", "P") three;
  alpha is dropped; an image whose channel count differs from the model's is an error, never
  silently converted (an RGB photo scored by a grayscale model is a mistake worth reporting);
- bytes Pillow cannot decode are an error.
Errors are returned per image, so callers can skip (training) or flag (scoring) the row.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

_GRAY = {"1": "L", "L": "L", "LA": "L"}
_COLOR = {"RGB": "RGB", "RGBA": "RGB", "P": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}


class ImageError(ValueError):
    """One image could not be turned into pixels; the message says why."""


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H,W] or [H,W,3] -> PNG bytes (deterministic: same pixels, same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_image(data: bytes | None, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Encoded bytes -> uint8 [H,W,C] at the given (height, width); raises ImageError."""
    if data is None or len(data) == 0:
        raise ImageError("empty image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"undecodable image ({e.__class__.__name__}: {e})") from None
    if img.mode in _GRAY:
        img, found = img.convert(_GRAY[img.mode]), 1
    elif img.mode in _COLOR:
        img, found = img.convert(_COLOR[img.mode]), 3
    else:
        raise ImageError(f"unsupported image mode {img.mode!r}")
    if found != channels:
        raise ImageError(f"image has {found} channel(s), the model takes {channels}")
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def decode_images(
    blobs: list[bytes | None], channels: int, size: tuple[int, int]
) -> tuple[np.ndarray, list[str | None]]:
    """Many images -> (uint8 [N,H,W,C], per-image error or None). Failed rows are left black."""
    out = np.zeros((len(blobs), *size, channels), dtype=np.uint8)
    errors: list[str | None] = [None] * len(blobs)
    for i, data in enumerate(blobs):
        try:
            out[i] = decode_image(data, channels, size)
        except ImageError as e:
            errors[i] = str(e)
    return out, errors


def channels_of(data: bytes) -> int:
    """1 for a grayscale image, 3 for a colour one (what a model for this data should take)."""
    try:
        mode = Image.open(io.BytesIO(data)).mode
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"undecodable image ({e.__class__.__name__}: {e})") from None
    if mode in _GRAY:
        return 1
    if mode in _COLOR:
        return 3
    raise ImageError(f"unsupported image mode {mode!r}")
