"""GradConDetector: the GradCon autoencoder, its training loop and its anomaly score, in one process."""
from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gradcon_core.checkpoint import data_fingerprint
from gradcon_core.detector import Detector
from gradcon_core.inputs import as_image_batch
from gradcon_core.objective import ReferenceGradients, gradcon_step, validation_loss
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
    gradient score stays defined).
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
    ):
        if score_method not in METHODS:
            raise ValueError(f"unknown score_method {score_method!r}; choose one of {METHODS}")
        if alpha < 0 or beta < 0 or lr <= 0:
            raise ValueError(f"need alpha >= 0, beta >= 0, lr > 0; got alpha={alpha}, beta={beta}, lr={lr}")
        self.model = model
        self.reference = ReferenceGradients.for_model(model)
        self.alpha, self.beta, self.lr = alpha, beta, lr
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
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        order = torch.Generator().manual_seed(seed)
        best_loss, best_state = float("inf"), None
        for epoch in range(epochs):
            start, sums = time.perf_counter(), np.zeros(3)
            for idx in torch.randperm(len(x), generator=order).split(batch_size):
                s = gradcon_step(self.model, self.reference, optimizer, x[idx].to(self.device), self.alpha)
                sums += len(idx) * np.array([s.loss, s.recon, s.grad_loss])
            loss, recon, grad_loss = sums / len(x)
            record = {"epoch": epoch, "loss": loss, "recon": recon, "grad_loss": grad_loss,
                      "images_per_s": len(x) / (time.perf_counter() - start)}
            if xv is not None:
                record["val_loss"] = validation_loss(self.model, self.reference, xv, self.alpha)
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
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(part("model."))
        self.reference.load_state_dict(part("reference."))

    def config(self) -> dict[str, Any]:
        if not hasattr(self.model, "spec"):
            raise ValueError("only models made by create_model can be saved (their spec rebuilds them)")
        return {"model": dict(self.model.spec), "input_size": list(self.input_size), "in_channels": self.channels,
                "alpha": self.alpha, "beta": self.beta, "lr": self.lr, "epsilon": 0.0,
                "score_method": self.score_method, **self.fit_info_}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> GradConDetector:
        det = cls(create_model(**config["model"]), alpha=config["alpha"], beta=config["beta"], lr=config["lr"],
                  score_method=config.get("score_method", "fast"))
        det.load_state_tensors(tensors)
        det.fit_info_ = {k: config[k] for k in ("epochs", "batch_size", "seed", "best_epoch", "data_fingerprint")
                         if k in config}
        return det
