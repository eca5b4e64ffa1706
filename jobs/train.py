"""Distributed training on Ray Train, with the exact global-batch semantics of one process.

gradcon train [--config FILE] [key=value ...]   e.g.  gradcon train data=s3://b/mnist/ normal_class=3 num_workers=8

Any registered detector (detector=NAME params={...}; GradCon by default). Every worker runs the epoch
loop single-process `fit` runs (gradcon_core/training/loop.py) with its rank and an all-reduce sync, so N
workers compute what one process computes on the global batch `batch_size`, whatever N is
(docs/design.md §4); each detector's docstring says whether its step is exact.
The scikit-learn ones (ocsvm, kde) are fitted once, in one worker. This file is the driver: it checks the
settings against the image set and plans the run (TrainPlan), starts the workers (jobs/train_worker.py) and
records the best checkpoint.

Input flows through Ray Data (read only the selected rows, decode them in CPU tasks; jobs/train_data.py):
with data_mode=memory every worker holds the whole class and takes its slice of each global batch; with
data_mode=stream each worker trains on its share as it arrives (docs/design.md §4).
Checkpoints (docs/design.md §7) go to local storage or S3 every `checkpoint_every`
epochs and whenever the selection metric (select_by: val_loss, or val_auroc against other classes'
train rows) improves; a restarted or resumed run continues from the latest with optimizers,
buffers, generators and epoch restored.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from cluster.storage import (
    S3Options,
    StorageError,
    check_reachable,
    check_readable,
    filesystem_for,
    storage_failure,
)
from gradcon_core.config import bounded, local_path, plain_name
from gradcon_core.data.imageset import (
    check_image_set,
    list_parquet_files,
    read_columns,
    recorded_shape,
    take_rows,
)
from gradcon_core.data.protocols import PROTOCOLS, Selection, columns_for, labeled_anomalies, select
from gradcon_core.detectors.settings import DetectorSettings
from gradcon_core.files import read_bytes, write_bytes
from gradcon_core.training.loop import SELECT_BY, Trainable, stream_problem
from jobs.tracking import JobSettings, config_params, start_run, tracking_uri
from jobs.train_data import DATA_MODES, all_rows_to_one_worker, decoded_rows, resolve_data_mode
from jobs.train_worker import TrainPlan, train_loop_per_worker

RAY_METRICS = ("time_this_iter_s", "time_total_s")  # Ray's bookkeeping beside the epoch's metrics
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's, for the workers' bundles


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

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, known in (("select_by", self.select_by, SELECT_BY), ("data_mode", self.data_mode, DATA_MODES),
                                   ("placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES),
                                   ("protocol", self.protocol, PROTOCOLS)):
            if value not in known:
                raise ValueError(f"config {name}: must be one of {', '.join(known)}, got {value!r}")
        if self.select_by == "val_auroc" and self.val_anomalies == 0:
            raise ValueError("select_by=val_auroc needs validation anomalies: set val_anomalies (e.g. -1)")
        if self.num_workers > 1 and 0 < self.worker_gpus < 1:
            raise ValueError(f"gpus_per_worker={self.worker_gpus:g} with {self.num_workers} workers: Ray may put two "
                             "workers of this run on one GPU, which NCCL cannot run; give each worker a whole GPU "
                             "(gpus_per_worker=1), or use num_workers=1 to share GPUs between runs")

    @property
    def worker_gpus(self) -> float:
        """The GPUs each worker holds: gpus_per_worker, else 1 with use_gpu, else 0."""
        return self.gpus_per_worker if self.gpus_per_worker is not None else float(self.use_gpu)


Config = TrainConfig  # the CLI's name for this job's settings


def plan_run(cfg: TrainConfig, options: S3Options) -> TrainPlan:
    """The run's plan, checked against the image set and the storage before anything starts on Ray."""
    check_readable(cfg.data, options)  # bad credentials, a missing bucket: a clear error before any work
    check_reachable(cfg.storage, options)
    data_fs, data_path = filesystem_for(cfg.data, options)
    _, files = list_parquet_files(data_path, data_fs)
    check_image_set(data_path, data_fs)
    if "id" not in pq.ParquetFile(files[0], filesystem=data_fs).schema_arrow.names:
        raise ValueError(f"{cfg.data} has no `id` column, which distributed training selects rows by: "
                         "re-encode it with `gradcon prepare parquet`")
    sel, rows = training_rows(cfg, data_path, data_fs)
    shape = cfg.image_shape(recorded_shape(data_path, data_fs),
                            lambda: take_rows(data_path, sel.train[:1], filesystem=data_fs).images[0])
    probe = cfg.build(shape.channels, shape.image_size)  # the settings with this shape: a misfit fails here
    trainable = isinstance(probe, Trainable)
    if not trainable and cfg.num_workers != 1:
        raise ValueError(f"{cfg.detector} is fitted in one process (scikit-learn): use num_workers=1")
    mode = resolve_data_mode(cfg.data_mode, len(rows["train"]), shape.channels, shape.image_size)
    if mode == "stream" and stream_problem(probe):
        raise ValueError(f"data_mode=stream cannot train {cfg.detector}: {stream_problem(probe)}; use data_mode=memory")
    store_fs, store_path = filesystem_for(cfg.storage, options)
    if cfg.resume and store_fs.get_file_info(f"{store_path}/{cfg.resume}").type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no run named {cfg.resume!r} under {cfg.storage} to resume")
    # Ray Train resumes a run whose name already has checkpoints in storage.
    name = cfg.resume or cfg.name or f"gradcon-c{cfg.normal_class}-{time.strftime('%Y%m%d-%H%M%S')}"
    fingerprint = hashlib.sha256("\n".join(map(str, rows["train"])).encode()).hexdigest()[:16]
    return TrainPlan(replace(cfg, data_mode=mode), name, files, data_fs, rows, shape, cfg.epochs if trainable else 1,
                     fingerprint, store_fs, f"{store_path}/{name}")


