"""The Ray Train job: N workers compute what one process computes on the global batch."""
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cluster.storage import StorageError, filesystem_for
from gradcon_core import GradConDetector, create_model, load_detector
from gradcon_core.checkpoint import load_checkpoint
from gradcon_core.defects import DefectCounts, defect_tables
from gradcon_core.images import decode_images, encode_png
from gradcon_core.imageset import ImageShape, take_rows, write_image_set
from gradcon_core.parallel import streamed_batches, training_generators
from gradcon_core.protocols import select
from gradcon_core.tracking import CHECKPOINT_TAG
from jobs.train import TrainConfig, epoch_line, run, training_rows
from tests.conftest import start_moto_s3


@pytest.fixture(scope="module")
def zeros_set(tmp_path_factory, mnist_train, mnist_test):
    """120 training zeros (108 train + 12 val under the gradcon protocol) and a small test split."""
    x, y = mnist_train
    xt, yt = mnist_test
    train = np.flatnonzero(y == 0)[:120]
    test = np.arange(40)
    images = [encode_png(img) for img in np.concatenate([x[train], xt[test]])]
    table = pa.table({"id": [f"r{i:04d}" for i in range(len(images))], "image": pa.array(images, pa.binary()),
                      "label": pa.array(np.concatenate([y[train], yt[test]]), pa.int64()),
                      "split": ["train"] * 120 + ["test"] * 40})
    path = tmp_path_factory.mktemp("zeros") / "set"
    write_image_set(str(path), table, rows_per_file=70)
    return str(path)


def _train_images(data):
    from gradcon_core.imageset import read_columns

    meta = read_columns(data, ["label", "split"])
    sel = select(meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False), 0)
    pixels, errors = decode_images(take_rows(data, sel.train).images, 1, (28, 28))
    assert not any(errors)
    return pixels


def _tensors(checkpoint):
    with checkpoint.as_directory() as d:
        return load_checkpoint(d)[0]


def _assert_same_training(trained: dict, single: dict, steps: int, close: float = 1e-5, share: float = 1e-3) -> None:
    """The same steps up to float rounding. Data-parallel workers sum a step's gradient in another order than one
    process (threads, reduction order). Where a weight's gradient is ~0 (a cancellation of larger terms), Adam
    divides it by its own size, so rounding noise in its sign moves that one weight by up to about lr a step: CI
    saw one weight of 32,768 off by 3.3e-4. So: all but `share` of each tensor's weights to `close`, none beyond
    twice Adam's bound on a step (lr (1 - beta1) / sqrt(1 - beta2) = 3.2 lr, early on) per step. A wrong step
    (weighting, rows, references) moves most weights, not a handful (a dropped step: 511 of 512 beyond 1e-5,
    509 beyond 1e-4)."""
    for k, v in single.items():
        diff = (trained[k].double() - v.double()).abs()
        loose = diff > close + 1e-5 * v.double().abs()
        assert int(loose.sum()) <= max(1, share * v.numel()), f"{k}: {int(loose.sum())} of {v.numel()} differ"
        assert float(diff.max()) <= 2 * 3.2e-3 * steps, f"{k}: {float(diff.max())}"


