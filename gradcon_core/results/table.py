"""Encoded images in, result rows out (docs/design.md §7), for any detector.

Shared by the Ray Data score job and the single-process baseline, so both compute the same rows.
A row that cannot be scored (undecodable bytes, wrong channel count, non-finite score) keeps its
place with `error` set and null scores: output rows == input rows, always.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from gradcon_core.data.images import decode_images
from gradcon_core.detectors.contract import Detector

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("score", pa.float32()),
    ("recon_error", pa.float32()),
    ("grad_score", pa.float32()),
    ("is_anomaly", pa.bool_()),
    ("threshold", pa.float64()),
    ("model_id", pa.string()),
    ("error", pa.string()),
    ("label", pa.int64()),
    ("is_anomaly_true", pa.bool_()),
])
PASSTHROUGH = {"label": "label", "is_anomaly": "is_anomaly_true"}  # input column -> result column
# The score job's decode stage (jobs/score.py, decode=tasks) hands the scoring actors these columns in place of
# the encoded images: each row's uint8 pixels [H, W, C] as one fixed-size binary value, and its decode error.
PIXELS, DECODE_ERROR = "pixels", "decode_error"


def score_pixels(detector: Detector, pixels: np.ndarray, errors: list[str | None]) -> dict[str, np.ndarray]:
    """Scores of the rows without an error; NaN elsewhere. Marks rows whose score is not finite."""
    n = len(errors)
    out = {k: np.full(n, np.nan, np.float32) for k in ("score", "recon_error", "grad_score")}
    ok = np.array([e is None for e in errors], dtype=bool)
    if ok.any():
        parts = detector.score_components(pixels[ok])
        for k in out.keys() & parts.keys():  # detectors may report more parts than the table has columns for
            out[k][ok] = parts[k]
    for i in np.flatnonzero(ok & ~np.isfinite(out["score"])):
        errors[i] = "score is not finite"
    return out


def decoded_columns(images: list[bytes | None], channels: int, size: tuple[int, int]) -> dict[str, pa.Array]:
    """Encoded images -> {PIXELS, DECODE_ERROR}: decoded and resized, as the scoring actor would (a failed row
    keeps black pixels and its error)."""
    pixels, errors = decode_images(images, channels, size)
    width = size[0] * size[1] * channels
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(pixels),
                                                  [None, pa.py_buffer(np.ascontiguousarray(pixels))])
    return {PIXELS: column, DECODE_ERROR: pa.array(errors, pa.string())}


def pixels_of(column: pa.Array | pa.ChunkedArray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """The PIXELS column back as uint8 [N, H, W, C] (no copy for a single chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = size[0] * size[1] * channels
    flat = np.frombuffer(column.buffers()[1], np.uint8, count=len(column) * width, offset=column.offset * width)
    return flat.reshape(len(column), *size, channels)


def result_rows(
    detector: Detector,
    ids: list,
    images: list[bytes | None],
    threshold: float | None,
    model_id: str,
    passthrough: dict[str, pa.Array] | None = None,
) -> pa.Table:
    """The result table for one batch of encoded images."""
    pixels, errors = decode_images(images, detector.channels, tuple(detector.input_size))
    return pixel_result_rows(detector, ids, pixels, errors, threshold, model_id, passthrough)


def pixel_result_rows(
    detector: Detector,
    ids: list,
    pixels: np.ndarray,
    errors: list[str | None],
    threshold: float | None,
    model_id: str,
    passthrough: dict[str, pa.Array] | None = None,
) -> pa.Table:
    """The result table for one batch of decoded images (uint8 [N, H, W, C] at the detector's size) and their
    decode errors (None where the row decoded)."""
    errors = list(errors)
    scores = score_pixels(detector, pixels, errors)
    failed = np.array([e is not None for e in errors], dtype=bool)

    def column(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.float32(), mask=failed | ~np.isfinite(values))

    has_grad = not np.isnan(scores["grad_score"][~failed]).all() if (~failed).any() else True
    anomaly = None if threshold is None else pa.array(scores["score"] > threshold, mask=failed)
    n = len(ids)
    columns = {
        "id": pa.array([None if i is None else str(i) for i in ids], pa.string()),
        "score": column(scores["score"]),
        "recon_error": column(scores["recon_error"]),
        "grad_score": column(scores["grad_score"]) if has_grad else pa.nulls(n, pa.float32()),
        "is_anomaly": anomaly if anomaly is not None else pa.nulls(n, pa.bool_()),
        "threshold": pa.array([threshold] * n, pa.float64()),
        "model_id": pa.array([model_id] * n, pa.string()),
        "error": pa.array(errors, pa.string()),
    }
    for source, target in PASSTHROUGH.items():
        kind = SCHEMA.field(target).type
        given = (passthrough or {}).get(source)
        columns[target] = pa.nulls(n, kind) if given is None else pa.array(given).cast(kind)
    return pa.table([columns[f.name] for f in SCHEMA], schema=SCHEMA)
