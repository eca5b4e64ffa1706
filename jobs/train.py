"""Distributed training on Ray Train, with the exact global-batch semantics of one process.

gradcon train [--config FILE] [key=value ...]   e.g.  gradcon train data=s3://b/mnist/ normal_class=3 num_workers=8

Any registered detector (detector=NAME params={...}; GradCon by default). Every worker runs the epoch
loop single-process `fit` runs (gradcon_core/training/loop.py) with its rank and an all-reduce sync, so N
workers compute what one process computes on the global batch `batch_size`, whatever N is
(docs/design.md §4); each detector's docstring says whether its step is exact.
The scikit-learn ones (ocsvm, kde) are fitted once, in one worker. This file keeps only Ray's parts:
the worker's context, its dataset shards, restoring from a checkpoint and ray.train.report.

Input flows through Ray Data (read only the selected rows, decode them in CPU tasks; jobs/train_data.py):
with data_mode=memory every worker holds the whole class and takes its slice of each global batch; with
data_mode=stream each worker trains on its share as it arrives (docs/design.md §4).
Checkpoints (docs/design.md §7) go to local storage or S3 every `checkpoint_every`
epochs and whenever the selection metric (select_by: val_loss, or val_auroc against other classes'
train rows) improves; a restarted or resumed run continues from the latest with optimizers,
buffers, generators and epoch restored.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import yaml

from cluster.storage import (
    S3Options,
    StorageError,
    check_reachable,
    check_readable,
    filesystem_for,
    storage_failure,
)
from gradcon_core.config import (
    JobSettings,
    add_config_arguments,
    bounded,
    config_from_arguments,
    local_path,
    plain_name,
)
from gradcon_core.data.imageset import (
    check_image_set,
    list_parquet_files,
    read_columns,
    recorded_shape,
    take_rows,
)
from gradcon_core.data.protocols import Selection, columns_for, labeled_anomalies, select
from gradcon_core.detectors.settings import DetectorSettings
from gradcon_core.files import read_bytes, write_bytes
from gradcon_core.training.checkpoint import load_checkpoint, load_training_state
from gradcon_core.training.loop import SELECT_BY, EpochReport, StreamedData, TrainingData, streamed_scores, train_epochs
from gradcon_core.training.parallel import AllReduceMean, StepClock
from jobs.tracking import Tracker, config_params, require, start_run, tracking_uri
from jobs.train_data import (
    BatchLog,
    StreamedShard,
    all_rows_to_one_worker,
    decoded_rows,
    held_rows,
    resolve_data_mode,
)

RAY_METRICS = ("time_this_iter_s", "time_total_s")  # Ray's bookkeeping beside the epoch's metrics
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's, for the workers' bundles
PARTS = ("train", "val", "anomaly")  # memory mode's parts of the rows, in TrainingData's order


@dataclass
class TrainConfig(DetectorSettings, JobSettings):
    data: str = local_path("data/sets/mnist")  # image set made by `gradcon prepare` (needs its `id` column)
    normal_class: int = 0
    protocol: str = "gradcon"
    merge_splits: bool = False  # the Fashion-MNIST variant of the gradcon protocol
    seed: int = 0
    epochs: int = bounded(10, at_least=1)
    batch_size: int = bounded(64, at_least=1)  # the GLOBAL batch; each of N workers holds about batch_size / N
    val_anomalies: int = 0  # > 0: also report val_auroc against this many other-class *train* rows; -1: one per val row
    select_by: str = "val_loss"  # the best checkpoint: lowest val_loss, or highest val_auroc
    num_workers: int = bounded(2, at_least=1)
    max_train_images: int = 0  # > 0: a seeded random subset of the class's training rows (smoke runs, demos)
    data_mode: str = "auto"  # memory | stream | auto (jobs/train_data.py); the run's config.yaml records the choice
    log_batches: bool = False  # stream mode: write each step's row ids under the run (batches/)
    read_ahead_mb: int | None = bounded(None, at_least=1)  # stream mode: object-store MiB read ahead (None: Ray's)
    use_gpu: bool = False  # one GPU per worker (NCCL), unless gpus_per_worker says otherwise
    gpus_per_worker: float | None = bounded(None, at_least=0)  # e.g. 0.25: four 1-worker runs (trials) share a GPU
    placement_strategy: str = "PACK"  # where the workers go: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD (Ray's)
    storage: str = local_path("runs")  # local folder or s3://bucket/prefix
    shared_storage: bool = False  # a local `storage` that every node mounts (NFS): allowed on a multi-node cluster
    name: str | None = plain_name()  # default gradcon-c<class>-<time>
    resume: str | None = plain_name()  # the name of a stopped run under `storage` to continue
    checkpoint_every: int = bounded(1, at_least=1)
    max_failures: int = bounded(2, at_least=-1)  # -1: retry forever (Ray Train)
    fail_at_epoch: int | None = None  # fault drill: raise once at this epoch on rank 0 (tests)
    address: str | None = None
    s3_endpoint: str | None = None

    def __post_init__(self):
        if self.num_workers > 1 and 0 < self.worker_gpus < 1:
            raise ValueError(f"gpus_per_worker={self.worker_gpus:g} with {self.num_workers} workers: Ray may put two "
                             "workers of this run on one GPU, which NCCL cannot run; give each worker a whole GPU "
                             "(gpus_per_worker=1), or use num_workers=1 to share GPUs between runs")

    @property
    def worker_gpus(self) -> float:
        """The GPUs each worker holds: gpus_per_worker, else 1 with use_gpu, else 0."""
        return self.gpus_per_worker if self.gpus_per_worker is not None else float(self.use_gpu)


def train_loop_per_worker(config: dict) -> list[str]:
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig(**config["cfg"])
    device = ray.train.torch.get_device() if cfg.worker_gpus > 0 else torch.device("cpu")
    clock = StepClock(device)  # where the steps spend their time, and how long this worker took to its first
    if not cfg.verbose:
        quiet_ray_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    det = cfg.build(config["channels"], config["image_size"], device)
    sync = AllReduceMean(world, clock) if world > 1 else None
    skipped: set = set()  # ids of rows that failed to decode
    listed = 0  # how many of them this rank's skipped_rows file lists
    if cfg.data_mode == "stream":
        log = BatchLog(config["store_fs"], config["run_path"], rank) if cfg.log_batches else None
        shard = StreamedShard(ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"),
                              cfg.batch_size, rank, world, cfg.seed, skipped, log)
        data = StreamedData(shard.train, shard.train_rows, shard.validation, rows=len(config["train_ids"]),
                            val_rows=len(config["val_ids"]), anomalies=len(config["anomaly_ids"]),
                            fingerprint=config["fingerprint"])
    else:
        rows = held_rows(ray.train.get_dataset_shard("rows"), {part: config[f"{part}_ids"] for part in PARTS},
                         det.channels, det.input_size, skipped)
        data = TrainingData(*(rows[part] for part in PARTS))
    restored, resume = ray.train.get_checkpoint(), None
    if restored:
        with restored.as_directory() as d:
            det.load_state_tensors(load_checkpoint(d)[0])
            resume = load_training_state(d)
    last = (cfg.epochs if det.iterative else 1) - 1
    # Rank 0 logs each epoch into the driver's MLflow run, found by name: a restarted worker continues it.
    tracker = start_run("mlflow", **config["tracking"]) if rank == 0 and config["tracking"] else Tracker()

    def report(r: EpochReport) -> None:
        nonlocal listed
        if cfg.fail_at_epoch == r.epoch and restored is None and rank == 0:
            raise RuntimeError(f"fault drill: rank 0 fails at epoch {r.epoch}")
        # Written when it grows (memory mode: once, by rank 0, as every rank saw every row; stream mode: a row
        # can reach another rank in a later epoch).
        if len(skipped) > listed and (rank == 0 or cfg.data_mode == "stream"):
            write_bytes(config["store_fs"], f"{config['run_path']}/skipped_rows-rank-{rank}.txt",
                        "".join(f"{i}\n" for i in sorted(map(str, skipped))).encode())
            listed = len(skipped)
        metrics = {**r.metrics, "epoch": r.epoch, "epochs": last + 1, "resumed": restored is not None}
        tracker.log_metrics(r.metrics, step=r.epoch)
        if not (r.improved or (r.epoch + 1) % cfg.checkpoint_every == 0 or r.epoch == last):
            ray.train.report(metrics)
            return
        # The threshold is a percentile of validation scores: in stream mode every rank scores its share.
        streamed = streamed_scores(det, data, sync)[0] if cfg.data_mode == "stream" else None
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                scores = streamed if streamed is not None else det.decision_function(data.threshold_images)
                det.set_threshold(scores=scores, percentile=det.threshold_percentile)
                det.save(d, training_state=r.training_state())
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    train_epochs(det, data, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, select_by=cfg.select_by,
                 rank=rank, world_size=world, sync=sync, resume=resume, on_epoch=report, clock=clock)
    # Every rank must end with the same state: a hash of it from each, for the caller to compare.
    digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes()
                                     for _, t in sorted(det.state_tensors().items()))).hexdigest()
    if world == 1:
        return [digest]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, digest)
    return gathered


def quiet_ray_worker_logs() -> None:
    """Keep Ray's INFO lines off a worker's console: Data's dataset plans and progress bars, and Train's dump
    of every report, which Ray 2.60 logs through a logger named by its source file, outside `ray.train` and so
    outside RunConfig's LoggingConfig (ray/train/v2/_internal/execution/context.py)."""
    from ray.train.v2._internal.execution import context

    from cluster.ray_init import data_logs

    data_logs(verbose=False)
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def epoch_lines():
    """A Ray Train callback that prints one line per epoch on the driver, from rank 0's report (a print in a
    worker reaches the console prefixed, and twice: Ray Train's print patch tees it)."""
    import ray.train

    class EpochLines(ray.train.UserCallback):
        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            print(epoch_line(metrics[0]), flush=True)

    return EpochLines()


