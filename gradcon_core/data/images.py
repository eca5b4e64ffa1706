"""Encoded image bytes <-> pixel arrays, with one documented policy for formats, sizes and channels.

Formats: whatever Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP, ...) plus gradcon's raw encoding (`encode_raw`);
the first frame of an animated or multi-page file is the image. Each format goes to the fastest decoder that
gives Pillow's pixels exactly (tests/test_images.py checks this on a corpus of odd files; benchmarks/decode_speed.py
measures the speed): PNG to libspng (pyspng), 8-bit greyscale and YCbCr JPEG to libjpeg-turbo through
torchvision, raw to no codec at all, everything else to Pillow, and any file a fast decoder fails on to Pillow.

Policy (also in docs/commands.md; one test each in tests/test_images.py):
1. Size: an image whose size differs from the model's input is resized to the model's (height, width) with
   Lanczos (as the official CIFAR-10 preparation does). The aspect ratio is not kept: a non-square image is
   stretched to the model's shape, never cropped.
2. Orientation: the EXIF orientation tag (JPEG, PNG eXIf, TIFF, WebP) is applied first, so a phone photo is
   scored upright, the way every viewer shows it (otherwise one product photographed in portrait and in
   landscape looks like two different objects).
3. Channels: greyscale images (bilevel, 8- and 16-bit grey, grey+alpha) give 1 channel; colour images (RGB,
   RGBA, CMYK, YCbCr) give 3. Alpha is dropped, not composited. CMYK is converted to RGB as Pillow does (no
   ICC profile).
4. Palette images (GIF, palette PNG/BMP/TIFF) are judged by their content: 1 channel if every pixel's colour
   is a grey (R = G = B), else 3. A grey palette image is also accepted by a 3-channel model, as R = G = B
   (exactly what it shows): a palette is a storage detail, and a colour GIF set must not lose its grey frames.
5. Otherwise an image whose channel count differs from the model's is an error, never silently converted (an
   RGB photo scored by a greyscale model is a mistake worth reporting).
6. 16-bit images (PNG, greyscale TIFF) are scaled to 8 bits by round(v / 257): 0 -> 0, 65535 -> 255, and an
   8-bit image stored as 16 bits (v * 257) comes back exactly. 32-bit integer and float images are an error:
   they have no agreed 8-bit scale.
7. Pixel limit: an image of more than `MAX_IMAGE_PIXELS` pixels (width x height, read from the file's header
   before anything is decoded) is an error, so a decompression bomb (a 20000x20000 PNG is 389 KB) costs
   nothing. The default, 2**26 (8192 x 8192), is far above any 64-512 px image set and still admits photos
   from 60-megapixel cameras. Change it by assigning `gradcon_core.data.images.MAX_IMAGE_PIXELS` or by setting the
   environment variable GRADCON_MAX_IMAGE_PIXELS (read at import, so set it where the workers run too, e.g.
   in the job's runtime environment). Pillow's own DecompressionBombWarning/Error never escape; a limit above
   2 x PIL.Image.MAX_IMAGE_PIXELS (179 Mpixel) also needs Pillow's raised for the formats Pillow decodes.
8. Bytes no decoder can read (empty, truncated, not an image) are an error.
Errors are per image (ImageError; a row's message in decode_images), so callers skip (training) or flag
(scoring) the row: no decoder's exception escapes decode_image, decode_images or channels_of as anything else.

Raw encoding (`encode_raw`), for image sets that are scored often: a 16-byte header, then the uint8 pixels in
(height, width, channels) order. Header: magic b"GCRW", version 1, channels (1 or 3), two zero bytes, height
and width as little-endian uint32. The shape lives in each image's bytes rather than in the parquet file's
metadata because Ray Data hands actors Arrow record batches without file metadata, rows of files of different
sizes can meet in one batch, and one image's bytes then decode on their own; it costs 16 bytes an image
(2% of a 28x28 one). Raw images follow the same size, channel and pixel-limit rules.
"""
from __future__ import annotations

