"""Evaluate a detector on an image set under a one-class protocol: per-class table, ROC curves, histograms.

gradcon eval [--config FILE] [key=value ...]   e.g.  gradcon eval data=data/sets/mnist classes=0,1 seeds=0,1

For each normal class and seed: select rows (gradcon_core/data/protocols.py), train the detector (GradCon
unless detector= names another registered one; its settings as in `gradcon train`) on the class's train
rows (model selection on its validation rows), then score the test rows and measure
(gradcon_core/results/evaluation.py). Every (class, seed) is one Ray task with cpus_per_run CPUs and
gpus_per_run GPUs (a fraction lets several small runs share a GPU), as many at once as the cluster (or
the embedded local Ray) fits. Each finished run is saved under <out>/<name>/runs/ at once, so a stopped
eval run again with the same name skips what finished. Writes <out>/<name>/: results.csv (every
class x seed), table.csv, table.md (mean +- std over seeds, beside the papers' rows for the dataset and
protocol: gradcon_core/results/papers.py), roc.png, histograms.png, auroc_by_class.png, selections.json,
skipped_rows.csv (undecodable rows, by id) and config.yaml.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cluster.storage import S3Options, filesystem_for
from gradcon_core.config import bounded, local_path, plain_name, save_config
from gradcon_core.data.imageset import (
    ImageShape,
    check_image_set,
    read_columns,
    recorded_dataset,
    recorded_shape,
    take_rows,
)
from gradcon_core.data.protocols import PROTOCOLS, columns_for, labeled_anomalies
from gradcon_core.detectors.settings import DetectorSettings
from gradcon_core.results.evaluation import RunResult, evaluate_class, per_class_auroc, write_outputs
from gradcon_core.results.papers import our_method
from jobs.progress import Progress
from jobs.tracking import JobSettings, config_params, start_run


@dataclass
class EvalConfig(DetectorSettings, JobSettings):
    data: str = local_path("data/sets/mnist")  # image set made by `gradcon prepare` (local or s3://)
    dataset: str | None = None  # default: the one the set was prepared from, else its folder's name; picks the
    # papers' rows (mnist, fashion-mnist, cifar10) and Fashion-MNIST's split rule
    protocol: str = "gradcon"  # gradcon (balanced test), full (whole test split) or labeled (by is_anomaly)
    classes: str = "all"  # "all" or a comma list such as "0,3,7"
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = bounded(10, at_least=1)
    batch_size: int = bounded(64, at_least=1)
    max_train: int | None = None  # cap on training images per class, for a time budget
    device: str = "auto"  # auto: cuda for runs given a GPU (gpus_per_run > 0), else cpu
    cpus_per_run: float = bounded(1.0, above=0)
    gpus_per_run: float = bounded(0.0, at_least=0)  # e.g. 0.25: four runs share each GPU
    out: str = local_path("results")
    name: str | None = plain_name()  # default: <dataset>-<protocol>-<time>; an existing name resumes that eval
    compare_with: str = local_path("")  # an earlier eval's output folder: its AUROC beside ours, paired test
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS, else an embedded local Ray
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        if self.device == "cuda" and self.gpus_per_run == 0:
            raise ValueError("device=cuda needs gpus_per_run > 0 (Ray gives a run only the GPUs it asks for)")


Config = EvalConfig


# Settings that do not change what a run computes: a resumed eval may differ in them.
NOT_RUN_SETTINGS = ("classes", "seeds", "out", "name", "compare_with", "address", "cpus_per_run", "gpus_per_run",
                    "tracking", "quiet", "verbose")


def run(cfg: EvalConfig) -> list[dict]:
    options = S3Options.from_env(endpoint=cfg.s3_endpoint)
    fs, _ = filesystem_for(cfg.data, options)
    check_image_set(cfg.data, fs)
    other = (Path(cfg.compare_with).name, per_class_auroc(Path(cfg.compare_with))) if cfg.compare_with else None
    cfg.dataset = cfg.dataset or recorded_dataset(cfg.data, fs) or Path(cfg.data.rstrip("/")).name
    meta = read_columns(cfg.data, columns_for(cfg.protocol), filesystem=fs)
    labels, splits = meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False)
    present = sorted(int(c) for c in np.unique(labels))
    classes = present if cfg.classes == "all" else [int(c) for c in str(cfg.classes).split(",") if c != ""]
    unknown = sorted(set(classes) - set(present))
    if unknown:
        raise ValueError(f"class(es) {unknown} not in {cfg.data} (labels there: {present})")
    shape = cfg.image_shape(recorded_shape(cfg.data, fs), lambda: take_rows(cfg.data, [0], filesystem=fs).images[0])
    name = cfg.name or f"{cfg.dataset}-{cfg.protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.out) / name
    _check_same_settings(cfg, out / "runs" / "settings.json")
    save_config(cfg, out / "config.yaml")
    with start_run(cfg.tracking, name) as tracker:
        tracker.log_params(config_params(cfg))
        tasks = [(c, seed) for c in classes for seed in cfg.seeds]
        runs = _evaluate(cfg, options, shape, labels, splits, labeled_anomalies(meta), tasks, out / "runs",
                         tracker.log_metrics)
        _write(cfg, out, runs, other)
        tracker.log_metrics({f"mean_{k}": float(np.mean([r.metrics[k] for r in runs])) for k in ("auroc", "aupr")})
        tracker.log_artifact(out)  # tables, plots, config
    return [r.metrics for r in runs]


def _check_same_settings(cfg: EvalConfig, path: Path) -> None:
    """Record what the runs under `path`'s folder compute; refuse to add runs of other settings to them."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_RUN_SETTINGS}
    settings = json.loads(json.dumps(settings))  # the form it takes in the file (lists, not tuples)
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
        if changed:
            raise ValueError(f"{path.parent.parent} holds an eval with other settings ({', '.join(changed)}): "
                             "give this one another name=, or delete that folder to start again")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def _evaluate_one(cfg: EvalConfig, options: S3Options, shape: ImageShape, labels: np.ndarray, splits: np.ndarray,
                  is_anomaly: np.ndarray | None, normal_class: int, seed: int) -> RunResult:
    """One (class, seed) run, in a Ray task that holds cpus_per_run CPUs and gpus_per_run GPUs."""
    torch.set_num_threads(max(1, int(cfg.cpus_per_run)))
    device = cfg.device if cfg.device != "auto" else ("cuda" if cfg.gpus_per_run > 0 else "cpu")
    fs, _ = filesystem_for(cfg.data, options)
    return evaluate_class(cfg.data, fs, cfg, shape, labels, splits, normal_class, seed, protocol=cfg.protocol,
                          merge_splits=cfg.dataset == "fashion-mnist", is_anomaly=is_anomaly, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, max_train=cfg.max_train, device=device)


