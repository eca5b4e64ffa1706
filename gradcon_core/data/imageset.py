"""Image sets (docs/design.md §7): one parquet file or a prefix of many, local, file:// or s3://.

Columns: `image` (binary, or the Hugging Face layout struct<bytes, path>), optional `id`
(string or int64; absent -> "<file>:<row>"), `label` (int64), `is_anomaly` (bool), and any
others, which pass through. Files under a prefix are read in sorted path order, so row numbers
are stable: protocols select rows by number and never copy the data.

When every image of a set has one size and channel count (`gradcon prepare` knows it for mnist, cifar10
and defects, and for any source it resizes with image_size=), each file's key-value metadata records it
under the key "gradcon" as JSON: {"image_size": [height, width], "channels": C}. Jobs read it from the first
file (recorded_shape) to size their networks; a set without it is sized by the job's settings.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradcon_core.files import resolve

IMAGE = "image"
SHAPE_KEY = b"gradcon"
DATASET_KEY = b"gradcon.dataset"  # which known dataset the set was prepared from (mnist, cifar10, ...)


@dataclass(frozen=True)
class ImageShape:
    """What every image of a set decodes to: (height, width) and 1 or 3 channels."""

    image_size: tuple[int, int]
    channels: int

    def __post_init__(self):
        if len(self.image_size) != 2 or min(self.image_size) < 1 or self.channels not in (1, 3):
            raise ValueError(f"an image shape is (height, width) >= 1 and 1 or 3 channels, got {self}")

    def __str__(self) -> str:
        return f"{self.image_size[0]}x{self.image_size[1]}x{self.channels}"

    def metadata(self) -> dict[bytes, bytes]:
        return {SHAPE_KEY: json.dumps({"image_size": list(self.image_size), "channels": self.channels}).encode()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, path: str) -> ImageShape | None:
        if not metadata or SHAPE_KEY not in metadata:
            return None
        try:
            info = json.loads(metadata[SHAPE_KEY])
            return cls(tuple(int(s) for s in info["image_size"]), int(info["channels"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: unreadable gradcon image-shape metadata {metadata[SHAPE_KEY]!r} ({e})") from None


def list_parquet_files(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted parquet paths) for a file or a prefix; raises FileNotFoundError if none."""
    fs, path = resolve(uri, filesystem)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return fs, [path]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"image set {uri} does not exist")
    files = sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )
    if not files:
        raise FileNotFoundError(f"image set {uri} holds no .parquet files")
    return fs, files


RowGroup = tuple[str, int, int, int, int]  # (path, row group, the file's row number of its first row, rows, bytes)


def row_groups(fs: pafs.FileSystem, files: list[str]) -> list[RowGroup]:
    """Every row group of `files`, from their footers (read once: on S3 a GET per file)."""
    groups = []
    for path in files:
        meta, start = pq.ParquetFile(path, filesystem=fs).metadata, 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            groups.append((path, g, start, rows, meta.row_group(g).total_byte_size))
            start += rows
    return groups


def image_bytes(column: pa.Array | pa.ChunkedArray) -> list[bytes | None]:
    """The encoded bytes of an `image` column in either accepted layout."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise ValueError(f"struct column {IMAGE!r} has no 'bytes' field (fields: {column.type})")
        column = pc.struct_field(column, "bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"column {IMAGE!r} must be binary or struct<bytes, path>, got {column.type}")
    return column.to_pylist()


def _check_schema(schema: pa.Schema, path: str) -> None:
    if IMAGE not in schema.names:
        raise ValueError(f"{path} has no {IMAGE!r} column (columns: {schema.names})")


def iter_batches(
    uri: str,
    columns: list[str] | None = None,
    batch_size: int = 1024,
    filesystem: pafs.FileSystem | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches over all files in order; an `id` column is always present."""
    fs, files = list_parquet_files(uri, filesystem)
    for path in files:
        pf = pq.ParquetFile(path, filesystem=fs)
        schema = pf.schema_arrow
        if columns is None or IMAGE in columns:
            _check_schema(schema, path)
        wanted = None if columns is None else [c for c in dict.fromkeys([*columns, "id"]) if c in schema.names]
        missing = [c for c in (columns or []) if c not in schema.names and c != "id"]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing} (columns: {schema.names})")
        row = 0
        name = os.path.basename(path)
        for batch in pf.iter_batches(batch_size=batch_size, columns=wanted):
            if "id" not in batch.schema.names:
                ids = pa.array([f"{name}:{i}" for i in range(row, row + batch.num_rows)])
                batch = batch.append_column("id", ids)
            row += batch.num_rows
            yield batch


def check_image_set(uri: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Refuse, naming the file, a set the jobs would fail on halfway: a file that is not readable parquet,
    no usable `image` column, a non-integer `label`, a non-boolean `is_anomaly`, or a column whose type
    differs between files (Ray Data cannot concatenate them). Reads each file's footer only."""
    fs, files = list_parquet_files(uri, filesystem)
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for path in files:
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path} is not a readable parquet file ({' '.join(str(e).split())[:200]})") from None
        _check_schema(schema, path)
        image = schema.field(IMAGE).type
        if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)
                or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0)):
            raise ValueError(f"{path}: column {IMAGE!r} must be binary or struct<bytes, path>, got {image}")
        for name, wanted, test in (("label", "integers", pa.types.is_integer),
                                   ("is_anomaly", "booleans", pa.types.is_boolean)):
            if name in schema.names and not test(schema.field(name).type):
                raise ValueError(f"{path}: column {name!r} must hold {wanted}, got {schema.field(name).type}")
        for name in ("id", IMAGE, "label", "split", "is_anomaly"):
            if name not in schema.names:
                continue
            kind = schema.field(name).type
            first_kind, first_path = seen.setdefault(name, (kind, path))
            if kind != first_kind:
                raise ValueError(f"column {name!r} is {kind} in {path} but {first_kind} in {first_path}: "
                                 "every file of an image set needs the same column types")