import functools
import io
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pyspng
import torch
from PIL import Image

ENV_MAX_IMAGE_PIXELS = "GRADCON_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 2**26


class ImageError(ValueError):
    """One image could not be turned into pixels; the message says why."""


def pixel_limit_from_environment() -> int:
    """GRADCON_MAX_IMAGE_PIXELS as a positive integer (underscores allowed), else the default."""
    text = os.environ.get(ENV_MAX_IMAGE_PIXELS, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"{ENV_MAX_IMAGE_PIXELS} must be a positive whole number of pixels, got {text!r}")
    return limit


MAX_IMAGE_PIXELS: int = pixel_limit_from_environment()

RAW_MAGIC = b"GCRW"
_RAW_VERSION = 1
_RAW_HEADER = struct.Struct("<4sBBxxII")  # magic, version, channels, 2 zero bytes, height, width
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"  # EOI
_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-f]+>")  # an object's repr in a decoder's message
# Baseline, extended sequential and progressive Huffman JPEG: what torchvision decodes like Pillow does.
_FAST_JPEG_FRAMES = {0xC0, 0xC1, 0xC2}
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_EXIF_ORIENTATION = 0x0112
_GRAY_MODES = {"1", "L", "LA", "La"}
_COLOR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
_PALETTE_MODES = {"P", "PA"}
# One nvJPEG call decodes at most this many pixels (about 0.8 GB of RGB), so a batch of photos cannot exhaust
# GPU memory.
_DEVICE_BATCH_PIXELS = 2**28


@dataclass
class _Decoded:
    pixels: np.ndarray  # uint8 [H, W, C], C 1 or 3, before orientation
    palette: bool = False
    orientation: int = 1


@dataclass
class _JpegHeader:
    frame: int  # the SOF marker's second byte
    precision: int
    height: int
    width: int
    components: int
    orientation: int

    @property
    def fast(self) -> bool:
        return self.frame in _FAST_JPEG_FRAMES and self.precision == 8 and self.components in (1, 3)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H,W] or [H,W,3] -> PNG bytes (deterministic: same pixels, same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_raw(pixels: np.ndarray) -> bytes:
    """uint8 [H,W], [H,W,1] or [H,W,3] -> raw bytes (header + pixels; see the module docstring)."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"raw encoding stores uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or 0 in pixels.shape:
        raise ValueError(f"raw encoding takes [H,W], [H,W,1] or [H,W,3] pixels, got shape {pixels.shape}")
    height, width, channels = pixels.shape
    return _RAW_HEADER.pack(RAW_MAGIC, _RAW_VERSION, channels, height, width) + np.ascontiguousarray(pixels).tobytes()


def decode_image(data: bytes | None, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Encoded bytes -> uint8 [H,W,C] at the given (height, width), per the module's policy; raises ImageError."""
    return _conform(_decode(data), channels, size)


def decode_images(
    blobs: list[bytes | None], channels: int, size: tuple[int, int], device: str | torch.device | None = None
) -> tuple[np.ndarray, list[str | None]]:
    """Many images -> (uint8 [N,H,W,C], per-image error or None). Failed rows are left black.

    With a CUDA `device`, the whole 8-bit greyscale/YCbCr JPEG rows are decoded there in batches by nvJPEG and
    everything else on the CPU. On an H200 (torch 2.11) nvJPEG matched libjpeg-turbo exactly on a 4:4:4 JPEG; on
    4:2:0 ones its chroma upsampling differs (up to 54 levels on small test images). A batch that fails is
    decoded again row by row on the CPU. The output is on the host; the per-row errors are the CPU path's.
    device="cpu" runs the same batched path with torchvision on the CPU (pixel-identical to the CPU path).
    """
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"JPEG decoding on {device} asked for, but CUDA is not available")
    raw = _raw_batch(blobs, channels, size)
    if raw is not None:
        return raw, [None] * len(blobs)
    out = np.zeros((len(blobs), *size, channels), dtype=np.uint8)
    errors: list[str | None] = [None] * len(blobs)
    batched: list[tuple[int, _JpegHeader]] = []
    for i, data in enumerate(blobs):
        try:
            header = _batchable_jpeg(data, channels) if device is not None else None
            if header is not None:
                batched.append((i, header))
            else:
                out[i] = decode_image(data, channels, size)
        except ImageError as e:
            errors[i] = str(e)
    if batched:
        _decode_jpeg_batches(blobs, batched, torch.device(device), channels, size, out, errors)
    return out, errors


