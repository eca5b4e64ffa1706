"""Result tables on storage (what `gradcon score` writes): one file per input file, complete or absent.

A file appears under its final name only once complete (local files are written as .partial and
renamed; S3 objects appear when their upload completes), so a killed job leaves no half file behind
and a re-run rewrites exactly the inputs whose output is missing or incomplete.

The scoring workers write what they score themselves, as pieces: the rows of one input file from row
`start` on, under <output>/_parts/<input name>/ (write_piece); once every row is scored, join_pieces puts
an input's pieces together in row order into its result file and removes them. Nothing funnels through
one process, and a piece is as atomic as a result file. Readers skip _parts (pyarrow ignores names
starting with "_").

Each file says what it is the result of, in its parquet key-value metadata under "gradcon_result" (JSON):
the model id (checkpoint content hash), the threshold setting (a value, or a contamination), and the input
file's identity (name, size in bytes, SHA-256 of its parquet footer, which holds every row group's offsets
and statistics). A re-run keeps a file only if all of these match and it holds one row per input row;
any other file of ours is rescored. A parquet file without that key is not ours and is never overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradcon_core.metrics import threshold_from_scores
from gradcon_core.results.table import SCHEMA

RESULT_KEY = b"gradcon_result"
PARTS = "_parts"
ROW = "row"  # a piece's rows: their row numbers in the input file


def parts_dir(out_root: str, input_name: str) -> str:
    return f"{out_root}/{PARTS}/{input_name}"


def _write_atomically(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    tmp = f"{path}.partial" if isinstance(fs, pafs.LocalFileSystem) else path
    pq.write_table(table, tmp, filesystem=fs, compression="zstd")
    if tmp != path:
        fs.move(tmp, path)


def write_piece(fs: pafs.FileSystem, out_root: str, input_name: str, rows: pa.Table) -> None:
    """Result rows of one input file (with their ROW numbers, in any order) as pieces of consecutive rows."""
    rows = rows.sort_by(ROW)
    numbers = rows.column(ROW).to_numpy()
    breaks = [0, *(np.flatnonzero(np.diff(numbers) != 1) + 1), len(numbers)]
    folder = parts_dir(out_root, input_name)
    fs.create_dir(folder, recursive=True)
    for lo, hi in zip(breaks, breaks[1:]):
        _write_atomically(fs, f"{folder}/{int(numbers[lo]):012d}.parquet", rows.slice(lo, hi - lo))


def clear_pieces(fs: pafs.FileSystem, out_root: str, input_name: str) -> None:
    """Pieces a killed run left: its input is scored again from the start."""
    if fs.get_file_info(parts_dir(out_root, input_name)).type == pafs.FileType.Directory:
        fs.delete_dir(parts_dir(out_root, input_name))


def join_pieces(fs: pafs.FileSystem, out_root: str, output: str, identity: dict, rows: int) -> None:
    """The input's result file from its pieces, which must cover rows 0 .. rows-1 exactly once; then the pieces
    go. An input of no rows gets an empty result file."""
    folder = parts_dir(out_root, identity["input"]["name"])
    found = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    pieces = sorted(i.path for i in found if i.path.endswith(".parquet"))
    result = ResultFile(fs, output, identity)
    covered = 0
    for path in pieces:
        piece = pq.read_table(path, filesystem=fs)
        first = piece.column(ROW)[0].as_py()
        if first != covered:
            result.abandon()
            raise RuntimeError(f"the scored rows of {identity['input']['name']} do not follow each other (row "
                               f"{first} after {covered} of {rows}): run the same command again")
        covered += piece.num_rows
        result.write(piece.drop_columns([ROW]))
    if covered != rows:
        result.abandon()
        raise RuntimeError(f"{covered} of {rows} rows of {identity['input']['name']} were scored: run the same "
                           "command again")
    result.close()
    if pieces:
        fs.delete_dir(folder)


def remove_parts_folder(fs: pafs.FileSystem, out_root: str) -> None:
    """The (now empty) folder of pieces, once every input is joined."""
    folder = f"{out_root}/{PARTS}"
    info = fs.get_file_info(folder)
    if info.type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(folder)):
        fs.delete_dir(folder)


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


def result_identity(model_id: str, threshold: float | None, contamination: float | None, source: dict) -> dict:
    """What a result file is the result of: model, threshold setting, input (input_identity)."""
    return {"model_id": model_id, "threshold": threshold, "contamination": contamination, "input": source}


class ResultFile:
    """One output file, visible under its final name only once complete; `identity` (result_identity) goes
    into its metadata."""

    def __init__(self, fs: pafs.FileSystem, path: str, identity: dict):
        self.fs, self.path, self.input_name = fs, path, identity["input"]["name"]
        # S3 objects appear only when their upload completes; local files are renamed into place.
        self.tmp = f"{path}.partial" if isinstance(fs, pafs.LocalFileSystem) else path
        schema = SCHEMA.with_metadata({RESULT_KEY: json.dumps(identity, sort_keys=True).encode()})
        self.writer = pq.ParquetWriter(self.tmp, schema, filesystem=fs, compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        ids = table.column("id")
        if ids.null_count:  # inputs without an id column get the stable default "<file>:<row>"
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


def is_complete(fs: pafs.FileSystem, path: str, rows: int, identity: dict) -> bool:
    """The result file exists, is the result of `identity` and holds one row per input row. A file there that
    is not one of ours (not parquet, or no gradcon_result metadata) raises ValueError: it is never overwritten."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    try:
        metadata = pq.ParquetFile(path, filesystem=fs).metadata
    except (pa.ArrowInvalid, OSError):
        metadata = None
    found = (metadata.metadata or {}).get(RESULT_KEY) if metadata is not None else None
    if found is None:
        raise ValueError(f"{path} is in the output but is not a gradcon result file: it is left as it is; "
                         "move it away or choose another output=")
    return json.loads(found) == json.loads(json.dumps(identity, sort_keys=True)) and metadata.num_rows == rows


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