def test_two_workers_equal_the_single_process_fit(ray_local, zeros_set, tmp_path):
    common = dict(data=zeros_set, normal_class=0, epochs=2, batch_size=16, storage=str(tmp_path))
    two, _ = run(TrainConfig(**common, num_workers=2, name="two"))
    # References bit-identical across the 2 ranks (a hash gathered from both).
    assert len(two.return_value) == 2 and two.return_value[0] == two.return_value[1]
    a = _tensors(two.checkpoint)
    assert int(a["reference.count"]) == 2 * 7  # 108 images / 16 per global batch
    # Each report says where its steps' time went.
    assert two.metrics["step_inner_allreduce_ms"] > 0 and two.metrics["step_final_allreduce_ms"] > 0

    torch.manual_seed(0)
    single = GradConDetector(create_model("gradcon_cae"), device="cpu")
    single.fit(_train_images(zeros_set), epochs=2, batch_size=16, seed=0)
    assert set(a) == set(single.state_tensors())
    for k, v in single.state_tensors().items():
        torch.testing.assert_close(a[k].double(), v.double(), rtol=1e-5, atol=1e-5, msg=k)
    assert (tmp_path / "two" / "config.yaml").exists()
    # One settings mechanism: a checkpoint from fit and one from the job describe themselves with the same keys.
    single.save(str(tmp_path / "fit"))
    with two.checkpoint.as_directory() as d:
        job_keys = set(yaml.safe_load((Path(d) / "config.yaml").read_text()))
    assert job_keys == set(yaml.safe_load((tmp_path / "fit" / "config.yaml").read_text()))
    # --resume of a finished run: Ray restores its last checkpoint and has nothing left to train.
    again, _ = run(TrainConfig(**common, num_workers=2, resume="two"))
    assert again.metrics["epoch"] == 1 and _tensors(again.checkpoint).keys() == a.keys()
    # ... and writes no checkpoint folder of its own: storage holds the 2 epochs' folders Ray Train lists.
    held = {str(p) for p in (tmp_path / "two").glob("checkpoint_*") if p.is_dir()}
    assert held == {c.path for c, _ in again.best_checkpoints} and len(held) == 2


def test_stream_mode_steps_replay_in_one_process_and_bad_rows_are_listed(ray_local, zeros_set, tmp_path, capsys):
    """data_mode=stream: two workers train from their own shards; the logged global batches (rank 0's local
    batch, then rank 1's), replayed in one process, give the same weights and references."""
    table = pq.read_table(zeros_set)
    broken = pa.table({"id": ["broken"], "image": pa.array([b"not an image"], pa.binary()),
                       "label": pa.array([0], pa.int64()), "split": ["train"]})
    data = tmp_path / "set"
    write_image_set(str(data), pa.concat_tables([table.select(broken.column_names), broken]), rows_per_file=50)
    cfg = TrainConfig(data=str(data), normal_class=0, epochs=2, batch_size=16, num_workers=2, storage=str(tmp_path),
                      name="stream", data_mode="stream", log_batches=True)
    result, _ = run(cfg)
    run_dir = tmp_path / "stream"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data_mode"] == "stream"
    skipped = sorted(run_dir.glob("skipped_rows-rank-*.txt"))
    assert {p.read_text() for p in skipped} == {"broken\n"}  # (a row can reach either worker in an epoch)
    assert "1 row(s) could not be decoded" in capsys.readouterr().out
    # The epoch line (printed by the Train controller, which the tests' Ray keeps off the console) says where
    # rank 0's steps spent their time.
    line = epoch_line(result.metrics)
    assert line.startswith("epoch 2/2  loss ") and "  | step ms: compute " in line
    assert all(f" {part} " in line for part in ("inner all-reduce", "final all-reduce", "data wait"))

    from gradcon_core.imageset import read_columns
    ids = read_columns(str(data), ["id"]).column("id").to_pylist()
    pixels, _ = decode_images(take_rows(str(data), np.arange(len(ids))).images, 1, (28, 28))
    by_id = dict(zip(ids, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255))
    torch.manual_seed(0)
    single = GradConDetector(create_model("gradcon_cae"), device="cpu")
    _, noise = training_generators(0)
    trained, steps_taken = [], 0
    for epoch in range(2):
        ranks = [json.loads((run_dir / "batches" / f"epoch-{epoch:04d}-rank-{r}.json").read_text()) for r in (0, 1)]
        steps = [sum((r[t] for r in ranks if t < len(r)), []) for t in range(max(map(len, ranks)))]
        trained.append(sorted(i for step in steps for i in step))
        batches = [torch.stack([by_id[i] for i in step]) for step in steps]
        steps_taken += len(batches)
        single.train_batches(streamed_batches(batches, placeholder=batches[0][:1]), noise)
    # Every decodable training row once per epoch, none twice (Ray's equal split would drop rows).
    _, selected = training_rows(cfg, str(data), pafs.LocalFileSystem())
    assert trained[0] == trained[1] == sorted(set(selected["train"]) - {"broken"})
    # Which rows meet in a step changes from run to run; a lopsided split (one worker's half-batch against the
    # whole of the other's) sums a step's gradient in another order, so how many weights Adam's amplified rounding
    # reaches changes too: 0 or 1 beyond 1e-5 in most runs, 66 of 32,768 in one. tests/test_streaming.py holds
    # every weight to 1e-5 on fixed shards.
    _assert_same_training(_tensors(result.checkpoint), single.state_tensors(), steps_taken, close=1e-4, share=0.02)