def _raw_batch(blobs: list[bytes | None], channels: int, size: tuple[int, int]) -> np.ndarray | None:
    """The pixels of a batch whose rows are all raw images of exactly this size and channel count, in one copy
    (what decoding each row would give, without a Python step per row), else None."""
    header = _RAW_HEADER.pack(RAW_MAGIC, _RAW_VERSION, channels, *size)
    length = len(header) + size[0] * size[1] * channels
    if not blobs or not all(b is not None and len(b) == length and b.startswith(header) for b in blobs):
        return None
    rows = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), length)
    return np.ascontiguousarray(rows[:, len(header):]).reshape(len(blobs), *size, channels)  # (one copy)


def shape_of(data: bytes | None) -> tuple[int, int, int]:
    """(height, width, channels) of an image as decode_image reads it before resizing: upright (EXIF
    orientation applied), 1 channel for greyscale, 3 for colour; raises ImageError.

    Decodes the image, so a palette image is judged by its content and a bomb or broken file is an error.
    """
    decoded = _decode(data)
    height, width = _orient(decoded.pixels, decoded.orientation).shape[:2]
    channels = 1 if decoded.palette and _all_grey(decoded.pixels) else decoded.pixels.shape[2]
    return height, width, channels


def channels_of(data: bytes | None) -> int:
    """1 for a greyscale image, 3 for a colour one (what a model for this data should take); raises ImageError."""
    return shape_of(data)[2]


def _decode(data: bytes | None) -> _Decoded:
    if data is None or len(data) == 0:
        raise ImageError("empty image bytes")
    data = bytes(data)
    try:
        if data.startswith(RAW_MAGIC):
            return _decode_raw(data)
        if data.startswith(_PNG_SIGNATURE):
            return _decode_png(data)
        if data.startswith(_JPEG_START):
            return _decode_jpeg(data)
        return _decode_pillow(data)
    except ImageError:
        raise
    except Exception as e:  # a decoder's own failure on hostile bytes, whatever its type, is this row's error
        # (without object addresses, "<_io.BytesIO object at 0x...>": the same bytes give the same error text)
        raise ImageError(f"undecodable image ({e.__class__.__name__}: {_ADDRESS.sub('', str(e))})") from None


def _check_pixels(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"undecodable image (its header says {width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image of {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS} pixels "
                         f"(a decompression bomb?); raise it with {ENV_MAX_IMAGE_PIXELS}")


def _decode_raw(data: bytes) -> _Decoded:
    if len(data) < _RAW_HEADER.size:
        raise ImageError("undecodable image (raw header cut short)")
    _, version, channels, height, width = _RAW_HEADER.unpack_from(data)
    if version != _RAW_VERSION or channels not in (1, 3):
        raise ImageError(f"undecodable image (raw version {version}, {channels} channel(s))")
    _check_pixels(width, height)
    if len(data) != _RAW_HEADER.size + height * width * channels:
        raise ImageError(f"undecodable image (raw {height}x{width}x{channels} with {len(data)} bytes)")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=_RAW_HEADER.size).reshape(height, width, channels)
    return _Decoded(pixels)


