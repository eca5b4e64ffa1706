"""The Ray Data score job: equals the detector, keeps every row, survives bad rows and re-runs, S3."""
import glob
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

import jobs.score
from cluster.storage import S3Options, StorageError, filesystem_for
from gradcon_core import GradConDetector, create_model, load_detector
from gradcon_core.data.images import encode_png
from gradcon_core.data.imageset import read_columns, take_rows, write_image_set
from gradcon_core.results.files import RowGroupTask, input_identity, is_complete, result_identity
from gradcon_core.results.table import SCHEMA
from jobs.prepare import prepare
from jobs.score import ScoreConfig, ScoringActor, run
from jobs.tracking import CHECKPOINT_TAG
from tests.test_images import bomb_png


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, mnist_train):
    torch.manual_seed(0)
    det = GradConDetector(create_model("gradcon_cae"), device="cpu")
    det.fit(mnist_train[0][:256], epochs=1, batch_size=64)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    det.save(path)
    return str(path)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory, small_mnist_idx):
    out = tmp_path_factory.mktemp("set") / "mnist"
    prepare("mnist", str(small_mnist_idx), str(out), rows_per_file=180)  # 3 files
    return str(out)


def _read(prefix, fs=None):
    fs, root = filesystem_for(prefix) if fs is None else (fs, prefix.split("://")[-1])
    files = sorted(f.path for f in fs.get_file_info(pa.fs.FileSelector(root)) if f.path.endswith(".parquet"))
    return pq.read_table(files, filesystem=fs), files


def test_job_scores_equal_the_detector_and_nothing_is_lost(ray_local, model_dir, image_set, tmp_path, capsys):
    summary = run(ScoreConfig(checkpoint=model_dir, input=image_set, output=str(tmp_path / "out"), batch_size=64))
    assert "scoring: 500/500 rows (100%)" in capsys.readouterr().err  # progress, as a line in a log
    table, files = _read(str(tmp_path / "out"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert table.schema == SCHEMA and table.num_rows == summary["rows"] == 500 and summary["errors"] == 0
    meta = read_columns(image_set, ["label"])
    assert table.column("id").to_pylist() == meta.column("id").to_pylist()  # same rows, same order
    det = load_detector(model_dir)
    rows = take_rows(image_set, np.arange(500))
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in rows.images])
    expected = det.score_components(pixels)
    np.testing.assert_allclose(table.column("score").to_numpy(), expected["score"], rtol=1e-5)
    np.testing.assert_allclose(table.column("grad_score").to_numpy(), expected["grad_score"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(table.column("is_anomaly").to_numpy(), expected["score"] > det.threshold_)
    assert set(table.column("threshold").to_pylist()) == {det.threshold_}
    np.testing.assert_array_equal(table.column("label").to_numpy(), meta.column("label").to_numpy())
    assert len(set(table.column("model_id").to_pylist())) == 1


def test_bad_rows_are_flagged_not_dropped(ray_local, model_dir, tmp_path, mnist_test):
    gray = [encode_png(img) for img in mnist_test[0][:6]]
    big = encode_png(np.kron(mnist_test[0][6], np.ones((2, 2), np.uint8)))  # 56x56: resized, scored
    rgb = encode_png(np.zeros((28, 28, 3), np.uint8))
    images = [*gray[:3], b"corrupt bytes", big, rgb, *gray[3:], None]
    data = tmp_path / "bad"
    write_image_set(str(data), pa.table({"id": [f"r{i}" for i in range(len(images))],
                                         "image": pa.array(images, pa.binary())}), rows_per_file=5)
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary())}),
                   data / "part-00009.parquet")  # an empty file
    summary = run(ScoreConfig(checkpoint=model_dir, input=str(data), output=str(tmp_path / "out")))
    table, files = _read(str(tmp_path / "out"))
    assert len(files) == 3 and table.num_rows == len(images) == summary["rows"] == 10
    errors = dict(zip(table.column("id").to_pylist(), table.column("error").to_pylist()))
    assert {k for k, v in errors.items() if v} == {"r3", "r5", "r9"} == {
        i for i, s in zip(table.column("id").to_pylist(), table.column("score").to_pylist()) if s is None}
    assert "undecodable" in errors["r3"] and "3 channel" in errors["r5"] and "empty" in errors["r9"]
    assert summary["errors"] == 3 and table.column("is_anomaly").null_count == 3
    # Decoding in more threads, in batches of 2 (what an actor with more CPUs does), gives the same table (the
    # batched scorer's sums, and so the scores' last bits, depend on which rows share a batch).
    run(ScoreConfig(checkpoint=model_dir, input=str(data), output=str(tmp_path / "threads"), decode_threads=3,
                    batch_size=2))
    threads = _read(str(tmp_path / "threads"))[0]
    floats = ["score", "recon_error", "grad_score"]
    assert threads.drop_columns(floats).equals(table.drop_columns(floats))
    for column in floats:
        np.testing.assert_allclose(threads.column(column).to_numpy(zero_copy_only=False),
                                   table.column(column).to_numpy(zero_copy_only=False), rtol=1e-5, atol=1e-7)