def epoch_line(metrics: dict) -> str:
    """'epoch 2/10  loss 0.01  ...  | step ms: compute 41.2  inner all-reduce 3.1  ...' from a report."""
    values = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith("step_"))
    steps = "  ".join(f"{k[5:-3].replace('_', ' ').replace('allreduce', 'all-reduce')} {v:.3g}"
                      for k, v in metrics.items() if k.startswith("step_"))
    return f"epoch {metrics['epoch'] + 1}/{metrics['epochs']}  {values}" + (f"  | step ms: {steps}" if steps else "")


def training_rows(cfg: TrainConfig, data_path: str, data_fs: pafs.FileSystem) -> tuple[Selection, dict[str, list]]:
    """The ids a run may read: train and validation rows of the class, and validation anomalies.

    Everything a training (or tuning) run sees goes through here; test rows are not among them.
    """
    meta = read_columns(data_path, columns_for(cfg.protocol), filesystem=data_fs)
    sel = select(meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False),
                 cfg.normal_class, cfg.protocol, cfg.seed, cfg.merge_splits, labeled_anomalies(meta))
    if cfg.select_by == "val_auroc" and not len(sel.val):
        raise ValueError(f"select_by=val_auroc needs validation rows; protocol {cfg.protocol!r} has none")
    ids = np.asarray(meta.column("id").to_pylist(), dtype=object)
    if cfg.max_train_images > 0:
        keep = np.random.default_rng([cfg.seed, 2]).permutation(len(sel.train))[: cfg.max_train_images]
        sel.train = np.sort(sel.train[keep])
    anomalies = sel.validation_anomalies(len(sel.val) if cfg.val_anomalies < 0 else cfg.val_anomalies)
    return sel, {"train": ids[sel.train].tolist(), "val": ids[sel.val].tolist(), "anomalies": ids[anomalies].tolist()}


