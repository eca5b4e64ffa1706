"""Result tables on storage (what `gradcon score` writes): one file per input file, complete or absent.

A file appears under its final name only once complete (local files are written as .partial and
renamed; S3 objects appear when their upload completes), so a killed job leaves no half file behind
and a re-run rewrites exactly the inputs whose output is missing or incomplete.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradcon_core.metrics import threshold_from_scores
from gradcon_core.result_table import SCHEMA


class ResultFile:
    """One output file, visible under its final name only once complete."""

    def __init__(self, fs: pafs.FileSystem, path: str, input_name: str):
        self.fs, self.path, self.input_name = fs, path, input_name
        # S3 objects appear only when their upload completes; local files are renamed into place.
        self.tmp = f"{path}.partial" if isinstance(fs, pafs.LocalFileSystem) else path
        self.writer = pq.ParquetWriter(self.tmp, SCHEMA, filesystem=fs, compression="zstd")
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


def is_complete(fs: pafs.FileSystem, path: str, rows: int) -> bool:
    """The result file exists and holds one row per input row."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows == rows


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