def test_a_decompression_bomb_is_a_row_error_even_as_the_first_row(ray_local, model_dir, tmp_path, mnist_test):
    """A 20000x20000 PNG (389 KB) first in the set: the driver's channel check and the actors skip it."""
    images = [bomb_png(), *(encode_png(img) for img in mnist_test[0][:3])]
    data = tmp_path / "bomb"
    write_image_set(str(data), pa.table({"id": ["bomb", "a", "b", "c"], "image": pa.array(images, pa.binary())}))
    summary = run(ScoreConfig(checkpoint=model_dir, input=str(data), output=str(tmp_path / "out")))
    table, _ = _read(str(tmp_path / "out"))
    errors = dict(zip(table.column("id").to_pylist(), table.column("error").to_pylist()))
    assert summary["rows"] == 4 and summary["errors"] == 1 and table.column("score").null_count == 1
    assert "20000x20000" in errors["bomb"] and "GRADCON_MAX_IMAGE_PIXELS" in errors["bomb"]
    assert errors["a"] is errors["b"] is errors["c"] is None

def test_an_actor_reads_scores_and_writes_its_row_groups_and_the_driver_gets_only_counts(model_dir, image_set,
                                                                                         tmp_path):
    """No funnel and no second write: an actor call takes row-group tasks, reads each from storage, writes its
    result file, and returns counts and timings (all the driver receives)."""
    first = sorted(glob.glob(f"{image_set}/*.parquet"))[1]
    identity = result_identity("m", 0.5, None, input_identity(pa.fs.LocalFileSystem(), first))
    task = {"input": first, "group": 0, "first_row": 0, "rows": 180, "output": str(tmp_path / "out.parquet"),
            "identity": json.dumps(identity, sort_keys=True)}
    actor = ScoringActor(model_dir, S3Options(), image_set, str(tmp_path), batch_size=64, threads=2)
    returned = actor.score([RowGroupTask(**task)])
    assert returned.column("rows").to_pylist() == [180] and returned.column("errors").to_pylist() == [0]
    assert {"image", "score", "id"}.isdisjoint(returned.column_names) and returned.column("score_s")[0].as_py() > 0
    written = pq.read_table(tmp_path / "out.parquet")
    source = pq.read_table(first)
    assert written.column("id").equals(source.column("id"))
    assert is_complete(pa.fs.LocalFileSystem(), str(tmp_path / "out.parquet"), 180, identity)
    expected = load_detector(model_dir).decision_function(
        np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in source.column("image").to_pylist()]))
    np.testing.assert_allclose(written.column("score").to_numpy(), expected, rtol=1e-5)