def finished_run(fs: pafs.FileSystem, path: str, last_epoch: int):
    """Ray's Result of the run at path if its latest checkpoint is of last_epoch (0-based), else None. Resuming
    a finished run has nothing to train; starting its workers to find that out costs tens of seconds."""
    from ray.train import Result

    try:
        result = Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no checkpoint registered yet
        return None
    return result if result.metrics and result.metrics["epoch"] >= last_epoch else None


def remove_unregistered_checkpoints(fs: pafs.FileSystem, listing: list[pafs.FileInfo], result) -> list[str]:
    """Remove the checkpoint folders in a run's listing that Ray Train never registered, and return them. Ray
    registers a checkpoint once its upload is complete, so such a folder is an upload that a storage outage or a
    killed worker cut short; after the run has finished every checkpoint it wrote is registered (num_to_keep is
    None), so nothing else can be writing one."""
    registered = [c for c, _ in result.best_checkpoints] or ([result.checkpoint] if result.checkpoint else [])
    names = {c.path.rstrip("/").rsplit("/", 1)[-1] for c in registered}
    stray = [i.path for i in listing if i.type == pafs.FileType.Directory
             and i.base_name.startswith("checkpoint_") and i.base_name not in names]
    for folder in stray:
        fs.delete_dir(folder)
    return stray


