"""One-class evaluation of a detector on an image set: one run per (normal class, seed), and its outputs.

A run selects rows under a protocol (gradcon_core/data/protocols.py), trains the detector on the class's
train rows (model selection on its validation rows), and only then reads and scores the test rows.
Undecodable rows are left out and listed by id. A finished run is saved on its own (RunResult.save), so an
evaluation that stops keeps it. write_outputs turns the runs into results.csv, table.csv/table.md (mean +- std
over seeds, beside the papers' rows: gradcon_core/results/papers.py), roc.png, histograms.png, auroc_by_class.png,
selections.json and skipped_rows.csv.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from gradcon_core.data.images import decode_images
from gradcon_core.data.imageset import ImageRows, ImageShape, take_rows
from gradcon_core.data.protocols import select
from gradcon_core.detectors.settings import DetectorSettings
from gradcon_core.metrics import evaluate
from gradcon_core.results.papers import Comparison, published_rows
from gradcon_core.results.plots import markdown, plot_histograms, plot_roc, summarize, write_csv


@dataclass
class RunResult:
    """What one (class, seed) run measured."""

    metrics: dict  # class, seed, auroc, aupr, f1, fpr95, train_images, test_images, seconds
    scores: np.ndarray
    is_anomaly: np.ndarray
    selection: dict
    skipped: list[dict] = field(default_factory=list)  # undecodable rows: id, part, error

    def save(self, folder: Path) -> None:
        """<folder>/class-C-seed-S.npz (scores, ground truth) and .json (the rest), the .json written last and
        atomically: its presence says the run finished."""
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / run_stem(self.metrics["class"], self.metrics["seed"])
        with open(f"{stem}.npz.tmp", "wb") as f:
            np.savez(f, scores=self.scores, is_anomaly=self.is_anomaly)
        os.replace(f"{stem}.npz.tmp", f"{stem}.npz")
        info = {"metrics": self.metrics, "selection": self.selection, "skipped": self.skipped}
        Path(f"{stem}.json.tmp").write_text(json.dumps(info, indent=1))
        os.replace(f"{stem}.json.tmp", f"{stem}.json")

    @classmethod
    def load(cls, folder: Path, normal_class: int, seed: int) -> RunResult | None:
        """The saved run, or None if it never finished."""
        stem = folder / run_stem(normal_class, seed)
        if not Path(f"{stem}.json").exists():
            return None
        info = json.loads(Path(f"{stem}.json").read_text())
        arrays = np.load(f"{stem}.npz")
        return cls(info["metrics"], arrays["scores"], arrays["is_anomaly"], info["selection"], info["skipped"])


def run_stem(normal_class: int, seed: int) -> str:
    return f"class-{normal_class}-seed-{seed}"


def saved_runs(folder: Path) -> list[tuple[int, int]]:
    """(class, seed) of every finished run saved under `folder` by RunResult.save."""
    return sorted((info["metrics"]["class"], info["metrics"]["seed"])
                  for info in (json.loads(p.read_text()) for p in folder.glob("class-*-seed-*.json")))


def _decode(rows: ImageRows, channels: int, size: tuple[int, int], part: str,
            skipped: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images and the kept positions; failed rows are listed in `skipped` by id and left out."""
    pixels, errors = decode_images(rows.images, channels, size)
    bad = [i for i, e in enumerate(errors) if e]
    for i in bad:
        skipped.append({"id": rows.ids[i], "part": part, "error": errors[i]})
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


def write_outputs(out: Path, runs: list[RunResult], *, title: str, method: str, protocol: str, dataset: str,
                  other: tuple[str, dict[int, float]] | None = None) -> str:
    """results.csv, table.csv, table.md, selections.json, skipped_rows.csv, roc.png, histograms.png and, beside
    the papers' rows or `other` (name, per-class AUROC of another evaluation), auroc_by_class.png; returns the
    Markdown."""
    results = [r.metrics for r in runs]
    table = summarize(results)
    write_csv(results, out / "results.csv")
    write_csv(table, out / "table.csv")
    md = markdown(table, title)
    per_class = table[:-1]
    rows = published_rows(protocol, dataset)
    if rows or other:
        comparison = Comparison(method, protocol, dataset, {e["class"]: e["auroc"] for e in per_class},
                                {e["class"]: e["auroc_std"] for e in per_class}, rows, other)
        md += "\n" + comparison.markdown()
        comparison.plot(out / "auroc_by_class.png")
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


def per_class_auroc(folder: Path) -> dict[int, float]:
    """Another evaluation's per-class AUROC (mean over its seeds), from its results.csv."""
    path = Path(folder) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: compare_with names the output folder of an earlier eval")
    with open(path, newline="") as f:
        rows = [{**r, "class": int(r["class"]), "seed": int(r["seed"]), "auroc": float(r["auroc"])}
                for r in csv.DictReader(f)]
    by_class: dict[int, list[float]] = {}
    for r in rows:
        by_class.setdefault(r["class"], []).append(r["auroc"])
    return {c: float(np.mean(v)) for c, v in sorted(by_class.items())}
