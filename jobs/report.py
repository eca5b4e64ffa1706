"""Write a static HTML report of a result table: score histogram, ROC/PR curves, counts, anomaly gallery.

gradcon report --results PREFIX [--images PREFIX] [--model CKPT] --out DIR [--top-k 24] [--normal-sample 12]

One folder (index.html beside its PNG files) that opens from disk without a server or the internet.
--images (the scored image set) adds the pictures, read by id for the rows shown only; --model (the
checkpoint that scored them) adds, for detectors that reconstruct, each image's reconstruction and
per-pixel error heat map. Local paths or s3:// for every input; no Ray.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from cluster.storage import S3Options, check_readable, filesystem_for
from gradcon_core import load_detector
from gradcon_core.config import load_config
from gradcon_core.results.report import build_report


@dataclass
class ReportConfig:
    results: str = ""  # result table written by gradcon score (a parquet file or a prefix)
    out: str = ""  # report folder
    images: str | None = None  # the image set that was scored: pictures of the rows shown
    model: str | None = None  # the checkpoint that scored it: reconstructions and error heat maps
    top_k: int = 24  # the most anomalous rows shown
    normal_sample: int = 12  # randomly chosen normal rows shown
    seed: int = 0  # of the normal sample
    s3_endpoint: str | None = None


def run(cfg: ReportConfig) -> str:
    if not (cfg.results and cfg.out):
        raise ValueError("report needs --results and --out")
    options = S3Options.from_env(endpoint=cfg.s3_endpoint)
    for uri in (cfg.results, cfg.images, cfg.model):
        if uri:
            check_readable(uri, options)
    results_fs, _ = filesystem_for(cfg.results, options)
    images_fs = filesystem_for(cfg.images, options)[0] if cfg.images else None
    detector = None
    if cfg.model:
        model_fs, model_path = filesystem_for(cfg.model, options)
        detector = load_detector(model_path, model_fs)
    out_fs, _ = filesystem_for(cfg.out, options)
    report = build_report(cfg.results, cfg.out, images=cfg.images, detector=detector, model=cfg.model,
                          top_k=cfg.top_k, normal_sample=cfg.normal_sample, seed=cfg.seed,
                          results_filesystem=results_fs, images_filesystem=images_fs, out_filesystem=out_fs)
    scan = report.scan
    summary = f"rows {scan.rows}  errors {scan.error_count}  anomalies {scan.anomalies}"
    if "auroc" in report.metrics:
        summary += f"  AUROC {report.metrics['auroc']:.4f}  AUPR {report.metrics['aupr']:.4f}"
    print(summary)
    print(f"report: {cfg.out.rstrip('/') + '/index.html' if '://' in cfg.out else report.index}")
    return report.index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with ReportConfig fields (flags override it)")
    for name, default in asdict(ReportConfig()).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None, help=f"default: {default!r}")


def main(args: argparse.Namespace) -> int:
    fields = ReportConfig.__dataclass_fields__
    overrides = [f"{k}={v}" for k, v in vars(args).items() if k in fields and v is not None]
    run(load_config(ReportConfig, args.config, overrides))
    return 0

