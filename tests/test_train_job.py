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
from gradcon_core.data.defects import SCHEMA as DEFECT_SCHEMA
from gradcon_core.data.defects import DefectCounts, defect_tables
from gradcon_core.data.images import decode_images, encode_png
from gradcon_core.data.imageset import ImageShape, take_rows, write_image_set
from gradcon_core.data.protocols import select
from gradcon_core.training.checkpoint import load_checkpoint
from gradcon_core.training.loop import run_steps
from gradcon_core.training.parallel import streamed_batches, training_generators
from jobs.tracking import CHECKPOINT_TAG
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
    from gradcon_core.data.imageset import read_columns

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


def test_two_workers_equal_the_single_process_fit(ray_local, zeros_set, tmp_path, capsys):
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
    # resume= of a finished run: nothing left to train, and no worker started to find that out. A checkpoint
    # folder Ray Train never registered (an upload an outage cut short) is removed, and said so.
    stray = tmp_path / "two" / "checkpoint_2026-01-01_00-00-00.000000"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    again, _ = run(TrainConfig(**common, num_workers=2, resume="two"))
    out = capsys.readouterr().out
    assert "run two has trained its last epoch: nothing left to train" in out
    assert "removed 1 checkpoint folder(s) whose upload was cut short" in out and not stray.exists()
    assert again.metrics["epoch"] == 1 and _tensors(again.checkpoint).keys() == a.keys()
    # ... and writes no checkpoint folder of its own: storage holds the 2 epochs' folders Ray Train lists.
    held = {str(p) for p in (tmp_path / "two").glob("checkpoint_*") if p.is_dir()}
    assert held == {c.path for c, _ in again.best_checkpoints} and len(held) == 2


def test_stream_mode_at_64x64_rgb_replays_in_one_process_lists_bad_rows_and_scores_96_resized(ray_local, tmp_path,
                                                                                               capsys):
    """The size flows from the data: a 64x64 RGB set (its files record the shape) trains a 64x64x3 network.
    data_mode=stream: two workers train from their own shards; the logged global batches (rank 0's local batch,
    then rank 1's), replayed in one process, give the same weights and references. A row that does not decode
    is left out and listed. The checkpoint then scores a 96x96 set, resizing each image, and says so. (Memory
    mode's workers are held bit-identical to `fit` at 28x28 above.)"""
    from jobs.score import ScoreConfig
    from jobs.score import run as score

    def image_set(name, size, counts, shape, extra=()):
        table = pa.concat_tables([*defect_tables(size, seed=1, counts=counts, classes=("metal",)), *extra])
        write_image_set(str(tmp_path / name), table, rows_per_file=25, filesystem=None, shape=shape)
        return str(tmp_path / name), table

    broken = pa.Table.from_pylist([{"id": "broken", "image": b"not an image", "label": 2, "split": "train"}],
                                  schema=DEFECT_SCHEMA)
    data, _ = image_set("set64", 64, DefectCounts(train=36, test_normal=0, test_defective=0), ImageShape((64, 64), 3),
                        [broken])
    cfg = TrainConfig(data=data, normal_class=2, epochs=2, batch_size=8, num_workers=2, storage=str(tmp_path),
                      name="stream", data_mode="stream", log_batches=True, read_ahead_mb=1)  # class 2: metal
    result, uri = run(cfg)
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
    det = load_detector(uri)
    assert (det.channels, det.input_size) == (3, (64, 64))

    from gradcon_core.data.imageset import read_columns
    ids = read_columns(data, ["id"]).column("id").to_pylist()
    pixels, _ = decode_images(take_rows(data, np.arange(len(ids))).images, 3, (64, 64))
    by_id = dict(zip(ids, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255))
    torch.manual_seed(0)
    single = GradConDetector(create_model("gradcon_cae", in_channels=3, image_size=64), device="cpu")
    _, noise = training_generators(0)
    trained, steps_taken = [], 0
    for epoch in range(2):
        ranks = [json.loads((run_dir / "batches" / f"epoch-{epoch:04d}-rank-{r}.json").read_text()) for r in (0, 1)]
        steps = [sum((r[t] for r in ranks if t < len(r)), []) for t in range(max(map(len, ranks)))]
        trained.append(sorted(i for step in steps for i in step))
        batches = [torch.stack([by_id[i] for i in step]) for step in steps]
        steps_taken += len(batches)
        run_steps(single, streamed_batches(batches, placeholder=batches[0][:1]), noise)
    # Every decodable training row once per epoch, none twice (Ray's equal split would drop rows).
    _, selected = training_rows(cfg, data, pafs.LocalFileSystem())
    assert trained[0] == trained[1] == sorted(set(selected["train"]) - {"broken"})
    # Which rows meet in a step changes from run to run; a lopsided split (one worker's half-batch against the
    # whole of the other's) sums a step's gradient in another order, and a 64x64x3 weight's gradient sums
    # thousands of positions: how many weights Adam's amplified rounding takes beyond 1e-4 depends on the split
    # and on the CPU's kernels (up to 0.67% of a tensor, 1.9e-3 at most, on one machine, in memory mode).
    # tests/test_streaming.py holds every weight to 1e-5 on fixed shards.
    _assert_same_training(_tensors(result.checkpoint), single.state_tensors(), steps_taken, close=1e-4, share=0.02)

    big, table = image_set("set96", 96, DefectCounts(train=0, test_normal=3, test_defective=3), None)
    capsys.readouterr()
    summary = score(ScoreConfig(checkpoint=uri, input=big, output=str(tmp_path / "scores"), quiet=True))
    assert summary["rows"] == 6 and summary["errors"] == 0
    assert capsys.readouterr().err.count("are resized to that when decoded") == 1
    scores = pa.parquet.read_table(tmp_path / "scores").column("score").to_numpy()
    blobs = table.column("image").to_pylist()
    np.testing.assert_allclose(scores, det.decision_function(decode_images(blobs, 3, (64, 64))[0]), rtol=1e-5)


