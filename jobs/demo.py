"""End-to-end demo on the embedded default: prepare, train (2 workers), score and evaluate, through a local S3.

gradcon demo [--config FILE] [key=value ...]   e.g. gradcon demo quick=true s3=false  (dataset=defects: RGB textures)

Starts an embedded Ray and a real S3 server on 127.0.0.1 (SeaweedFS, random credentials), writes
MNIST into the bucket as an image set, trains GradCon on one digit with 2 data-parallel workers
(checkpoints in the bucket), scores the test split from the bucket into a result table in the
bucket, evaluates it and writes an HTML report of it (gradcon report). Everything it started is
stopped at the end, on failure or on Ctrl-C; the result table, the checkpoint, the plots and the
report are also kept under `out` to outlive the server.
dataset=defects runs the same steps on the generated 64x64 RGB texture set (gradcon_core/data/defects.py):
normal_class is a texture kind (0 fabric, 1 wood, 2 metal, 3 carpet), the test rows are that kind's normal
and defective ones; image_size=S generates (and trains) at S instead.
s3=false runs the same on local files; quick=true is a reduced run (2,000 training images, 3 epochs, 1,000 test
images).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.storage import S3Options, filesystem_for
from gradcon_core.config import bounded, local_path, save_config
from gradcon_core.data.defects import CLASSES, DefectCounts
from gradcon_core.data.idx import find_idx
from gradcon_core.data.imageset import read_columns, recorded_shape, write_image_set
from gradcon_core.detectors.settings import DetectorSettings
from gradcon_core.metrics import evaluate
from gradcon_core.results.plots import plot_histograms, plot_roc
from jobs import prepare, report, score, train

BUCKET = "gradcon-demo"
QUICK = {"train_images": 2000, "test_images": 1000, "epochs": 3}
DATASETS = ("mnist", "defects")
DEFECTS_SIZE = 64  # the defects demo's default image size: minutes on 2 cores
DEFECTS_COUNTS = DefectCounts(train=400, test_normal=100, test_defective=100)  # per texture kind


@dataclass
class DemoConfig(DetectorSettings):
    dataset: str = "mnist"  # or defects (generated RGB textures, no download)
    data_dir: str = local_path("data/mnist")  # IDX files; `make data` puts MNIST here
    normal_class: int = 0  # a digit, or a texture kind (defects: 0 fabric, 1 wood, 2 metal, 3 carpet)
    train_images: int = 0  # 0: all of the class's training images (90% train, 10% validation)
    test_images: int = 0  # 0: the whole MNIST test split is scored
    epochs: int = bounded(10, at_least=1)
    batch_size: int = bounded(64, at_least=1)
    num_workers: int = bounded(2, at_least=1)
    seed: int = 0
    s3: bool = True  # False: local files instead of the local S3 server
    quick: bool = False  # a reduced run: 2,000 training images, 3 epochs, 1,000 test images (unless set)
    out: str = local_path("runs/demo")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        kinds = 10 if self.dataset == "mnist" else len(CLASSES)
        if not 0 <= self.normal_class < kinds:
            raise ValueError(f"normal_class must be 0-{kinds - 1} for {self.dataset}, got {self.normal_class}")

    def sizes(self) -> dict[str, int]:
        """train_images, test_images and epochs, with quick's reductions where they are left at the default."""
        sizes = {k: getattr(self, k) for k in QUICK}
        if self.quick:
            defaults = {f.name: f.default for f in fields(DemoConfig)}
            sizes.update({k: v for k, v in QUICK.items() if sizes[k] == defaults[k]})
        return sizes


Config = DemoConfig


class Steps:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total: int):
        self.total, self.n, self.start = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {text}  (t = {time.perf_counter() - self.start:.0f} s)", flush=True)


