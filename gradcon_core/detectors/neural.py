"""NeuralDetector: what every detector with a trained network shares (device, batching, fit, persistence).

A subclass says how to take one optimisation step (step, or just `batch_loss` for one optimiser and one
loss), what its objective is on held-out normal images (validation_loss) and how to score a batch
(score_batch). It is then a training.loop.Trainable: the one loop (training/loop.py) drives it, the same for
`fit` and for every data-parallel worker of `gradcon train`.

Distributed contract of step(x, batch, noise, sync): x is this worker's n_r images of a global batch of B
across N workers; every loss is multiplied by batch.scale = N * n_r / B before backward, and right before
each optimizer.step() sync.mean_ all-reduces (mean) the gradients of all of that optimizer's parameters
(zeros where a parameter got none, so every worker passes the same list): `update` does both. For a loss
that is a per-sample mean this makes the N workers take exactly the global-batch step. Each detector's
docstring says where that is not exact. State that is not a gradient (Deep SVDD's radius) is all-reduced
the same way, so every worker keeps identical state.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from gradcon_core.data.arrays import as_image_batch, uint8_images
from gradcon_core.detectors.contract import Detector, Settings, with_prefix
from gradcon_core.detectors.scoring import score_batch_size
from gradcon_core.training.loop import EpochReport, TrainingData, train_epochs
from gradcon_core.training.parallel import GradientSync, LocalBatch, all_reduce_gradients

log = logging.getLogger("gradcon")


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" = CUDA when there is one."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(kw_only=True)
class NeuralSettings(Settings):
    """What every detector with a trained network takes: the learning rate of its (first) optimiser."""

    lr: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0:
            raise ValueError(f"need lr > 0, got {self.lr}")


class NeuralDetector(Detector):
    default_model = "gradcon_cae"
    Settings = NeuralSettings
    cpu_score_batch_size = 256  # small batches keep per-image work in cache on a CPU; a GPU wants big ones
    aux_name = "aux"  # the prefix of the aux state's tensors in checkpoints

    def __init__(self, model: nn.Module, *, device: str | torch.device = "auto", score_batch_size: int | None = None,
                 **settings):
        super().__init__(**settings)
        self.model = model
        self._score_batch_size = score_batch_size
        self.aux = self.make_aux()
        self.to(device)
        self._optimizers: list[torch.optim.Optimizer] | None = None  # built on first use: see `optimizers`
        self.history_: list[dict[str, float]] = []

    # --- what subclasses provide -------------------------------------------------------------
    def make_aux(self) -> nn.Module:
        """Score-time state beside the weights (a centre, a radius, reference gradients), as buffers:
        saved, moved and selected together with the weights."""
        return nn.Module()

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.model.parameters(), lr=self.settings.lr)]

    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (per-sample mean), for the default step and validation_loss."""
        raise NotImplementedError

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"score", ...} per image of a batch already on the device."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator,
             sync: GradientSync | None = None) -> dict[str, torch.Tensor]:
        """One optimisation step on this worker's images x (on the device); returns {"loss", ...} (unweighted)."""
        loss = self.batch_loss(x)
        self.update(self.optimizers[0], batch.scale * loss, sync)
        return {"loss": loss.detach()}

    def prepare(self, x: torch.Tensor, sync: GradientSync | None = None) -> None:
        """State from the whole class before the first step (Deep SVDD's centre); nothing by default."""

    def start_epoch(self, x: torch.Tensor, batches: list[LocalBatch], noise: torch.Generator) -> None:
        """Work before an epoch's steps, given all of this worker's batches (ARAE's per-epoch attack)."""

    @property
    def stream_problem(self) -> str | None:
        """Why this detector cannot train from a stream of batches (it needs the whole class), or None."""
        return None

    @torch.no_grad()
    def validation_loss(self, x) -> float:
        x = self._batch(x)
        self.model.eval()
        total = sum(float(self.batch_loss(xb.to(self.device))) * len(xb) for xb in x.split(self.score_batch_size))
        return total / len(x)

    # --- shared machinery ----------------------------------------------------------------------
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Built when training first needs them: a detector loaded only to score never builds one (torch's
        optimizers import torch._dynamo, about a second of a scoring actor's start-up on a CPU)."""
        if self._optimizers is None:
            self._optimizers = self.make_optimizers()
        return self._optimizers

    def update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, sync: GradientSync | None) -> None:
        """backward, all-reduce the optimizer's gradients, step."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(optimizer, sync)
        optimizer.step()

    def to(self, device: str | torch.device) -> NeuralDetector:
        """Move the network and its score-time state ("auto" = CUDA when there is one)."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.aux.to(self.device)
        self.score_batch_size = self._score_batch_size or self.default_score_batch_size()
        return self

    def default_score_batch_size(self) -> int:
        """As many images as fit the scoring memory budget (scoring.score_batch_size: the estimate grows with
        the image size, so 256x256x3 gets a small batch where 28x28 gets thousands); on a CPU no more than
        cpu_score_batch_size, beyond which per-image work falls out of cache."""
        by_memory = score_batch_size(self.model, self.device)
        return by_memory if self.device.type == "cuda" else min(by_memory, self.cpu_score_batch_size)

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

        seed fixes the order of the data (and ARAE's noise); seed the initialisation and the noise of
        other stochastic objectives with torch.manual_seed.
        """
        data = TrainingData(self._batch(x), self._batch(x_val) if x_val is not None else None)
        best: dict = {}

        def keep_best(report: EpochReport) -> None:
            self.history_.append({"epoch": report.epoch, **report.metrics})
            log.info("%s epoch %d/%d  %s", self.name, report.epoch + 1, epochs,
                     "  ".join(f"{k}={v:.5g}" for k, v in report.metrics.items()))
            if data.has_val and report.improved:
                best.update(state=copy.deepcopy(self.state_tensors()), info=dict(self.fit_info_))

        train_epochs(self, data, epochs=epochs, batch_size=batch_size, seed=seed, on_epoch=keep_best)
        if best:  # the weights of the best validation epoch, as the official selection keeps them
            self.load_state_tensors(best["state"])
            self.fit_info_ = {**best["info"], "epochs": epochs}
        self.set_normal_threshold(self.decision_function(data.threshold_images))
        return self

    @torch.no_grad()
    def score_components(self, x) -> dict[str, np.ndarray]:
        """{"score", ...} per image, as float32 arrays."""
        self.model.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        for xb in self._device_batches(x):
            for k, v in self.score_batch(xb).items():
                parts.setdefault(k, []).append(v.detach().float())
        return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}  # (one wait for the device, at the end)

    def _device_batches(self, x) -> Iterator[torch.Tensor]:
        """x in batches of score_batch_size on the device, as floats in [0, 1]. On a GPU, uint8 images cross as
        uint8 (a quarter of the bytes), from pinned memory without waiting, and become floats there."""
        if self.device.type == "cuda" and isinstance(x, np.ndarray) and x.dtype == np.uint8:
            self._batch(x[:1])  # the shape, channels and size checks, on one image
            for xb in uint8_images(x).split(self.score_batch_size):
                yield xb.pin_memory().to(self.device, non_blocking=True).float().div_(255)
            return
        for xb in self._batch(x).split(self.score_batch_size):
            yield xb.to(self.device)

    def decision_function(self, x) -> np.ndarray:
        return self.score_components(x)["score"]

    @torch.no_grad()
    def reconstruct(self, x) -> np.ndarray | None:
        """The network's output for x, when it is an autoencoder (it has a decoder); None otherwise."""
        if getattr(self.model, "decoder", None) is None:
            return None
        x = self._batch(x)
        self.model.eval()
        return np.concatenate([self.model(xb.to(self.device)).float().cpu().numpy()
                               for xb in x.split(self.score_batch_size)])

    # --- persistence ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"{self.aux_name}.{k}": v for k, v in self.aux.state_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(with_prefix(tensors, "model."))
        self.aux.load_state_dict(with_prefix(tensors, f"{self.aux_name}."))
