"""NeuralDetector: what every detector with a trained network shares (device, batching, fit loop, persistence).

A subclass says how to take one optimisation step (train_step, or just `batch_loss` for one optimiser
and one loss), what its objective is on held-out normal images (validation_loss) and how to score a
batch (score_batch). The loop in fit is written once, here, with GradConDetector.fit's data order, so
a data-parallel trainer can drive train_step itself.

Distributed contract of train_step(x, sync, scale): x is this worker's n_r images of a global batch
of B across N workers; every loss is multiplied by scale = N * n_r / B before backward, and right
before each optimizer.step() sync.mean_ all-reduces (mean) the gradients of all of that optimizer's
parameters (zeros where a parameter got none, so every worker passes the same list). For a loss that
is a per-sample mean this makes the N workers take exactly the global-batch step. Each detector's
docstring says where that is not exact. State that is not a gradient (Deep SVDD's radius, OC-NN's r)
is all-reduced the same way, so every worker keeps identical state. A trainer calls
prepare(x_local, sync) once before the first step (Deep SVDD's centre, OC-NN's pretraining), then
train_step per batch, and checkpoints state_tensors() with each optimizer's state_dict().

Hyperparameters are the constructor's keyword arguments, kept as attributes of the same name
(scikit-learn's get_params convention); config() saves them and from_state() rebuilds from them.
"""
from __future__ import annotations

import copy
import inspect
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gradcon_core.checkpoint import data_fingerprint
from gradcon_core.detector import Detector, with_prefix
from gradcon_core.detectors.gradcon import resolve_device
from gradcon_core.inputs import as_image_batch
from gradcon_core.objective import GradientSync, step_rows, training_generators
from gradcon_core.registry import create_model

log = logging.getLogger("gradcon")
FIT_INFO = ("epochs", "batch_size", "seed", "best_epoch", "data_fingerprint")
NOT_SAVED = ("self", "model", "device", "score_batch_size")  # runtime choices, not part of the method


