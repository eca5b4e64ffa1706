"""The Tune job: searches validation metrics only, stops poor trials early, survives a killed driver, and
resumes only state its own user's sweep signed."""
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from gradcon_core import load_detector
from gradcon_core.data.images import encode_png
from gradcon_core.data.imageset import write_image_set
from jobs.cli import main as cli_main
from jobs.tracking import CHECKPOINT_TAG
from jobs.train import TrainConfig, training_rows
from jobs.tune import TuneConfig, run, search_space


@pytest.fixture(autouse=True)
def state_key(monkeypatch):
    """This user's key for signing sweep state (tests never create one under ~/.config)."""
    monkeypatch.setenv("GRADCON_STATE_KEY", "test-key-" + "0" * 32)


class _RunsCode:
    """A pickle that runs code when loaded: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _code_running_tuner_pkl(sweep: Path, marker: Path) -> str:
    (sweep / "tuner.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    return "tuner.pkl"


def _newer_searcher_state(sweep: Path, marker: Path) -> str:
    (sweep / "basic-variant-state-9999-12-31_23-59-59.json").write_bytes(pickle.dumps(_RunsCode(marker)))
    return "basic-variant-state-9999-12-31_23-59-59.json"


def _edited_experiment_state(sweep: Path, marker: Path) -> str:
    state = sorted(sweep.glob("experiment_state-*.json"))[-1]
    state.write_text(state.read_text() + " ")  # still valid JSON, no longer what was signed
    return state.name


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory, mnist_train, mnist_test):
    """96 zeros and 60 other digits in the train split, 60 test rows of every digit."""
    x, y = mnist_train
    xt, yt = mnist_test
    train = np.concatenate([np.flatnonzero(y == 0)[:96], np.flatnonzero(y != 0)[:60]])
    test = np.arange(60)
    images = [encode_png(img) for img in np.concatenate([x[train], xt[test]])]
    table = pa.table({"id": [f"r{i:04d}" for i in range(len(images))], "image": pa.array(images, pa.binary()),
                      "label": pa.array(np.concatenate([y[train], yt[test]]), pa.int64()),
                      "split": ["train"] * len(train) + ["test"] * len(test)})
    path = tmp_path_factory.mktemp("digits") / "set"
    write_image_set(str(path), table, rows_per_file=80)
    return str(path)


@pytest.mark.parametrize("merge_splits", [False, True])
def test_tuning_rows_never_include_a_test_row(digits_set, merge_splits):
    from gradcon_core.data.imageset import read_columns

    cfg = TrainConfig(data=digits_set, normal_class=0, val_anomalies=-1, select_by="val_auroc",
                      merge_splits=merge_splits)
    sel, rows = training_rows(cfg, digits_set, pafs.LocalFileSystem())
    meta = read_columns(digits_set, ["label", "split"])
    ids = np.asarray(meta.column("id").to_pylist())
    labels = meta.column("label").to_numpy()
    seen = set(rows["train"]) | set(rows["val"]) | set(rows["anomalies"])
    assert not seen & set(ids[sel.test]) and len(sel.test) > 0
    assert len(rows["anomalies"]) == len(rows["val"]) > 0
    assert set(labels[np.isin(ids, rows["anomalies"])]) and 0 not in set(labels[np.isin(ids, rows["anomalies"])])
    if not merge_splits:  # the plain protocol: nothing of the test split at all
        splits = np.asarray(meta.column("split").to_pylist())
        assert set(splits[np.isin(ids, list(seen))]) == {"train"}


@pytest.mark.parametrize(("search", "message"), [
    ({"alhpa": "uniform(0,1)"}, "cannot search 'alhpa'"),
    ({"alpha": "uniform(0.5,0.5)"}, "empty range"),
    ({"lr": "loguniform(0,1)"}, "loguniform needs low > 0"),
    ({"alpha": "normal(0,1)"}, "expected one of"),
    ({"batch_size": "choice()"}, "needs at least one value"),
    ({}, "nothing to search"),
    ({"lr": "grid(0.1,0.01)", "search_alg": "optuna"}, "does not take grid"),
])
def test_bad_search_spaces_fail_before_any_trial(search, message):
    search = dict(search)
    extra = {"search_alg": search.pop("search_alg")} if "search_alg" in search else {}
    with pytest.raises(ValueError, match=message):
        TuneConfig(search=search, **extra)


def test_search_values_keep_their_types():
    cfg = TuneConfig(search={"lr": "loguniform(1e-7, 1e-2)", "batch_size": "choice(32,64)",
                             "attack_refresh": "grid(batch,epoch)"})
    assert cfg.search == {"lr": "loguniform(1e-07,0.01)", "batch_size": "choice(32,64)",
                          "attack_refresh": "grid(batch,epoch)"}
    space = search_space(cfg.search)
    assert space["attack_refresh"] == {"grid_search": ["batch", "epoch"]}
    assert space["batch_size"].categories == [32, 64] and space["lr"].lower == 1e-7


def test_any_detector_setting_is_searchable_as_params():
    cfg = TuneConfig(detector="deep_svdd", search={"params.nu": "uniform(0.01,0.2)", "lr": "choice(1e-4)"},
                     params={"objective": "soft-boundary"})
    trial = cfg.train_config(**{"params.nu": 0.05, "lr": 1e-4})
    assert trial.params == {"objective": "soft-boundary", "nu": 0.05} and trial.lr == 1e-4
    assert trial.detector_params() == {"lr": 1e-4, "objective": "soft-boundary", "nu": 0.05}
    assert "params.nu" in search_space(cfg.search)
    with pytest.raises(ValueError, match=r"cannot search params \['nu'\]: detector 'cae'"):
        TuneConfig(detector="cae", search={"params.nu": "uniform(0.01,0.2)"})


def test_optuna_samples_our_search_space():
    """Ray's OptunaSearch (with the installed Optuna) takes every distribution it can sample, seeded."""
    from ray.tune.search.optuna import OptunaSearch

    cfg = TuneConfig(search={"alpha": "loguniform(1e-3,1)", "epsilon": "uniform(0,0.3)",
                             "batch_size": "choice(32,64)", "attack_steps": "randint(5,20)"}, search_alg="optuna")
    draws = []
    for _ in range(2):
        searcher = OptunaSearch(seed=cfg.tune_seed)
        assert searcher.set_search_properties(cfg.metric, "max", search_space(cfg.search))
        draws.append(searcher.suggest("trial-1"))
    assert draws[0] == draws[1] and 1e-3 <= draws[0]["alpha"] <= 1 and draws[0]["batch_size"] in (32, 64)
    assert 5 <= draws[0]["attack_steps"] < 20


