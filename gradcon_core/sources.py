"""Where image sets come from: readers that turn a source into tables of id, image, label, split rows.

mnist / fashion-mnist (IDX files), cifar10 (a cifar-10-batches-py folder), folder (one subfolder per
class, optional train/ and test/), parquet (an existing parquet or Hugging Face export, re-encoded).
`gradcon prepare` writes what they yield as an image set (gradcon_core/imageset.py).
"""
from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from gradcon_core.idx import load_mnist
from gradcon_core.images import encode_png
from gradcon_core.imageset import image_bytes, iter_batches

SOURCES = ("mnist", "fashion-mnist", "cifar10", "folder", "parquet")
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
        # Kept RGB at 32x32: models resize with Lanczos when decoding (see gradcon_core/images.py).
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


def tables(kind: str, source: str, filesystem: pafs.FileSystem | None = None,
           download: bool = False) -> Iterator[pa.Table]:
    """The image set's rows from a source, as tables of CHUNK rows (filesystem: for a parquet source on S3)."""
    if kind in ("mnist", "fashion-mnist"):
        return _idx_source(Path(source), download, kind)
    if kind == "cifar10":
        return _cifar_source(Path(source))
    if kind == "folder":
        return _folder_source(Path(source))
    if kind == "parquet":
        return _parquet_source(source, filesystem)
    raise ValueError(f"unknown source {kind!r}; choose one of {SOURCES}")
