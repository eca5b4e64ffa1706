"""Hyperparameter sweeps on Ray Tune: every trial is one `gradcon train` run (itself 1..N workers).

gradcon tune [--config FILE] [key=value ...] search.NAME=DIST ...
  e.g. gradcon tune data=s3://b/mnist/ normal_class=3 num_samples=64 "search.alpha=loguniform(1e-3,1)" \
       "search.epsilon=uniform(0,0.3)"

Every `gradcon train` setting is the base of all trials; search.NAME=DIST (or `search:` in the YAML) draws
some of them per trial from uniform(a,b), loguniform(a,b), randint(a,b) (b excluded), choice(x,...)
or grid(x,...). ASHA stops poor trials early (scheduler=fifo runs all to the end); search_alg=optuna
samples with Optuna's TPE instead of at random.

The objective is measured on validation rows only: val_auroc (the class's validation images
against other classes' *train* images) or val_loss. The trials never receive a test row's id
(gradcon_core.data.protocols keeps the anomaly pool outside every test set); evaluate the best
config on the test split once, afterwards, with `gradcon eval`.

Writes <storage>/<name>/: trials.parquet and trials.csv (every trial: its values, seed,
iterations, whether ASHA stopped it, its best and last objective), best_config.yaml (a train
config: `gradcon train --config best_config.yaml`), summary.json (best trial, objective, its best
checkpoint's URI). resume=<name> continues an interrupted sweep; finished trials are kept.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from cluster.storage import S3Options, filesystem_for
from gradcon_core.config import absolute, parse_scalar
from gradcon_core.detectors.registry import detector_class
from gradcon_core.detectors.settings import SHORT_FORMS
from gradcon_core.files import read_bytes, write_bytes
from gradcon_core.training.loop import SELECT_BY
from jobs import train
from jobs.tracking import config_params, start_run, tracking_uri
from jobs.train import TrainConfig

# Run settings a sweep may draw per trial, beside any detector setting as params.NAME (e.g. params.nu).
TUNABLE = {*SHORT_FORMS, "batch_size", "epochs", "detector", "seed", "model"}
PARAM_PREFIX = "params."
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
TRIAL_DRIVER_CPU = 0.01  # Tune rejects 0; the driver only waits on its Train run


@dataclass
class TuneConfig(TrainConfig):
    search: dict[str, str] = field(default_factory=dict)  # name -> "loguniform(1e-3,1)" ...
    num_samples: int = 8  # trials (times the grid's size when a grid is searched)
    metric: str = "val_auroc"  # or val_loss
    scheduler: str = "asha"  # or fifo
    search_alg: str = "random"  # or optuna
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits
    tune_seed: int = 0  # seeds the search algorithm (each trial's training seed is `seed`, or searched)
    trust_storage: bool = False  # resume state your key did not sign (cluster/sweep_state.py): only your own

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in SELECT_BY:
            raise ValueError(f"metric must be one of {sorted(SELECT_BY)}, got {self.metric!r}")
        if self.scheduler not in ("asha", "fifo") or self.search_alg not in ("random", "optuna"):
            raise ValueError(f"scheduler is asha or fifo and search_alg random or optuna; got {self.scheduler!r} "
                             f"and {self.search_alg!r}")
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("need num_samples >= 1, grace_period >= 1 and reduction_factor >= 2")
        if not self.search and not self.resume:
            raise ValueError("nothing to search: give search.NAME=DIST (e.g. search.alpha=loguniform(1e-3,1))")
        self.search = {name: parse_distribution(name, spec) for name, spec in dict(self.search).items()}
        searched = [n[len(PARAM_PREFIX):] for n in self.search if n.startswith(PARAM_PREFIX)]
        if searched and "detector" not in self.search:
            known = detector_class(self.detector).param_names()
            unknown = sorted(set(searched) - set(known))
            if unknown:
                raise ValueError(f"cannot search params {unknown}: detector {self.detector!r} has the settings {known}")
        if self.search_alg == "optuna" and any(spec.startswith("grid(") for spec in self.search.values()):
            raise ValueError("Optuna samples; it does not take grid(...): use choice(...) or search_alg=random")

    def train_config(self, **values) -> TrainConfig:
        """The train run of a trial: these settings with `values` (params.NAME ones into params) drawn."""
        return TrainConfig(**with_values({f.name: getattr(self, f.name) for f in fields(TrainConfig)}, values))


Config = TuneConfig  # the CLI's name for this job's settings


def with_values(base: dict, values: dict) -> dict:
    """A train config's fields with a trial's values; params.NAME values go into its params."""
    params = {k[len(PARAM_PREFIX):]: v for k, v in values.items() if k.startswith(PARAM_PREFIX)}
    plain = {k: v for k, v in values.items() if not k.startswith(PARAM_PREFIX)}
    return {**base, **plain, "params": {**base.get("params", {}), **params}}


_SPEC = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$")


def parse_distribution(name: str, spec: str) -> str:
    """Check one search entry before any trial starts; returns it normalised."""
    if name not in TUNABLE and not (name.startswith(PARAM_PREFIX) and len(name) > len(PARAM_PREFIX)):
        raise ValueError(f"cannot search {name!r}: tunable settings are {sorted(TUNABLE)} and any detector "
                         "setting as params.NAME")
    m = _SPEC.match(str(spec))
    if not m or m.group(1) not in DISTRIBUTIONS:
        raise ValueError(f"search {name}={spec!r}: expected one of {DISTRIBUTIONS} like loguniform(1e-3,1)")
    kind, args = m.group(1), [parse_scalar(a) for a in m.group(2).split(",") if a.strip()]
    if kind in ("choice", "grid"):
        if not args:
            raise ValueError(f"search {name}={spec!r}: {kind} needs at least one value")
    else:
        if len(args) != 2 or not all(isinstance(a, int | float) for a in args):
            raise ValueError(f"search {name}={spec!r}: {kind} needs two numbers (low, high)")
        low, high = args
        if not low < high:
            raise ValueError(f"search {name}={spec!r}: empty range (need low < high)")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"search {name}={spec!r}: loguniform needs low > 0")
    return f"{kind}({','.join(str(a) for a in args)})"


def search_space(search: dict[str, str]) -> dict:
    from ray import tune

    space = {}
    for name, spec in search.items():
        kind, raw = _SPEC.match(spec).groups()
        args = [parse_scalar(a) for a in raw.split(",")]
        space[name] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                       "randint": lambda a: tune.randint(*a), "choice": tune.choice,
                       "grid": tune.grid_search}[kind](args)
    return space


def run_trial(values: dict, base: dict, tracking_parent: dict | None = None) -> None:
    """One trial: the train job with these values, its epoch reports forwarded to Tune (and, tracked, logged
    as a child of the sweep's MLflow run, tracking_parent)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    # A stable run name: a restarted trial resumes its Train run from its last checkpoint.
    cfg = TrainConfig(**with_values(base, {**values, "name": f"trial-{ray.tune.get_context().get_trial_id()}"}))
    train.run(cfg, callbacks=[TuneReportCallback()], tracking_parent=tracking_parent)


def _concurrency(cfg: TuneConfig) -> int:
    import ray

    if cfg.max_concurrent_trials > 0:
        return cfg.max_concurrent_trials
    resources = ray.cluster_resources()
    # A trial holds its workers' CPUs, two for its Ray Data listing and read tasks and its driver's sliver;
    # short of any of it, the trial's reads wait forever.
    per_trial = cfg.num_workers + 2 + TRIAL_DRIVER_CPU
    fits = math.floor(resources.get("CPU", 0) / per_trial)
    if cfg.worker_gpus > 0:  # gpus_per_worker=0.25: four 1-worker trials on each GPU
        fits = min(fits, math.floor(resources.get("GPU", 0) / (cfg.num_workers * cfg.worker_gpus) + 1e-9))
    if fits < 1:
        raise ValueError(f"one trial of {cfg.num_workers} worker(s) needs {per_trial:g} CPUs (workers, 2 for Ray Data "
                         f"reads, its driver); this cluster has {resources.get('CPU', 0):g}")
    return fits


def resumed_config(cfg: TuneConfig, saved: dict) -> TuneConfig:
    """The sweep's saved settings, with today's cluster and storage (where the sweep was found), local paths
    made absolute: the trials run in working directories of their own."""
    today = {"resume": cfg.resume, "address": cfg.address, "s3_endpoint": cfg.s3_endpoint,
             "trust_storage": cfg.trust_storage, "storage": absolute(cfg.storage)}
    resumed = TuneConfig(**{**saved, **today})
    resumed.data = absolute(saved["data"])
    if "://" not in saved["data"] and not os.path.exists(resumed.data):
        raise FileNotFoundError(f"the sweep's data {saved['data']!r} is not at {resumed.data}: resume from the "
                                "directory the sweep was started in")
    return resumed


def sweep_storage(cfg: TuneConfig) -> tuple[pafs.FileSystem, str]:
    """The sweep's storage. Tune pickles this filesystem into the sweep's own files (tuner.pkl, every trial's
    state): on S3 it is pickled without credentials, which trials take from their environment as train does."""
    return filesystem_for(cfg.storage, S3Options.from_env(endpoint=cfg.s3_endpoint), credentials_in_pickles=False)


@dataclass
class Sweep:
    """Where a sweep lives: its name and folder in the storage's filesystem."""

    name: str
    fs: pafs.FileSystem
    store_path: str

    @property
    def path(self) -> str:
        return f"{self.store_path}/{self.name}"


def run(cfg: TuneConfig):
    """Run (or resume) the sweep; returns Tune's ResultGrid and the summary written next to it."""
    import ray

    from cluster.ray_init import check_shared_storage, init_ray

    store_fs, store_path = sweep_storage(cfg)
    sweep = Sweep(cfg.resume or cfg.name or f"tune-c{cfg.normal_class}-{time.strftime('%Y%m%d-%H%M%S')}",
                  store_fs, store_path)
    if cfg.resume:
        cfg = resumed(cfg, sweep)
    # One MLflow run for the sweep, found again by name when it resumes; each trial's train run is its child.
    tracker = start_run(cfg.tracking, sweep.name, uri=tracking_uri())
    tracker.log_params(config_params(cfg))
    parent = tracker.run_id and {"uri": tracker.uri, "run_id": tracker.run_id}
    if not ray.is_initialized():
        init_ray(cfg.address, min_cpus=cfg.num_workers + 2 + TRIAL_DRIVER_CPU)  # one trial (_concurrency)
    check_shared_storage(cfg.storage, cfg.shared_storage)
    tuner = restored_tuner(cfg, sweep, parent) if cfg.resume else new_tuner(cfg, sweep, parent)
    with tracker:
        grid = tuner.fit()
        summary = write_results(grid, cfg, sweep)
        track_trials(cfg, sweep, tracker, summary)
    print(f"sweep {sweep.name}: {summary['trials']} trials ({summary['stopped_early']} stopped early by "
          f"{cfg.scheduler}, {summary['errored']} errored); best {cfg.metric} = {summary['best_value']:.6g} "
          f"with {summary['best_values']}\n  best config: {summary['best_config']}\n  best checkpoint: "
          f"{summary['best_checkpoint']}")
    return grid, summary


def resumed(cfg: TuneConfig, sweep: Sweep) -> TuneConfig:
    """The settings of the sweep to resume, as saved when it started (with today's cluster and storage)."""
    from cluster.sweep_state import sign

    saved = f"{sweep.path}/tune_config.yaml"
    if sweep.fs.get_file_info(saved).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no sweep named {cfg.resume!r} under {cfg.storage} to resume")
    cfg = resumed_config(cfg, yaml.safe_load(read_bytes(sweep.fs, saved)))
    if cfg.trust_storage:  # the user vouches for the storage: sign what is there with their key
        print(f"trust_storage=true: signing the state of sweep {sweep.name} as it is now", file=sys.stderr)
        sign(sweep.fs, sweep.path)
    return cfg


def trainable(cfg: TuneConfig, sweep: Sweep, parent: dict | None):
    """What Tune runs per trial: run_trial on the sweep's base train config, its driver holding a sliver of CPU."""
    from ray import tune

    base = asdict(cfg.train_config(storage=f"{cfg.storage.rstrip('/')}/{sweep.name}/trials", resume=None, name=None,
                                   select_by=cfg.metric, val_anomalies=cfg.val_anomalies or -1,
                                   tracking=cfg.tracking if parent else "none"))
    return tune.with_resources(tune.with_parameters(run_trial, base=base, tracking_parent=parent),
                               {"CPU": TRIAL_DRIVER_CPU})


def restored_tuner(cfg: TuneConfig, sweep: Sweep, parent: dict | None):
    from ray import tune

    from cluster.sweep_state import verify

    verify(sweep.fs, sweep.path, f"sweep {sweep.name}")  # just before Tune unpickles anything
    return tune.Tuner.restore(sweep.path, trainable(cfg, sweep, parent), resume_unfinished=True, restart_errored=True,
                              storage_filesystem=sweep.fs)


def new_tuner(cfg: TuneConfig, sweep: Sweep, parent: dict | None):
    """A new sweep's Tuner (its search, scheduler and concurrency), its state signed and its settings saved."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cluster.sweep_state import SignState, sign

    concurrency = _concurrency(cfg)
    if cfg.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher, limit = OptunaSearch(seed=cfg.tune_seed), concurrency
    else:  # Tune ignores max_concurrent_trials for a generator it is given: the limit goes in here
        searcher, limit = BasicVariantGenerator(random_state=cfg.tune_seed, max_concurrent=concurrency), None
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs, grace_period=cfg.grace_period,
                               reduction_factor=cfg.reduction_factor) if cfg.scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        trainable(cfg, sweep, parent),
        param_space=search_space(cfg.search),
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=SELECT_BY[cfg.metric], num_samples=cfg.num_samples,
                                    search_alg=searcher, scheduler=scheduler, max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.store_path,
                                  storage_filesystem=sweep.fs if _is_s3(cfg) else None,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=[SignState()]),
    )
    sign(sweep.fs, sweep.path, ["tuner.pkl"])  # written by the Tuner just now
    write_bytes(sweep.fs, f"{sweep.path}/tune_config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False).encode())
    return tuner


def _is_s3(cfg: TuneConfig) -> bool:
    return str(cfg.storage).startswith("s3://")


def track_trials(cfg: TuneConfig, sweep: Sweep, tracker, summary: dict) -> None:
    """Each trial's outcome into its MLflow child run, and the sweep's into its own. Tune ends a trial at its last
    report (or ASHA's stop), before its train run logs its end: it is done here."""
    for row in pq.read_table(f"{sweep.path}/trials.parquet", filesystem=sweep.fs).to_pylist():
        if row["trial_id"] is None:  # failed before its first report: its train run marked itself FAILED
            continue
        trial = tracker.child(f"trial-{row['trial_id']}")
        trial.log_metrics({k: row[k] for k in (f"best_{cfg.metric}", f"last_{cfg.metric}", "iterations")
                           if row[k] is not None})
        trial.set_tags({"stopped_early": row["stopped_early"]})
        if row["best_checkpoint"]:
            trial.set_checkpoint(f"{'s3://' if _is_s3(cfg) else ''}{row['best_checkpoint']}")
        trial.finish("FAILED" if row["status"] == "error" else "FINISHED")
    tracker.log_metrics({f"best_{cfg.metric}": summary["best_value"], "trials": summary["trials"],
                         "stopped_early": summary["stopped_early"], "errored": summary["errored"]})
    for artifact in ("trials.csv", "summary.json", "best_config.yaml"):
        tracker.log_text(read_bytes(sweep.fs, f"{sweep.path}/{artifact}").decode(), artifact)
    tracker.set_checkpoint(summary["best_checkpoint"])


def write_results(grid, cfg: TuneConfig, sweep: Sweep) -> dict:
    """trials.parquet/.csv, best_config.yaml and summary.json next to Tune's own experiment state."""
    fs, name, folder = sweep.fs, sweep.name, sweep.path
    mode = SELECT_BY[cfg.metric]
    pick = max if mode == "max" else min
    rows = []
    for result in grid:
        history, values = result.metrics_dataframe, result.config
        objective = history[cfg.metric].dropna() if history is not None and cfg.metric in history else []
        iterations = int(result.metrics.get("training_iteration", 0)) if result.metrics else 0
        best_row = None
        if len(objective):
            best_row = objective.idxmax() if mode == "max" else objective.idxmin()
        rows.append({"trial_id": (result.metrics or {}).get("trial_id"),
                     **{k: values.get(k) for k in cfg.search}, "seed": values.get("seed", cfg.seed),
                     "status": "error" if result.error else "done", "iterations": iterations,
                     "stopped_early": result.error is None and iterations < cfg.epochs,
                     f"best_{cfg.metric}": float(pick(objective)) if len(objective) else None,
                     f"last_{cfg.metric}": float(objective.iloc[-1]) if len(objective) else None,
                     # Every epoch that improves the objective saves a checkpoint (jobs/train.py).
                     "best_checkpoint": None if best_row is None else history.loc[best_row, "checkpoint_path"]})
    ok = [r for r in rows if r[f"best_{cfg.metric}"] is not None]
    if not ok:
        raise RuntimeError(f"sweep {name}: no trial reported {cfg.metric}; see the errors above")
    best = pick(ok, key=lambda r: r[f"best_{cfg.metric}"])
    table = pa.Table.from_pylist(rows)
    with fs.open_output_stream(f"{folder}/trials.parquet") as f:
        pq.write_table(table, f)
    with fs.open_output_stream(f"{folder}/trials.csv") as f:
        pacsv.write_csv(table, f)
    best_values = {k: best[k] for k in cfg.search}
    best_config = asdict(cfg.train_config(**best_values, storage=cfg.storage, name=None, resume=None,
                                          select_by=cfg.metric, val_anomalies=cfg.val_anomalies or -1))
    write_bytes(fs, f"{folder}/best_config.yaml", yaml.safe_dump(best_config, sort_keys=False).encode())
    scheme = "s3://" if _is_s3(cfg) else ""
    checkpoint = f"{scheme}{best['best_checkpoint']}"
    summary = {"name": name, "metric": cfg.metric, "mode": mode, "trials": len(rows),
               "stopped_early": sum(r["stopped_early"] for r in rows),
               "errored": sum(r["status"] == "error" for r in rows),
               "best_trial": best["trial_id"], "best_value": best[f"best_{cfg.metric}"], "best_values": best_values,
               "best_seed": best["seed"], "best_checkpoint": checkpoint,
               "best_config": f"{scheme}{folder}/best_config.yaml",
               "tune_seed": cfg.tune_seed, "search": cfg.search}
    write_bytes(fs, f"{folder}/summary.json", json.dumps(summary, indent=2).encode())
    return summary