def test_bad_search_on_the_command_line_exits_2_without_starting_ray(capsys):
    assert cli_main(["tune", "search.alpha=uniform(1,0)"]) == 2
    assert "empty range" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess
def test_a_sweep_killed_midway_resumes_and_finishes(ray_local, digits_set, tmp_path, monkeypatch):
    """3 trials, one at a time (a good lr, then a hopeless one twice) under ASHA; the driver is SIGKILLed
    as the third starts, and the sweep resumed from storage. Tracked in MLflow all along."""
    storage, name = tmp_path / "sweeps", "sweep"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the driver's subprocess and the resumed sweep
    args = [f"data={digits_set}", "normal_class=0", "epochs=2", "batch_size=16", "num_workers=1",
            f"storage={storage}", f"name={name}", "metric=val_loss", "num_samples=1", "grace_period=1",
            f"address={ray_local.get_runtime_context().gcs_address}", "tracking=mlflow",
            "search.lr=grid(0.01,1e-7,1e-7)"]
    driver = subprocess.Popen([sys.executable, "-m", "jobs", "tune", *args], cwd=Path(__file__).parents[1],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not list((storage / name).glob("run_trial_*_00002_*")):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.time() < deadline, "the third trial did not start in time"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (storage / name / "summary.json").exists()

    # Tune unpickles tuner.pkl, the experiment and searcher states: a copy of the sweep with any of them
    # replaced, added or edited is refused, naming the file, before anything is unpickled.
    marker = tmp_path / "code-ran"
    for tamper in (_code_running_tuner_pkl, _newer_searcher_state, _edited_experiment_state):
        copy = storage / tamper.__name__
        shutil.copytree(storage / name, copy)
        culprit = tamper(copy, marker)
        with pytest.raises(ValueError, match=re.escape(culprit)):
            run(TuneConfig(storage=str(storage), resume=copy.name, address=None))
        shutil.rmtree(copy)
    assert not marker.exists()

    grid, summary = run(TuneConfig(storage=str(storage), resume=name, address=None))
    table = {r["lr"]: r for r in pq.read_table(storage / name / "trials.parquet").to_pylist()}
    rows = pq.read_table(storage / name / "trials.parquet").to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"} and sorted(table) == [1e-7, 0.01]
    assert table[0.01]["iterations"] == 2 and not table[0.01]["stopped_early"]
    # ASHA stopped the first hopeless trial at its first rung, before the kill. (Tune does not restore
    # ASHA's rung records, so after the resume the third trial may run to the end.)
    first_hopeless = sorted(rows, key=lambda r: r["trial_id"])[1]
    assert first_hopeless["lr"] == 1e-7 and first_hopeless["stopped_early"] and first_hopeless["iterations"] == 1
    assert summary["stopped_early"] >= 1
    assert summary["best_values"] == {"lr": 0.01} and summary["metric"] == "val_loss"
    assert summary["best_value"] == pytest.approx(table[0.01]["best_val_loss"])
    best = yaml.safe_load((storage / name / "best_config.yaml").read_text())
    assert best["lr"] == 0.01 and best["data"] == digits_set and TrainConfig(**best).select_by == "val_loss"
    det = load_detector(summary["best_checkpoint"])
    assert det.threshold_ is not None and (storage / name / "trials.csv").exists()

    # MLflow: one run for the sweep (resumed, not doubled), each trial a child named by its trial id, with
    # the epochs and objective trials.parquet has.
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("gradcon").experiment_id
    (sweep,) = client.search_runs([experiment], filter_string=f"attributes.run_name = '{name}'")
    assert sweep.info.status == "FINISHED" and sweep.data.tags[CHECKPOINT_TAG] == summary["best_checkpoint"]
    assert sweep.data.metrics["best_val_loss"] == pytest.approx(summary["best_value"])
    assert sweep.data.params["search.lr"] == "grid(0.01,1e-07,1e-07)" and sweep.data.params["metric"] == "val_loss"
    assert {a.path for a in client.list_artifacts(sweep.info.run_id)} == {"trials.csv", "summary.json",
                                                                         "best_config.yaml"}
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(f"trial-{r['trial_id']}" for r in rows)
    for child in children:
        row = next(r for r in rows if child.info.run_name == f"trial-{r['trial_id']}")
        history = client.get_metric_history(child.info.run_id, "val_loss")
        # The epochs Tune saw; a trial ASHA stops may have logged one more epoch before the stop reached it.
        steps = sorted({m.step for m in history})
        assert steps[:row["iterations"]] == list(range(row["iterations"])) and steps[-1] < 2
        seen = [m.value for m in history if m.step < row["iterations"]]
        assert min(seen) == pytest.approx(row["best_val_loss"])
        assert float(child.data.params["lr"]) == row["lr"] and child.info.status == "FINISHED"
        assert child.data.metrics["best_val_loss"] == pytest.approx(row["best_val_loss"])
        assert child.data.metrics["iterations"] == row["iterations"]
        assert child.data.tags[CHECKPOINT_TAG] == row["best_checkpoint"]
        assert child.data.tags["stopped_early"] == str(row["stopped_early"])


@pytest.mark.parametrize(("resources", "workers", "gpus", "expected"), [
    ({"CPU": 4}, 1, {}, 1),  # 1 worker + 2 for reads + the driver's 0.01
    ({"CPU": 16}, 2, {}, 3),
    ({"CPU": 64, "GPU": 4}, 1, {"use_gpu": True}, 4),  # GPUs bound it
    ({"CPU": 64, "GPU": 2}, 1, {"gpus_per_worker": 0.25}, 8),  # four trials share each GPU
    ({"CPU": 64, "GPU": 1}, 1, {"gpus_per_worker": 0.3}, 3),
    ({"CPU": 3}, 1, {}, "needs 3.01 CPUs"),  # reads would starve: refused, not hung
])
def test_concurrent_trials_leave_room_for_their_reads(monkeypatch, resources, workers, gpus, expected):
    import ray

    from jobs.tune import _concurrency

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    cfg = TuneConfig(search={"alpha": "uniform(0,1)"}, num_workers=workers, **gpus)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            _concurrency(cfg)
    else:
        assert _concurrency(cfg) == expected


def test_resume_never_unpickles_state_it_cannot_trust(ray_local, digits_set, tmp_path):
    """A sweep folder whose tuner.pkl runs code when loaded (anyone who can write the storage could put it
    there): `resume` refuses it, naming the file and what to do, and the code never runs."""
    storage = tmp_path / "sweeps"
    (storage / "evil").mkdir(parents=True)
    saved = TuneConfig(data=digits_set, storage=str(storage), name="evil", search={"lr": "choice(0.01)"})
    (storage / "evil" / "tune_config.yaml").write_text(yaml.safe_dump(asdict(saved)))
    marker = tmp_path / "code-ran"
    _code_running_tuner_pkl(storage / "evil", marker)
    with pytest.raises(ValueError, match="tuner.pkl.*trust_storage=true"):
        run(TuneConfig(storage=str(storage), resume="evil"))
    assert not marker.exists()


def test_a_resumed_sweep_sends_absolute_paths_to_ray(digits_set, tmp_path, monkeypatch):
    """Trials run in their own working directories: the sweep's saved relative paths (and today's relative
    `storage`, where the sweep was found) reach them as absolute paths, or the resume stops, naming the path."""
    from jobs.tune import resumed_config

    monkeypatch.chdir(tmp_path)
    shutil.copytree(digits_set, tmp_path / "set")
    # Saved by a release that kept relative paths as given (a config now makes them absolute when it is made).
    saved = {**asdict(TuneConfig(search={"lr": "choice(0.01)"})), "data": "set", "storage": "elsewhere"}
    cfg = resumed_config(TuneConfig(storage="sweeps", resume="s", trust_storage=True), saved)
    assert (cfg.data, cfg.storage, cfg.resume, cfg.trust_storage) == (str(tmp_path / "set"),
                                                                      str(tmp_path / "sweeps"), "s", True)
    assert cfg.search == {"lr": "choice(0.01)"}
    monkeypatch.chdir(tmp_path / "sweeps" if (tmp_path / "sweeps").exists() else tmp_path / "set")
    with pytest.raises(FileNotFoundError, match="the sweep's data 'set'"):
        resumed_config(TuneConfig(storage=str(tmp_path / "sweeps"), resume="s"), saved)


def test_a_sweep_on_s3_keeps_the_credentials_out_of_its_storage(s3_server, monkeypatch):
    """Tune pickles the storage filesystem into tuner.pkl (and into every trial's state): the S3 secret key must
    not travel with it. Unpickled, the filesystem takes credentials from its process's environment."""
    from ray import tune

    from jobs.tune import sweep_storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    fs, path = sweep_storage(TuneConfig(storage="s3://gradcon-test/sweeps", s3_endpoint=s3_server.endpoint,
                                        search={"lr": "choice(0.01)"}))
    tune.Tuner(lambda config: None, run_config=tune.RunConfig(name="creds", storage_path=path, storage_filesystem=fs))
    with fs.open_input_stream(f"{path}/creds/tuner.pkl") as f:
        tuner_pkl = f.read()
    assert s3_server.secret_key.encode() not in tuner_pkl and s3_server.secret_key.encode() not in pickle.dumps(fs)
    restored = pickle.loads(pickle.dumps(fs))  # as a trial or a Train worker receives it
    with restored.open_input_stream(f"{path}/creds/tuner.pkl") as f:
        assert f.read() == tuner_pkl
