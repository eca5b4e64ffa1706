"""Write a static HTML report of a result table: score histogram, ROC/PR curves, counts, anomaly gallery.

gradcon report results=PREFIX [images=PREFIX] [checkpoint=CKPT] out=DIR [top_k=24] [normal_sample=12]

One folder (index.html beside its PNG files) that opens from disk without a server or the internet.
images= (the scored image set) adds the pictures, read by id for the rows shown only; checkpoint= (the
checkpoint that scored them) adds, for detectors that reconstruct, each image's reconstruction and
per-pixel error heat map. Local paths or s3:// for every input; no Ray.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.storage import S3Options, check_readable, filesystem_for
from gradcon_core import load_detector
from gradcon_core.config import Config, bounded, local_path
from gradcon_core.results.report import build_report

RENAMED = {"model": "checkpoint"}  # the flag of the release before -> its key


@dataclass
class ReportConfig(Config):
    results: str = local_path("")  # result table written by gradcon score (a parquet file or a prefix)
    out: str = local_path("")  # report folder
    images: str | None = local_path(None)  # the image set that was scored: pictures of the rows shown
    checkpoint: str | None = local_path(None)  # what scored it (a checkpoint or a run's folder): reconstructions
    top_k: int = bounded(24, at_least=0)  # the most anomalous rows shown
    normal_sample: int = bounded(12, at_least=0)  # randomly chosen normal rows shown
    seed: int = 0  # of the normal sample
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.results and self.out):
            raise ValueError("report needs results= and out=")


Config = ReportConfig


def run(cfg: ReportConfig) -> str:
    options = S3Options.from_env(endpoint=cfg.s3_endpoint)
    for uri in (cfg.results, cfg.images, cfg.checkpoint):
        if uri:
            check_readable(uri, options)
    results_fs, _ = filesystem_for(cfg.results, options)
    images_fs = filesystem_for(cfg.images, options)[0] if cfg.images else None
    detector = None
    if cfg.checkpoint:
        model_fs, model_path = filesystem_for(cfg.checkpoint, options)
        detector = load_detector(model_path, model_fs)  # (a run's folder: its best checkpoint)
    out_fs, _ = filesystem_for(cfg.out, options)
    report = build_report(cfg.results, cfg.out, images=cfg.images, detector=detector, checkpoint=cfg.checkpoint,
                          top_k=cfg.top_k, normal_sample=cfg.normal_sample, seed=cfg.seed,
                          results_filesystem=results_fs, images_filesystem=images_fs, out_filesystem=out_fs)
    scan = report.scan
    summary = f"rows {scan.rows}  errors {scan.error_count}  anomalies {scan.anomalies}"
    if "auroc" in report.metrics:
        summary += f"  AUROC {report.metrics['auroc']:.4f}  AUPR {report.metrics['aupr']:.4f}"
    print(summary)
    print(f"report: {cfg.out.rstrip('/') + '/index.html' if '://' in cfg.out else report.index}")
    return report.index
