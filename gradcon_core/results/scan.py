"""One streaming pass over a result table (gradcon score's output): counts, the score and label arrays,
the top-K most anomalous rows and a seeded random sample of normal rows.

A result table can hold tens of millions of rows, so nothing is read whole: the needed columns come in
record batches, the top-K and the sample are running selections of K rows, and the only arrays that grow
with the table are the scores (float32) and labels (int8) of the scored rows, 5 bytes a row, kept for the
exact AUROC/AUPR and the histogram.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradcon_core.data.imageset import list_parquet_files
from gradcon_core.results.table import SCHEMA

log = logging.getLogger("gradcon")
COLUMNS = ("id", "score", "recon_error", "grad_score", "is_anomaly", "threshold", "model_id", "error", "label",
           "is_anomaly_true")
ROW_SCHEMA = pa.schema([SCHEMA.field(c) for c in COLUMNS])
# "undecodable image (UnidentifiedImageError: ...)" -> "undecodable image": the detail names one row.
ERROR_DETAIL = r" \(.*$"
PROGRESS_EVERY_S = 10.0


class RunningSelection:
    """The k rows with the largest keys offered so far (ties: the earlier row first), kept as a small table."""

    def __init__(self, k: int):
        self.k = k
        self.keys = np.empty(0, np.float64)
        self.positions = np.empty(0, np.int64)  # row number in the whole table: the tie-breaker
        self.rows = ROW_SCHEMA.empty_table()

    def offer(self, keys: np.ndarray, batch: pa.Table, first_row: int) -> None:
        """keys: one per row of batch, NaN for rows that may not be selected."""
        if self.k == 0:
            return
        candidates = np.flatnonzero(~np.isnan(keys))
        if len(candidates) > self.k:  # every row tied with the k-th largest stays a candidate
            kth = np.partition(keys[candidates], len(candidates) - self.k)[len(candidates) - self.k]
            candidates = candidates[keys[candidates] >= kth]
        if len(candidates) == 0:
            return
        all_keys = np.concatenate([self.keys, keys[candidates]])
        positions = np.concatenate([self.positions, first_row + candidates])
        rows = pa.concat_tables([self.rows, batch.take(pa.array(candidates))])
        keep = np.lexsort((positions, -all_keys))[: self.k]
        self.keys, self.positions, self.rows = all_keys[keep], positions[keep], rows.take(pa.array(keep))


@dataclass
class ResultScan:
    rows: int = 0
    anomalies: int = 0  # rows with is_anomaly true (above the threshold)
    true_anomalies: int = 0  # rows with is_anomaly_true true
    thresholds: set = field(default_factory=set)
    model_ids: set = field(default_factory=set)
    errors: Counter = field(default_factory=Counter)  # error kind -> rows
    error_rows: list[tuple[str, str]] = field(default_factory=list)  # the first (id, error) pairs
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))  # the scored rows
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))  # is_anomaly_true: 1, 0, -1 = null
    top: pa.Table = field(default_factory=ROW_SCHEMA.empty_table)  # highest score first
    normal: pa.Table = field(default_factory=ROW_SCHEMA.empty_table)
    normal_by_threshold: bool = False  # normal = below the threshold (else: any scored row, no threshold)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def threshold(self) -> float | None:
        return min(self.thresholds) if len(self.thresholds) == 1 else None


def _conform(batch: pa.RecordBatch) -> pa.Table:
    """The batch with every column of ROW_SCHEMA, in order (nulls for those the file lacks)."""
    n = batch.num_rows
    columns = [batch.column(f.name).cast(f.type) if f.name in batch.schema.names else pa.nulls(n, f.type)
               for f in ROW_SCHEMA]
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


def _bools(column: pa.ChunkedArray) -> np.ndarray:
    """1 / 0 / -1 (null) per row."""
    return np.asarray(pc.fill_null(pc.cast(column, pa.int8()), -1).to_numpy(zero_copy_only=False), np.int8)


def scan_results(
    uri: str,
    top_k: int = 24,
    normal_sample: int = 12,
    seed: int = 0,
    max_error_rows: int = 50,
    batch_rows: int = 65536,
    filesystem: pafs.FileSystem | None = None,
) -> ResultScan:
    """Stream the result table at uri (a file or a prefix of parquet files) once."""
    fs, files = list_parquet_files(uri, filesystem)
    readers = [pq.ParquetFile(path, filesystem=fs) for path in files]
    for path, reader in zip(files, readers):
        if not {"id", "score"} <= set(reader.schema_arrow.names):
            raise ValueError(f"{path} is not a result table: it has no 'id' and 'score' columns "
                             f"(columns: {reader.schema_arrow.names})")
    total = sum(r.metadata.num_rows for r in readers)
    # The sample leaves out rows the top-K shows (few anomalies, or no threshold): k extra candidates make up for them.
    scan, top, normal = ResultScan(), RunningSelection(top_k), RunningSelection(normal_sample + top_k)
    rng = np.random.default_rng(seed)  # one draw per row, in table order: the sample depends on seed and rows only
    scores, labels = [], []
    last_report = time.monotonic()
    for reader in readers:
        present = [c for c in COLUMNS if c in reader.schema_arrow.names]
        for record_batch in reader.iter_batches(batch_size=batch_rows, columns=present):
            batch = _conform(record_batch)
            score = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where null
            scored = ~np.isnan(score)
            predicted, truth = _bools(batch.column("is_anomaly")), _bools(batch.column("is_anomaly_true"))
            scores.append(score[scored].astype(np.float32))
            labels.append(truth[scored])
            scan.anomalies += int((predicted == 1).sum())
            scan.true_anomalies += int((truth == 1).sum())
            scan.normal_by_threshold |= bool((predicted[scored] >= 0).any())
            top.offer(np.where(scored, score, np.nan), batch, scan.rows)
            # Normal: below the threshold; rows without is_anomaly (no threshold) count as normal candidates.
            draws = rng.random(batch.num_rows)
            normal.offer(np.where(scored & (predicted != 1), draws, np.nan), batch, scan.rows)
            scan.thresholds.update(v for v in pc.unique(batch.column("threshold")).to_pylist() if v is not None)
            scan.model_ids.update(v for v in pc.unique(batch.column("model_id")).to_pylist() if v is not None)
            _count_errors(scan, batch, max_error_rows)
            scan.rows += batch.num_rows
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                log.info("report: read %d / %d result rows (%.0f%%)", scan.rows, total, 100 * scan.rows / total)
                last_report = time.monotonic()
    scan.scores = np.concatenate(scores) if scores else scan.scores
    scan.labels = np.concatenate(labels) if labels else scan.labels
    scan.top = top.rows
    scan.normal = normal.rows.filter(pc.invert(pc.is_in(normal.rows.column("id"), top.rows.column("id"))))
    scan.normal = scan.normal.slice(0, normal_sample)
    return scan


def _count_errors(scan: ResultScan, batch: pa.Table, max_error_rows: int) -> None:
    failed = batch.filter(pc.is_valid(batch.column("error")))
    if failed.num_rows == 0:
        return
    kinds = pc.value_counts(pc.replace_substring_regex(failed.column("error"), ERROR_DETAIL, ""))
    for entry in kinds.to_pylist():
        scan.errors[entry["values"]] += entry["counts"]
    room = max_error_rows - len(scan.error_rows)
    if room > 0:
        head = failed.slice(0, room)
        scan.error_rows.extend(zip(head.column("id").to_pylist(), head.column("error").to_pylist()))