def _first_file_metadata(uri: str, filesystem: pafs.FileSystem | None) -> tuple[dict[bytes, bytes], str]:
    fs, files = list_parquet_files(uri, filesystem)
    return pq.read_schema(files[0], filesystem=fs).metadata or {}, files[0]


def recorded_shape(uri: str, filesystem: pafs.FileSystem | None = None) -> ImageShape | None:
    """The image shape `gradcon prepare` recorded in the set's first file, or None if it recorded none."""
    return ImageShape.from_metadata(*_first_file_metadata(uri, filesystem))


def recorded_dataset(uri: str, filesystem: pafs.FileSystem | None = None) -> str | None:
    """The known dataset (mnist, fashion-mnist, cifar10, defects) `gradcon prepare` made the set from, if any."""
    metadata, _ = _first_file_metadata(uri, filesystem)
    return metadata[DATASET_KEY].decode() if DATASET_KEY in metadata else None


def read_columns(uri: str, columns: list[str], filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """Small columns (label, split, id...) of the whole set, e.g. to select rows for a protocol."""
    batches = list(iter_batches(uri, columns, batch_size=65536, filesystem=filesystem))
    return pa.Table.from_batches(batches)


@dataclass
class ImageRows:
    """Selected rows of an image set, still encoded."""

    ids: list
    images: list[bytes | None]
    labels: np.ndarray | None

    def __getitem__(self, part: slice) -> ImageRows:
        return ImageRows(self.ids[part], self.images[part], None if self.labels is None else self.labels[part])


def take_rows(uri: str, rows: np.ndarray, filesystem: pafs.FileSystem | None = None) -> ImageRows:
    """The rows with these global row numbers (in the given order), streaming through the files."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    ids, images, labels = [None] * len(rows), [None] * len(rows), np.full(len(rows), -1, np.int64)
    start, k = 0, 0
    for batch in iter_batches(uri, None, filesystem=filesystem):
        end = start + batch.num_rows
        hi = np.searchsorted(wanted, end, side="left")
        if hi > k:
            local = wanted[k:hi] - start
            sub = batch.take(pa.array(local))
            blobs = image_bytes(sub.column(IMAGE))
            sub_ids = sub.column("id").to_pylist()
            sub_labels = sub.column("label").to_numpy() if "label" in sub.schema.names else None
            for j, dest in enumerate(order[k:hi]):
                ids[dest], images[dest] = sub_ids[j], blobs[j]
                if sub_labels is not None:
                    labels[dest] = sub_labels[j]
            k = hi
        start = end
    if k < len(rows):
        raise IndexError(f"row {int(wanted[k])} is past the end of {uri} ({start} rows)")
    return ImageRows(ids, images, labels)


class ImageSetWriter:
    """Writes part-00000.parquet, part-00001.parquet, ... of rows_per_file rows each, from tables
    appended in order. Names and bytes depend only on the rows, so a re-run rewrites identical files.
    shape: the one shape of every image, recorded in each file (see the module docstring); dataset: the known
    dataset the rows come from, recorded too (eval compares with the papers only for those)."""

    def __init__(self, uri: str, rows_per_file: int = 20000, filesystem: pafs.FileSystem | None = None,
                 shape: ImageShape | None = None, dataset: str | None = None):
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        self.fs, self.root = resolve(uri, filesystem)
        self.fs.create_dir(self.root, recursive=True)
        self.rows_per_file, self.shape, self.dataset = rows_per_file, shape, dataset
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.paths: list[str] = []

    def write(self, table: pa.Table) -> None:
        _check_schema(table.schema, self.root)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.pending)
        metadata = dict(table.schema.metadata or {})
        if self.shape is not None:
            metadata.update(self.shape.metadata())
        if self.dataset is not None:
            metadata[DATASET_KEY] = self.dataset.encode()
        table = table.replace_schema_metadata(metadata or None)
        path = f"{self.root}/part-{len(self.paths):05d}.parquet"
        pq.write_table(table.slice(0, rows), path, filesystem=self.fs, compression="zstd")
        self.paths.append(path)
        rest = table.slice(rows)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> list[str]:
        if self.pending_rows or not self.paths:
            self._flush(self.pending_rows)
        # Parts left by an earlier, longer run would silently join this set: remove them.
        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            name = os.path.basename(info.path)
            if name.startswith("part-") and name.endswith(".parquet") and info.path not in self.paths:
                self.fs.delete_file(info.path)
        return self.paths


def write_image_set(
    uri: str, table: pa.Table, rows_per_file: int = 20000, filesystem: pafs.FileSystem | None = None,
    shape: ImageShape | None = None,
) -> list[str]:
    """Write one table as an image set (see ImageSetWriter)."""
    writer = ImageSetWriter(uri, rows_per_file, filesystem, shape)
    writer.write(table)
    return writer.close()
