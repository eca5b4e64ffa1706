"""End-to-end demo on the embedded default: prepare, train (2 workers), score and evaluate, through a local S3.

gradcon demo [--quick] [--no-s3] [--config FILE] [key=value ...]

Starts an embedded Ray and a real S3 server on 127.0.0.1 (SeaweedFS, random credentials), writes
MNIST into the bucket as an image set, trains GradCon on one digit with 2 data-parallel workers
(checkpoints in the bucket), scores the test split from the bucket into a result table in the
bucket, evaluates it and writes an HTML report of it (gradcon report). Everything it started is
stopped at the end, on failure or on Ctrl-C; the result table, the checkpoint, the plots and the
report are also kept under `out` to outlive the server.
--no-s3 runs the same on local files; --quick is a reduced run (2,000 training images, 3 epochs, 1,000 test images).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.storage import S3Options, filesystem_for
from gradcon_core.config import add_config_arguments, bounded, load_config, local_path, save_config
from gradcon_core.idx import find_idx, load_mnist
from gradcon_core.images import encode_png
from gradcon_core.metrics import evaluate
from gradcon_core.report import plot_histograms, plot_roc
from gradcon_core.settings import DetectorSettings
from jobs import prepare, report, score, train

BUCKET = "gradcon-demo"
QUICK = {"train_images": 2000, "test_images": 1000, "epochs": 3}


@dataclass
class DemoConfig(DetectorSettings):
    data_dir: str = local_path("data/mnist")  # IDX files; `make data` puts MNIST here
    normal_class: int = 0
    train_images: int = 0  # 0: all of the class's training images (90% train, 10% validation)
    test_images: int = 0  # 0: the whole MNIST test split is scored
    epochs: int = bounded(10, at_least=1)
    batch_size: int = bounded(64, at_least=1)
    num_workers: int = bounded(2, at_least=1)
    seed: int = 0
    s3: bool = True  # False: local files instead of the local S3 server
    out: str = local_path("runs/demo")


class Steps:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total: int):
        self.total, self.n, self.start = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {text}  (t = {time.perf_counter() - self.start:.0f} s)", flush=True)


def _test_set(cfg: DemoConfig, root: str, fs: pafs.FileSystem) -> str:
    """The test split as its own image set, with ground truth for the normal class (is_anomaly)."""
    from gradcon_core.imageset import write_image_set

    x, y = load_mnist(cfg.data_dir, "test")
    if cfg.test_images:
        x, y = x[: cfg.test_images], y[: cfg.test_images]
    table = pa.table({"id": [f"test-{i:06d}" for i in range(len(x))],
                      "image": pa.array([encode_png(img) for img in x], pa.binary()),
                      "label": pa.array(y, pa.int64()), "is_anomaly": pa.array(y != cfg.normal_class)})
    path = f"{root}/sets/mnist-test"
    write_image_set(path, table, rows_per_file=5000, filesystem=fs)
    return path


def _copy_out(uri: str, dest: Path) -> None:
    """Copy a directory tree from the bucket (or a local path) under dest."""
    fs, path = filesystem_for(uri, S3Options.from_env())
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def run(cfg: DemoConfig) -> dict:
    from cluster.local_s3 import LocalS3
    from cluster.ray_init import init_ray, stop_ray

    if not 0 <= cfg.normal_class <= 9:
        raise ValueError(f"normal_class must be a digit 0-9, got {cfg.normal_class}")
    cfg.detector_params()  # an unknown detector or setting fails here, before anything starts
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):  # before starting anything
        find_idx(cfg.data_dir, stem)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    step = Steps(7)
    with ExitStack() as stack:  # stops the S3 server and Ray however this ends (error, Ctrl-C)
        if cfg.s3:
            step("starting a local S3 server (SeaweedFS on 127.0.0.1, random credentials)")
            s3 = stack.enter_context(LocalS3(data_dir=str(out / "s3-data")))
            s3.create_bucket(BUCKET)
            # The jobs read credentials from the environment; Ray's processes, started next, inherit them.
            os.environ.update(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key,
                              AWS_ENDPOINT_URL=s3.options.endpoint)
            root = f"s3://{BUCKET}"
        else:
            step("local files only (--no-s3)")
            root = str(out / "store")
        fs, _ = filesystem_for(root, S3Options.from_env())
        # Ray Data's per-operator bars flood a terminal shared by parallel datasets: the steps show progress.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        init_ray(num_cpus=cfg.num_workers + 2)  # workers + Ray Data's list and read tasks
        stack.callback(stop_ray)  # returns once every Ray process has exited

        step(f"preparing MNIST as image sets under {root}/sets/")
        prepare.prepare("mnist", cfg.data_dir, f"{root}/sets/mnist")
        test_set = _test_set(cfg, root, fs)

        step(f"training {cfg.detector} on digit {cfg.normal_class} with {cfg.num_workers} Ray Train workers, "
             f"{cfg.epochs} epoch(s)")
        detector = {f.name: getattr(cfg, f.name) for f in fields(DetectorSettings)}
        train_cfg = train.TrainConfig(**detector, data=f"{root}/sets/mnist", normal_class=cfg.normal_class,
                                      epochs=cfg.epochs, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                      seed=cfg.seed, storage=f"{root}/runs", max_train_images=cfg.train_images,
                                      name=f"demo-c{cfg.normal_class}-{time.strftime('%Y%m%d-%H%M%S')}")
        _, checkpoint = train.run(train_cfg)

        step("scoring the test split with Ray Data")
        scores_uri = f"{root}/scores/{train_cfg.name}"
        score.run(score.ScoreConfig(model=checkpoint, input=test_set, output=scores_uri,
                                    concurrency=max(1, cfg.num_workers - 1)))

        step("evaluating the result table")
        _copy_out(scores_uri, out / "results")
        _copy_out(checkpoint, out / "checkpoint")
        table = pq.read_table(out / "results", columns=["score", "is_anomaly_true", "threshold", "error"])
        ok = table.filter(pc.is_null(table.column("error")))
        scores = ok.column("score").to_numpy()
        is_anomaly = ok.column("is_anomaly_true").to_numpy(zero_copy_only=False)
        metrics = evaluate(scores, is_anomaly, ok.column("threshold")[0].as_py())
        curves = {f"digit {cfg.normal_class} vs rest": (scores, is_anomaly)}
        plot_roc(curves, out / "roc.png")
        plot_histograms(curves, out / "histograms.png")
        metrics.update(test_images=len(scores), errors=table.num_rows - len(scores), checkpoint=checkpoint,
                       result_table=scores_uri)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

        step("writing the HTML report (gallery of the most anomalous test images, with their error maps)")
        index = report.run(report.ReportConfig(results=str(out / "results"), out=str(out / "report"),
                                               images=test_set, model=str(out / "checkpoint")))

    step("done; " + ("the S3 server and Ray are" if cfg.s3 else "Ray is") + " stopped")
    print(f"\nAUROC {metrics['auroc']:.4f}  AUPR {metrics['aupr']:.4f}  F1 {metrics['f1']:.4f}  "
          f"FPR@95TPR {metrics['fpr95']:.4f}  on {len(scores)} test images (digit {cfg.normal_class} normal)")
    print(f"result table: {scores_uri}  (copied to {out / 'results'})")
    print(f"checkpoint:   {checkpoint}  (copied to {out / 'checkpoint'})")
    print(f"plots:        {out / 'roc.png'}, {out / 'histograms.png'}\nmetrics:      {out / 'metrics.json'}")
    print(f"report:       {index}  (open it in a browser)")
    where = "s3://BUCKET" if cfg.s3 else str(out / "store")
    print(f"""
