"""Image decoding: fast decoders == Pillow on a corpus of odd files, every rule of the policy, raw encoding,
the batched JPEG path, and bad input (bombs, broken files) as per-row errors."""
import functools
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from gradcon_core.data import images
from gradcon_core.data.images import ImageError, channels_of, decode_image, decode_images, encode_png, encode_raw

RNG = np.random.default_rng(0)


def smooth(height: int, width: int, channels: int = 3) -> np.ndarray:
    """A photo-like image (smooth, so JPEG keeps it close), uint8 [H,W] or [H,W,3]."""
    coarse = RNG.integers(0, 256, (max(2, height // 4), max(2, width // 4), channels), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse).resize((width, height),
                                                                                                Image.BICUBIC))


def save(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_by_hand(samples: np.ndarray, color_type: int, bit_depth: int, interlace: bool = False) -> bytes:
    """A PNG Pillow cannot write (Adam7-interlaced, 16-bit RGB): [H,W,C] integer samples, filter 0 everywhere."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    dtype = ">u2" if bit_depth == 16 else np.uint8
    passes = ([(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
              if interlace else [(0, 0, 1, 1)])
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = samples[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.astype(dtype).tobytes() for row in sub)
    height, width = samples.shape[:2]
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) +
            chunk(b"IEND", b""))


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


RGB = Image.fromarray(smooth(24, 36))
GREY = RGB.convert("L")
GREY16 = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
RGB16 = RNG.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
GREY_PALETTE = GREY.convert("P")
COLOUR_PALETTE = RGB.quantize(16)

# name -> bytes: the odd formats a user's folder holds; every one must decode exactly as Pillow decodes it.
CORPUS = {
    "png_grey": save(GREY, "PNG"),
    "png_rgb": save(RGB, "PNG"),
    "png_bilevel": save(GREY.convert("1"), "PNG"),
    "png_palette_grey": save(GREY_PALETTE, "PNG"),
    "png_palette_colour": save(COLOUR_PALETTE, "PNG"),
    "png_palette_4bit_transparent": save(COLOUR_PALETTE, "PNG", bits=4, transparency=0),
    "png_grey_alpha": save(Image.merge("LA", [GREY, GREY.point(lambda v: 255 - v)]), "PNG"),
    "png_rgba": save(Image.merge("RGBA", [*RGB.split(), GREY]), "PNG"),
    "png_grey16": save(Image.fromarray(GREY16), "PNG"),
    "png_interlaced_rgb": png_by_hand(np.asarray(RGB), color_type=2, bit_depth=8, interlace=True),
    "png_interlaced_grey": png_by_hand(np.asarray(GREY)[..., None], color_type=0, bit_depth=8, interlace=True),
    "png_exif_rotated": save(RGB, "PNG", exif=exif(6)),
    "jpeg_rgb": save(RGB, "JPEG", quality=90),
    "jpeg_444": save(RGB, "JPEG", quality=90, subsampling=0),
    "jpeg_422": save(RGB, "JPEG", quality=75, subsampling=1),
    "jpeg_grey": save(GREY, "JPEG"),
    "jpeg_progressive": save(RGB, "JPEG", progressive=True),
    "jpeg_cmyk": save(RGB.convert("CMYK"), "JPEG"),
    "jpeg_exif_rotated": save(RGB, "JPEG", exif=exif(8)),
    "gif_grey": save(GREY, "GIF"),
    "gif_colour": save(COLOUR_PALETTE, "GIF"),
    "bmp_rgb": save(RGB, "BMP"),
    "bmp_palette": save(COLOUR_PALETTE, "BMP"),
    "tiff_rgb": save(RGB, "TIFF"),
    "tiff_grey16": save(Image.fromarray(GREY16), "TIFF"),
    "webp_lossy": save(RGB, "WEBP", quality=80),
    "webp_lossless_rgba": save(Image.merge("RGBA", [*RGB.split(), GREY]), "WEBP", lossless=True),
}
TRUNCATED = {name: CORPUS[name][: len(CORPUS[name]) * 2 // 3] for name in ("png_rgb", "jpeg_rgb", "jpeg_progressive",
                                                                             "gif_colour", "webp_lossy")}


def pillow_policy(data: bytes) -> np.ndarray:
    """The policy written with Pillow alone (the reference): EXIF transpose, then L or RGB, 16-bit by round(v/257)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if img.mode.startswith("I;16"):
        return ((np.asarray(img).astype(np.uint32) + 128) // 257).astype(np.uint8)[..., None]
    if img.mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"))[..., None]
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_decoder_gives_pillows_pixels(name):
    data = CORPUS[name]
    reference = pillow_policy(data)
    height, width, channels = reference.shape
    if "palette_grey" in name or name == "gif_grey":
        channels = 1
        reference = reference[..., :1]
    np.testing.assert_array_equal(decode_image(data, channels, (height, width)), reference)
    pixels, errors = decode_images([data], channels, (height, width))
    assert errors == [None]
    np.testing.assert_array_equal(pixels[0], reference)
    assert channels_of(data) == channels


def test_png_and_jpeg_use_the_fast_decoders(monkeypatch):
    def refuse(data):
        raise AssertionError("Pillow used")

    monkeypatch.setattr(images, "_decode_pillow", refuse)
    for name in ("png_grey", "png_rgb", "png_palette_colour", "png_grey16", "png_interlaced_rgb", "png_rgba",
                 "jpeg_rgb", "jpeg_grey", "jpeg_progressive", "jpeg_exif_rotated"):
        decode_image(CORPUS[name], 1 if "grey" in name else 3, (24, 24))


def test_truncated_files_are_errors_for_every_decoder():
    pixels, errors = decode_images(list(TRUNCATED.values()), 3, (24, 36))
    assert all(e is not None and e.startswith("undecodable image") for e in errors), errors
    assert not pixels.any()


@pytest.mark.parametrize("name", ["png_rgb", "png_palette_colour", "png_grey16", "png_interlaced_grey", "jpeg_rgb",
                                  "jpeg_progressive", "jpeg_grey"])
def test_corrupted_files_fail_or_decode_exactly_as_pillow_decodes_them(name):
    """A fast decoder that is more lenient than Pillow (libspng ignores checksums) must not decode garbage."""
    rng = np.random.default_rng(sum(map(ord, name)))
    channels = 1 if "grey" in name else 3
    outcomes = set()
    for _ in range(40):
        data = bytearray(CORPUS[name])
        data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        try:
            reference = pillow_policy(bytes(data))
        except Exception:
            reference = None
        pixels, errors = decode_images([bytes(data)], channels, (24, 36) if reference is None else reference.shape[:2])
        if reference is None:
            assert errors[0] is not None
        else:
            assert errors[0] is None
            np.testing.assert_array_equal(pixels[0], reference)
        outcomes.add(reference is None)
    assert outcomes == {True, False} or name.startswith("png")  # JPEG decodes many corruptions, PNG refuses most


# ---- the module docstring's rules, one test each ----

def test_rule_1_other_sizes_are_stretched_to_the_model_with_lanczos():
    wide = smooth(20, 50)
    out = decode_image(encode_png(wide), 3, (28, 28))
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(wide).resize((28, 28), Image.LANCZOS)))
    assert "stretched" in images.__doc__ and "Lanczos" in images.__doc__


@pytest.mark.parametrize("orientation", range(1, 9))
def test_rule_2_exif_orientation_is_applied_like_pillows_exif_transpose(orientation):
    transpose = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}[orientation]
    for fmt in ("PNG", "JPEG", "TIFF", "WEBP"):
        data = save(RGB, fmt, exif=exif(orientation), **({"lossless": True} if fmt == "WEBP" else {}))
        stored = Image.open(io.BytesIO(data)).convert("RGB") if fmt == "JPEG" else RGB  # the rest are lossless
        upright = np.asarray(stored if transpose is None else stored.transpose(transpose))
        assert upright.shape[:2] == ((36, 24) if orientation >= 5 else (24, 36))
        np.testing.assert_array_equal(upright, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
                                                          .convert("RGB")), err_msg=fmt)
        np.testing.assert_array_equal(decode_image(data, 3, upright.shape[:2]), upright, err_msg=fmt)