def test_rgb_64_two_workers_equal_one_process_and_score_resizes_96_to_the_checkpoint(ray_local, tmp_path, capsys):
    """The size flows from the data: a 64x64 RGB set (its files record the shape) trains a 64x64x3 network with 2
    workers exactly as one process does; its checkpoint scores a 96x96 set, resizing each image, and says so."""
    from jobs.score import ScoreConfig
    from jobs.score import run as score

    def image_set(name, size, counts, shape):
        table = pa.concat_tables(defect_tables(size, seed=1, counts=counts, classes=("metal",)))
        write_image_set(str(tmp_path / name), table, rows_per_file=25, filesystem=None, shape=shape)
        return str(tmp_path / name), table

    data, _ = image_set("set64", 64, DefectCounts(train=36, test_normal=0, test_defective=0), ImageShape((64, 64), 3))
    common = dict(data=data, normal_class=2, epochs=2, batch_size=8, storage=str(tmp_path), quiet=True)  # metal
    result, uri = run(TrainConfig(**common, num_workers=2, name="rgb"))
    det, final = load_detector(uri), _tensors(result.checkpoint)
    assert (det.channels, det.input_size) == (3, (64, 64))
    meta = pa.parquet.read_table(data, columns=["label", "split"])
    sel = select(meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False), 2)
    torch.manual_seed(0)
    single = GradConDetector(create_model("gradcon_cae", in_channels=3, image_size=64), device="cpu")
    single.fit(decode_images(take_rows(data, sel.train).images, 3, (64, 64))[0], epochs=2, batch_size=8, seed=0)
    # 33 train rows: the last global batch of 1 leaves worker 1 empty (weight 0). 2 epochs of 5 steps. A 64x64x3
    # weight's gradient sums thousands of positions, and how much rounding Adam amplifies depends on the CPU's
    # kernels: 5e-5 at most on one machine; on another up to 0.67% of a tensor beyond 1e-4 and 1.9e-3 at most,
    # with the code of a run that passed on the first (the same numbers in every run on each).
    _assert_same_training(final, single.state_tensors(), steps=10, close=1e-4, share=0.02)

    big, table = image_set("set96", 96, DefectCounts(train=0, test_normal=3, test_defective=3), None)
    capsys.readouterr()
    summary = score(ScoreConfig(model=uri, input=big, output=str(tmp_path / "scores"), quiet=True))
    assert summary["rows"] == 6 and summary["errors"] == 0
    assert capsys.readouterr().err.count("are resized to that when decoded") == 1
    scores = pa.parquet.read_table(tmp_path / "scores").column("score").to_numpy()
    blobs = table.column("image").to_pylist()
    np.testing.assert_allclose(scores, det.decision_function(decode_images(blobs, 3, (64, 64))[0]), rtol=1e-5)