def _decode_png(data: bytes) -> _Decoded:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageError("undecodable image (PNG without a header)")
    width, height, _, color_type = struct.unpack_from(">IIBB", data, 16)
    _check_pixels(width, height)
    intact, orientation = _png_chunks(data)
    if not intact:
        return _decode_pillow(data)  # Pillow decides, and words the error
    try:
        pixels = pyspng.load(data)  # palette -> RGB, 16-bit -> uint16 (grey as grey+alpha)
    except RuntimeError:
        return _decode_pillow(data)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    pixels = pixels[..., :1] if color_type in (0, 4) else pixels[..., :3]
    if pixels.dtype == np.uint16:
        pixels = _to_8_bits(pixels)
    return _Decoded(pixels, palette=color_type == 3, orientation=orientation)


def _decode_jpeg(data: bytes) -> _Decoded:
    header = _jpeg_header(data)
    if header is None or not header.fast:
        return _decode_pillow(data)
    _check_pixels(header.width, header.height)
    try:
        pixels = _torchvision_jpeg(data)
    except RuntimeError:
        return _decode_pillow(data)
    return _Decoded(pixels, orientation=header.orientation)


def _decode_pillow(data: bytes) -> _Decoded:
    try:
        with warnings.catch_warnings():  # our own limit, below, decides; Pillow's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"image over Pillow's pixel limit ({e})") from None
    _check_pixels(*img.size)
    img.load()
    mode = img.mode
    if mode in _GRAY_MODES:
        pixels = np.asarray(img.convert("L"))
    elif mode.startswith("I;16"):
        pixels = _to_8_bits(np.asarray(img).astype(np.uint16))
    elif mode in _COLOR_MODES or mode in _PALETTE_MODES:
        pixels = np.asarray(img.convert("RGB"))
    else:
        raise ImageError(f"unsupported image mode {mode!r}")
    return _Decoded(pixels.reshape(*pixels.shape[:2], -1), palette=mode in _PALETTE_MODES,
                    orientation=_pillow_orientation(img))


def _pillow_orientation(img: Image.Image) -> int:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not make the pixels unreadable
        return 1
    return orientation if isinstance(orientation, int) else 1


