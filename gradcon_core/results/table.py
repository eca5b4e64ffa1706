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


def score_pixels(detector: Detector, pixels: np.ndarray, errors: list[str | None]) -> dict[str, np.ndarray]:
    """Scores of the rows without an error; NaN elsewhere. Marks rows whose score is not finite."""
    n = len(errors)
    out = {k: np.full(n, np.nan, np.float32) for k in ("score", "recon_error", "grad_score")}
    ok = ~failed_rows(errors)
    if ok.any():
        parts = detector.score_components(pixels if ok.all() else pixels[ok])
        for k in out.keys() & parts.keys():  # detectors may report more parts than the table has columns for
            out[k][ok] = parts[k]
    for i in np.flatnonzero(ok & ~np.isfinite(out["score"])):
        errors[i] = "score is not finite"
    return out


def failed_rows(errors: list[str | None]) -> np.ndarray:
    """Which rows have an error (a vectorized look at a list that is mostly None)."""
    return np.asarray(errors, dtype=object) != None  # noqa: E711 (element-wise, not identity)


def result_rows(
    detector: Detector,
    ids: list | pa.Array,
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
    ids: list | pa.Array,
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
    return result_columns(ids, scores, errors, threshold, model_id, passthrough)


def result_columns(ids: list | pa.Array, scores: dict[str, np.ndarray], errors: list[str | None],
                   threshold: float | None, model_id: str, passthrough: dict[str, pa.Array] | None = None) -> pa.Table:
    """The result table of a batch from its scores (score_pixels) and errors, built from whole arrays."""
    n = len(errors)
    failed = failed_rows(errors)

    def column(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.float32(), mask=failed | ~np.isfinite(values))

    has_grad = not np.isnan(scores["grad_score"][~failed]).all() if (~failed).any() else True
    columns = {
        "id": (ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids)).cast(pa.string()),
        "score": column(scores["score"]),
        "recon_error": column(scores["recon_error"]),
        "grad_score": column(scores["grad_score"]) if has_grad else pa.nulls(n, pa.float32()),
        "is_anomaly": (pa.nulls(n, pa.bool_()) if threshold is None
                       else pa.array(scores["score"] > threshold, mask=failed)),
        "threshold": pa.nulls(n, pa.float64()) if threshold is None else pa.array(np.full(n, threshold, np.float64)),
        "model_id": pa.repeat(pa.scalar(model_id, pa.string()), n),
        "error": pa.array(errors, pa.string()),
    }
    for source, target in PASSTHROUGH.items():
        kind = SCHEMA.field(target).type
        given = (passthrough or {}).get(source)
        columns[target] = pa.nulls(n, kind) if given is None else pa.array(given).cast(kind)
    return pa.table([columns[f.name] for f in SCHEMA], schema=SCHEMA)