@pytest.mark.parametrize("read_ahead_mb", [None, 48])
def test_read_ahead_mb_caps_the_object_store_bytes_of_every_streamed_dataset(read_ahead_mb):
    """Stream mode's read_ahead_mb reaches Ray Data as the object-store limit of each split dataset's
    execution; without it the limit is Ray's own (what the driver's DataContext says)."""
    from ray.data import DataContext

    from jobs.train_data import all_rows_to_one_worker

    class Recorder:  # the three things the DataConfig asks of a Dataset
        def __init__(self):
            self.context, self.limits = DataContext.get_current().copy(), None

        @staticmethod
        def copy(ds):
            return ds

        def streaming_split(self, n, equal, locality_hints):
            self.limits = self.context.execution_options.resource_limits
            return [object()] * n

    datasets = {"train": Recorder(), "val": Recorder()}
    shards = all_rows_to_one_worker(read_ahead_mb).configure(datasets, world_size=2, worker_handles=None,
                                                            worker_node_ids=None)
    assert len(shards) == 2 and all(set(shard) == {"train", "val"} for shard in shards)
    default = DataContext.get_current().execution_options.resource_limits.object_store_memory
    expected = default if read_ahead_mb is None else read_ahead_mb * 2**20
    assert [ds.limits.object_store_memory for ds in datasets.values()] == [expected, expected]