def _conform(decoded: _Decoded, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Orientation, channel policy and resize: everything after the codec, shared by every decoder."""
    pixels = _orient(decoded.pixels, decoded.orientation)
    found = pixels.shape[2]
    if found != channels:
        if decoded.palette and channels == 1 and _all_grey(pixels):
            pixels = pixels[..., :1]
        else:
            raise ImageError(f"image has {found} channel(s), the model takes {channels}")
    height, width = size
    if pixels.shape[:2] != (height, width):
        img = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if channels == 1 else pixels))
        pixels = np.asarray(img.resize((width, height), Image.LANCZOS))
    return pixels.reshape(height, width, channels)


def _all_grey(pixels: np.ndarray) -> bool:
    return pixels.shape[2] == 1 or bool((pixels[..., 0] == pixels[..., 1]).all() and
                                        (pixels[..., 1] == pixels[..., 2]).all())


def _to_8_bits(pixels: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 by round(v / 257) (no ties: 257 is odd)."""
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to [H,W,C] pixels, as PIL.ImageOps.exif_transpose does."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(pixels, k=-1)
    if orientation == 7:
        return pixels.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(pixels, k=1)
    return pixels  # 1, and values outside the standard's 1-8, which Pillow ignores too


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag of an EXIF block (a TIFF structure), 1 if it is absent or unreadable."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * k)
            if tag == _EXIF_ORIENTATION and kind == 3:  # a SHORT
                return value
    except (KeyError, struct.error):
        pass
    return 1


def _png_chunks(data: bytes) -> tuple[bool, int]:
    """(every chunk's CRC matches and IEND is there, EXIF orientation). libspng as pyspng drives it ignores
    CRCs and zlib checksums, so a corrupted file would decode to garbage where Pillow refuses it: such a file
    goes to Pillow."""
    pos, orientation = len(_PNG_SIGNATURE), 1
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(data[pos + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            return False, orientation
        if kind == b"eXIf":
            orientation = _exif_orientation(data[pos + 8:end])
        elif kind == b"IEND":
            return True, orientation
        pos = end + 4
    return False, orientation


def _jpeg_header(data: bytes) -> _JpegHeader | None:
    """Frame and EXIF orientation from a JPEG's markers up to its first scan; None if they cannot be read."""
    pos, orientation, frame = 2, None, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\0\0") and orientation is None:
            orientation = _exif_orientation(segment[6:])
        elif marker in _JPEG_FRAMES and len(segment) >= 6 and frame is None:
            frame = (marker, *struct.unpack_from(">BHHB", segment))
        elif marker == 0xDA:  # start of scan: the header is over
            break
        pos += 2 + length
    if frame is None or frame[2] == 0:  # no frame, or a height given later (DNL): Pillow's business
        return None
    return _JpegHeader(*frame, orientation=orientation or 1)


@functools.cache
def _torchvision_io():
    import torchvision.io  # imported on the first JPEG only: it takes seconds

    return torchvision.io


def _jpeg_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _torchvision_jpeg(data: bytes) -> np.ndarray:
    tv = _torchvision_io()
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        return tv.decode_jpeg(_jpeg_tensor(data)).permute(1, 2, 0).numpy()


def _batchable_jpeg(data: bytes | None, channels: int) -> _JpegHeader | None:
    """The header of a JPEG the batched path takes (8-bit, its channels the model's, ending in its EOI marker),
    else None (the CPU path). nvJPEG decodes a truncated file without an error (seen on an H200), where the CPU
    path reports it: so only whole files go to the device."""
    if not data or bytes(data[:3]) != _JPEG_START or bytes(data[-2:]) != _JPEG_END:
        return None
    try:
        header = _jpeg_header(bytes(data))
    except Exception:  # unreadable header: the CPU path words the error
        return None
    if header is None or not header.fast or header.components != channels:
        return None
    _check_pixels(header.width, header.height)
    return header


def _decode_jpeg_batches(blobs: list, rows: list[tuple[int, _JpegHeader]], device: torch.device, channels: int,
                         size: tuple[int, int], out: np.ndarray, errors: list[str | None]) -> None:
    tv = _torchvision_io()
    mode = tv.ImageReadMode.GRAY if channels == 1 else tv.ImageReadMode.RGB
    for batch in _pixel_budget_batches(rows):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = tv.decode_jpeg([_jpeg_tensor(bytes(blobs[i])) for i, _ in batch], mode=mode, device=device)
            if len({tuple(t.shape) for t in decoded}) == 1:  # the usual prepared set: one copy to the host
                pixels = list(torch.stack(decoded).permute(0, 2, 3, 1).cpu().numpy())
            else:
                pixels = [t.permute(1, 2, 0).cpu().numpy() for t in decoded]
        except Exception:  # one bad row fails the whole call: decode this batch row by row on the CPU
            pixels = [None] * len(batch)
        for (i, header), decoded_row in zip(batch, pixels):
            try:
                if decoded_row is None:
                    out[i] = decode_image(blobs[i], channels, size)
                else:
                    out[i] = _conform(_Decoded(decoded_row, orientation=header.orientation), channels, size)
            except ImageError as e:
                errors[i] = str(e)


def _pixel_budget_batches(rows: list[tuple[int, _JpegHeader]]) -> list[list[tuple[int, _JpegHeader]]]:
    batches: list[list[tuple[int, _JpegHeader]]] = [[]]
    budget = 0
    for row in rows:
        pixels = row[1].width * row[1].height
        if batches[-1] and budget + pixels > _DEVICE_BATCH_PIXELS:
            batches.append([])
            budget = 0
        batches[-1].append(row)
        budget += pixels
    return batches