def run(cfg: TrainConfig, callbacks: list | None = None, tracking_parent: dict | None = None):
    """Train; returns Ray's Result and the URI of the best checkpoint (by cfg.select_by).

    callbacks go to the Train run (Tune passes its report callback here); tracking_parent ({"uri", "run_id"}):
    the MLflow run this one is a child of (a sweep's).
    """
    import ray
    import ray.train
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_init import check_shared_storage, data_context, init_ray

    if cfg.batch_size < 1 or cfg.num_workers < 1 or cfg.epochs < 1:
        raise ValueError("batch_size, num_workers and epochs must be >= 1")
    cfg.detector_params()  # an unknown detector or setting fails here, before anything is read
    require(cfg.tracking)
    if cfg.select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {sorted(SELECT_BY)}, got {cfg.select_by!r}")
    if cfg.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {cfg.placement_strategy!r}")
    if cfg.select_by == "val_auroc" and cfg.val_anomalies == 0:
        raise ValueError("select_by=val_auroc needs validation anomalies: set val_anomalies (e.g. -1)")
    options = S3Options.from_env(endpoint=cfg.s3_endpoint)
    check_readable(cfg.data, options)  # bad credentials, a missing bucket: a clear error before any work
    check_reachable(cfg.storage, options)
    data_fs, data_path = filesystem_for(cfg.data, options)
    _, files = list_parquet_files(data_path, data_fs)
    check_image_set(data_path, data_fs)
    if "id" not in pq.ParquetFile(files[0], filesystem=data_fs).schema_arrow.names:
        raise ValueError(f"{cfg.data} has no `id` column, which distributed training selects rows by: "
                         "re-encode it with `gradcon prepare parquet`")
    sel, rows = training_rows(cfg, data_path, data_fs)
    train_ids, val_ids, anomaly_ids = rows["train"], rows["val"], rows["anomalies"]
    shape = cfg.image_shape(recorded_shape(data_path, data_fs),
                            lambda: take_rows(data_path, sel.train[:1], filesystem=data_fs).images[0])
    probe = cfg.build(shape.channels, shape.image_size)
    if not probe.iterative and cfg.num_workers != 1:
        raise ValueError(f"{cfg.detector} is fitted in one process (scikit-learn): use num_workers=1")
    cfg.data_mode = resolve_data_mode(cfg.data_mode, len(train_ids), shape.channels, shape.image_size)
    if cfg.data_mode == "stream" and probe.stream_problem:
        raise ValueError(f"data_mode=stream cannot train {cfg.detector}: {probe.stream_problem}; "
                         "use data_mode=memory")

    if not ray.is_initialized():
        init_ray(cfg.address, min_cpus=cfg.num_workers + 2)  # an embedded Ray is sized for the check below
    check_shared_storage(cfg.storage, cfg.shared_storage)
    data_context(cfg.verbose)
    cpus = ray.cluster_resources().get("CPU", 0)
    # Ray Data's listing and read tasks need a CPU each while the workers hold theirs, or the read waits forever.
    if cfg.num_workers + 2 > cpus or cfg.num_workers * cfg.worker_gpus > ray.cluster_resources().get("GPU", 0):
        raise ValueError(f"{cfg.num_workers} worker(s) (+2 CPUs for reading) do not fit this cluster "
                         f"({cpus:g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs)")

    store_fs, store_path = filesystem_for(cfg.storage, options)
    if cfg.resume and store_fs.get_file_info(f"{store_path}/{cfg.resume}").type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no run named {cfg.resume!r} under {cfg.storage} to resume")
    # Ray Train resumes a run whose name already has checkpoints in storage.
    name = cfg.resume or cfg.name or f"gradcon-c{cfg.normal_class}-{time.strftime('%Y%m%d-%H%M%S')}"
    is_s3 = str(cfg.storage).startswith("s3://")
    parent = tracking_parent or {}
    tracker = start_run(cfg.tracking, name, uri=parent.get("uri") or tracking_uri(),
                        parent_run_id=parent.get("run_id"))
    tracker.log_params(config_params(cfg))
    worker_tracking = tracker.run_id and {"name": name, "uri": tracker.uri, "parent_run_id": parent.get("run_id")}
    last_epoch = (cfg.epochs if probe.iterative else 1) - 1
    finished = finished_run(store_fs, f"{store_path}/{name}", last_epoch) if cfg.resume else None
    if finished is not None:
        print(f"run {name} has trained its last epoch: nothing left to train")
    else:  # the datasets and the trainer, only for a run that has epochs left
        size = tuple(shape.image_size)
        if cfg.data_mode == "stream":
            datasets = {"train": decoded_rows(files, data_fs, train_ids, shape.channels, size),
                        "val": decoded_rows(files, data_fs, val_ids + anomaly_ids, shape.channels, size, anomaly_ids)}
        else:  # each worker reads all its rows in one pass: a Ray Data execution costs seconds to start
            datasets = {"rows": decoded_rows(files, data_fs, train_ids + val_ids + anomaly_ids, shape.channels, size)}
        fingerprint = hashlib.sha256("\n".join(map(str, train_ids)).encode()).hexdigest()[:16]
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": asdict(cfg), "train_ids": train_ids, "val_ids": val_ids,
                               "anomaly_ids": anomaly_ids, "channels": shape.channels, "fingerprint": fingerprint,
                               "image_size": list(size), "tracking": worker_tracking,
                               "store_fs": store_fs, "run_path": f"{store_path}/{name}"},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.worker_gpus > 0,
                                         resources_per_worker={"CPU": 1, "GPU": cfg.worker_gpus} if cfg.worker_gpus > 0
                                         else None, placement_strategy=cfg.placement_strategy),
            torch_config=TorchConfig(backend="nccl" if cfg.worker_gpus > 0 else "gloo"),
            datasets=datasets,
            dataset_config=(all_rows_to_one_worker(cfg.read_ahead_mb) if cfg.data_mode == "stream"
                            else DataConfig(datasets_to_split=[])),
            run_config=RunConfig(name=name, storage_path=store_path, storage_filesystem=store_fs if is_s3 else None,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 callbacks=[*(callbacks or []), *([] if cfg.quiet else [epoch_lines()])],
                                 checkpoint_config=CheckpointConfig(num_to_keep=None),
                                 logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING")),
        )
    config_yaml = yaml.safe_dump(asdict(cfg), sort_keys=False)
    write_bytes(store_fs, f"{store_path}/{name}/config.yaml", config_yaml.encode())
    with tracker:  # FAILED in MLflow when the run fails
        tracker.log_text(config_yaml, "config.yaml")
        try:
            result = finished if finished is not None else trainer.fit()
        except TrainingFailedError as e:
            if (cause := storage_failure(e, options)) is None:
                raise
            raise StorageError(f"run {name} stopped: its storage failed: {cause}. The checkpoints it had written "
                               f"are kept: once the storage answers again, run it again with resume={name}") from e
        best = (result.get_best_checkpoint(metric=cfg.select_by, mode=SELECT_BY[cfg.select_by])
                if result.best_checkpoints else result.checkpoint)
        uri = f"s3://{best.path}" if is_s3 else best.path
        write_bytes(store_fs, f"{store_path}/{name}/best_checkpoint", uri.encode())
        tracker.log_metrics({f"final_{k}": v for k, v in result.metrics.items()
                             if isinstance(v, float) and k not in RAY_METRICS})
        tracker.set_checkpoint(uri)
    listing = store_fs.get_file_info(pafs.FileSelector(f"{store_path}/{name}"))  # one listing (S3: one LIST)
    stray = remove_unregistered_checkpoints(store_fs, listing, result)
    if stray:
        print(f"run {name}: removed {len(stray)} checkpoint folder(s) whose upload was cut short (never registered): "
              f"{', '.join(stray)}")
    skipped = [i.path for i in listing if i.base_name.startswith("skipped_rows-")]
    if skipped:
        count = len(set().union(*(read_bytes(store_fs, p).decode().splitlines() for p in skipped)))
        print(f"run {name}: {count} row(s) could not be decoded and were left out; ids in {', '.join(skipped)}")
    print(f"run {name} ({cfg.data_mode} data): final val J {result.metrics['val_loss']:.6g}; best checkpoint: {uri}")
    return result, uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> int:
    run(config_from_arguments(args, TrainConfig))
    return 0
