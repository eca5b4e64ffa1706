"""GradConDetector: the GradCon autoencoder, its training loop and its anomaly score, in one process."""
from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gradcon_core.adversarial import LatentAttack
from gradcon_core.checkpoint import data_fingerprint
from gradcon_core.detector import Detector, with_prefix
from gradcon_core.inputs import as_image_batch
from gradcon_core.objective import (
    GradientSync,
    ReferenceGradients,
    gradcon_step,
    local_part,
    step_rows,
    training_generators,
    validation_loss,
)
from gradcon_core.registry import create_model, register_detector
from gradcon_core.scoring import METHODS, score_components

log = logging.getLogger("gradcon")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@register_detector("gradcon")
class GradConDetector(Detector):
    """Autoencoder trained with the gradient constraint (weight alpha); score = recon + beta * grad score.

    alpha = 0 trains a plain autoencoder (the reference gradients are still tracked, so the
    gradient score stays defined). epsilon > 0 trains it adversarially (ARAE, gradcon_core.adversarial):
    alpha = beta = 0 with epsilon > 0 is ARAE itself, alpha > 0 GradCon + ARAE.
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 0.03,
        beta: float = 0.12,
        lr: float = 1e-3,
        device: str | torch.device = "auto",
        score_method: str = "fast",
        score_batch_size: int | None = None,
        threshold_percentile: float = 95.0,
        epsilon: float = 0.0,
        gamma: float = 0.1,
        attack_steps: int = 40,
        attack_refresh: str = "batch",
    ):
        if score_method not in METHODS:
            raise ValueError(f"unknown score_method {score_method!r}; choose one of {METHODS}")
        if alpha < 0 or beta < 0 or lr <= 0:
            raise ValueError(f"need alpha >= 0, beta >= 0, lr > 0; got alpha={alpha}, beta={beta}, lr={lr}")
        self.model = model
        self.reference = ReferenceGradients.for_model(model)
        self.alpha, self.beta, self.lr = alpha, beta, lr
        self.attack = LatentAttack(epsilon, attack_steps, gamma, attack_refresh)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.score_method = score_method
        self._score_batch_size = score_batch_size
        self.threshold_percentile = threshold_percentile
        self.to(device)
        self.history_: list[dict[str, float]] = []
        self.fit_info_: dict[str, Any] = {}

    def to(self, device: str | torch.device) -> GradConDetector:
        """Move the network and its reference gradients ("auto" = CUDA when there is one)."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.reference.to(self.device)
        # Small batches keep the per-image gradient work in cache on a CPU; a GPU wants big ones.
        self.score_batch_size = self._score_batch_size or (4096 if self.device.type == "cuda" else 64)
        return self

    @property
    def channels(self) -> int:
        return self.model.in_channels

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.input_size)

    @property
    def reference_gradients(self) -> list[torch.Tensor]:
        return self.reference.tensors

    def _batch(self, x) -> torch.Tensor:
        return as_image_batch(x, self.channels, self.input_size)

    def fit(self, x, epochs: int = 10, batch_size: int = 64, seed: int = 0, x_val=None) -> GradConDetector:
        """Train on normal images x; with x_val, keep the epoch of best validation J (official selection).

        seed fixes the order of the data; seed the model's initialisation with torch.manual_seed
        before create_model.
        """
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
        x = self._batch(x)
        xv = self._batch(x_val) if x_val is not None else None
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
            log.info("epoch %d/%d  %s", epoch + 1, epochs,
                     "  ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "epoch"))
        if best_state is not None:
            self.load_state_tensors(best_state[1])
        self.fit_info_ = {"epochs": epochs, "batch_size": batch_size, "seed": seed,
                          "best_epoch": best_state[0] if best_state else epochs - 1,
                          "data_fingerprint": data_fingerprint(x)}
        self.set_threshold(scores=self.decision_function(xv if xv is not None else x),
                           percentile=self.threshold_percentile)
        return self

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def prepare(self, x: torch.Tensor, sync: GradientSync | None = None) -> None:
        """Nothing to set up before the first step (the trainer's contract, see NeuralDetector)."""

    def validation_loss(self, x) -> float:
        """The official validation J on held-out normal images (first order), averaged over images."""
        return validation_loss(self.model, self.reference, self._batch(x), self.alpha)

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
        """One epoch over x in global batches of batch_size, this worker taking its slice of each.

        With world_size = 1 this is the single-process epoch; with N workers that share the generators'
        states, each calls it with its rank and the all-reduce sync, and together they take exactly the
        single-process steps (jobs/train.py). Returns this worker's share of the sums over images of
        "loss" (J), "recon" and "grad_loss"; summed over workers they are the global sums.
        """
        sums = torch.zeros(3, dtype=torch.float64)
        batches = torch.randperm(len(x), generator=order).split(batch_size)
        if self.attack.enabled and self.attack.refresh == "epoch":
            # Official schedule: x* for the whole set with this epoch's weights; a worker crafts only its rows.
            start = self.attack.random_start(x.shape, noise)
            rows = torch.cat([local_part(b, rank, world_size)[0] for b in batches])
            x_adv = x.clone()  # rows another worker crafts stay clean images here (used only with weight 0)
            x_adv[rows] = self.attack.craft(self.model, x[rows].to(self.device), start[rows]).cpu()
        for batch in batches:
            rows, scale, own = step_rows(batch, rank, world_size)
            xb, xa = x[rows].to(self.device), None
            if self.attack.enabled and self.attack.refresh == "epoch":
                xa = x_adv[rows].to(self.device)
            elif self.attack.enabled:
                start = self.attack.random_start((len(batch), *x.shape[1:]), noise)
                xa = self.attack.craft(self.model, xb, start.tensor_split(world_size)[rank] if own else start[:1])
            s = gradcon_step(self.model, self.reference, self.optimizer, xb, self.alpha, sync, scale,
                             x_adv=xa, gamma=self.attack.gamma)
            # The step's losses are this worker's scaled share (N * n_r / B of its mean): times B / N, its sum.
            sums += torch.tensor([s.loss, s.recon, s.grad_loss], dtype=torch.float64) * len(batch) / world_size
        return dict(zip(("loss", "recon", "grad_loss"), sums.tolist()))

    def score_components(self, x) -> dict[str, np.ndarray]:
        """{"score", "recon_error", "grad_score"} per image, as float32 arrays."""
        x = self._batch(x)
        parts: dict[str, list[np.ndarray]] = {"score": [], "recon_error": [], "grad_score": []}
        for xb in x.split(self.score_batch_size):
            out = score_components(self.model, self.reference.tensors, xb.to(self.device), self.beta,
                                   self.score_method)
            for k, v in out.items():
                parts[k].append(v.detach().float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def decision_function(self, x) -> np.ndarray:
        return self.score_components(x)["score"]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(with_prefix(tensors, "model."))
        self.reference.load_state_dict(with_prefix(tensors, "reference."))

    def config(self) -> dict[str, Any]:
        if not hasattr(self.model, "spec"):
            raise ValueError("only models made by create_model can be saved (their spec rebuilds them)")
        return {"model": dict(self.model.spec), "input_size": list(self.input_size), "in_channels": self.channels,
                "alpha": self.alpha, "beta": self.beta, "lr": self.lr, "epsilon": self.attack.epsilon,
                "gamma": self.attack.gamma, "attack_steps": self.attack.steps, "attack_refresh": self.attack.refresh,
                "score_method": self.score_method, **self.fit_info_}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> GradConDetector:
        det = cls(create_model(**config["model"]), alpha=config["alpha"], beta=config["beta"], lr=config["lr"],
                  score_method=config.get("score_method", "fast"), epsilon=config.get("epsilon", 0.0),
                  gamma=config.get("gamma", 0.1), attack_steps=config.get("attack_steps", 40),
                  attack_refresh=config.get("attack_refresh", "batch"))
        det.load_state_tensors(tensors)
        det.fit_info_ = {k: config[k] for k in ("epochs", "batch_size", "seed", "best_epoch", "data_fingerprint")
                         if k in config}
        return det