def _evaluate(cfg: EvalConfig, options: S3Options, shape: ImageShape, labels: np.ndarray, splits: np.ndarray,
              is_anomaly: np.ndarray | None, tasks: list[tuple[int, int]], folder: Path,
              log_metrics) -> list[RunResult]:
    """Every (class, seed) run, those saved by an earlier try of this eval taken as they are, the others as Ray
    tasks, each saved and logged (class_C.seed_S.NAME) as it finishes; in the order of `tasks`."""
    import ray

    from cluster.ray_init import init_ray

    done = {task: run for task in tasks if (run := RunResult.load(folder, *task)) is not None}
    if done:
        print(f"eval: {len(done)} of {len(tasks)} runs finished earlier, in {folder}: not run again", flush=True)
    todo = [task for task in tasks if task not in done]
    if todo:
        init_ray(cfg.address, min_cpus=cfg.cpus_per_run)
        remote = ray.remote(_evaluate_one).options(num_cpus=cfg.cpus_per_run, num_gpus=cfg.gpus_per_run)
        shared = [ray.put(v) for v in (cfg, options, shape, labels, splits, is_anomaly)]  # once, not per run
        pending = {remote.remote(*shared, c, seed): (c, seed) for c, seed in todo}
        progress = Progress(len(todo), unit="runs", label="eval", quiet=cfg.quiet, every_s=0, stream=sys.stdout)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            c, seed = pending.pop(ref)
            run = done[(c, seed)] = ray.get(ref)
            run.save(folder)
            _say(run)
            log_metrics({f"class_{c}.seed_{seed}.{k}": v for k, v in run.metrics.items()})
            progress.update()
        progress.close()
    return [done[task] for task in tasks]


def _say(run: RunResult) -> None:
    m = run.metrics
    print(f"class {m['class']} seed {m['seed']}: AUROC {m['auroc']:.4f}  AUPR {m['aupr']:.4f}  "
          f"({m['train_images']} train, {m['test_images']} test, {m['seconds']} s)", flush=True)
    if run.skipped:
        first = run.skipped[0]
        print(f"warning: class {m['class']} seed {m['seed']}: {len(run.skipped)} undecodable row(s) left out, "
              f"e.g. {first['part']} row id {first['id']!r}: {first['error']}", file=sys.stderr, flush=True)


def _write(cfg: EvalConfig, out: Path, runs: list[RunResult], other: tuple[str, dict[int, float]] | None) -> None:
    method = our_method(cfg.detector, cfg.detector_params())
    title = f"{method} on {cfg.dataset}, {cfg.protocol} protocol, {cfg.epochs} epochs, seeds {cfg.seeds}"
    md = write_outputs(out, runs, title=title, method=method, protocol=cfg.protocol, dataset=cfg.dataset,
                       other=other)
    print(md)
    print(f"results in {out}/ ({', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))})")