Each step alone (add AWS_ENDPOINT_URL / credentials for your S3, or use local paths):
  gradcon prepare mnist --source {cfg.data_dir} --out {where}/sets/mnist
  gradcon train data={where}/sets/mnist normal_class={cfg.normal_class} num_workers={cfg.num_workers} \
epochs={cfg.epochs} storage={where}/runs
  gradcon score --model <the checkpoint train prints> --input {where}/sets/mnist-test --output {where}/scores/RUN
  gradcon eval data={where}/sets/mnist classes={cfg.normal_class}
  gradcon report --results {where}/scores/RUN --images {where}/sets/mnist-test --model <checkpoint> --out DIR""")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)
    parser.add_argument("--quick", action="store_true", help="2,000 training images, 3 epochs, 1,000 test images")
    parser.add_argument("--no-s3", action="store_true", help="local files instead of the local S3 server")


def main(args: argparse.Namespace) -> int:
    extra = {**(QUICK if args.quick else {}), **({"s3": False} if args.no_s3 else {})}
    # --quick sets the sizes, but an explicit key=value still wins.
    overrides = {o.split("=", 1)[0] for o in args.overrides}
    cfg = load_config(DemoConfig, args.config, args.overrides, extra={k: v for k, v in extra.items()
                                                                      if k not in overrides})
    run(cfg)
    return 0

