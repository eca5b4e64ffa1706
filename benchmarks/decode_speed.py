"""Decoding speed per CPU core: each codec alone, then gradcon's decode_images before and after.

(a) codecs: Pillow vs libspng (pyspng) vs torchvision.io.decode_png on PNG, Pillow vs torchvision.io.decode_jpeg
    on JPEG, each turning one image's bytes into a uint8 array, with its ratio to Pillow;
(b) decode_images, the whole per-row policy (decode, channels, resize) at the model's size: "before" is Pillow as
    gradcon decoded until now (open, load, convert, asarray), "after" is gradcon_core.data.images.decode_images, and
    "raw" the same images stored with encode_raw (no codec);
(c) with --device cuda: decode_images with the JPEG rows decoded in batches by nvJPEG.
Images: MNIST digits as 28x28 grey PNGs (data/mnist, else synthetic digits-sized images), and photo-like
128x128 RGB images as PNG and as JPEG (quality 90). One thread, one process: images/s per core.

python benchmarks/decode_speed.py [--images 2000] [--repeats 3] [--mnist-dir data/mnist] [--device cuda]
"""
from __future__ import annotations

import argparse
import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyspng
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import images_per_second, machine  # noqa: E402

from gradcon_core.data.idx import load_mnist  # noqa: E402
from gradcon_core.data.images import decode_images, encode_png, encode_raw  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision 0.29 deprecates its image decoders
warnings.filterwarnings("ignore", message="The given buffer is not writable")
import torchvision.io as tvio  # noqa: E402


def photo_like(count: int, side: int, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs plus fine noise: compresses like a photo, not like flat colour or white noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, side, side, 3), np.uint8)
    for i in range(count):
        coarse = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
        out[i] = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return out


def digits(count: int, mnist_dir: str) -> tuple[np.ndarray, str]:
    try:
        return load_mnist(mnist_dir, "test")[0][:count], "MNIST test digits"
    except (OSError, ValueError):
        rng = np.random.default_rng(0)
        strokes = (rng.random((count, 28, 28)) < 0.15) * rng.integers(128, 256, (count, 28, 28))
        return strokes.astype(np.uint8), "synthetic 28x28 (no MNIST found)"


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pillow_codec(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(img)


def pillow_before(blobs: list[bytes], channels: int, size: tuple[int, int]) -> np.ndarray:
    """gradcon_core.data.images.decode_images as it was before this benchmark's decoders: Pillow for everything."""
    out = np.zeros((len(blobs), *size, channels), np.uint8)
    for i, data in enumerate(blobs):
        img = Image.open(io.BytesIO(data))
        img.load()
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != size[::-1]:
            img = img.resize(size[::-1], Image.LANCZOS)
        out[i] = np.asarray(img, dtype=np.uint8).reshape(*size, channels)
    return out


def torchvision_codec(decode: Callable) -> Callable[[bytes], np.ndarray]:
    return lambda data: decode(torch.frombuffer(data, dtype=torch.uint8)).permute(1, 2, 0).numpy()


def rate(fn: Callable[[bytes], object], blobs: list[bytes], repeats: int) -> float:
    return images_per_second(lambda: [fn(b) for b in blobs], len(blobs), torch.device("cpu"), repeats)


def line(name: str, value: float, base: float | None) -> None:
    ratio = f"  ({value / base:.2f}x Pillow)" if base else ""
    print(f"  {name:<44} {value:>10,.0f} images/s per core{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images per set (128x128 sets use a quarter)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mnist-dir", default=str(Path(__file__).resolve().parents[1] / "data" / "mnist"))
    parser.add_argument("--device", default=None, help="cuda: also time the batched nvJPEG path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine(torch.device(args.device or 'cpu'))}; one thread per decoder")

    grey, source = digits(args.images, args.mnist_dir)
    photos = photo_like(max(1, args.images // 4), 128)
    sets = {
        f"28x28 grey PNG ({source})": ("png", [encode_png(p) for p in grey], grey[..., None]),
        "128x128 RGB PNG": ("png", [encode_png(p) for p in photos], photos),
        "128x128 RGB JPEG q90": ("jpeg", [jpeg(p) for p in photos], photos),
    }
    codecs = {
        "png": {"Pillow": pillow_codec, "pyspng (libspng)": pyspng.load,
                "torchvision.io.decode_png": torchvision_codec(tvio.decode_png)},
        "jpeg": {"Pillow": pillow_codec, "torchvision.io.decode_jpeg": torchvision_codec(tvio.decode_jpeg)},
    }
    for name, (fmt, blobs, pixels) in sets.items():
        channels, size = pixels.shape[3], pixels.shape[1:3]
        print(f"\n{name}: {len(blobs)} images, {sum(map(len, blobs)) / len(blobs):,.0f} bytes each")
        print(" (a) codec alone")
        base = None
        for codec, fn in codecs[fmt].items():
            value = rate(fn, blobs, args.repeats)
            base = base or value
            line(codec, value, base)
        print(" (b) decode_images at the model's size")
        before = images_per_second(lambda b=blobs, c=channels, s=size: pillow_before(b, c, s), len(blobs),
                                   torch.device("cpu"), args.repeats)
        line("before: Pillow", before, before)
        after = images_per_second(lambda b=blobs, c=channels, s=size: decode_images(b, c, s), len(blobs),
                                  torch.device("cpu"), args.repeats)
        line("after: gradcon_core.data.images.decode_images", after, before)
        raw = [encode_raw(p) for p in pixels]
        raw_rate = images_per_second(lambda r=raw, c=channels, s=size: decode_images(r, c, s), len(raw),
                                     torch.device("cpu"), args.repeats)
        line("raw encoding (encode_raw), decode_images", raw_rate, before)
        if args.device and fmt == "jpeg":
            device = torch.device(args.device)
            gpu = images_per_second(lambda b=blobs, c=channels, s=size, d=device: decode_images(b, c, s, device=d),
                                    len(blobs), torch.device("cpu"), args.repeats)
            line(f"(c) decode_images, JPEG batches on {device}", gpu, before)


if __name__ == "__main__":
    main()
