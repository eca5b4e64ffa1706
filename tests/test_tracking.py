"""Experiment tracking (jobs.tracking) against a real MLflow store: SQLite, the default under runs/."""
from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.tracking import CHECKPOINT_TAG, Tracker, require, start_run, tracking_uri

pytestmark = pytest.mark.slow  # importing MLflow and creating its SQLite tables takes seconds


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh directory as the working directory, MLFLOW_TRACKING_URI unset: the default store."""
    root = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "goes on without tracking" in r.getMessage()]


def test_default_store_is_sqlite_under_runs(store):
    assert tracking_uri() == f"sqlite:///{store / 'runs' / 'mlflow.db'}"
    start_run("mlflow", "first").finish()
    assert (store / "runs" / "mlflow.db").is_file()


def test_params_metrics_artifacts_and_checkpoint(store):
    (store / "config.yaml").write_text("alpha: 0.03\n")
    (store / "plots").mkdir()
    (store / "plots" / "roc.png").write_bytes(b"png")
    tracker = start_run("mlflow", "train-digit3")
    tracker.log_params({"alpha": 0.03, "epochs": 3, "model": {"name": "gradcon_cae"}})
    for epoch in range(3):
        tracker.log_metrics({"loss": 1.0 / (epoch + 1), "val_loss": 2.0 / (epoch + 1), "note": "text"}, step=epoch)
    tracker.log_metrics({"auroc": 0.97})
    tracker.log_artifact(store / "config.yaml")
    tracker.log_artifact(store / "plots", "plots")
    tracker.set_checkpoint("s3://bucket/runs/digit3/checkpoint")
    tracker.finish()

    run = client().get_run(tracker.run_id)
    assert run.info.run_name == "train-digit3" and run.info.status == "FINISHED"
    assert run.data.params == {"alpha": "0.03", "epochs": "3", "model.name": "gradcon_cae"}
    history = client().get_metric_history(tracker.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.0), (2, 2.0 / 3)]
    assert run.data.metrics["auroc"] == 0.97 and "note" not in run.data.metrics
    assert run.data.tags[CHECKPOINT_TAG] == "s3://bucket/runs/digit3/checkpoint"
    assert {a.path for a in client().list_artifacts(tracker.run_id)} == {"config.yaml", "plots"}
    assert [a.path for a in client().list_artifacts(tracker.run_id, "plots")] == ["plots/roc.png"]
    assert list((store / "runs" / "mlartifacts").rglob("roc.png"))  # beside the store, not ./mlruns
    assert not (store / "mlruns").exists()


def test_a_restarted_worker_continues_the_same_run(store, caplog):
    first = start_run("mlflow", "train-restart")
    first.log_params({"alpha": 0.03})
    first.log_metrics({"loss": 0.5}, step=0)
    # the worker dies here, without finish(); Ray Train restarts it and it starts the run by name again
    again = start_run("mlflow", "train-restart")
    assert again.run_id == first.run_id
    assert client().get_run(again.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="gradcon"):
        again.log_params({"alpha": 0.03, "seed": 1})  # already there: not logged twice
        again.log_params({"alpha": 0.5})  # MLflow params cannot change: kept, said, the run goes on
    assert any("keeps the first value" in r.getMessage() for r in caplog.records) and not failures(caplog)
    again.log_metrics({"loss": 0.25}, step=1)
    again.finish()
    runs = client().search_runs([client().get_experiment_by_name("gradcon").experiment_id],
                                filter_string="attributes.run_name = 'train-restart'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params == {"alpha": "0.03", "seed": "1"}
    assert [(m.step, m.value) for m in client().get_metric_history(first.run_id, "loss")] == [(0, 0.5), (1, 0.25)]


def test_a_sweep_and_its_trials(store):
    sweep = start_run("mlflow", "sweep-a", experiment="sweeps")
    trials = [sweep.child(f"trial_{i}") for i in range(2)]
    # a trial in another process knows only the parent's id and the store
    remote = start_run("mlflow", "trial_2", experiment="sweeps", parent_run_id=sweep.run_id, uri=sweep.uri)
    for i, trial in enumerate([*trials, remote]):
        trial.log_metrics({"val_auroc": 0.9 + i / 100}, step=0)
        trial.finish()
    sweep.log_metrics({"best_val_auroc": 0.92})
    sweep.finish()
    assert len({t.run_id for t in [sweep, *trials, remote]}) == 4
    for trial in [*trials, remote]:
        assert client().get_run(trial.run_id).data.tags["mlflow.parentRunId"] == sweep.run_id
    assert sweep.child("trial_0").run_id == trials[0].run_id  # a resumed sweep continues its trials
    other = start_run("mlflow", "sweep-b", experiment="sweeps")
    assert other.child("trial_0").run_id != trials[0].run_id  # same trial name, another sweep: another run


def test_a_failing_block_marks_the_run_failed(store):
    with pytest.raises(RuntimeError), start_run("mlflow", "train-crash") as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("worker died")
    assert client().get_run(tracker.run_id).info.status == "FAILED"


def test_a_store_failing_mid_run_warns_once_and_the_run_goes_on(store, caplog, monkeypatch):
    tracker = start_run("mlflow", "train-store-breaks")

    def broken(*args, **kwargs):
        raise OSError("disk I/O error")

    monkeypatch.setattr(tracker.client, "log_batch", broken)
    with caplog.at_level(logging.WARNING, logger="gradcon"):
        for epoch in range(3):
            tracker.log_metrics({"loss": 1.0}, step=epoch)
        tracker.log_params({"alpha": 1})
        tracker.finish()
    assert len(failures(caplog)) == 1 and "disk I/O error" in failures(caplog)[0]


def test_an_unreachable_store_warns_once_and_the_caller_goes_on(tmp_path, caplog, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="gradcon"):
        tracker = start_run("mlflow", "train-offline")
        tracker.log_params({"alpha": 0.03})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.set_checkpoint("runs/x/checkpoint")
        tracker.child("trial").finish()
        tracker.finish()
    assert type(tracker) is Tracker and tracker.run_id is None
    assert len(failures(caplog)) == 1 and f"127.0.0.1:{port}" in failures(caplog)[0]
    assert time.perf_counter() - start < 60  # short time-outs, few retries: not MLflow's minutes


def test_tracking_off_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with start_run("none", "train") as tracker:
        tracker.log_params({"alpha": 1})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(tmp_path)
        assert tracker.child("trial").run_id is None
    assert tracker.run_id is None and not list(Path(tmp_path).iterdir())


def test_settings_are_checked_where_the_job_starts():
    require("none")
    require("mlflow")
    with pytest.raises(ValueError, match="unknown tracking 'wandb'"):
        require("wandb")
    with pytest.raises(ValueError, match="unknown tracking"):
        start_run("wandb", "x")


def test_text_artifacts_and_config_params(store):
    from dataclasses import dataclass

    from jobs.tracking import config_params

    @dataclass
    class Config:
        epochs: int = 3
        resume: str | None = "run-a"  # how this attempt started, not what the run is
        address: str | None = "10.0.0.1:6379"

    tracker = start_run("mlflow", "text-artifacts")
    tracker.log_params(config_params(Config()))
    tracker.log_text("epochs: 3\n", "config.yaml")  # e.g. a config that lives on S3, not on this disk
    tracker.finish()
    assert client().get_run(tracker.run_id).data.params == {"epochs": "3"}
    assert [a.path for a in client().list_artifacts(tracker.run_id)] == ["config.yaml"]
    local = client().download_artifacts(tracker.run_id, "config.yaml", str(store))
    assert Path(local).read_text() == "epochs: 3\n"
