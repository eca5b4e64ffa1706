"""The one epoch loop: single-process `fit` and every Ray Train worker run the same function.

train_epochs(det, data, ...) runs epochs of the detector's train_epoch, turns each worker's share of the
sums into global means, measures validation (val_loss; val_auroc against validation anomalies), keeps
the selection key (lowest val_loss or highest val_auroc), and hands each epoch to a callback: `fit`
keeps the best state in memory, the Ray worker reports to Ray Train and checkpoints. With one worker
and no sync it is the single-process run; with N workers, each passing its rank and an all-reduce sync,
they take exactly the single-process steps (gradcon_core/training/parallel.py). Detectors that are not
iterative (scikit-learn's) are fitted once and reported as one epoch.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradcon_core.detectors.contract import Detector
from gradcon_core.metrics import auroc
from gradcon_core.training.checkpoint import data_fingerprint
from gradcon_core.training.parallel import (
    GradientSync,
    LocalBatch,
    StepClock,
    average_buffers,
    streamed_batches,
    training_generators,
)

SELECT_BY = {"val_loss": "min", "val_auroc": "max"}  # the selection metric and which way is better


@dataclass
class TrainingData:
    """Normal training images, normal validation images and validation anomalies (float [N,C,H,W])."""

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
    def threshold_images(self) -> torch.Tensor:
        """What the threshold is a percentile of: validation scores, else training scores."""
        return self.val if self.has_val else self.train


@dataclass
class StreamedData:
    """This worker's share of the class, read while it trains (data_mode=stream): never held all at once.

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


@dataclass
class EpochReport:
    epoch: int
    metrics: dict[str, float]
    improved: bool  # the selection key is the best so far
    training_state: Callable[[], dict[str, Any]] = field(repr=False)  # what a checkpoint needs to resume