def test_a_failed_worker_resumes_from_its_checkpoint_on_s3(ray_local, zeros_set, s3_server, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = TrainConfig(data=zeros_set, normal_class=0, epochs=3, batch_size=32, num_workers=2, fail_at_epoch=1,
                      max_failures=1, storage="s3://gradcon-test/runs", name="drill", s3_endpoint=s3_server.endpoint,
                      tracking="mlflow")
    result, uri = run(cfg)
    assert uri.startswith("s3://gradcon-test/runs/drill/checkpoint_")
    assert result.metrics["epoch"] == 2 and result.metrics["resumed"]  # the drill did fail, and it resumed
    # The restart leaves no unregistered checkpoint folder behind: what storage holds is what Ray Train lists.
    fs, _ = filesystem_for(uri, s3_server)
    held = {i.path for i in fs.get_file_info(pafs.FileSelector("gradcon-test/runs/drill"))
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}
    assert held == {c.path for c, _ in result.best_checkpoints} and len(held) == 3

    # Tracked: one MLflow run, continued by the restarted worker; an epoch's metrics once each, as reported.
    client = MlflowClient(tracking_uri=store)
    (tracked,) = client.search_runs([client.get_experiment_by_name("gradcon").experiment_id],
                                    filter_string="attributes.run_name = 'drill'")
    assert tracked.info.status == "FINISHED" and tracked.data.tags[CHECKPOINT_TAG] == uri
    assert tracked.data.params["epochs"] == "3" and tracked.data.params["normal_class"] == "0"
    history = client.get_metric_history(tracked.info.run_id, "val_loss")
    assert [m.step for m in history] == [0, 1, 2]  # epoch 1 failed before its report; after the restart, 1 and 2
    assert history[-1].value == pytest.approx(result.metrics["val_loss"])
    assert tracked.data.metrics["final_val_loss"] == pytest.approx(result.metrics["val_loss"])
    assert {"loss", "val_loss", "images_per_s"} <= set(tracked.data.metrics)
    assert [a.path for a in client.list_artifacts(tracked.info.run_id)] == ["config.yaml"]
    det = load_detector(uri, filesystem=fs)
    assert int(det.reference.count) > 0 and det.threshold_ is not None
    scores = det.decision_function(_train_images(zeros_set)[:8])
    assert scores.shape == (8,) and np.isfinite(scores).all()


@pytest.mark.slow
def test_an_s3_outage_mid_run_fails_with_the_storage_error_and_the_run_resumes(ray_local, zeros_set, monkeypatch):
    """Stream mode, images and checkpoints on S3, the S3 server stopped once the first checkpoint is registered:
    the run (one restart allowed) fails with the storage error, not waiting on Ray Data's nested read retries
    (before: still waiting after 13 min); with the server back, resume= continues from that checkpoint."""
    from moto.server import ThreadedMotoServer

    server, options = start_moto_s3("outage", "outage-key", "outage-secret")  # its own: this one goes down
    port = server.get_host_and_port()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options.secret_key)
    fs, _ = filesystem_for("s3://outage", options)
    write_image_set("s3://outage/set", pq.read_table(zeros_set), rows_per_file=40, filesystem=fs)
    cfg = TrainConfig(data="s3://outage/set", normal_class=0, epochs=6, batch_size=16, num_workers=1,
                      data_mode="stream", max_failures=1, storage="s3://outage/runs", name="outage",
                      s3_endpoint=options.endpoint)
    snapshot = "outage/runs/outage/checkpoint_manager_snapshot.json"  # written once a checkpoint is registered

    def stop_at_the_first_checkpoint() -> None:
        while fs.get_file_info(snapshot).type == pafs.FileType.NotFound:
            time.sleep(0.1)
        server.stop()

    stopper = threading.Thread(target=stop_at_the_first_checkpoint, daemon=True)
    stopper.start()
    failure: list[BaseException] = []
    attempt = threading.Thread(target=lambda: failure.append(pytest.raises(StorageError, run, cfg).value))
    attempt.start()
    attempt.join(timeout=400)
    assert not attempt.is_alive(), "the run is still waiting on its storage"
    assert not stopper.is_alive(), "the run ended before the server was stopped"
    message = str(failure[0])
    assert "NETWORK_CONNECTION" in message and "resume=outage" in message and options.secret_key not in message

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # moto's state outlives it
    server.start()
    try:
        result, uri = run(replace(cfg, name=None, resume="outage"))
    finally:
        server.stop()
    assert result.metrics["resumed"] and result.metrics["epoch"] == 5
    assert uri.startswith("s3://outage/runs/outage/checkpoint_")


