"""Experiment tracking: the one small interface the jobs call, MLflow behind it when asked, nothing otherwise.

    tracker = start_run("mlflow", name="digit3", uri=tracking_uri())   # or "none": every call does nothing
    tracker.log_params({"alpha": 0.03, "model": {"name": "gradcon_cae"}})   # nested keys become "model.name"
    tracker.log_metrics({"loss": 0.01, "val_loss": 0.02}, step=epoch)
    tracker.log_artifact("runs/digit3/config.yaml"); tracker.set_checkpoint("s3://bucket/runs/digit3/checkpoint")
    trial = start_run("mlflow", name="trial_00001", parent_run_id=sweep.run_id, uri=sweep.uri)   # a child run
    tracker.finish()          # or use the tracker as a context manager: FAILED when the block raises

A run is found again by its name (and parent): starting the same name twice continues the same MLflow
run, so a Ray Train worker restarted after a failure, or a resumed sweep, keeps logging into one run.
Params already logged are not logged again; a changed value is kept as first logged, with a warning.

Tracking is never a reason to lose a run: when MLflow is not installed, cannot be reached or fails, the
tracker warns once (logger "gradcon") and does nothing from then on. HTTP stores are asked with short
time-outs and few retries (MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES, unless set), so a store that does
not answer costs seconds, not minutes.

The store is MLFLOW_TRACKING_URI, default a SQLite file under runs/ (runs/mlflow.db, artifacts in
runs/mlartifacts). Resolve it once where the job starts (tracking_uri()) and hand it to Ray workers:
their working directory is not the driver's.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradcon_core.config import Config

log = logging.getLogger("gradcon")
TRACKERS = ("none", "mlflow")
RUNS_DIR = "runs"
RUN_KEY_TAG = "gradcon.run_key"  # name (under a parent: parent id / name): how a run is found again
CHECKPOINT_TAG = "checkpoint_uri"
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
BATCH = 100  # MLflow's limit on params per log_batch call
ATTEMPT_SETTINGS = ("resume", "address", "trust_storage")
INSTALL_HINT = "install it with: pip install 'gradcon[mlflow]'"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the SQLite store runs/mlflow.db under the current directory (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(RUNS_DIR, 'mlflow.db').resolve()}"


def require(tracking: str) -> None:
    """Check a job's `tracking` setting where it starts: unknown names and a missing mlflow are errors there."""
    if tracking not in TRACKERS:
        raise ValueError(f"unknown tracking {tracking!r}; choose one of {TRACKERS}")
    if tracking == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ValueError(f"tracking=mlflow needs the mlflow package: {INSTALL_HINT}") from None


@dataclasses.dataclass
class JobSettings(Config):
    """What every long job has: where it tracks itself and how much it prints."""

    tracking: str = "none"  # or mlflow: MLflow at MLFLOW_TRACKING_URI, default runs/mlflow.db (gradcon[mlflow])
    quiet: bool = False  # no progress lines
    verbose: bool = False  # also Ray's own INFO lines (Train's worker group, every report and checkpoint)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.tracking)