def _prepare(cfg: DemoConfig, root: str) -> str:
    """The demo's image set under root/sets/: MNIST from data_dir, or the generated defects set."""
    data = f"{root}/sets/{cfg.dataset}"
    if cfg.dataset == "mnist":
        prepare.prepare("mnist", cfg.data_dir, data)
    else:
        prepare.prepare("defects", None, data, image_size=cfg.image_hw() or DEFECTS_SIZE, seed=cfg.seed,
                        counts=DEFECTS_COUNTS)
    return data


def _test_set(cfg: DemoConfig, data: str, fs: pafs.FileSystem) -> str:
    """The test split as its own image set, with ground truth (is_anomaly): for MNIST every digit but the
    normal one is an anomaly; for defects the test rows are the normal kind's, defective or not."""
    columns = ["image", "label", "split"] + (["is_anomaly"] if cfg.dataset == "defects" else [])
    table = read_columns(data, columns, filesystem=fs)
    table = table.filter(pc.equal(table.column("split"), "test"))
    if cfg.dataset == "mnist":
        table = table.append_column("is_anomaly", pc.not_equal(table.column("label"), cfg.normal_class))
    else:
        table = table.filter(pc.equal(table.column("label"), cfg.normal_class))
    if cfg.sizes()["test_images"]:
        table = table.slice(0, cfg.sizes()["test_images"])
    path = f"{data}-test"
    write_image_set(path, table.select(["id", "image", "label", "is_anomaly"]), rows_per_file=5000, filesystem=fs,
                    shape=recorded_shape(data, fs))
    return path


def _copy_out(uri: str, dest: Path) -> None:
    """Copy a directory tree from the bucket (or a local path) under dest."""
    fs, path = filesystem_for(uri, S3Options.from_env())
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def _storage(cfg: DemoConfig, out: Path, stack: ExitStack, step: Steps) -> str:
    """Where the demo keeps its sets, runs and scores: a bucket of a local S3 server (stopped with the stack)
    whose credentials the jobs read from the environment, or local files."""
    from cluster.local_s3 import LocalS3

    if not cfg.s3:
        step("local files only (s3=false)")
        return str(out / "store")
    step("starting a local S3 server (SeaweedFS on 127.0.0.1, random credentials)")
    s3 = stack.enter_context(LocalS3(data_dir=str(out / "s3-data")))
    s3.create_bucket(BUCKET)
    # The jobs read credentials from the environment; Ray's processes, started next, inherit them.
    os.environ.update(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key,
                      AWS_ENDPOINT_URL=s3.options.endpoint)
    return f"s3://{BUCKET}"


def _train(cfg: DemoConfig, data: str, root: str) -> tuple[train.TrainConfig, str]:
    sizes = cfg.sizes()
    detector = {f.name: getattr(cfg, f.name) for f in fields(DetectorSettings)}
    train_cfg = train.TrainConfig(**detector, data=data, normal_class=cfg.normal_class, epochs=sizes["epochs"],
                                  batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                                  storage=f"{root}/runs", max_train_images=sizes["train_images"],
                                  name=f"demo-c{cfg.normal_class}-{time.strftime('%Y%m%d-%H%M%S')}")
    return train_cfg, train.run(train_cfg)[1]


def _evaluate(cfg: DemoConfig, results: Path, out: Path, normal: str) -> dict:
    """AUROC and friends of the result table, the ROC and histogram plots, metrics.json."""
    table = pq.read_table(results, columns=["score", "is_anomaly_true", "threshold", "error"])
    ok = table.filter(pc.is_null(table.column("error")))
    scores = ok.column("score").to_numpy()
    is_anomaly = ok.column("is_anomaly_true").to_numpy(zero_copy_only=False)
    metrics = evaluate(scores, is_anomaly, ok.column("threshold")[0].as_py())
    curves = {f"{normal}: normal vs anomalous": (scores, is_anomaly)}
    plot_roc(curves, out / "roc.png")
    plot_histograms(curves, out / "histograms.png")
    metrics.update(test_images=len(scores), errors=table.num_rows - len(scores))
    return metrics