def run(cfg: TrainConfig, callbacks: list | None = None, tracking_parent: dict | None = None):
    """Train; returns Ray's Result and the URI of the best checkpoint (by cfg.select_by).

    callbacks go to the Train run (Tune passes its report callback here); tracking_parent ({"uri", "run_id"}):
    the MLflow run this one is a child of (a sweep's).
    """
    options = S3Options.from_env(endpoint=cfg.s3_endpoint)
    plan = plan_run(cfg, options)
    start_ray(cfg)
    parent = tracking_parent or {}
    tracker = start_run(cfg.tracking, plan.name, uri=parent.get("uri") or tracking_uri(),
                        parent_run_id=parent.get("run_id"))
    tracker.log_params(config_params(plan.cfg))
    plan.tracking = tracker.run_id and {"name": plan.name, "uri": tracker.uri, "parent_run_id": parent.get("run_id")}
    finished = finished_run(plan) if cfg.resume else None
    if finished is not None:
        print(f"run {plan.name} has trained its last epoch: nothing left to train")
    config_yaml = yaml.safe_dump(asdict(plan.cfg), sort_keys=False)
    write_bytes(plan.store_fs, f"{plan.run_path}/config.yaml", config_yaml.encode())
    with tracker:  # FAILED in MLflow when the run fails
        tracker.log_text(config_yaml, "config.yaml")
        result = finished if finished is not None else fit_on_ray(plan, options, callbacks or [])
        best = (result.get_best_checkpoint(metric=cfg.select_by, mode=SELECT_BY[cfg.select_by])
                if result.best_checkpoints else result.checkpoint)
        uri = f"s3://{best.path}" if is_s3(cfg) else best.path
        write_bytes(plan.store_fs, f"{plan.run_path}/best_checkpoint", uri.encode())
        tracker.log_metrics({f"final_{k}": v for k, v in result.metrics.items()
                             if isinstance(v, float) and k not in RAY_METRICS})
        tracker.set_checkpoint(uri)
    say_what_was_left(plan, result)
    print(f"run {plan.name} ({plan.cfg.data_mode} data): final val J {result.metrics['val_loss']:.6g}; "
          f"best checkpoint: {uri}")
    return result, uri


def is_s3(cfg: TrainConfig) -> bool:
    return str(cfg.storage).startswith("s3://")