def train_epochs(
    det: Detector,
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
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {sorted(SELECT_BY)}, got {select_by!r}")
    streamed = isinstance(data, StreamedData)
    if streamed and det.stream_problem:
        raise ValueError(f"data_mode=stream cannot train {det.name}: {det.stream_problem}; use data_mode=memory")
    fingerprint = data.fingerprint if streamed else data_fingerprint(data.train)
    order, noise = training_generators(seed)
    start_epoch, best = 0, float("inf")
    if resume is not None:
        for optimizer, saved in zip(det.optimizers, resume["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        order.set_state(resume["generator"])
        noise.set_state(resume["noise_generator"])
        start_epoch, best = resume["epoch"] + 1, resume["best_selection_key"]
    elif det.iterative and not streamed:
        det.prepare(data.train, sync)  # e.g. Deep SVDD's centre, before the first step
    last = epochs if det.iterative else 1

    for epoch in range(start_epoch, last):
        start = time.perf_counter()
        if streamed:
            metrics = _train_streamed_epoch(det, data, epoch, noise, rank, world_size, sync, clock)
        elif det.iterative:
            metrics = _train_epoch(det, data, order, noise, batch_size, rank, world_size, sync, clock)
        else:  # fitted in one go; its "validation loss" is the mean validation score
            det.fit(data.train, epochs=epochs, batch_size=batch_size, seed=seed,
                    x_val=data.val if data.has_val else None)
            metrics = {"val_loss": float(np.mean(det.decision_function(data.threshold_images)))}
        metrics["images_per_s"] = data.rows / (time.perf_counter() - start)
        if clock is not None and epoch == start_epoch and clock.first_step_s is not None:
            metrics["first_step_s"] = clock.first_step_s  # this worker's start to its first step
        if streamed and data.anomalies:
            normal, anomalous = streamed_scores(det, data, sync)
            metrics["val_auroc"] = auroc(np.concatenate([normal, anomalous]),
                                         np.arange(len(normal) + len(anomalous)) >= len(normal))
        elif not streamed and data.has_val and data.anomalies is not None and len(data.anomalies):
            scores = det.decision_function(torch.cat([data.val, data.anomalies]))
            metrics["val_auroc"] = auroc(scores, np.arange(len(scores)) >= len(data.val))
        if select_by not in metrics:
            raise ValueError(f"select_by={select_by} needs validation anomalies (none were given)")
        # The selection metric as "lower is better", so that one running minimum serves both.
        key = -metrics[select_by] if SELECT_BY[select_by] == "max" else metrics[select_by]
        improved = key < best
        best = min(best, key)
        if det.iterative:  # (a detector fitted in one go has said so itself)
            det.fit_info_ = {"epochs": epoch + 1, "epoch": epoch, "batch_size": batch_size, "seed": seed,
                             "data_fingerprint": fingerprint}

        def state(epoch=epoch, best=best) -> dict[str, Any]:
            return {"optimizers": [o.state_dict() for o in det.optimizers], "generator": order.get_state(),
                    "noise_generator": noise.get_state(), "epoch": epoch, "best_selection_key": best}

        if on_epoch is not None:
            on_epoch(EpochReport(epoch, metrics, improved, state))


def _train_epoch(det: Detector, data: TrainingData, order: torch.Generator, noise: torch.Generator,
                 batch_size: int, rank: int, world_size: int, sync: GradientSync | None,
                 clock: StepClock | None) -> dict[str, float]:
    if clock is not None:
        clock.restart()
        clock.step_begins()  # (the rows are held)
    sums = det.train_epoch(data.train, order, noise, batch_size, rank, world_size, sync)
    times = clock.per_step_ms(-(-len(data.train) // batch_size)) if clock is not None else {}  # (rows held: no wait)
    totals = _global_sums(list(sums.values()), sync)
    if sync is not None:
        average_buffers(det.model, sync)
    metrics = dict(zip(sums, (totals / len(data.train)).tolist())) | times
    # Without validation rows the training loss stands in, as the selection metric.
    metrics["val_loss"] = det.validation_loss(data.val) if data.has_val else metrics["loss"]
    return metrics


def _train_streamed_epoch(det: Detector, data: StreamedData, epoch: int, noise: torch.Generator, rank: int,
                          world_size: int, sync: GradientSync | None, clock: StepClock | None) -> dict[str, float]:
    placeholder = torch.zeros(1, det.channels, *det.input_size)
    trained, steps = 0, 0  # this worker's images (rows that failed to decode never arrive), the epoch's steps

    def counted(batches: Iterable[tuple[torch.Tensor, LocalBatch]]):
        nonlocal trained, steps
        for x, batch in batches:
            trained, steps = trained + batch.own, steps + 1
            yield x, batch

    if clock is not None:
        clock.restart()
    batches = streamed_batches(data.train(epoch), placeholder, rank, world_size, sync)
    sums = det.train_batches(counted(clock.waited(batches) if clock is not None else batches), noise, sync)
    times = clock.per_step_ms(steps) if clock is not None else {}
    *totals, images = _global_sums([*sums.values(), trained], sync)
    if sync is not None:
        average_buffers(det.model, sync)
    metrics = {k: float(v / images) for k, v in zip(sums, totals)} | times
    if data.has_val:  # the exact mean over every worker's share: sums and counts, all-reduced
        loss, count = 0.0, 0
        for x, is_anomaly in data.validation():
            normal = x[~is_anomaly]
            if len(normal):
                loss, count = loss + det.validation_loss(normal) * len(normal), count + len(normal)
        loss, count = _global_sums([loss, count], sync)
    # Without validation rows (or none that decoded) the training loss stands in, as the selection metric.
    metrics["val_loss"] = float(loss / count) if data.has_val and count else metrics["loss"]
    return metrics


def _global_sums(values: list[float], sync: GradientSync | None) -> np.ndarray:
    """Per-worker shares -> global sums (a mean over workers, times their number)."""
    totals = torch.tensor(values, dtype=torch.float64)
    if sync is not None:
        sync.mean_([totals])
        totals *= sync.world_size
    return totals.numpy()


def streamed_scores(det: Detector, data: StreamedData, sync: GradientSync | None) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every worker's validation rows, gathered: (normal rows, validation anomalies); without
    validation rows, the training rows' scores stand in for the normal ones (what thresholds are set from)."""
    scores, flags = [np.zeros(0, np.float32)], [np.zeros(0, bool)]
    batches = data.validation() if data.has_val else ((x, torch.zeros(len(x), dtype=torch.bool))
                                                      for x in data.train_rows())
    for x, is_anomaly in batches:
        if len(x):  # (a batch whose rows all failed to decode is empty)
            scores.append(det.decision_function(x))
            flags.append(is_anomaly.numpy())
    mine = np.stack([np.concatenate(scores).astype(np.float64), np.concatenate(flags)])
    everyone = np.concatenate(sync.gather(mine), axis=1) if sync is not None else mine
    anomalous = everyone[1].astype(bool)
    return everyone[0][~anomalous], everyone[0][anomalous]