def run(cfg: DemoConfig) -> dict:
    from cluster.ray_init import init_ray, stop_ray

    if cfg.dataset == "mnist":
        for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):  # before starting anything
            find_idx(cfg.data_dir, stem)
    normal = f"digit {cfg.normal_class}" if cfg.dataset == "mnist" else f"{CLASSES[cfg.normal_class]} textures"
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    step = Steps(7)
    with ExitStack() as stack:  # stops the S3 server and Ray however this ends (error, Ctrl-C)
        root = _storage(cfg, out, stack, step)
        fs, _ = filesystem_for(root, S3Options.from_env())
        # Ray Data's per-operator bars flood a terminal shared by parallel datasets: the steps show progress.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        init_ray(num_cpus=cfg.num_workers + 2)  # workers + Ray Data's list and read tasks
        stack.callback(stop_ray)  # returns once every Ray process has exited
        step(f"preparing {cfg.dataset} as image sets under {root}/sets/")
        data = _prepare(cfg, root)
        test_set = _test_set(cfg, data, fs)
        step(f"training {cfg.detector} on {normal} with {cfg.num_workers} Ray Train workers, "
             f"{cfg.sizes()['epochs']} epoch(s)")
        train_cfg, checkpoint = _train(cfg, data, root)
        step("scoring the test split with a pool of Ray actors")
        scores_uri = f"{root}/scores/{train_cfg.name}"
        score.run(score.ScoreConfig(checkpoint=checkpoint, input=test_set, output=scores_uri))
        step("evaluating the result table")
        _copy_out(scores_uri, out / "results")
        _copy_out(checkpoint, out / "checkpoint")
        metrics = _evaluate(cfg, out / "results", out, normal) | {"checkpoint": checkpoint, "result_table": scores_uri}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        step("writing the HTML report (gallery of the most anomalous test images, with their error maps)")
        index = report.run(report.ReportConfig(results=str(out / "results"), out=str(out / "report"),
                                               images=test_set, checkpoint=str(out / "checkpoint")))
    step("done; " + ("the S3 server and Ray are" if cfg.s3 else "Ray is") + " stopped")
    _say_where(cfg, metrics, out, index, normal)
    return metrics


def _say_where(cfg: DemoConfig, metrics: dict, out: Path, index: str, normal: str) -> None:
    """The metrics, where everything is, and each step as its own command."""
    print(f"\nAUROC {metrics['auroc']:.4f}  AUPR {metrics['aupr']:.4f}  F1 {metrics['f1']:.4f}  "
          f"FPR@95TPR {metrics['fpr95']:.4f}  on {metrics['test_images']} test images ({normal} normal)")
    print(f"result table: {metrics['result_table']}  (copied to {out / 'results'})")
    print(f"checkpoint:   {metrics['checkpoint']}  (copied to {out / 'checkpoint'})")
    print(f"plots:        {out / 'roc.png'}, {out / 'histograms.png'}\nmetrics:      {out / 'metrics.json'}")
    print(f"report:       {index}  (open it in a browser)")
    where = "s3://BUCKET" if cfg.s3 else str(out / "store")
    sets = f"{where}/sets/{cfg.dataset}"
    source = f"source={cfg.data_dir}" if cfg.dataset == "mnist" else \
        f"image_size={'x'.join(map(str, cfg.image_hw() or (DEFECTS_SIZE,)))} counts=400,100,100"
    protocol = " protocol=labeled" if cfg.dataset == "defects" else ""
    print(f"""
Each step alone (add AWS_ENDPOINT_URL / credentials for your S3, or use local paths):
  gradcon prepare {cfg.dataset} {source} out={sets}
  gradcon train data={sets} normal_class={cfg.normal_class} num_workers={cfg.num_workers} \
epochs={cfg.sizes()['epochs']} storage={where}/runs
  gradcon score checkpoint=<the checkpoint train prints> input={sets}-test output={where}/scores/RUN
  gradcon eval data={sets} dataset={cfg.dataset}{protocol} classes={cfg.normal_class}
  gradcon report results={where}/scores/RUN images={sets}-test checkpoint=<checkpoint> out=DIR""")