def test_results_reach_the_driver_row_group_by_row_group(ray_local, model_dir, image_set, tmp_path, monkeypatch):
    """Row groups go to whichever actor is free and each is counted as soon as it is written."""
    data = tmp_path / "set"
    write_image_set(str(data), pq.read_table(sorted(glob.glob(f"{image_set}/*.parquet"))), rows_per_file=50)
    counted = []
    monkeypatch.setattr(jobs.score.Progress, "update", lambda self, n=1: counted.append(n))
    summary = run(ScoreConfig(checkpoint=model_dir, input=str(data), output=str(tmp_path / "out"), batch_size=64,
                              concurrency=2))
    assert sum(counted) == summary["rows"] == 500 and len(counted) >= 5
    assert 0 < summary["first_results_s"] < summary["seconds"]
    assert summary["objects_written"] == summary["row_groups"] + 1 == 11  # a result file per row group, a summary
    assert set(summary["stages_s"]) == {"read", "decode", "score", "rows", "write"}
    assert set(summary["startup_s"]) == {"plan", "to_process", "imports", "to_actor", "actor_init", "first_call"}


def test_an_input_of_several_row_groups_gets_a_result_file_per_group_in_order_and_none_stale(
        ray_local, model_dir, image_set, tmp_path):
    table = pq.read_table(sorted(glob.glob(f"{image_set}/*.parquet")))
    data, out = tmp_path / "set", tmp_path / "out"
    data.mkdir()
    pq.write_table(table, data / "part-00000.parquet")
    run(ScoreConfig(checkpoint=model_dir, input=str(data), output=str(out)))
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet"]
    pq.write_table(table, data / "part-00000.parquet", row_group_size=200)  # the same rows, three row groups now
    summary = run(ScoreConfig(checkpoint=model_dir, input=str(data), output=str(out)))
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-00000-rg0000{g}.parquet" for g in range(3)]
    result, _ = _read(str(out))
    assert summary["rows"] == result.num_rows == 500 and result.column("id").equals(table.column("id"))


def test_rerun_completes_a_killed_job_without_duplicates(ray_local, model_dir, image_set, tmp_path):
    out = tmp_path / "out"
    cfg = ScoreConfig(checkpoint=model_dir, input=image_set, output=str(out), batch_size=128)
    run(cfg)
    before = _read(str(out))[0]
    # What a kill leaves: one output never written, one half written (never under its final name).
    (out / "part-00001.parquet").unlink()
    (out / "part-00002.parquet").rename(out / "part-00002.parquet.partial")
    untouched = (out / "part-00000.parquet").stat().st_mtime_ns
    summary = run(cfg)
    assert summary["scored_now"] == 180 + 140 and summary["rows"] == 500
    assert (out / "part-00000.parquet").stat().st_mtime_ns == untouched  # complete files are skipped
    table, _ = _read(str(out))
    assert table.drop_columns(["score", "recon_error", "grad_score", "is_anomaly"]).equals(
        before.drop_columns(["score", "recon_error", "grad_score", "is_anomaly"]))
    for column in ("score", "recon_error", "grad_score"):  # batches differ, so the last bits may (docstring)
        np.testing.assert_allclose(table.column(column).to_numpy(), before.column(column).to_numpy(), rtol=1e-6)
    assert table.column("is_anomaly").equals(before.column("is_anomaly"))
    assert len(set(table.column("id").to_pylist())) == table.num_rows == 500
    # Complete means this model, this threshold setting and this input's content: another threshold, all again.
    again = run(ScoreConfig(checkpoint=model_dir, input=image_set, output=str(out), batch_size=128, threshold=0.0))
    assert again["scored_now"] == 500 and set(_read(str(out))[0].column("threshold").to_pylist()) == {0.0}
    # A file there that is not ours is never overwritten: refused before any work, by name.
    pq.write_table(pa.table({"x": [1]}), out / "part-00001.parquet")
    with pytest.raises(ValueError, match="part-00001.parquet is in the output but is not a gradcon result"):
        run(cfg)
    assert pq.read_table(out / "part-00001.parquet").column_names == ["x"]
    with pytest.raises(ValueError, match="is the input image set or inside it"):
        run(ScoreConfig(checkpoint=model_dir, input=image_set, output=f"{image_set}/scores"))