class NeuralDetector(Detector):
    default_model = "gradcon_cae"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        device: str | torch.device = "auto",
        score_batch_size: int | None = None,
        threshold_percentile: float = 95.0,
    ):
        if lr <= 0:
            raise ValueError(f"need lr > 0, got {lr}")
        self.model, self.lr, self.threshold_percentile = model, lr, threshold_percentile
        self._score_batch_size = score_batch_size
        self.aux = self.make_aux()
        self.to(device)
        self.optimizers = self.make_optimizers()
        self.history_: list[dict[str, float]] = []
        self.fit_info_: dict[str, Any] = {}

    # --- what subclasses provide -------------------------------------------------------------
    def make_aux(self) -> nn.Module:
        """Score-time state beside the weights (a centre, a radius, reference gradients), as buffers:
        saved, moved and selected together with the weights."""
        return nn.Module()

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.model.parameters(), lr=self.lr)]

    def prepare(self, x: torch.Tensor, sync: GradientSync | None = None) -> None:
        """One-off state from the training images before the first step (Deep SVDD's centre)."""

    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (per-sample mean), for the default train_step and validation_loss."""
        raise NotImplementedError

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"score", ...} per image of a batch already on the device."""
        raise NotImplementedError

    def train_step(self, x: torch.Tensor, sync: GradientSync | None = None, scale: float = 1.0) -> dict[str, float]:
        """One optimisation step on a batch already on the device; returns {"loss", ...} (unscaled)."""
        loss = self.batch_loss(x)
        self.update(self.optimizers[0], scale * loss, sync)
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def validation_loss(self, x) -> float:
        """The objective on held-out normal images, averaged over images; no update."""
        x = self._batch(x)
        self.model.eval()
        total = sum(float(self.batch_loss(xb.to(self.device))) * len(xb) for xb in x.split(self.score_batch_size))
        return total / len(x)

    # --- shared machinery ----------------------------------------------------------------------
    def update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, sync: GradientSync | None) -> None:
        """backward, all-reduce the optimizer's gradients, step."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sync_grads(optimizer, sync)
        optimizer.step()

    @staticmethod
    def sync_grads(optimizer: torch.optim.Optimizer, sync: GradientSync | None) -> None:
        """Mean-all-reduce the gradients of all the optimizer's parameters (zeros where one got none)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if sync is not None:
            sync.mean_([p.grad for p in params])

    def to(self, device: str | torch.device) -> NeuralDetector:
        """Move the network and its score-time state ("auto" = CUDA when there is one)."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.aux.to(self.device)
        self.score_batch_size = self._score_batch_size or (4096 if self.device.type == "cuda" else 256)
        return self

    @property
    def channels(self) -> int:
        return self.model.in_channels

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.input_size)

    def _batch(self, x) -> torch.Tensor:
        return as_image_batch(x, self.channels, self.input_size)

    def fit(self, x, epochs: int = 10, batch_size: int = 64, seed: int = 0, x_val=None) -> NeuralDetector:
        """Train on normal images x; with x_val, keep the epoch of best validation loss.

        seed fixes the order of the data; seed the initialisation and the noise of stochastic
        objectives with torch.manual_seed.
        """
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
        x = self._batch(x)
        xv = self._batch(x_val) if x_val is not None else None
        self.prepare(x)
        order, noise = training_generators(seed)
        best_loss, best_state = float("inf"), None
        for epoch in range(epochs):
            start = time.perf_counter()
            sums = self.train_epoch(x, order, noise, batch_size)
            record = {"epoch": epoch, **{k: v / len(x) for k, v in sums.items()},
                      "images_per_s": len(x) / (time.perf_counter() - start)}
            if xv is not None:
                record["val_loss"] = self.validation_loss(xv)
                if record["val_loss"] < best_loss:
                    best_loss, best_state = record["val_loss"], (epoch, copy.deepcopy(self.state_tensors()))
            self.history_.append(record)
            log.info("%s epoch %d/%d  %s", self.name, epoch + 1, epochs,
                     "  ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "epoch"))
        if best_state is not None:
            self.load_state_tensors(best_state[1])
        self.fit_info_ = {"epochs": epochs, "batch_size": batch_size, "seed": seed,
                          "best_epoch": best_state[0] if best_state else epochs - 1,
                          "data_fingerprint": data_fingerprint(x)}
        self.set_threshold(scores=self.decision_function(xv if xv is not None else x),
                           percentile=self.threshold_percentile)
        return self

    def train_epoch(
        self,
        x: torch.Tensor,
        order: torch.Generator,
        noise: torch.Generator,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        sync: GradientSync | None = None,
    ) -> dict[str, float]:
        """One epoch in global batches of batch_size, this worker taking its slice of each (as
        GradConDetector.train_epoch; `noise` is unused: these objectives draw from torch's global RNG).
        Returns this worker's share of the sums over images of train_step's values."""
        self.model.train()
        sums: dict[str, float] = {}
        for batch in torch.randperm(len(x), generator=order).split(batch_size):
            rows, scale, own = step_rows(batch, rank, world_size)
            for k, v in self.train_step(x[rows].to(self.device), sync, scale).items():
                sums[k] = sums.get(k, 0.0) + v * own
        return sums

    @torch.no_grad()
    def score_components(self, x) -> dict[str, np.ndarray]:
        """{"score", ...} per image, as float32 arrays."""
        x = self._batch(x)
        self.model.eval()
        parts: dict[str, list[np.ndarray]] = {}
        for xb in x.split(self.score_batch_size):
            for k, v in self.score_batch(xb.to(self.device)).items():
                parts.setdefault(k, []).append(v.detach().float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def decision_function(self, x) -> np.ndarray:
        return self.score_components(x)["score"]

    @torch.no_grad()
    def reconstruct(self, x) -> np.ndarray | None:
        """The network's output for x, batched; None when the network is not an autoencoder (Deep SVDD's
        and OC-NN's outputs are codes and scores, not images of x's shape)."""
        x = self._batch(x)
        self.model.eval()
        parts = []
        for xb in x.split(self.score_batch_size):
            out = self.model(xb.to(self.device))
            if out.shape != xb.shape:
                return None
            parts.append(out.float().cpu().numpy())
        return np.concatenate(parts)

    # --- persistence ---------------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        return [n for n in inspect.signature(cls.__init__).parameters if n not in NOT_SAVED]

    def get_params(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.param_names()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"aux.{k}": v for k, v in self.aux.state_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(with_prefix(tensors, "model."))
        self.aux.load_state_dict(with_prefix(tensors, "aux."))

    def config(self) -> dict[str, Any]:
        if not hasattr(self.model, "spec"):
            raise ValueError("only models made by create_model can be saved (their spec rebuilds them)")
        return {"model": dict(self.model.spec), "input_size": list(self.input_size), "in_channels": self.channels,
                **self.get_params(), **self.fit_info_}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> NeuralDetector:
        det = cls(create_model(**config["model"]), **{n: config[n] for n in cls.param_names() if n in config})
        det.load_state_tensors(tensors)
        det.fit_info_ = {k: config[k] for k in FIT_INFO if k in config}
        return det