def test_rule_3_grey_is_one_channel_colour_three_alpha_dropped_cmyk_as_pillow():
    assert channels_of(CORPUS["png_grey"]) == channels_of(CORPUS["png_bilevel"]) == 1
    assert channels_of(CORPUS["png_grey_alpha"]) == channels_of(CORPUS["png_grey16"]) == 1
    assert channels_of(CORPUS["png_rgb"]) == channels_of(CORPUS["jpeg_cmyk"]) == channels_of(CORPUS["png_rgba"]) == 3
    np.testing.assert_array_equal(decode_image(CORPUS["png_rgba"], 3, (24, 36)), np.asarray(RGB))  # not composited
    np.testing.assert_array_equal(decode_image(CORPUS["png_grey_alpha"], 1, (24, 36))[..., 0], np.asarray(GREY))
    cmyk = Image.open(io.BytesIO(CORPUS["jpeg_cmyk"]))
    np.testing.assert_array_equal(decode_image(CORPUS["jpeg_cmyk"], 3, (24, 36)), np.asarray(cmyk.convert("RGB")))


def test_rule_4_palette_images_are_judged_by_their_colours():
    for name in ("gif_grey", "png_palette_grey"):
        assert channels_of(CORPUS[name]) == 1
        grey = decode_image(CORPUS[name], 1, (24, 36))
        np.testing.assert_array_equal(grey[..., 0], np.asarray(GREY))
        np.testing.assert_array_equal(decode_image(CORPUS[name], 3, (24, 36)), np.repeat(grey, 3, axis=2))
    for name in ("gif_colour", "png_palette_colour", "bmp_palette"):
        assert channels_of(CORPUS[name]) == 3
        with pytest.raises(ImageError, match="3 channel"):
            decode_image(CORPUS[name], 1, (24, 36))