def test_bad_input_fails_fast_with_a_clear_error(ray_local, zeros_set, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(TrainConfig(data=str(tmp_path / "missing"), storage=str(tmp_path)))
    with pytest.raises(ValueError, match="no training rows"):
        run(TrainConfig(data=zeros_set, normal_class=7, storage=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no run named 'nope'"):
        run(TrainConfig(data=zeros_set, normal_class=0, storage=str(tmp_path), resume="nope"))
    with pytest.raises(ValueError, match="do not fit this cluster"):
        run(TrainConfig(data=zeros_set, normal_class=0, num_workers=16, storage=str(tmp_path)))
    with pytest.raises(ValueError, match="placement_strategy must be one of"):
        run(TrainConfig(data=zeros_set, normal_class=0, placement_strategy="ANYWHERE", storage=str(tmp_path)))
    with pytest.raises(ValueError, match=r"do not fit this cluster \(\d+ CPUs, 0 GPUs\)"):  # a GPU, even a quarter
        run(TrainConfig(data=zeros_set, normal_class=0, num_workers=1, gpus_per_worker=0.25, storage=str(tmp_path)))


def test_workers_of_one_run_never_share_a_gpu():
    with pytest.raises(ValueError, match="gpus_per_worker=0.5 with 2 workers: .* NCCL cannot run"):
        TrainConfig(num_workers=2, gpus_per_worker=0.5)
    assert TrainConfig(num_workers=1, gpus_per_worker=0.25).worker_gpus == 0.25  # runs (trials) may share one
    assert TrainConfig(num_workers=2, use_gpu=True).worker_gpus == 1.0 and TrainConfig().worker_gpus == 0.0


def test_a_local_storage_path_is_refused_on_a_cluster_of_several_nodes(monkeypatch):
    """(benchmarks/two_nodes.py shows it on a real two-node cluster.)"""
    from cluster import ray_init

    nodes = [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(ray_init.ray, "nodes", lambda: nodes)
    with pytest.raises(ValueError, match=r"storage=/runs is a local path, and this Ray cluster has 2 nodes.*"
                                         r"storage=s3://BUCKET/PREFIX.*shared_storage=true"):
        ray_init.check_shared_storage("/runs", shared=False)
    ray_init.check_shared_storage("s3://bucket/runs", shared=False)
    ray_init.check_shared_storage("/mnt/nfs/runs", shared=True)
    nodes[1]["Alive"] = False
    ray_init.check_shared_storage("/runs", shared=False)  # one node: its disk is everyone's


@pytest.mark.parametrize(("detector", "params", "workers"), [
    ("deep_svdd", {"objective": "soft-boundary"}, 2),  # a centre from prepare(), score-time state, 2 workers
    ("ocsvm", {}, 1),  # scikit-learn: fitted once, in one worker
])
def test_other_detectors_train_through_the_job_and_score_through_ray_data(
    ray_local, zeros_set, tmp_path, detector, params, workers
):
    from jobs.score import ScoreConfig
    from jobs.score import run as score

    result, uri = run(TrainConfig(data=zeros_set, normal_class=0, epochs=2, batch_size=16, num_workers=workers,
                                  detector=detector, params=params, storage=str(tmp_path), name=detector))
    assert len(set(result.return_value)) == 1  # every rank ends with the same weights and state
    det = load_detector(uri)
    assert det.name == detector and det.threshold_ is not None
    summary = score(ScoreConfig(model=uri, input=zeros_set, output=str(tmp_path / "scores")))
    table = pa.concat_tables(pa.parquet.read_table(f) for f in sorted((tmp_path / "scores").glob("*.parquet")))
    assert summary["rows"] == table.num_rows == 160 and summary["errors"] == 0
    expected = det.decision_function(decode_images(take_rows(zeros_set, np.arange(160)).images, 1, (28, 28))[0])
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=1e-5)


def test_bad_detector_settings_fail_before_training(ray_local, zeros_set, tmp_path):
    with pytest.raises(ValueError, match="unknown detector"):
        run(TrainConfig(data=zeros_set, detector="nope", storage=str(tmp_path)))
    with pytest.raises(ValueError, match=r"detector 'deep_svdd' has no setting\(s\) \['objectiv'\]"):
        run(TrainConfig(data=zeros_set, detector="deep_svdd", params={"objectiv": "x"}, storage=str(tmp_path)))
    with pytest.raises(ValueError, match="use num_workers=1"):
        run(TrainConfig(data=zeros_set, detector="kde", num_workers=2, storage=str(tmp_path)))
    with pytest.raises(ValueError, match=r"detector 'deep_svdd' has no setting\(s\) \['epsilon'\]"):
        run(TrainConfig(data=zeros_set, detector="deep_svdd", epsilon=0.1, storage=str(tmp_path)))
