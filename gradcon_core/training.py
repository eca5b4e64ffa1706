"""The one epoch loop: single-process `fit` and every Ray Train worker run the same function.

train_epochs(det, data, ...) runs epochs of the detector's train_epoch, turns each worker's share of the
sums into global means, measures validation (val_loss; val_auroc against validation anomalies), keeps
the selection key (lowest val_loss or highest val_auroc), and hands each epoch to a callback: `fit`
keeps the best state in memory, the Ray worker reports to Ray Train and checkpoints. With one worker
and no sync it is the single-process run; with N workers, each passing its rank and an all-reduce sync,
they take exactly the single-process steps (gradcon_core/parallel.py). Detectors that are not
iterative (scikit-learn's) are fitted once and reported as one epoch.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradcon_core.checkpoint import data_fingerprint
from gradcon_core.detector import Detector
from gradcon_core.metrics import auroc
from gradcon_core.parallel import GradientSync, average_buffers, training_generators

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
    def threshold_images(self) -> torch.Tensor:
        """What the threshold is a percentile of: validation scores, else training scores."""
        return self.val if self.has_val else self.train


@dataclass
class EpochReport:
    epoch: int
    metrics: dict[str, float]
    improved: bool  # the selection key is the best so far
    training_state: Callable[[], dict[str, Any]] = field(repr=False)  # what a checkpoint needs to resume


def train_epochs(
    det: Detector,
    data: TrainingData,
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
) -> None:
    """Train det on data, calling on_epoch after every epoch (see the module docstring).

    resume: a training state saved from an EpochReport (optimizers, generators, epoch, best key), to
    continue a run where it stopped. After each epoch det.fit_info_ describes the current weights.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {sorted(SELECT_BY)}, got {select_by!r}")
    fingerprint = data_fingerprint(data.train)
    order, noise = training_generators(seed)
    start_epoch, best = 0, float("inf")
    if resume is not None:
        for optimizer, saved in zip(det.optimizers, resume["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        order.set_state(resume["generator"])
        noise.set_state(resume["noise_generator"])
        start_epoch, best = resume["epoch"] + 1, resume["best_selection_key"]
    elif det.iterative:
        det.prepare(data.train, sync)  # e.g. Deep SVDD's centre, before the first step
    last = epochs if det.iterative else 1

    for epoch in range(start_epoch, last):
        start = time.perf_counter()
        if det.iterative:
            metrics = _train_epoch(det, data, order, noise, batch_size, rank, world_size, sync)
        else:  # fitted in one go; its "validation loss" is the mean validation score
            det.fit(data.train, epochs=epochs, batch_size=batch_size, seed=seed,
                    x_val=data.val if data.has_val else None)
            metrics = {"val_loss": float(np.mean(det.decision_function(data.threshold_images)))}
        metrics["images_per_s"] = len(data.train) / (time.perf_counter() - start)
        if data.has_val and data.anomalies is not None and len(data.anomalies):
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
                 batch_size: int, rank: int, world_size: int, sync: GradientSync | None) -> dict[str, float]:
    sums = det.train_epoch(data.train, order, noise, batch_size, rank, world_size, sync)
    totals = torch.tensor(list(sums.values()), dtype=torch.float64)
    if sync is not None:  # per-worker shares -> global sums (a mean over workers, times their number)
        sync.mean_([totals])
        totals *= sync.world_size
        average_buffers(det.model, sync)
    metrics = dict(zip(sums, (totals / len(data.train)).tolist()))
    # Without validation rows the training loss stands in, as the selection metric.
    metrics["val_loss"] = det.validation_loss(data.val) if data.has_val else metrics["loss"]
    return metrics