def start_ray(cfg: TrainConfig) -> None:
    """Ray as the run needs it: joined or embedded, with room for the workers and Ray Data's reads."""
    import ray

    from cluster.ray_init import check_shared_storage, data_context, init_ray

    if not ray.is_initialized():
        init_ray(cfg.address, min_cpus=cfg.num_workers + 2)  # an embedded Ray is sized for the check below
    check_shared_storage(cfg.storage, cfg.shared_storage)
    data_context(cfg.verbose)
    cpus, gpus = ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0)
    # Ray Data's listing and read tasks need a CPU each while the workers hold theirs, or the read waits forever.
    if cfg.num_workers + 2 > cpus or cfg.num_workers * cfg.worker_gpus > gpus:
        raise ValueError(f"{cfg.num_workers} worker(s) (+2 CPUs for reading) do not fit this cluster "
                         f"({cpus:g} CPUs, {gpus:g} GPUs)")


def fit_on_ray(plan: TrainPlan, options: S3Options, callbacks: list):
    """Ray Train's run of the plan (Ray Data reading and decoding its rows); Ray's Result."""
    from ray.train import TrainingFailedError

    try:
        return trainer(plan, callbacks).fit()
    except TrainingFailedError as e:
        if (cause := storage_failure(e, options)) is None:
            raise
        raise StorageError(f"run {plan.name} stopped: its storage failed: {cause}. The checkpoints it had written are "
                           f"kept: once the storage answers again, run it again with resume={plan.name}") from e


def trainer(plan: TrainPlan, callbacks: list):
    """The TorchTrainer of a plan: its workers, their datasets, where it checkpoints."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, ids, args = plan.cfg, plan.rows, (plan.files, plan.data_fs)
    shape = (plan.shape.channels, tuple(plan.shape.image_size))
    if cfg.data_mode == "stream":
        datasets = {"train": decoded_rows(*args, ids["train"], *shape),
                    "val": decoded_rows(*args, ids["val"] + ids["anomalies"], *shape, ids["anomalies"])}
    else:  # each worker reads all its rows in one pass: a Ray Data execution costs seconds to start
        datasets = {"rows": decoded_rows(*args, ids["train"] + ids["val"] + ids["anomalies"], *shape)}
    gpus = cfg.worker_gpus
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": 1, "GPU": gpus} if gpus > 0 else None,
                                     placement_strategy=cfg.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        datasets=datasets,
        dataset_config=(all_rows_to_one_worker(cfg.read_ahead_mb) if cfg.data_mode == "stream"
                        else DataConfig(datasets_to_split=[])),
        run_config=RunConfig(name=plan.name, storage_path=plan.run_path.rsplit("/", 1)[0],
                             storage_filesystem=plan.store_fs if is_s3(cfg) else None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             callbacks=[*callbacks, *([] if cfg.quiet else [epoch_lines()])],
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING")))


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


def finished_run(plan: TrainPlan):
    """Ray's Result of the planned run if its latest checkpoint is of its last epoch, else None. Resuming a
    finished run has nothing to train; starting its workers to find that out costs tens of seconds."""
    from ray.train import Result

    try:
        result = Result.from_path(plan.run_path, storage_filesystem=plan.store_fs)
    except RuntimeError:  # no checkpoint registered yet
        return None
    return result if result.metrics and result.metrics["epoch"] >= plan.epochs - 1 else None


def say_what_was_left(plan: TrainPlan, result) -> None:
    """Once the run has finished: remove (and name) checkpoint folders whose upload was cut short, and say how many
    rows could not be decoded, from one listing of the run's folder (on S3: one LIST)."""
    listing = plan.store_fs.get_file_info(pafs.FileSelector(plan.run_path))
    stray = remove_unregistered_checkpoints(plan.store_fs, listing, result)
    if stray:
        print(f"run {plan.name}: removed {len(stray)} checkpoint folder(s) whose upload was cut short (never "
              f"registered): {', '.join(stray)}")
    skipped = [i.path for i in listing if i.base_name.startswith("skipped_rows-")]
    if skipped:
        count = len(set().union(*(read_bytes(plan.store_fs, p).decode().splitlines() for p in skipped)))
        print(f"run {plan.name}: {count} row(s) could not be decoded and were left out; ids in {', '.join(skipped)}")


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
