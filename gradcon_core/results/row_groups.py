"""Scoring image sets row group by row group, each row group into its own result file: what every scoring actor
of `gradcon score` does, and what one process can do alone.

A row group is read (the image column and the columns results carry, nothing else), cut into batches of
`batch_size` rows, decoded, scored, turned into result rows and written, with the stages overlapped: while the
detector scores batch k (the calling thread; a GPU is kept busy from there), `threads` threads decode the
batches after it and one thread builds and writes the result rows of the batches before it; the next row group
is read while this one is scored. Decoders that release the GIL (torchvision's JPEG and PNG) use every thread;
small PNGs, decoded mostly in Python, gain from the overlap of reading, decoding and writing rather than from
more threads. Each stage's seconds (in its own thread, so they overlap and add up to more than the wall time)
come back with every row group, as does the time the row group took.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradcon_core.data.images import decode_images
from gradcon_core.data.imageset import IMAGE, image_bytes
from gradcon_core.detectors.contract import Detector
from gradcon_core.results.files import ResultFile, RowGroupTask
from gradcon_core.results.table import PASSTHROUGH, failed_rows, result_columns, score_pixels

STAGES = ("read", "decode", "score", "rows", "write")
READ_COLUMNS = ("id", *PASSTHROUGH)  # what a result row carries from its input row, where the input has it


@dataclass
class Timings:
    """Seconds spent per stage (each in its own thread: several decode at once)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def timed(self, stage: str, fn: Callable, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self.lock:
                self.seconds[stage] += time.perf_counter() - start


class RowGroupScorer:
    """Scores row groups (RowGroupTask) of image sets on in_fs into result files on out_fs. Each task's identity
    says which threshold and model id its result rows carry."""

    def __init__(self, detector: Detector, in_fs: pafs.FileSystem, out_fs: pafs.FileSystem,
                 batch_size: int | None = None, threads: int = 1):
        self.detector, self.in_fs, self.out_fs = detector, in_fs, out_fs
        self.batch_size = batch_size or getattr(detector, "score_batch_size", 256)
        self.lookahead = threads + 1  # batches decoded ahead of the one being scored
        self.decoders = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="write")

    def score(self, tasks: list[RowGroupTask]) -> list[dict]:
        """Score every task's row group into its result file; one summary each (rows, errors, anomalies, the
        stages' seconds and the row group's wall seconds)."""
        summaries, reads = [], deque()
        for k, task in enumerate(tasks):
            timings = Timings()
            if not reads:
                reads.append(self.reader.submit(timings.timed, "read", self._read, task))
            table = reads.popleft().result()
            if k + 1 < len(tasks):  # the next row group is read while this one is scored
                reads.append(self.reader.submit(timings.timed, "read", self._read, tasks[k + 1]))
            summaries.append(self._score_group(task, table, timings))
        return summaries

    def close(self) -> None:
        for pool in (self.decoders, self.reader, self.writer):
            pool.shutdown()

    def _read(self, task: RowGroupTask) -> pa.Table:
        pf = pq.ParquetFile(task.input, filesystem=self.in_fs)
        columns = [c for c in (IMAGE, *READ_COLUMNS) if c in pf.schema_arrow.names]
        if pf.metadata.num_row_groups == 0:  # a file of no rows
            return pf.schema_arrow.empty_table().select(columns)
        return pf.read_row_group(task.group, columns=columns)

    def _score_group(self, task: RowGroupTask, table: pa.Table, timings: Timings) -> dict:
        start = time.perf_counter()
        identity = json.loads(task.identity)
        result = ResultFile(self.out_fs, task.output, identity, task.first_row)
        counts = {"rows": 0, "errors": 0, "anomalies": 0}
        writes: list[Future] = []
        try:
            for batch, (pixels, errors) in self._decoded(table, timings):
                scores = timings.timed("score", score_pixels, self.detector, pixels, errors)
                writes.append(self.writer.submit(self._write, result, batch, scores, errors, identity, timings,
                                                 counts))
            for write in writes:
                write.result()
            if counts["rows"] != task.rows:
                raise RuntimeError(f"{task.input} row group {task.group}: {counts['rows']} rows read, {task.rows} "
                                   "expected (did the file change?): run the same command again")
            timings.timed("write", result.close)
        except BaseException:
            for write in writes:
                write.cancel()
            self.writer.submit(result.abandon).result()  # after any write still running
            raise
        return {"output": task.output, **counts, **{f"{k}_s": v for k, v in timings.seconds.items()},
                "wall_s": time.perf_counter() - start}

    def _decoded(self, table: pa.Table, timings: Timings) -> Iterator[tuple[pa.Table, tuple[np.ndarray, list]]]:
        """(batch, its decoded pixels and errors), in order, the next `lookahead` batches decoding meanwhile."""
        channels, size = self.detector.channels, tuple(self.detector.input_size)
        batches = (table.slice(k, self.batch_size) for k in range(0, table.num_rows, self.batch_size))
        pending: deque = deque()

        def decode(batch: pa.Table):
            return batch, timings.timed("decode", decode_images, image_bytes(batch.column(IMAGE)), channels, size)

        for batch in batches:
            pending.append(self.decoders.submit(decode, batch))
            if len(pending) > self.lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _write(self, result: ResultFile, batch: pa.Table, scores: dict[str, np.ndarray], errors: list,
               identity: dict, timings: Timings, counts: dict) -> None:
        names, threshold = batch.schema.names, identity["threshold"]
        ids = batch.column("id") if "id" in names else pa.nulls(batch.num_rows, pa.string())
        passthrough = {c: batch.column(c) for c in PASSTHROUGH if c in names}
        rows = timings.timed("rows", result_columns, ids, scores, errors, threshold, identity["model_id"], passthrough)
        timings.timed("write", result.write, rows)
        counts["rows"] += rows.num_rows
        counts["errors"] += int(failed_rows(errors).sum())
        counts["anomalies"] += int(np.sum(scores["score"] > threshold)) if threshold is not None else 0