def test_contamination_sets_the_threshold_from_this_runs_scores(ray_local, model_dir, image_set, tmp_path,
                                                                capsys, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    summary = run(ScoreConfig(checkpoint=model_dir, input=image_set, output=str(tmp_path / "out"), contamination=0.1,
                              tracking="mlflow", quiet=True))
    assert "scoring:" not in capsys.readouterr().err
    client = MlflowClient(tracking_uri=store)
    (tracked,) = client.search_runs([client.get_experiment_by_name("gradcon").experiment_id])
    assert tracked.info.run_name == "score-out" and tracked.data.tags[CHECKPOINT_TAG] == model_dir
    assert tracked.data.metrics["rows"] == summary["rows"] == 500
    assert tracked.data.metrics["threshold"] == pytest.approx(summary["threshold"])
    assert [a.path for a in client.list_artifacts(tracked.info.run_id)] == ["_summary.json"]
    table, _ = _read(str(tmp_path / "out"))
    scores = table.column("score").to_numpy()
    assert table.column("threshold")[0].as_py() == pytest.approx(np.quantile(scores, 0.9))
    assert abs(table.column("is_anomaly").to_numpy().mean() - 0.1) < 0.01


def test_input_and_output_on_s3(ray_local, model_dir, image_set, s3_server):
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, s3_server.region)
    fs, _ = filesystem_for("s3://gradcon-test/x", s3)
    table = pa.concat_tables(pq.read_table(p) for p in sorted(glob.glob(f"{image_set}/*.parquet")))
    write_image_set("s3://gradcon-test/score-in", table, rows_per_file=250, filesystem=fs)
    load_detector(model_dir).save("s3://gradcon-test/models/m", filesystem=fs)
    cfg = ScoreConfig(checkpoint="s3://gradcon-test/models/m", input="s3://gradcon-test/score-in",
                      output="s3://gradcon-test/score-out", s3_endpoint=s3.endpoint)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
        summary = run(cfg)
    result, files = _read("s3://gradcon-test/score-out", fs)
    assert len(files) == 2 and result.num_rows == summary["rows"] == 500 and summary["errors"] == 0


def test_clear_errors_before_any_work(ray_local, model_dir, image_set, tmp_path, seaweed_s3):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(ScoreConfig(checkpoint=str(tmp_path / "no-model"), input=image_set, output=str(tmp_path / "o")))
    rgb = tmp_path / "rgb"
    write_image_set(str(rgb), pa.table({"image": [encode_png(np.zeros((28, 28, 3), np.uint8))] * 3}))
    with pytest.raises(ValueError, match="1-channel images but .* holds 3-channel"):
        run(ScoreConfig(checkpoint=model_dir, input=str(rgb), output=str(tmp_path / "o")))
    wrong = S3Options(seaweed_s3.options.endpoint, seaweed_s3.options.access_key, "not-the-secret-77", "us-east-1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", wrong.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", wrong.secret_key)
        with pytest.raises(StorageError) as err:
            run(ScoreConfig(checkpoint=model_dir, input="s3://gradcon-test/anything", output=str(tmp_path / "o"),
                            s3_endpoint=wrong.endpoint))
    assert "not-the-secret-77" not in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)


def test_an_actor_pool_larger_than_the_cluster_is_refused(ray_local, model_dir, image_set, tmp_path):
    with pytest.raises(ValueError, match=r"5 scoring actor\(s\) x 1.0 CPU do not fit this cluster \(4 CPUs\)"):
        run(ScoreConfig(checkpoint=model_dir, input=image_set, output=str(tmp_path / "o"), concurrency=5))


