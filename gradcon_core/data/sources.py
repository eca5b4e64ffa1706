"""Where image sets come from: readers that turn a source into tables of id, image, label, split rows.

mnist / fashion-mnist (IDX files), cifar10 (a cifar-10-batches-py folder), folder (one subfolder per
class, optional train/ and test/), parquet (an existing parquet or Hugging Face export: its image bytes kept,
a Hugging Face struct flattened), defects (generated: gradcon_core/data/defects.py). `gradcon prepare` writes what
they yield as an image set (gradcon_core/data/imageset.py). Folder and parquet images keep their bytes as they
are (a JPEG stays that JPEG) unless a size is asked for: then Resizer decodes each image under the policy of
gradcon_core/data/images.py and stores it as a PNG of that size.
"""
from __future__ import annotations

import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from gradcon_core.data.defects import CLASSES, DEFAULT_COUNTS, DefectCounts, defect_tables
from gradcon_core.data.idx import load_mnist
from gradcon_core.data.images import ImageError, channels_of, decode_images, encode_png, encode_raw
from gradcon_core.data.imageset import IMAGE, ImageShape, image_bytes, iter_batches
from gradcon_core.data.sizes import ImageSize, as_hw

SOURCES = ("mnist", "fashion-mnist", "cifar10", "folder", "parquet", "defects")
KNOWN_DATASETS = ("mnist", "fashion-mnist", "cifar10", "defects")  # recorded in the set (a folder is the user's)
# What the fixed-format sources hold; folder and parquet images may have any shape, each its own.
NATIVE_SHAPES = {"mnist": ImageShape((28, 28), 1), "fashion-mnist": ImageShape((28, 28), 1),
                 "cifar10": ImageShape((32, 32), 3)}
DEFECTS_DEFAULT_SIZE = 128
CHUNK = 2048
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _arrays_to_tables(images: np.ndarray, labels: np.ndarray, split: str) -> Iterator[pa.Table]:
    for start in range(0, len(images), CHUNK):
        block = images[start: start + CHUNK]
        yield pa.table({
            "id": [f"{split}-{i:06d}" for i in range(start, start + len(block))],
            "image": pa.array([encode_png(img) for img in block], pa.binary()),
            "label": pa.array(labels[start: start + len(block)], pa.int64()),
            "split": [split] * len(block),
        })


def _idx_source(source: Path, download: bool, name: str) -> Iterator[pa.Table]:
    if download:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        for train in (True, False):
            cls(str(source), train=train, download=True)
        source = source / cls.__name__ / "raw"
    for split in ("train", "test"):
        images, labels = load_mnist(source, split)
        yield from _arrays_to_tables(images, labels, split)


def _cifar_source(source: Path) -> Iterator[pa.Table]:
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    for split, names in files.items():
        missing = [n for n in names if not (source / n).exists()]
        if missing:
            raise FileNotFoundError(f"{source} is not a cifar-10-batches-py directory: {missing} missing")
        images, labels = [], []
        for n in names:
            with open(source / n, "rb") as f:
                batch = pickle.load(f, encoding="bytes")  # the official CIFAR-10 python format
            images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"]))
        # Kept RGB at 32x32: models resize with Lanczos when decoding (see gradcon_core/data/images.py).
        yield from _arrays_to_tables(np.concatenate(images), np.concatenate(labels), split)