@pytest.mark.slow
def test_a_failed_worker_and_an_s3_outage_both_resume_from_the_checkpoints_on_s3(ray_local, zeros_set, monkeypatch,
                                                                                   tmp_path):
    """Stream mode, images and checkpoints on S3, tracked in MLflow. Rank 0 fails at epoch 1 (the fault drill):
    the workers restart from epoch 0's checkpoint. Once the restarted workers register a checkpoint, the S3
    server stops: the next epoch's reads fail, and so does the run (its one restart spent), with the storage
    error, not waiting on Ray Data's nested read retries (before: still waiting after 13 min, two restarts
    allowed). With the server back, resume= finishes the run."""
    from moto.server import ThreadedMotoServer

    server, options = start_moto_s3("drill", "drill-key", "drill-secret")  # its own: this one goes down
    port = server.get_host_and_port()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options.secret_key)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    fs, _ = filesystem_for("s3://drill", options)
    write_image_set("s3://drill/set", pq.read_table(zeros_set), rows_per_file=40, filesystem=fs)
    cfg = TrainConfig(data="s3://drill/set", normal_class=0, epochs=3, batch_size=32, num_workers=2,
                      data_mode="stream", fail_at_epoch=1, max_failures=1, storage="s3://drill/runs", name="drill",
                      s3_endpoint=options.endpoint, tracking="mlflow")
    snapshot = "drill/runs/drill/checkpoint_manager_snapshot.json"  # rewritten as each checkpoint is registered

    def restarted_workers_checkpointed() -> bool:
        if fs.get_file_info(snapshot).type == pafs.FileType.NotFound:
            return False
        with fs.open_input_file(snapshot) as f:
            return json.loads(f.readall())["latest_checkpoint_result"]["metrics"]["resumed"]

    def stop_once_the_restarted_workers_checkpoint() -> None:
        while not restarted_workers_checkpointed():
            time.sleep(0.1)
        server.stop()

    stopper = threading.Thread(target=stop_once_the_restarted_workers_checkpoint, daemon=True)
    stopper.start()
    failure: list[BaseException] = []
    attempt = threading.Thread(target=lambda: failure.append(pytest.raises(StorageError, run, cfg).value))
    attempt.start()
    attempt.join(timeout=400)
    assert not attempt.is_alive(), "the run is still waiting on its storage"
    assert not stopper.is_alive(), "the run ended before the server was stopped"
    message = str(failure[0])
    assert "NETWORK_CONNECTION" in message and "resume=drill" in message and options.secret_key not in message

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # moto's state outlives it
    server.start()
    try:
        result, uri = run(replace(cfg, name=None, resume="drill"))
        assert uri.startswith("s3://drill/runs/drill/checkpoint_")
        assert result.metrics["epoch"] == 2 and result.metrics["resumed"]
        # Neither restart leaves an unregistered checkpoint folder: what storage holds is what Ray Train lists,
        # one per epoch (the drill failed epoch 1 before its checkpoint, the outage epoch 2). Where the outage cut
        # an upload short (a fast machine reaches epoch 2's report first), the finished run removed the folder.
        held = {i.path for i in fs.get_file_info(pafs.FileSelector("drill/runs/drill"))
                if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}
        assert held == {c.path for c, _ in result.best_checkpoints} and len(held) == 3

        # Tracked: one MLflow run, continued by the restarted workers and the resumed run; each epoch's metrics
        # as reported.
        client = MlflowClient(tracking_uri=store)
        (tracked,) = client.search_runs([client.get_experiment_by_name("gradcon").experiment_id],
                                        filter_string="attributes.run_name = 'drill'")
        assert tracked.info.status == "FINISHED" and tracked.data.tags[CHECKPOINT_TAG] == uri
        assert tracked.data.params["epochs"] == "3" and tracked.data.params["normal_class"] == "0"
        history = client.get_metric_history(tracked.info.run_id, "val_loss")
        # (Epoch 1 failed before its report. Epoch 2 may have logged its metrics before the outage failed it:
        # the resumed run logs it again.)
        steps = [m.step for m in history]
        assert steps[:2] == [0, 1] and set(steps[2:]) == {2}
        assert history[-1].value == pytest.approx(result.metrics["val_loss"])
        assert tracked.data.metrics["final_val_loss"] == pytest.approx(result.metrics["val_loss"])
        assert {"loss", "val_loss", "images_per_s"} <= set(tracked.data.metrics)
        assert [a.path for a in client.list_artifacts(tracked.info.run_id)] == ["config.yaml"]
        det = load_detector(uri, filesystem=fs)
        assert int(det.reference.count) > 0 and det.threshold_ is not None
        scores = det.decision_function(_train_images(zeros_set)[:8])
        assert scores.shape == (8,) and np.isfinite(scores).all()
    finally:
        server.stop()


def test_memory_mode_holds_each_part_in_its_order_from_one_pass():
    """held_rows reads the worker's rows once for every part; a row that failed to decode is skipped."""
    from jobs.train_data import held_rows

    class Shard:
        passes = 0

        def iter_batches(self, **_):
            Shard.passes += 1
            pixels = np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1) * 60
            yield {"id": np.array(["a", "b", "c", "d"], object), "pixels": pixels,
                   "error": np.array(["", "", "broken", ""])}

    skipped: set = set()
    rows = held_rows(Shard(), {"train": ["d", "a", "c"], "val": ["b"], "anomaly": []}, 1, (1, 1), skipped)
    assert Shard.passes == 1 and skipped == {"c"}
    assert (rows["train"].flatten() * 255).round().tolist() == [180, 0] and rows["val"].flatten().tolist() == [
        pytest.approx(60 / 255)] and rows["anomaly"].shape == (0, 1, 1, 1)


def test_bad_input_fails_fast_with_a_clear_error(ray_local, zeros_set, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(TrainConfig(data=str(tmp_path / "missing"), storage=str(tmp_path)))
    with pytest.raises(ValueError, match="no training rows"):
        run(TrainConfig(data=zeros_set, normal_class=7, storage=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no run named 'nope'"):
        run(TrainConfig(data=zeros_set, normal_class=0, storage=str(tmp_path), resume="nope"))
    with pytest.raises(ValueError, match="do not fit this cluster"):
        run(TrainConfig(data=zeros_set, normal_class=0, num_workers=16, storage=str(tmp_path)))
    with pytest.raises(ValueError, match="placement_strategy: must be one of"):
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
    summary = score(ScoreConfig(checkpoint=uri, input=zeros_set, output=str(tmp_path / "scores")))
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
