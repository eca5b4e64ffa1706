"""Evaluate a detector on an image set under a one-class protocol: per-class table, ROC curves, histograms.

gradcon eval [--config FILE] [key=value ...]   e.g.  gradcon eval data=data/sets/mnist classes=0,1 seeds=0,1

For each normal class and seed: select rows (gradcon_core/protocols.py), train the detector (GradCon
unless detector= names another registered one; its settings as in `gradcon train`) on the class's train
rows (model selection on its validation rows), then score the test rows and measure
(gradcon_core/evaluation.py). Writes <out>/<name>/: results.csv (every class x seed), table.csv,
table.md (mean +- std over seeds, beside the paper's number), roc.png, histograms.png,
selections.json, skipped_rows.csv (undecodable rows, by id) and config.yaml. Runs in this process (no Ray).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.storage import S3Options, filesystem_for
from gradcon_core.config import (
    JobSettings,
    add_config_arguments,
    bounded,
    config_from_arguments,
    local_path,
    plain_name,
    save_config,
)
from gradcon_core.evaluation import RunResult, evaluate_class, write_outputs
from gradcon_core.imageset import ImageShape, check_image_set, read_columns, recorded_shape, take_rows
from gradcon_core.progress import Progress
from gradcon_core.protocols import PROTOCOLS, columns_for, labeled_anomalies
from gradcon_core.settings import DetectorSettings
from gradcon_core.tracking import config_params, require, start_run


@dataclass
class EvalConfig(DetectorSettings, JobSettings):
    data: str = local_path("data/sets/mnist")  # image set made by `gradcon prepare` (local or s3://)
    dataset: str = "mnist"  # mnist, fashion-mnist or cifar10: picks the paper's number and FMNIST's split rule
    protocol: str = "gradcon"  # gradcon (balanced test), full (whole test split) or labeled (by is_anomaly)
    classes: str = "all"  # "all" or a comma list such as "0,3,7"
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = bounded(10, at_least=1)
    batch_size: int = bounded(64, at_least=1)
    max_train: int | None = None  # cap on training images per class, for a time budget
    device: str = "auto"
    out: str = local_path("results")
    name: str | None = plain_name()  # default: <dataset>-<protocol>-<time>
    s3_endpoint: str | None = None


def run(cfg: EvalConfig) -> list[dict]:
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {cfg.protocol!r}; choose one of {PROTOCOLS}")
    cfg.detector_params()  # an unknown detector or setting fails here, before any work
    require(cfg.tracking)
    fs, _ = filesystem_for(cfg.data, S3Options.from_env(endpoint=cfg.s3_endpoint))
    check_image_set(cfg.data, fs)
    meta = read_columns(cfg.data, columns_for(cfg.protocol), filesystem=fs)
    labels, splits = meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False)
    is_anomaly = labeled_anomalies(meta)
    present = sorted(int(c) for c in np.unique(labels))
    classes = present if cfg.classes == "all" else [int(c) for c in str(cfg.classes).split(",") if c != ""]
    unknown = sorted(set(classes) - set(present))
    if unknown:
        raise ValueError(f"class(es) {unknown} not in {cfg.data} (labels there: {present})")
    shape = cfg.image_shape(recorded_shape(cfg.data, fs), lambda: take_rows(cfg.data, [0], filesystem=fs).images[0])
    name = cfg.name or f"{cfg.dataset}-{cfg.protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.out) / name
    save_config(cfg, out / "config.yaml")
    with start_run(cfg.tracking, name) as tracker:
        tracker.log_params(config_params(cfg))
        runs = _evaluate(cfg, fs, shape, labels, splits, is_anomaly, classes, tracker.log_metrics)
        _write(cfg, out, runs)
        tracker.log_metrics({f"mean_{k}": float(np.mean([r.metrics[k] for r in runs])) for k in ("auroc", "aupr")})
        tracker.log_artifact(out)  # tables, plots, config
    return [r.metrics for r in runs]


def _evaluate(cfg: EvalConfig, fs, shape: ImageShape, labels: np.ndarray, splits: np.ndarray,
              is_anomaly: np.ndarray | None, classes: list[int], log_metrics) -> list[RunResult]:
    """Every class x seed, in turn; each run's metrics logged as class_C.seed_S.NAME."""
    runs: list[RunResult] = []
    progress = Progress(len(classes) * len(cfg.seeds), unit="runs", label="eval", quiet=cfg.quiet, every_s=0,
                        stream=sys.stdout)  # a line after each run, beside its result
    for c in classes:
        for seed in cfg.seeds:
            run = evaluate_class(cfg.data, fs, cfg, shape, labels, splits, c, seed, protocol=cfg.protocol,
                                 merge_splits=cfg.dataset == "fashion-mnist", is_anomaly=is_anomaly, epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, max_train=cfg.max_train, device=cfg.device)
            runs.append(run)
            m = run.metrics
            print(f"class {c} seed {seed}: AUROC {m['auroc']:.4f}  AUPR {m['aupr']:.4f}  "
                  f"({m['train_images']} train, {m['test_images']} test, {m['seconds']} s)", flush=True)
            log_metrics({f"class_{c}.seed_{seed}.{k}": v for k, v in m.items()})
            progress.update()
    progress.close()
    return runs


def _write(cfg: EvalConfig, out: Path, runs: list[RunResult]) -> None:
    method = "GradCon" if cfg.detector == "gradcon" else cfg.detector
    title = f"{method} on {cfg.dataset}, {cfg.protocol} protocol, {cfg.epochs} epochs, seeds {cfg.seeds}"
    md = write_outputs(out, runs, title=title, protocol=cfg.protocol, dataset=cfg.dataset,
                       paper=cfg.detector == "gradcon")
    print(md)
    print(f"results in {out}/ (table.md, table.csv, results.csv, roc.png, histograms.png)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig)


def main(args: argparse.Namespace) -> int:
    run(config_from_arguments(args, EvalConfig))
    return 0