def _folder_source(source: Path) -> Iterator[pa.Table]:
    split_dirs = [(s, source / s) for s in ("train", "test") if (source / s).is_dir()] or [("train", source)]
    classes = sorted({d.name for _, root in split_dirs for d in root.iterdir() if d.is_dir()})
    if not classes:
        raise FileNotFoundError(f"{source} has no class subfolders (expected {source}/<class>/<image files>)")
    for split, root in split_dirs:
        files = sorted(p for c in classes if (root / c).is_dir() for p in (root / c).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        for start in range(0, len(files), CHUNK):
            block = files[start: start + CHUNK]
            yield pa.table({
                "id": [str(p.relative_to(source)) for p in block],
                "image": pa.array([p.read_bytes() for p in block], pa.binary()),
                "label": pa.array([classes.index(p.relative_to(root).parts[0]) for p in block], pa.int64()),
                "class_name": [p.relative_to(root).parts[0] for p in block],
                "split": [split] * len(block),
            })


def _parquet_source(source: str, filesystem: pafs.FileSystem | None) -> Iterator[pa.Table]:
    for batch in iter_batches(source, None, batch_size=CHUNK, filesystem=filesystem):
        columns = {name: batch.column(name) for name in batch.schema.names}
        columns["image"] = pa.array(image_bytes(batch.column("image")), pa.binary())  # HF struct -> plain bytes
        columns.setdefault("split", pa.array(["train"] * batch.num_rows))
        yield pa.table(columns)


def tables(kind: str, source: str | None, filesystem: pafs.FileSystem | None = None, download: bool = False,
           image_size: ImageSize | None = None, seed: int = 0, counts: DefectCounts = DEFAULT_COUNTS,
           classes: tuple[str, ...] = CLASSES) -> Iterator[pa.Table]:
    """The image set's rows from a source, as tables of CHUNK rows (filesystem: for a parquet source on S3).

    image_size, seed, counts and classes are the generated defects set's (it has no source; see
    gradcon_core/data/defects.py); other sources are resized by Resizer, after reading."""
    if kind == "defects":
        return defect_tables(image_size or DEFECTS_DEFAULT_SIZE, seed, counts, classes, rows_per_table=CHUNK)
    if source is None:
        raise ValueError(f"prepare {kind} needs source=")
    if kind in ("mnist", "fashion-mnist"):
        return _idx_source(Path(source), download, kind)
    if kind == "cifar10":
        return _cifar_source(Path(source))
    if kind == "folder":
        return _folder_source(Path(source))
    if kind == "parquet":
        return _parquet_source(source, filesystem)
    raise ValueError(f"unknown source {kind!r}; choose one of {SOURCES}")


def known_shape(kind: str, image_size: ImageSize | None = None) -> ImageShape | None:
    """The one shape of every image a source yields (resized to image_size if given), if known before reading."""
    if kind == "defects":
        return ImageShape(as_hw(image_size or DEFECTS_DEFAULT_SIZE), 3)
    native = NATIVE_SHAPES.get(kind)
    if native is not None and image_size is not None:
        return ImageShape(as_hw(image_size), native.channels)
    return native


ENCODINGS = {"png": encode_png, "raw": encode_raw}  # how prepare stores images it decodes (images.py: raw)


class Resizer:
    """Decodes every image of the tables it is given (tables of one set, in turn) to one (height, width) and
    re-encodes it (PNG, or raw pixels). The channel count is the first decodable image's unless given; rows
    that fail the decoding policy (gradcon_core/data/images.py: unreadable, too large, another channel count) are
    left out and kept in `skipped` as (id, reason)."""

    def __init__(self, image_size: ImageSize, channels: int | None = None, encoding: str = "png"):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; choose one of {sorted(ENCODINGS)}")
        self.hw, self.channels, self.encode = as_hw(image_size), channels, ENCODINGS[encoding]
        self.skipped: list[tuple[str, str]] = []

    @property
    def shape(self) -> ImageShape | None:
        return None if self.channels is None else ImageShape(self.hw, self.channels)

    def __call__(self, table: pa.Table) -> pa.Table:
        blobs = image_bytes(table.column(IMAGE))
        if self.channels is None:
            self.channels = next((c for c in map(_channels_or_none, blobs) if c is not None), None)
        if self.channels is None:  # nothing here decodes: each row's reason is its own decoding error
            pixels, errors = None, [_decoding_error(b) for b in blobs]
        else:
            pixels, errors = decode_images(blobs, self.channels, self.hw)
        keep = [i for i, e in enumerate(errors) if e is None]
        ids = table.column("id").to_pylist()  # every source gives ids
        self.skipped += [(str(ids[i]), e) for i, e in enumerate(errors) if e is not None]
        images = pa.array([self.encode(pixels[i, ..., 0] if self.channels == 1 else pixels[i]) for i in keep],
                          pa.binary())
        table = table.take(pa.array(keep, pa.int64()))
        return table.set_column(table.schema.get_field_index(IMAGE), IMAGE, images)

    def report(self) -> None:
        """One warning for every row left out, with a few examples."""
        if self.skipped:
            examples = "; ".join(f"{i}: {e}" for i, e in self.skipped[:3])
            print(f"warning: {len(self.skipped)} image(s) could not be resized to {self.hw[0]}x{self.hw[1]} and "
                  f"were left out, e.g. {examples}", file=sys.stderr)


def _channels_or_none(blob: bytes | None) -> int | None:
    try:
        return channels_of(blob)
    except ImageError:
        return None


def _decoding_error(blob: bytes | None) -> str:
    try:
        channels_of(blob)
    except ImageError as e:
        return str(e)
    raise AssertionError("called only for images that do not decode")