def test_a_scoring_actor_killed_mid_job_is_restarted_and_nothing_is_lost(ray_local, model_dir, image_set, tmp_path):
    """SIGKILL a scoring actor's process while it works: Ray restarts the actor and retries its call; every row
    group is written once, complete."""
    data, out = tmp_path / "set", tmp_path / "out"
    rows = take_rows(image_set, np.arange(500))
    write_image_set(str(data), pa.table({"id": [f"k{i:05d}" for i in range(6000)],
                                         "image": pa.array([rows.images[i % 500] for i in range(6000)])}),
                    rows_per_file=200)  # 30 files

    def kill_an_actor() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(out.glob("*.parquet")):
            time.sleep(0.05)
        for p in psutil.process_iter(["cmdline"]):
            if any("ScoringActor" in part for part in p.info["cmdline"] or ()):
                p.kill()
                killed.append(p.pid)
                return

    killed: list = []
    killer = threading.Thread(target=kill_an_actor)
    killer.start()
    summary = run(ScoreConfig(checkpoint=model_dir, input=str(data), output=str(out), batch_size=64))
    killer.join()
    assert killed and summary["rows"] == 6000 and summary["errors"] == 0
    table, files = _read(str(out))
    assert len(files) == 30 and table.column("id").to_pylist() == [f"k{i:05d}" for i in range(6000)]


def test_a_really_killed_job_completes_on_rerun(ray_local, model_dir, image_set, tmp_path):
    """SIGKILL the driver of a running `python -m jobs score` mid-run, then run the same command again."""
    data, out = tmp_path / "set", tmp_path / "out"
    rows = take_rows(image_set, np.arange(500))
    table = pa.table({"id": [f"k{i:05d}" for i in range(4000)],
                      "image": pa.array([rows.images[i % 500] for i in range(4000)], pa.binary())})
    write_image_set(str(data), table, rows_per_file=200)  # 20 files
    args = [f"checkpoint={model_dir}", f"input={data}", f"output={out}", "batch_size=64",
            f"address={ray_local.get_runtime_context().gcs_address}"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "score", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The killed driver's actors live on until Ray notices it is gone; they can finish a row group meanwhile.
    from ray.util.state import list_actors

    deadline = time.monotonic() + 60
    while list_actors(filters=[("class_name", "=", "ScoringActor"), ("state", "!=", "DEAD")]):
        assert time.monotonic() < deadline, "the killed job's scoring actors are still alive"
        time.sleep(0.2)
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert 0 < len(done_before) < 20, "the kill should land mid-run"
    summary = run(ScoreConfig(checkpoint=model_dir, input=str(data), output=str(out), batch_size=64))
    assert summary["rows"] == 4000 and summary["scored_now"] == 4000 - 200 * len(done_before)
    assert {n: (out / n).stat().st_mtime_ns for n in done_before} == done_before  # complete files kept
    result, files = _read(str(out))
    assert len(files) == 20 and result.num_rows == len(set(result.column("id").to_pylist())) == 4000


def test_input_and_output_on_a_real_seaweedfs(ray_local, model_dir, image_set, seaweed_s3):
    fs = seaweed_s3.filesystem()
    table = pa.concat_tables(pq.read_table(p) for p in sorted(glob.glob(f"{image_set}/*.parquet")))
    write_image_set("s3://gradcon-test/sw-in", table, rows_per_file=300, filesystem=fs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
        summary = run(ScoreConfig(checkpoint=model_dir, input="s3://gradcon-test/sw-in", output="s3://gradcon-test/sw-out",
                                  s3_endpoint=seaweed_s3.options.endpoint))
    result, files = _read("s3://gradcon-test/sw-out", fs)
    assert len(files) == 2 and result.num_rows == summary["rows"] == 500 and summary["errors"] == 0
    assert result.column("id").to_pylist() == table.column("id").to_pylist()
