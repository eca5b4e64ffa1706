"""The score job's read stage: a Ray Data datasource with one read task per parquet row group.

Each task reads its row group in blocks of about block_mb (the image column and READ_COLUMNS only), each
row with its file ("path") and its row number there (ROW), which is how the scoring actors write their
results as pieces of the input files (gradcon_core/results/files.py).

Why a datasource rather than `from_items(row groups).map_batches(read)`: Ray Data fuses such a map_batches
into the scoring actors' stage and then hands each actor call as many *row groups* as the scorer's
batch_size asks rows, so one actor read and scored a whole set of a few hundred row groups while the
others waited, and results reached the driver only at the end. A Read is not fused into a stage with a
batch size: its blocks go through the object store to whichever actor is free.
"""
from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from cluster.storage import S3Options, filesystem_for
from gradcon_core.data.imageset import IMAGE, RowGroup
from gradcon_core.results.files import ROW

# What the read stage passes on, typed: a file without one of these gets nulls, so every block has one schema.
READ_COLUMNS = {"id": pa.string(), "label": pa.int64(), "is_anomaly": pa.bool_()}


def read_row_group(fs: pafs.FileSystem, path: str, group: int, start: int, block_mb: float) -> Iterator[pa.Table]:
    """Row group `group` of `path` (whose first row is the file's row `start`) in blocks of about block_mb."""
    pf = pq.ParquetFile(path, filesystem=fs)
    meta = pf.metadata.row_group(group)
    rows_per_block = max(1, int(block_mb * 2**20 * meta.num_rows / max(meta.total_byte_size, 1)))
    names = pf.schema_arrow.names
    row = start
    for batch in pf.iter_batches(batch_size=rows_per_block, row_groups=[group],
                                 columns=[c for c in [IMAGE, *READ_COLUMNS] if c in names]):
        table = pa.Table.from_batches([batch])
        if "id" in names and table.column("id").type != pa.string():  # int64 ids, as strings (as results have)
            table = table.set_column(table.schema.get_field_index("id"), "id", table.column("id").cast(pa.string()))
        for name, kind in READ_COLUMNS.items():
            if name not in table.schema.names:
                table = table.append_column(name, pa.nulls(table.num_rows, kind))
        n = table.num_rows
        yield (table.append_column("path", pa.array([path] * n, pa.string()))
               .append_column(ROW, pa.array(range(row, row + n), pa.int64())))
        row += n


class RowGroups(Datasource):
    """The row groups `groups` (of files on input_uri's filesystem), one read task each."""

    def __init__(self, groups: list[RowGroup], input_uri: str, options: S3Options, block_mb: float):
        self.groups, self.input_uri, self.options, self.block_mb = groups, input_uri, options, block_mb

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for *_, size in self.groups)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # One task per row group, whatever `parallelism` asks: a row group is the unit parquet reads. A task
        # carries only what it reads (not `self`, whose list of every row group would travel with each task).
        uri, options, block_mb = self.input_uri, self.options, self.block_mb

        def task(path: str, group: int, start: int, rows: int, size: int) -> ReadTask:
            def read() -> Iterator[pa.Table]:
                fs, _ = filesystem_for(uri, options)
                yield from read_row_group(fs, path, group, start, block_mb)

            return ReadTask(read, BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None, input_files=[path]),
                            per_task_row_limit=per_task_row_limit)

        return [task(*group) for group in self.groups]
