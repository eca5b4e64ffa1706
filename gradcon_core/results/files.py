"""Result tables on storage (what `gradcon score` writes): one file per input row group, complete or absent.

The result of an input file with one row group is one file of the same name; an input with several row groups
gets one file per group, `<stem>-rg<group>.parquet`, so the files sorted by name are the input's rows in order.
Each is written once, by whoever scored that row group, and appears under its final name only once complete
(local files are written as .partial and renamed; S3 objects appear when their upload completes), so a killed
job leaves no half file behind and a re-run rewrites exactly the row groups whose result is missing or stale.

Each file says what it is the result of, in its parquet key-value metadata under "gradcon_result" (JSON): the
model id (checkpoint content hash), the threshold setting (a value, or a contamination), the input file's
identity (name, size in bytes, SHA-256 of its parquet footer, which holds every row group's offsets and
statistics) and the row group. A re-run keeps a file only if all of these match and it holds one row per input
row of its group; any other file of ours is rescored. A parquet file without that key is not ours and is never
overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradcon_core.metrics import threshold_from_scores
from gradcon_core.results.table import SCHEMA

RESULT_KEY = b"gradcon_result"


@dataclass(frozen=True)
class RowGroupTask:
    """One input row group to score and the result file it becomes."""

    input: str  # the input file (a path in the input's filesystem)
    group: int  # its row group
    first_row: int  # the file's row number of the group's first row (ids of rows without one count from it)
    rows: int
    output: str  # the result file (a path in the output's filesystem)
    identity: str  # what the result file records (result_identity, as JSON)


def result_name(input_path: str, group: int, groups: int) -> str:
    """The result file's name: the input's for a one-group file, else `<stem>-rg<group>.parquet`."""
    name = os.path.basename(input_path)
    if groups == 1:
        return name
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
    return f"{stem}-rg{group:05d}.parquet"


def input_identity(fs: pafs.FileSystem, path: str) -> dict:
    """What identifies an input file's content, cheaply: its name, size and the SHA-256 of its footer."""
    with fs.open_input_file(path) as f:
        size = f.size()
        if size < 12:
            raise ValueError(f"{path} is not a parquet file ({size} bytes)")
        f.seek(size - 8)
        footer_length, magic = struct.unpack("<I4s", f.read(8))
        if magic != b"PAR1" or footer_length > size - 12:
            raise ValueError(f"{path} is not a parquet file (no parquet footer)")
        f.seek(size - 8 - footer_length)
        footer = f.read(footer_length)
    return {"name": os.path.basename(path), "bytes": size, "footer_sha256": hashlib.sha256(footer).hexdigest()}


def result_identity(model_id: str, threshold: float | None, contamination: float | None, source: dict,
                    group: int = 0) -> dict:
    """What a result file is the result of: model, threshold setting, input (input_identity) and row group."""
    return {"model_id": model_id, "threshold": threshold, "contamination": contamination, "input": source,
            "row_group": group}


def recorded_identity(fs: pafs.FileSystem, path: str) -> tuple[dict, int] | None:
    """(the identity a result file records, its rows); None if there is no file. A file there that is not one of
    ours (not parquet, or no gradcon_result metadata) raises ValueError: it is never overwritten."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        metadata = pq.ParquetFile(path, filesystem=fs).metadata
    except (pa.ArrowInvalid, OSError):
        metadata = None
    found = (metadata.metadata or {}).get(RESULT_KEY) if metadata is not None else None
    if found is None:
        raise ValueError(f"{path} is in the output but is not a gradcon result file: it is left as it is; "
                         "move it away or choose another output=")
    return json.loads(found), metadata.num_rows


def is_complete(fs: pafs.FileSystem, path: str, rows: int, identity: dict) -> bool:
    """The result file exists, is the result of `identity` and holds `rows` rows."""
    found = recorded_identity(fs, path)
    return found is not None and found == (json.loads(json.dumps(identity, sort_keys=True)), rows)


class ResultFile:
    """One output file, visible under its final name only once complete; `identity` (result_identity) goes
    into its metadata. Rows without an id get the stable default "<input file>:<row>", counted from first_row."""

    def __init__(self, fs: pafs.FileSystem, path: str, identity: dict, first_row: int = 0):
        self.fs, self.path, self.input_name = fs, path, identity["input"]["name"]
        # S3 objects appear only when their upload completes; local files are renamed into place.
        self.tmp = f"{path}.partial" if isinstance(fs, pafs.LocalFileSystem) else path
        schema = SCHEMA.with_metadata({RESULT_KEY: json.dumps(identity, sort_keys=True).encode()})
        self.writer = pq.ParquetWriter(self.tmp, schema, filesystem=fs, compression="zstd")
        self.rows = first_row

    def write(self, table: pa.Table) -> None:
        ids = table.column("id")
        if ids.null_count:
            filled = [f"{self.input_name}:{self.rows + k}" if v is None else v for k, v in enumerate(ids.to_pylist())]
            table = table.set_column(0, "id", pa.array(filled, pa.string()))
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self.writer.close()
        if self.tmp != self.path:
            self.fs.move(self.tmp, self.path)

    def abandon(self) -> None:
        """Stop without a result file (an S3 upload closed here does appear: it is removed)."""
        self.writer.close()
        self.fs.delete_file(self.tmp)


def apply_contamination(fs: pafs.FileSystem, outputs: list[str], contamination: float) -> float:
    """Second pass over the (small) result files: threshold from this run's scores, then is_anomaly."""
    scores = pa.concat_arrays([pq.read_table(p, columns=["score"], filesystem=fs).column("score").combine_chunks()
                               for p in outputs])
    threshold = threshold_from_scores(scores.drop_null().to_numpy(), contamination=contamination)
    for p in outputs:
        table = pq.read_table(p, filesystem=fs)
        table = table.set_column(table.schema.get_field_index("is_anomaly"), "is_anomaly",
                                 pc.greater(table.column("score"), threshold))
        table = table.set_column(table.schema.get_field_index("threshold"), "threshold",
                                 pa.array([threshold] * table.num_rows, pa.float64()))
        pq.write_table(table, p, filesystem=fs, compression="zstd")
    return threshold