def config_params(config: Any) -> dict[str, Any]:
    """A job's dataclass config as run params, less what only says how this attempt was started (a resumed
    run's params stay those it started with)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ATTEMPT_SETTINGS}


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"name": "x"}} -> {"model.name": "x"}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """No tracking: what every call does when tracking is off (or has failed)."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Hyperparameters and settings (nested mappings flattened to dotted keys)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numbers (others are left out); step = epoch for per-epoch metrics, none for final ones."""

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """A local file or folder (plots, config) under the run's artifacts, in `folder` if given."""

    def log_text(self, text: str, name: str) -> None:
        """Text as an artifact file `name` (a config or table that may live on S3, not on this disk)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def set_checkpoint(self, uri: str) -> None:
        """The checkpoint's URI as the run's `checkpoint_uri` tag (what load_detector and gradcon score read)."""
        self.set_tags({CHECKPOINT_TAG: uri})

    def child(self, name: str) -> Tracker:
        """A run under this one (a sweep's trial), started or resumed by name."""
        return Tracker()

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED (a resumed run becomes RUNNING again)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


def start_run(
    tracking: str,
    name: str,
    *,
    experiment: str = "gradcon",
    parent_run_id: str | None = None,
    uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Tracker:
    """Start the run called `name` in `experiment`, or resume it if it exists (under the same parent).

    tracking: "none" (a Tracker that does nothing) or "mlflow". uri: the store (default tracking_uri()).
    Never raises for MLflow's sake: an unusable store gives a warning and a Tracker that does nothing.
    """
    if tracking not in TRACKERS:
        raise ValueError(f"unknown tracking {tracking!r}; choose one of {TRACKERS}")
    if tracking == "none":
        return Tracker()
    uri = uri or tracking_uri()
    try:
        return MlflowTracker.start(uri, experiment, name, parent_run_id, dict(tags or {}))
    except Exception as e:  # anything MLflow raises: tracking must not end the run
        _warn_failed(uri, "starting the run", e)
        return Tracker()


def _warn_failed(uri: str, doing: str, error: Exception) -> None:
    hint = f"; {INSTALL_HINT}" if isinstance(error, ImportError) else ""
    log.warning("tracking: MLflow at %s failed while %s (%s: %s)%s; the run goes on without tracking",
                uri, doing, type(error).__name__, error, hint)


class MlflowTracker(Tracker):
    def __init__(self, client, uri: str, experiment: str, run_id: str):
        self.client, self.uri, self.experiment, self.run_id = client, uri, experiment, run_id
        self.failed = False
        self.params: dict[str, str] = dict(client.get_run(run_id).data.params)

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, parent_run_id: str | None, tags: dict) -> MlflowTracker:
        for variable, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(variable, value)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, uri, experiment)
        key = (f"{parent_run_id}/{name}" if parent_run_id else name).replace("'", "_")
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            log.info("tracking: resuming MLflow run %s (%s) in %s", run_id, name, uri)
        else:
            tags = {**tags, RUN_KEY_TAG: key, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            run_id = client.create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()}
                                       ).info.run_id
            log.info("tracking: MLflow run %s (%s) in %s", run_id, name, uri)
        return cls(client, uri, experiment, run_id)

    def _safely(self, doing: str, call: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            call()
        except Exception as e:  # tracking must not end the run
            self.failed = True
            _warn_failed(self.uri, doing, e)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        values = {k: str(v) for k, v in flatten(params).items()}
        changed = sorted(k for k, v in values.items() if k in self.params and self.params[k] != v)
        if changed:
            log.warning("tracking: run %s keeps the first value of param(s) %s (MLflow params cannot change)",
                        self.run_id, changed)
        new = [Param(k, v) for k, v in values.items() if k not in self.params]

        def call() -> None:
            for start in range(0, len(new), BATCH):
                self.client.log_batch(self.run_id, params=new[start:start + BATCH])
            self.params.update({p.key: p.value for p in new})

        self._safely("logging params", call)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step or 0) for k, v in flatten(metrics).items()
                   if isinstance(v, numbers.Real)]
        if entries:
            self._safely("logging metrics", lambda: self.client.log_batch(self.run_id, metrics=entries))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).is_dir():
            self._safely(f"logging {path}", lambda: self.client.log_artifacts(self.run_id, str(path), folder))
        else:
            self._safely(f"logging {path}", lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def log_text(self, text: str, name: str) -> None:
        self._safely(f"logging {name}", lambda: self.client.log_text(self.run_id, text, name))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        self._safely("setting tags", lambda: self.client.log_batch(self.run_id, tags=entries))

    def child(self, name: str) -> Tracker:
        if self.failed:
            return Tracker()
        return start_run("mlflow", name, experiment=self.experiment, parent_run_id=self.run_id, uri=self.uri)

    def finish(self, status: str = "FINISHED") -> None:
        self._safely("ending the run", lambda: self.client.set_terminated(self.run_id, status))


def _experiment_id(client, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # A SQLite store keeps its artifacts beside it (runs/mlartifacts), not in ./mlruns of whatever directory.
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(uri[len("sqlite:///"):]).resolve().parent.joinpath("mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first: use theirs
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
