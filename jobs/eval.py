"""Evaluate a detector on an image set under a one-class protocol: per-class table, ROC curves, histograms.

gradcon eval [--config FILE] [key=value ...]   e.g.  gradcon eval data=data/sets/mnist classes=0,1 seeds=0,1

For each normal class and seed: select rows (gradcon_core.protocols), train the detector (GradCon
unless detector= names another registered one, with that method's defaults) on the class's train
rows (model selection on its validation rows), score the test rows, and measure.
Writes <out>/<name>/: results.csv (every class x seed), table.csv, table.md (mean +- std over
seeds, beside the paper's number), roc.png, histograms.png, selections.json, skipped_rows.csv
(undecodable rows, by id) and config.yaml. Runs in this process (no Ray).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cluster.storage import S3Options, filesystem_for
from gradcon_core import GradConDetector, create_model, evaluate
from gradcon_core.config import add_config_arguments, config_from_arguments, save_config
from gradcon_core.images import channels_of, decode_images
from gradcon_core.imageset import read_columns, take_rows
from gradcon_core.protocols import PROTOCOLS, select
from gradcon_core.registry import create_detector, detector_class
from gradcon_core.report import markdown, plot_histograms, plot_roc, summarize, write_csv


@dataclass
class EvalConfig:
    data: str = "data/sets/mnist"  # image set made by `gradcon prepare` (local or s3://)
    dataset: str = "mnist"  # mnist, fashion-mnist or cifar10: picks the paper's number and FMNIST's split rule
    protocol: str = "gradcon"  # gradcon (balanced test) or full (whole test split)
    classes: str = "all"  # "all" or a comma list such as "0,3,7"
    seeds: list[int] = field(default_factory=lambda: [0])
    detector: str = "gradcon"  # any registered detector; alpha, beta and lr apply to gradcon only
    epochs: int = 10
    batch_size: int = 64
    alpha: float = 0.03
    beta: float = 0.12
    lr: float = 1e-3
    max_train: int | None = None  # cap on training images per class, for a time budget
    device: str = "auto"
    out: str = "results"
    name: str | None = None  # default: <dataset>-<protocol>-<time>
    s3_endpoint: str | None = None


def _decode(rows, channels: int, what: str, skipped: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images and the kept positions; failed rows are reported by id and left out."""
    pixels, errors = decode_images(rows.images, channels, (28, 28))
    bad = [i for i, e in enumerate(errors) if e]
    for i in bad:
        skipped.append({"id": rows.ids[i], "part": what, "error": errors[i]})
    if bad:
        print(f"warning: {len(bad)} undecodable {what} row(s) left out, e.g. id {rows.ids[bad[0]]!r}: "
              f"{errors[bad[0]]}", file=sys.stderr)
    keep = np.setdiff1d(np.arange(len(errors)), bad)
    return pixels[keep], keep


def run(cfg: EvalConfig) -> list[dict]:
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {cfg.protocol!r}; choose one of {PROTOCOLS}")
    detector_class(cfg.detector)  # an unknown name fails here, listing the registered ones
    fs, _ = filesystem_for(cfg.data, S3Options.from_env(endpoint=cfg.s3_endpoint))
    meta = read_columns(cfg.data, ["label", "split"], filesystem=fs)
    labels, splits = meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False)
    present = sorted(int(c) for c in np.unique(labels))
    classes = present if cfg.classes == "all" else [int(c) for c in str(cfg.classes).split(",") if c != ""]
    unknown = sorted(set(classes) - set(present))
    if unknown:
        raise ValueError(f"class(es) {unknown} not in {cfg.data} (labels there: {present})")
    name = cfg.name or f"{cfg.dataset}-{cfg.protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.out) / name
    save_config(cfg, out / "config.yaml")

    results, selections, skipped, curves = [], [], [], {}
    channels = None
    for c in classes:
        for seed in cfg.seeds:
            sel = select(labels, splits, c, cfg.protocol, seed, merge_splits=cfg.dataset == "fashion-mnist")
            train = sel.train[: cfg.max_train] if cfg.max_train else sel.train
            rows = take_rows(cfg.data, np.concatenate([train, sel.val, sel.test]), filesystem=fs)
            channels = channels or channels_of(next(b for b in rows.images if b))
            cut = np.cumsum([len(train), len(sel.val)])
            parts = [rows[a:b] for a, b in zip([0, *cut], [*cut, len(rows.ids)])]
            x_train, _ = _decode(parts[0], channels, "train", skipped)
            x_val, _ = _decode(parts[1], channels, "val", skipped)
            x_test, kept = _decode(parts[2], channels, "test", skipped)
            is_anomaly = sel.test_is_anomaly[kept]

            torch.manual_seed(seed)
            if cfg.detector == "gradcon":
                det = GradConDetector(create_model("gradcon_cae", in_channels=channels), alpha=cfg.alpha,
                                      beta=cfg.beta, lr=cfg.lr, device=cfg.device)
            else:
                det = create_detector(cfg.detector, in_channels=channels, device=cfg.device)
            start = time.perf_counter()
            det.fit(x_train, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed,
                    x_val=x_val if len(x_val) else None)
            scores = det.decision_function(x_test)
            metrics = evaluate(scores, is_anomaly, det.threshold_)
            results.append({"class": c, "seed": seed, **metrics, "train_images": len(x_train),
                            "test_images": len(x_test), "seconds": round(time.perf_counter() - start, 1)})
            selections.append({**sel.summary(), "train_used": len(x_train)})
            if seed == cfg.seeds[0]:
                curves[f"class {c}"] = (scores, is_anomaly)
            print(f"class {c} seed {seed}: AUROC {metrics['auroc']:.4f}  AUPR {metrics['aupr']:.4f}  "
                  f"({len(x_train)} train, {len(x_test)} test, {results[-1]['seconds']} s)", flush=True)

    table = summarize(results)
    write_csv(results, out / "results.csv")
    write_csv(table, out / "table.csv")
    method = "GradCon" if cfg.detector == "gradcon" else cfg.detector
    md = markdown(table, cfg.protocol, cfg.dataset,
                  f"{method} on {cfg.dataset}, {cfg.protocol} protocol, {cfg.epochs} epochs, seeds {cfg.seeds}",
                  paper=cfg.detector == "gradcon")
    (out / "table.md").write_text(md)
    (out / "selections.json").write_text(json.dumps(selections, indent=1))
    if skipped:
        write_csv(skipped, out / "skipped_rows.csv")
    plot_roc(curves, out / "roc.png")
    plot_histograms(curves, out / "histograms.png")
    print(md)
    print(f"results in {out}/ (table.md, table.csv, results.csv, roc.png, histograms.png)")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig)


def main(args: argparse.Namespace) -> int:
    run(config_from_arguments(args, EvalConfig))
    return 0


if __name__ == "__main__":  # python -m jobs.eval ... == gradcon eval ...
    from jobs.cli import main as cli_main

    raise SystemExit(cli_main(["eval", *sys.argv[1:]]))
