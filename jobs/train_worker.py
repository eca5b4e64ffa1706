"""What each Ray Train worker of `gradcon train` runs, given the driver's TrainPlan.

A worker builds the detector (seeded: every worker starts from the same weights), reads its data (jobs/
train_data.py: the whole class in memory mode, its shard in stream mode), continues from Ray Train's latest
checkpoint if it was restarted, and hands everything to the one training loop (gradcon_core/training/loop.py)
with its rank and an all-reduce sync. After every epoch an EpochReporter does the bookkeeping: the fault
drill, the list of undecodable rows, the report to Ray Train (and MLflow), a checkpoint when one is due.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from gradcon_core.data.imageset import ImageShape
from gradcon_core.detectors.contract import Detector
from gradcon_core.files import write_bytes
from gradcon_core.training.checkpoint import load_checkpoint, load_training_state
from gradcon_core.training.loop import (
    EpochReport,
    StreamedData,
    Trainable,
    TrainingData,
    fit_in_one_go,
    train_epochs,
)
from gradcon_core.training.parallel import AllReduceMean, GradientSync, StepClock
from jobs.tracking import Tracker, start_run
from jobs.train_data import BatchLog, StreamedShard, held_rows


@dataclass
class TrainPlan:
    """What the driver decided for a run, and every worker's copy of it."""

    cfg: Any  # the run's TrainConfig, its data_mode resolved (jobs/train.py)
    name: str
    files: list[str]  # the image set's parquet files (which the driver's Ray Data reads)
    data_fs: pafs.FileSystem
    rows: dict[str, list]  # the ids of the "train", "val" and "anomalies" rows
    shape: ImageShape  # what the detector takes
    epochs: int  # the epochs the detector trains (1 for one fitted in one go)
    fingerprint: str  # identifies the training rows
    store_fs: pafs.FileSystem
    run_path: str  # the run's folder in storage
    tracking: dict | None = None  # the driver's MLflow run, for rank 0 to log into


def train_loop_per_worker(config: dict) -> list[str]:
    """One worker's run; returns every worker's hash of its final state (they must agree)."""
    import ray.train

    from cluster.ray_init import size_torch_threads

    size_torch_threads()
    plan: TrainPlan = config["plan"]
    cfg = plan.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.worker_gpus > 0 else torch.device("cpu")
    clock = StepClock(device)  # where the steps spend their time, and how long this worker took to its first
    if not cfg.verbose:
        quiet_ray_worker_logs()
    torch.manual_seed(cfg.seed)
    det = cfg.build(plan.shape.channels, plan.shape.image_size, device)
    sync = AllReduceMean(world, clock) if world > 1 else None
    skipped: set = set()  # ids of rows that failed to decode
    data = worker_data(plan, det, rank, world, skipped)
    restored, resume = ray.train.get_checkpoint(), None
    if restored:
        with restored.as_directory() as d:
            det.load_state_tensors(load_checkpoint(d)[0])
            resume = load_training_state(d)
    reporter = EpochReporter(plan, det, data, sync, rank, restored is not None, skipped)
    loop = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, select_by=cfg.select_by,
                resume=resume, on_epoch=reporter)
    if isinstance(det, Trainable):
        train_epochs(det, data, rank=rank, world_size=world, sync=sync, clock=clock, **loop)
    else:
        fit_in_one_go(det, data, **loop)
    return state_digests(det, world)


def worker_data(plan: TrainPlan, det: Detector, rank: int, world: int, skipped: set) -> TrainingData | StreamedData:
    """This worker's data: the whole class held (memory mode) or its shard as it arrives (stream mode)."""
    import ray.train

    cfg, ids = plan.cfg, plan.rows
    if cfg.data_mode == "stream":
        log = BatchLog(plan.store_fs, plan.run_path, rank) if cfg.log_batches else None
        shard = StreamedShard(ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"),
                              cfg.batch_size, rank, world, cfg.seed, skipped, log)
        return StreamedData(shard.train, shard.train_rows, shard.validation, rows=len(ids["train"]),
                            val_rows=len(ids["val"]), anomalies=len(ids["anomalies"]), fingerprint=plan.fingerprint)
    rows = held_rows(ray.train.get_dataset_shard("rows"), ids, det.channels, det.input_size, skipped)
    return TrainingData(rows["train"], rows["val"], rows["anomalies"])


class EpochReporter:
    """A worker's bookkeeping after each epoch (the loop's on_epoch): the fault drill, the list of rows that
    failed to decode, the epoch's metrics to Ray Train (and from rank 0 to MLflow), and, every
    checkpoint_every epochs, on each improvement and at the end, a checkpoint with its threshold."""

    def __init__(self, plan: TrainPlan, det: Detector, data: TrainingData | StreamedData,
                 sync: GradientSync | None, rank: int, resumed: bool, skipped: set):
        self.plan, self.det, self.data, self.sync, self.rank = plan, det, data, sync, rank
        self.resumed, self.skipped, self.listed = resumed, skipped, 0
        # Rank 0 logs into the driver's MLflow run, found by name: a restarted worker continues it.
        self.tracker = start_run("mlflow", **plan.tracking) if rank == 0 and plan.tracking else Tracker()

    def __call__(self, r: EpochReport) -> None:
        import ray.train

        cfg = self.plan.cfg
        if cfg.fail_at_epoch == r.epoch and not self.resumed and self.rank == 0:
            raise RuntimeError(f"fault drill: rank 0 fails at epoch {r.epoch}")
        self._list_skipped()
        metrics = {**r.metrics, "epoch": r.epoch, "epochs": self.plan.epochs, "resumed": self.resumed}
        self.tracker.log_metrics(r.metrics, step=r.epoch)
        if r.improved or (r.epoch + 1) % cfg.checkpoint_every == 0 or r.epoch == self.plan.epochs - 1:
            self._checkpoint(r, metrics)
        else:
            ray.train.report(metrics)

    def _list_skipped(self) -> None:
        """The skipped rows' ids, written when they grow (memory mode: once, by rank 0, as every rank saw every
        row; stream mode: a row can reach another rank in a later epoch)."""
        if len(self.skipped) > self.listed and (self.rank == 0 or self.plan.cfg.data_mode == "stream"):
            write_bytes(self.plan.store_fs, f"{self.plan.run_path}/skipped_rows-rank-{self.rank}.txt",
                        "".join(f"{i}\n" for i in sorted(map(str, self.skipped))).encode())
            self.listed = len(self.skipped)

    def _checkpoint(self, r: EpochReport, metrics: dict) -> None:
        """Rank 0 saves the detector with its threshold (a percentile of validation scores: in stream mode every
        rank scores its share) and the state to resume from; every rank reports."""
        import ray.train
        from ray.train import Checkpoint

        scores = self.data.threshold_scores(self.det, self.sync, wanted=self.rank == 0)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                self.det.set_normal_threshold(scores)
                self.det.save(d, training_state=r.training_state())
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def state_digests(det: Detector, world: int) -> list[str]:
    """Every rank's hash of its detector's state, in rank order: every rank must end with the same state."""
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