def test_rule_5_other_channel_mismatches_are_errors_not_conversions():
    pixels, errors = decode_images([CORPUS["png_rgb"], CORPUS["jpeg_rgb"], encode_raw(np.asarray(RGB))], 1, (24, 36))
    assert all("has 3 channel(s), the model takes 1" in e for e in errors)
    pixels, errors = decode_images([CORPUS["png_grey"], CORPUS["jpeg_grey"], CORPUS["png_grey16"]], 3, (24, 36))
    assert all("has 1 channel(s), the model takes 3" in e for e in errors)


def test_rule_6_sixteen_bits_are_scaled_by_rounding_and_wider_images_refused():
    expected = ((GREY16.astype(np.uint32) + 128) // 257).astype(np.uint8)
    for name in ("png_grey16", "tiff_grey16"):
        np.testing.assert_array_equal(decode_image(CORPUS[name], 1, (20, 30))[..., 0], expected)
    np.testing.assert_array_equal(decode_image(png_by_hand(RGB16, 2, 16), 3, (20, 30)),
                                  ((RGB16.astype(np.uint32) + 128) // 257).astype(np.uint8))
    rgba16 = np.concatenate([RGB16, RGB16[..., :1]], axis=2)
    np.testing.assert_array_equal(decode_image(png_by_hand(rgba16, 6, 16, interlace=True), 3, (20, 30)),
                                  ((RGB16.astype(np.uint32) + 128) // 257).astype(np.uint8))
    eight = np.asarray(GREY)
    widened = save(Image.fromarray(eight.astype(np.uint16) * 257), "PNG")
    np.testing.assert_array_equal(decode_image(widened, 1, eight.shape)[..., 0], eight)  # 8 -> 16 -> 8 exact
    assert decode_image(save(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG"), 1, (4, 4)).max() == 255
    for mode in ("F", "I"):
        with pytest.raises(ImageError, match=f"unsupported image mode '{mode}'"):
            decode_image(save(GREY.convert(mode), "TIFF"), 1, (24, 36))


@functools.cache
def bomb_png(side: int = 20000) -> bytes:
    """A real side x side all-black greyscale PNG, compressed row by row (389 KB at 20000)."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", body) + chunk(b"IEND", b""))


def bmp_header_only(width: int, height: int) -> bytes:
    """A BMP that claims width x height 8-bit grey pixels and holds none (Pillow checks its size at open)."""
    palette = b"".join(bytes([v, v, v, 0]) for v in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset, 0, 0, offset) + info + palette


def test_rule_7_decompression_bombs_are_row_errors_and_nothing_escapes():
    bomb = bomb_png()
    assert len(bomb) < 500_000
    rows = [CORPUS["png_grey"], bomb, bmp_header_only(20000, 20000), bmp_header_only(10000, 10000),
            CORPUS["gif_grey"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape either
        pixels, errors = decode_images(rows, 1, (24, 36))
        for data in rows[1:4]:
            with pytest.raises(ImageError, match="over"):
                channels_of(data)
    assert errors[0] is None and errors[4] is None
    assert all("limit" in e for e in errors[1:4]), errors
    assert "20000x20000" in errors[1] and "GRADCON_MAX_IMAGE_PIXELS" in errors[1]
    np.testing.assert_array_equal(pixels[0, ..., 0], np.asarray(GREY))


def test_rule_7_the_pixel_limit_is_configurable(monkeypatch):
    assert images.MAX_IMAGE_PIXELS == images.DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192
    data = {"png": CORPUS["png_rgb"], "jpeg": CORPUS["jpeg_rgb"], "gif": CORPUS["gif_colour"],
            "raw": encode_raw(np.asarray(RGB))}
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 24 * 36 - 1)
    for blob in data.values():
        with pytest.raises(ImageError, match="over the limit of 863 pixels"):
            decode_image(blob, 3, (24, 36))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 24 * 36)
    for blob in data.values():
        decode_image(blob, 3, (24, 36))
    for text, limit in [("", images.DEFAULT_MAX_IMAGE_PIXELS), ("1000", 1000), (" 250_000_000 ", 250_000_000)]:
        monkeypatch.setenv("GRADCON_MAX_IMAGE_PIXELS", text)
        assert images.pixel_limit_from_environment() == limit
    for text in ("abc", "0", "-5", "1e6"):
        monkeypatch.setenv("GRADCON_MAX_IMAGE_PIXELS", text)
        with pytest.raises(ValueError, match="GRADCON_MAX_IMAGE_PIXELS must be a positive whole number"):
            images.pixel_limit_from_environment()


def test_rule_8_unreadable_bytes_are_errors():
    rows = [None, b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + bytes(40), b"\xff\xd8\xff\xe0garbage",
            images.RAW_MAGIC + bytes(3), encode_raw(np.zeros((4, 4), np.uint8))[:-1], CORPUS["png_rgb"]]
    pixels, errors = decode_images(rows, 3, (24, 36))
    assert errors[:2] == ["empty image bytes"] * 2
    assert all(e.startswith("undecodable image") for e in errors[2:7]), errors
    assert errors[7] is None
    for data in rows[:7]:
        with pytest.raises(ImageError):
            channels_of(data)


# ---- raw encoding ----

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(24, 36), (28, 28), (50, 64)])
def test_raw_rows_decode_to_the_pixels_of_a_png_of_the_same_image(channels, size):
    pictures = [smooth(24, 36, channels) for _ in range(4)]
    raw, _ = decode_images([encode_raw(p) for p in pictures], channels, size)
    png, _ = decode_images([encode_png(p) for p in pictures], channels, size)
    np.testing.assert_array_equal(raw, png)
    assert all(channels_of(encode_raw(p)) == channels for p in pictures)


def test_raw_header_is_self_describing_and_encode_raw_refuses_what_it_cannot_store():
    pixels = smooth(5, 7)
    data = encode_raw(pixels)
    assert data[:4] == b"GCRW" and len(data) == 16 + 5 * 7 * 3
    assert struct.unpack_from("<BBxxII", data, 4) == (1, 3, 5, 7)
    assert encode_raw(pixels[..., :1]) == encode_raw(pixels[..., 0])
    for bad in (pixels.astype(np.float32), pixels.astype(np.uint16), np.zeros((4, 4, 4), np.uint8),
                np.zeros((0, 4), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="raw encoding"):
            encode_raw(bad)


def test_a_batch_of_raw_rows_of_the_models_shape_decodes_in_one_step_to_what_each_row_decodes_to():
    pictures = [smooth(28, 28, 1) for _ in range(5)]
    blobs = [encode_raw(p) for p in pictures]
    together, errors = decode_images(blobs, 1, (28, 28))
    np.testing.assert_array_equal(together, np.stack([decode_image(b, 1, (28, 28)) for b in blobs]))
    assert errors == [None] * 5 and together.flags.writeable
    mixed, errors = decode_images([*blobs[:2], b"", encode_raw(smooth(20, 20, 1))], 1, (28, 28))  # one way per row
    assert errors[2] == "empty image bytes" and errors[3] is None and not mixed[2].any()


@pytest.mark.parametrize("height, width", [(0, 0), (0, 5), (5, 0)])
def test_a_raw_header_of_no_pixels_is_an_error_for_that_row(height, width):
    zero = b"GCRW" + struct.pack("<BBxxII", 1, 1, height, width)
    pixels, errors = decode_images([zero, encode_raw(smooth(28, 28, 1))], 1, (28, 28))
    assert errors[0] == f"undecodable image (its header says {width}x{height} pixels)" and errors[1] is None
    with pytest.raises(ImageError, match="its header says"):
        decode_image(zero, 1, (28, 28))


# ---- JPEG rows decoded in batches (nvJPEG on a GPU; torchvision on the CPU here) ----

def mixed_rows() -> list:
    return [CORPUS["jpeg_rgb"], CORPUS["png_rgb"], CORPUS["jpeg_progressive"], TRUNCATED["jpeg_rgb"],
            CORPUS["jpeg_grey"], CORPUS["jpeg_cmyk"], CORPUS["jpeg_exif_rotated"], save(RGB.resize((50, 40)), "JPEG"),
            None, bomb_png(), CORPUS["jpeg_444"]]


def test_batched_jpeg_path_on_cpu_equals_the_row_by_row_path():
    rows = mixed_rows()
    expected, expected_errors = decode_images(rows, 3, (28, 28))
    pixels, errors = decode_images(rows, 3, (28, 28), device="cpu")
    assert errors == expected_errors
    assert [e is None for e in errors] == [True, True, True, False, False, True, True, True, False, False, True]
    np.testing.assert_array_equal(pixels, expected)
    good = [r for r, e in zip(rows, errors) if e is None and r[:3] == b"\xff\xd8\xff"]
    alone, _ = decode_images(good, 3, (28, 28), device="cpu")  # no failing row: one batched call
    np.testing.assert_array_equal(alone, expected[[0, 2, 5, 6, 7, 10]])


def test_only_whole_jpegs_take_the_batched_path(monkeypatch):
    """nvJPEG decodes a truncated JPEG without an error (an H200, torch 2.11): such a row must stay on the CPU
    path, which reports it."""
    batched = []
    decode = images._torchvision_io().decode_jpeg

    def recording(tensors, **kw):
        batched.extend(bytes(t.numpy()) for t in tensors)
        return decode(tensors, **kw)

    monkeypatch.setattr(images._torchvision_io(), "decode_jpeg", recording)
    rows = mixed_rows()
    _, errors = decode_images(rows, 3, (28, 28), device="cpu")
    assert TRUNCATED["jpeg_rgb"] not in batched and CORPUS["jpeg_rgb"] in batched
    assert errors[rows.index(TRUNCATED["jpeg_rgb"])].startswith("undecodable image")


def test_batched_jpeg_path_splits_by_pixel_budget(monkeypatch):
    monkeypatch.setattr(images, "_DEVICE_BATCH_PIXELS", 24 * 36 * 2)
    rows = [CORPUS["jpeg_rgb"]] * 5
    calls = []
    decode = images._torchvision_io().decode_jpeg

    def counting(tensors, **kw):
        calls.append(len(tensors))
        return decode(tensors, **kw)

    monkeypatch.setattr(images._torchvision_io(), "decode_jpeg", counting)
    pixels, errors = decode_images(rows, 3, (24, 36), device="cpu")
    assert calls == [2, 2, 1] and errors == [None] * 5
    np.testing.assert_array_equal(pixels, np.stack([decode_image(CORPUS["jpeg_rgb"], 3, (24, 36))] * 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: nvJPEG batch decoding not run")
def test_batched_jpeg_path_on_cuda_matches_the_cpu_path_up_to_chroma_upsampling():
    """Measured on an H200 (torch 2.11, CUDA 13): the 4:4:4 row identical to libjpeg-turbo's; 4:2:0
    rows (Pillow's default) differ where nvJPEG upsamples the half-size chroma otherwise: up to 54 levels, a
    mean of 6.7, on these small sharp-edged images."""
    rows = mixed_rows()
    expected, expected_errors = decode_images(rows, 3, (28, 28))
    pixels, errors = decode_images(rows, 3, (28, 28), device="cuda")
    assert errors == expected_errors
    diff = np.abs(pixels.astype(int) - expected.astype(int))
    assert diff[rows.index(CORPUS["jpeg_444"])].max() == 0
    assert diff.max() <= 64 and diff.mean(axis=(1, 2, 3)).max() < 8


def test_cuda_device_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA is not available"):
        decode_images([CORPUS["jpeg_rgb"]], 3, (24, 36), device="cuda")
