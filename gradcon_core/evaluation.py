"""One-class evaluation of a detector on an image set: one run per (normal class, seed), and its outputs.

A run selects rows under a protocol (gradcon_core/protocols.py), trains the detector on the class's
train rows (model selection on its validation rows), and only then reads and scores the test rows.
Undecodable rows are left out and listed by id. write_outputs turns the runs into results.csv,
table.csv/table.md (mean +- std over seeds, beside the paper), roc.png, histograms.png,
selections.json and skipped_rows.csv.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from gradcon_core.images import decode_images
from gradcon_core.imageset import ImageRows, ImageShape, take_rows
from gradcon_core.metrics import evaluate
from gradcon_core.protocols import select
from gradcon_core.report import markdown, plot_histograms, plot_roc, summarize, write_csv
from gradcon_core.settings import DetectorSettings


@dataclass
class RunResult:
    """What one (class, seed) run measured."""

    metrics: dict  # class, seed, auroc, aupr, f1, fpr95, train_images, test_images, seconds
    scores: np.ndarray
    is_anomaly: np.ndarray
    selection: dict
    skipped: list[dict] = field(default_factory=list)  # undecodable rows: id, part, error


def _decode(rows: ImageRows, channels: int, size: tuple[int, int], part: str,
            skipped: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images and the kept positions; failed rows are reported by id and left out."""
    pixels, errors = decode_images(rows.images, channels, size)
    bad = [i for i, e in enumerate(errors) if e]
    for i in bad:
        skipped.append({"id": rows.ids[i], "part": part, "error": errors[i]})
    if bad:
        print(f"warning: {len(bad)} undecodable {part} row(s) left out, e.g. id {rows.ids[bad[0]]!r}: "
              f"{errors[bad[0]]}", file=sys.stderr)
    keep = np.setdiff1d(np.arange(len(errors)), bad)
    return pixels[keep], keep


def evaluate_class(
    data: str, filesystem: pafs.FileSystem | None, settings: DetectorSettings, shape: ImageShape,
    labels: np.ndarray, splits: np.ndarray, normal_class: int, seed: int, *, protocol: str = "gradcon",
    merge_splits: bool = False, is_anomaly: np.ndarray | None = None, epochs: int = 10, batch_size: int = 64,
    max_train: int | None = None, device: str = "auto",
) -> RunResult:
    """Train on normal_class under the protocol, then score its test rows (read only after training); the
    detector takes images of `shape` (DetectorSettings.image_shape)."""
    sel = select(labels, splits, normal_class, protocol, seed, merge_splits=merge_splits, is_anomaly=is_anomaly)
    train = sel.train[:max_train] if max_train else sel.train
    rows = take_rows(data, np.concatenate([train, sel.val]), filesystem=filesystem)
    torch.manual_seed(seed)
    det = settings.build(shape.channels, shape.image_size, device)
    skipped: list[dict] = []
    x_train, _ = _decode(rows[: len(train)], det.channels, det.input_size, "train", skipped)
    x_val, _ = _decode(rows[len(train):], det.channels, det.input_size, "val", skipped)
    start = time.perf_counter()
    det.fit(x_train, epochs=epochs, batch_size=batch_size, seed=seed, x_val=x_val if len(x_val) else None)
    x_test, kept = _decode(take_rows(data, sel.test, filesystem=filesystem), det.channels, det.input_size, "test",
                           skipped)
    is_anomaly = sel.test_is_anomaly[kept]
    scores = det.decision_function(x_test)
    metrics = evaluate(scores, is_anomaly, det.threshold_)
    row = {"class": normal_class, "seed": seed, **metrics, "train_images": len(x_train), "test_images": len(x_test),
           "seconds": round(time.perf_counter() - start, 1)}
    return RunResult(row, scores, is_anomaly, {**sel.summary(), "train_used": len(x_train)}, skipped)


def write_outputs(out: Path, runs: list[RunResult], *, title: str, protocol: str, dataset: str,
                  paper: bool) -> str:
    """results.csv, table.csv, table.md, selections.json, skipped_rows.csv, roc.png, histograms.png; returns
    the Markdown table."""
    results = [r.metrics for r in runs]
    table = summarize(results)
    write_csv(results, out / "results.csv")
    write_csv(table, out / "table.csv")
    md = markdown(table, protocol, dataset, title, paper=paper)
    (out / "table.md").write_text(md)
    (out / "selections.json").write_text(json.dumps([r.selection for r in runs], indent=1))
    skipped = [s for r in runs for s in r.skipped]
    if skipped:
        write_csv(skipped, out / "skipped_rows.csv")
    first_seed = min(r.metrics["seed"] for r in runs)
    curves = {f"class {r.metrics['class']}": (r.scores, r.is_anomaly) for r in runs if r.metrics["seed"] == first_seed}
    plot_roc(curves, out / "roc.png")
    plot_histograms(curves, out / "histograms.png")
    return md
