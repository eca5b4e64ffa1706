"""The one training loop: single-process `fit` and every Ray Train worker run train_epochs.

train_epochs(det, data, ...) drives a Trainable (a detector with a trained network) through epochs of steps:
run_steps hands each of this worker's local batches to det.step, whose optimizer steps see gradients that are
already all-reduced. The data decides where a step's images come from: TrainingData (memory mode) cuts this
worker's slice of every global batch from the whole class it holds; StreamedData (stream mode) trains on this
worker's shard as it arrives. After each epoch the loop turns the workers' shares of the sums into global means,
measures validation (val_loss; val_auroc against validation anomalies), keeps the selection key (lowest val_loss
or highest val_auroc) and hands the epoch to a callback: `fit` keeps the best weights in memory, the Ray worker
reports to Ray Train and checkpoints. With one worker and no sync it is the single-process run; with N workers,
each passing its rank and an all-reduce sync, they take exactly the single-process steps (parallel.py).

Detectors fitted in one go (scikit-learn's) are not Trainable: fit_in_one_go fits them and reports one epoch.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from gradcon_core.metrics import auroc
from gradcon_core.training.checkpoint import data_fingerprint
from gradcon_core.training.parallel import (
    GradientSync,
    LocalBatch,
    StepClock,
    average_buffers,
    local_batches,
    streamed_batches,
    training_generators,
)

SELECT_BY = {"val_loss": "min", "val_auroc": "max"}  # the selection metric and which way is better
ONE_GO = "it is fitted in one go on all its images"  # why a detector that is not Trainable cannot stream


@runtime_checkable
class Trainable(Protocol):
    """What the loop drives: a network, its optimizers, one method per step.

    step(x, batch, noise, sync): one optimisation step on this worker's images x (on the device) of a global
    batch (batch: its LocalBatch; every loss is weighted by batch.scale = N * n_r / B, and the gradients are
    all-reduced before each optimizer.step()); returns its values ({"loss", ...}, unweighted; tensors stay on
    the device). noise: the run's generator for random draws shared by all workers (ARAE's random starts).
    validation_loss(x): the objective on held-out normal images, averaged over images, no update.
    prepare(x, sync): state from the whole class before the first step (a no-op for most);
    start_epoch(x, batches, noise): work before an epoch's steps, given all of this worker's batches
    (ARAE's per-epoch attack; a no-op for most).
    stream_problem: why it cannot train from a stream of batches (it needs the whole class), or None.
    """

    model: nn.Module
    device: torch.device

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]: ...

    @property
    def stream_problem(self) -> str | None: ...

    def step(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator,
             sync: GradientSync | None) -> dict[str, Any]: ...

    def validation_loss(self, x: torch.Tensor) -> float: ...

    def prepare(self, x: torch.Tensor, sync: GradientSync | None = None) -> None: ...

    def start_epoch(self, x: torch.Tensor, batches: list[LocalBatch], noise: torch.Generator) -> None: ...

    def decision_function(self, x: torch.Tensor) -> np.ndarray: ...


@dataclass
class EpochReport:
    epoch: int
    metrics: dict[str, float]
    improved: bool  # the selection key is the best so far
    training_state: Callable[[], dict[str, Any]] = field(repr=False)  # what a checkpoint needs to resume


def run_steps(det: Trainable, steps: Iterable[tuple[torch.Tensor, LocalBatch]], noise: torch.Generator,
              sync: GradientSync | None = None) -> tuple[dict[str, float], int, int]:
    """det.step on each (this worker's images, its LocalBatch); returns this worker's share of the sums over
    images of the steps' values, its images and its steps. The values are summed on the device and read once."""
    det.model.train()
    sums: dict[str, Any] = {}
    images = count = 0
    for x, batch in steps:
        for k, v in det.step(x.to(det.device), batch, noise, sync).items():
            sums[k] = sums.get(k, 0.0) + v * batch.own
        images, count = images + batch.own, count + 1
    return {k: float(v) for k, v in sums.items()}, images, count


def global_sums(values: list[float], sync: GradientSync | None) -> np.ndarray:
    """Per-worker shares -> global sums (a mean over workers, times their number)."""
    totals = torch.tensor(values, dtype=torch.float64)
    if sync is not None:
        sync.mean_([totals])
        totals *= sync.world_size
    return totals.numpy()


@dataclass
class TrainingData:
    """Memory mode: normal training images, normal validation images and validation anomalies (float [N,C,H,W]),
    every worker holding all of them and taking its slice of each global batch."""

    train: torch.Tensor
    val: torch.Tensor | None = None
    anomalies: torch.Tensor | None = None

    @property
    def has_val(self) -> bool:
        return self.val is not None and len(self.val) > 0

    @property
    def rows(self) -> int:
        return len(self.train)

    @property
    def fingerprint(self) -> str:
        return data_fingerprint(self.train)

    @property
    def threshold_images(self) -> torch.Tensor:
        """What the threshold is a percentile of: validation images, else training images."""
        return self.val if self.has_val else self.train

    def steps(self, det: Trainable, epoch: int, order: torch.Generator, noise: torch.Generator, batch_size: int,
              rank: int, world_size: int, sync: GradientSync | None,
              clock: StepClock | None) -> Iterator[tuple[torch.Tensor, LocalBatch]]:
        """This worker's slice of each global batch of a permutation of the class. The images move to the device
        once per epoch (when they fit in a quarter of its free memory) and the batches are index tensors there."""
        x = _on_device(self.train, det.device)
        batches = local_batches(torch.randperm(len(x), generator=order).to(x.device), batch_size, rank, world_size)
        det.start_epoch(x, batches, noise)
        if clock is not None:
            clock.step_begins()  # (the rows are held: no data wait)
        return ((x[batch.rows], batch) for batch in batches)

    def validation_loss(self, det: Trainable, sync: GradientSync | None) -> float | None:
        return det.validation_loss(self.val) if self.has_val else None

    def validation_scores(self, det: Trainable, sync: GradientSync | None) -> tuple[np.ndarray, np.ndarray] | None:
        """(normal validation scores, validation anomalies' scores), or None without validation anomalies."""
        if not (self.has_val and self.anomalies is not None and len(self.anomalies)):
            return None
        scores = det.decision_function(torch.cat([self.val, self.anomalies]))
        return scores[: len(self.val)], scores[len(self.val):]

    def threshold_scores(self, det, sync: GradientSync | None, wanted: bool = True) -> np.ndarray | None:
        """The scores a threshold is a percentile of (computed only where wanted: every worker holds them)."""
        return det.decision_function(self.threshold_images) if wanted else None


@dataclass
class StreamedData:
    """Stream mode: this worker's share of the class, read while it trains: never held all at once.

    train(epoch): this worker's local batches of that epoch (float [n, C, H, W]), as its data pipeline
    delivers them; train_rows(): its share of the training rows once more, in any batches (what a threshold
    is set from when there are no validation rows); validation(): (images, is_anomaly) batches of its share
    of the validation rows and the validation anomalies. The counts are over all workers; fingerprint
    identifies the training rows.
    """

    train: Callable[[int], Iterable[torch.Tensor]]
    train_rows: Callable[[], Iterable[torch.Tensor]]
    validation: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    rows: int
    val_rows: int
    anomalies: int
    fingerprint: str

    @property
    def has_val(self) -> bool:
        return self.val_rows > 0

    def steps(self, det: Trainable, epoch: int, order: torch.Generator, noise: torch.Generator, batch_size: int,
              rank: int, world_size: int, sync: GradientSync | None,
              clock: StepClock | None) -> Iterator[tuple[torch.Tensor, LocalBatch]]:
        placeholder = torch.zeros(1, det.channels, *det.input_size)  # a worker whose shard has run out steps on it
        batches = streamed_batches(self.train(epoch), placeholder, rank, world_size, sync)
        return clock.waited(batches) if clock is not None else batches

    def validation_loss(self, det: Trainable, sync: GradientSync | None) -> float | None:
        """The exact mean over every worker's share: sums and counts, all-reduced."""
        if not self.has_val:
            return None
        loss, count = 0.0, 0
        for x, is_anomaly in self.validation():
            normal = x[~is_anomaly]
            if len(normal):
                loss, count = loss + det.validation_loss(normal) * len(normal), count + len(normal)
        loss, count = global_sums([loss, count], sync)
        return float(loss / count) if count else None  # (no validation row decoded: None)

    def validation_scores(self, det: Trainable, sync: GradientSync | None) -> tuple[np.ndarray, np.ndarray] | None:
        return self._gathered_scores(det, sync) if self.anomalies else None

    def threshold_scores(self, det, sync: GradientSync | None, wanted: bool = True) -> np.ndarray:
        """Every worker's scores of its share (a collective: every worker calls it, wanted or not)."""
        return self._gathered_scores(det, sync)[0]

    def _gathered_scores(self, det, sync: GradientSync | None) -> tuple[np.ndarray, np.ndarray]:
        """Scores of every worker's validation rows, gathered: (normal rows, validation anomalies); without
        validation rows, the training rows' scores stand in for the normal ones."""
        scores, flags = [np.zeros(0, np.float32)], [np.zeros(0, bool)]
        batches = self.validation() if self.has_val else ((x, torch.zeros(len(x), dtype=torch.bool))
                                                           for x in self.train_rows())
        for x, is_anomaly in batches:
            if len(x):  # (a batch whose rows all failed to decode is empty)
                scores.append(det.decision_function(x))
                flags.append(is_anomaly.numpy())
        mine = np.stack([np.concatenate(scores).astype(np.float64), np.concatenate(flags)])
        everyone = np.concatenate(sync.gather(mine), axis=1) if sync is not None else mine
        anomalous = everyone[1].astype(bool)
        return everyone[0][~anomalous], everyone[0][anomalous]


def stream_problem(det) -> str | None:
    """Why det cannot train from a stream of batches (data_mode=stream), or None if it can."""
    return det.stream_problem if isinstance(det, Trainable) else ONE_GO


def train_epochs(
    det: Trainable,
    data: TrainingData | StreamedData,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    select_by: str = "val_loss",
    rank: int = 0,
    world_size: int = 1,
    sync: GradientSync | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    clock: StepClock | None = None,
) -> None:
    """Train det on data, calling on_epoch after every epoch (see the module docstring).

    resume: a training state saved from an EpochReport (optimizers, generators, epoch, best key), to
    continue a run where it stopped. After each epoch det.fit_info_ describes the current weights.
    clock: time the steps (the one the sync times its collectives with); each epoch's metrics then carry
    per-step means of compute, inner and final all-reduce and data wait (step_*_ms), and the first epoch's
    the seconds from the clock's making (the worker's start) to the first step (first_step_s).
    """
    _check(det, data, epochs, batch_size, select_by)
    order, noise = training_generators(seed)
    start_epoch, best = 0, float("inf")
    if resume is not None:
        for optimizer, saved in zip(det.optimizers, resume["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        order.set_state(resume["generator"])
        noise.set_state(resume["noise_generator"])
        start_epoch, best = resume["epoch"] + 1, resume["best_selection_key"]
    elif isinstance(data, TrainingData):
        det.prepare(data.train, sync)  # e.g. Deep SVDD's centre, before the first step

    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        if clock is not None:
            clock.restart()
        steps = data.steps(det, epoch, order, noise, batch_size, rank, world_size, sync, clock)
        sums, images, count = run_steps(det, steps, noise, sync)
        times = clock.per_step_ms(count) if clock is not None else {}  # (before validation, which is not a step)
        metrics = _epoch_metrics(det, data, sums, images, sync) | times
        metrics["images_per_s"] = data.rows / (time.perf_counter() - start)
        if clock is not None and epoch == start_epoch and clock.first_step_s is not None:
            metrics["first_step_s"] = clock.first_step_s  # this worker's start to its first step
        improved, best = _selection(metrics, select_by, best)
        det.fit_info_ = {"epochs": epoch + 1, "epoch": epoch, "batch_size": batch_size, "seed": seed,
                         "data_fingerprint": data.fingerprint}

        def state(epoch=epoch, best=best) -> dict[str, Any]:
            return {"optimizers": [o.state_dict() for o in det.optimizers], "generator": order.get_state(),
                    "noise_generator": noise.get_state(), "epoch": epoch, "best_selection_key": best}

        if on_epoch is not None:
            on_epoch(EpochReport(epoch, metrics, improved, state))


def _check(det, data: TrainingData | StreamedData, epochs: int, batch_size: int, select_by: str) -> None:
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {sorted(SELECT_BY)}, got {select_by!r}")
    if isinstance(data, StreamedData) and stream_problem(det):
        raise ValueError(f"data_mode=stream cannot train {det.name}: {stream_problem(det)}; use data_mode=memory")
    if not isinstance(det, Trainable):
        raise ValueError(f"{det.name} is not trained in epochs: {ONE_GO} (fit_in_one_go)")


def _epoch_metrics(det: Trainable, data: TrainingData | StreamedData, sums: dict[str, float], images: int,
                   sync: GradientSync | None) -> dict[str, float]:
    """The epoch's global means, val_loss (the training loss stands in without validation rows) and val_auroc."""
    *totals, count = global_sums([*sums.values(), images], sync)
    if sync is not None:
        average_buffers(det.model, sync)
    metrics = {k: float(v / count) for k, v in zip(sums, totals)}
    val_loss = data.validation_loss(det, sync)
    metrics["val_loss"] = metrics["loss"] if val_loss is None else val_loss
    return metrics | _validation_auroc(det, data, sync)


def _validation_auroc(det, data: TrainingData | StreamedData, sync: GradientSync | None) -> dict[str, float]:
    """{"val_auroc": ...} of the validation rows against the validation anomalies, {} without anomalies."""
    scores = data.validation_scores(det, sync)
    if scores is None:
        return {}
    normal, anomalous = scores
    return {"val_auroc": auroc(np.concatenate([normal, anomalous]),
                               np.arange(len(normal) + len(anomalous)) >= len(normal))}


def _selection(metrics: dict[str, float], select_by: str, best: float) -> tuple[bool, float]:
    """(improved, the new best) of the selection key, "lower is better" so that one running minimum serves both."""
    if select_by not in metrics:
        raise ValueError(f"select_by={select_by} needs validation anomalies (none were given)")
    key = -metrics[select_by] if SELECT_BY[select_by] == "max" else metrics[select_by]
    return key < best, min(best, key)


def fit_in_one_go(det, data: TrainingData, *, epochs: int, batch_size: int, seed: int, select_by: str = "val_loss",
                  resume: dict[str, Any] | None = None, on_epoch: Callable[[EpochReport], None] | None = None) -> None:
    """A detector that is not Trainable (scikit-learn's): det.fit once, reported as its one epoch, whose
    "validation loss" is the mean score of the threshold images. A resumed run has nothing left to fit."""
    if resume is not None:
        return
    start = time.perf_counter()
    det.fit(data.train, epochs=epochs, batch_size=batch_size, seed=seed, x_val=data.val if data.has_val else None)
    metrics = {"val_loss": float(np.mean(det.decision_function(data.threshold_images)))}
    metrics |= _validation_auroc(det, data, None)
    metrics["images_per_s"] = data.rows / (time.perf_counter() - start)
    _, best = _selection(metrics, select_by, float("inf"))
    if on_epoch is not None:
        on_epoch(EpochReport(0, metrics, True, lambda: {"optimizers": [], "epoch": 0, "best_selection_key": best}))


def _on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return x
    free, _ = torch.cuda.mem_get_info(device)
    return x.to(device) if x.numel() * x.element_size() < free / 4 else x
