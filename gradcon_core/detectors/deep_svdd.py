"""Deep SVDD (Ruff et al. 2018): map normal images close to a centre c; score = squared distance to c.

objective="one-class": mean ||phi(x) - c||^2. objective="soft-boundary": R^2 + (1/nu) mean max(0,
||phi(x) - c||^2 - R^2), R set after every step to the (1 - nu)-quantile of the batch's distances
(Ruff's code does this per batch too, after warm-up epochs; we skip the warm-up), score = d^2 - R^2.
Weight decay (the objective's regulariser) is the optimiser's. c is the mean of phi over the
training images before training (prepare, after one pass that sets BatchNorm's statistics), with
Ruff's eps rule so no coordinate sits at 0.

Distributed: the centre is exact (sums and counts are all-reduced). The one-class loss is a
per-sample mean, but BatchNorm normalises with local batch statistics (as plain DDP without
SyncBatchNorm), so a step is not exactly the global-batch step, and BatchNorm's running statistics
are each worker's own (average the model's buffers, or keep rank 0's, when checkpointing).
Soft-boundary: R is the mean over workers of their local-batch quantiles (identical on every
worker, not the global quantile).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gradcon_core.detectors.neural import NeuralDetector, NeuralSettings
from gradcon_core.detectors.registry import register_detector
from gradcon_core.training.parallel import GradientSync, LocalBatch

OBJECTIVES = ("one-class", "soft-boundary")
CENTRE_EPS = 0.1  # Ruff's: a coordinate of c near 0 is trivially matched by zero weights


@dataclass(kw_only=True)
class DeepSVDDSettings(NeuralSettings):
    lr: float = 1e-4
    objective: str = "one-class"  # or "soft-boundary"
    nu: float = 0.1  # soft-boundary: the share of images allowed outside the sphere
    weight_decay: float = 1e-6  # the objective's regulariser

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if not 0 < self.nu <= 1:
            raise ValueError(f"nu must lie in (0, 1], got {self.nu}")


@register_detector("deep_svdd")
class DeepSVDDDetector(NeuralDetector):
    default_model = "deep_svdd_lenet"
    Settings = DeepSVDDSettings

    def make_aux(self) -> nn.Module:
        aux = nn.Module()
        aux.register_buffer("center", torch.zeros(self.model.rep_dim))
        aux.register_buffer("radius", torch.zeros(()))
        return aux

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.model.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay)]

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, sync: GradientSync | None = None) -> None:
        # A first pass in training mode gives BatchNorm the data's statistics, so that c (eval mode)
        # is the centre of what the network outputs at score time.
        self.model.train()
        for xb in x.split(self.score_batch_size):
            self.model(xb.to(self.device))
        self.model.eval()
        total = torch.zeros(self.model.rep_dim, device=self.device)
        for xb in x.split(self.score_batch_size):
            total += self.model(xb.to(self.device)).sum(0)
        count = torch.tensor(float(len(x)), device=self.device)
        if sync is not None:
            sync.mean_([total, count])  # mean of sums / mean of counts = the global mean
        c = total / count
        c[(c.abs() < CENTRE_EPS) & (c < 0)] = -CENTRE_EPS
        c[(c.abs() < CENTRE_EPS) & (c >= 0)] = CENTRE_EPS
        self.aux.center.copy_(c)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) - self.aux.center).pow(2).sum(1)

    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        dist = self.distances(x)
        if self.settings.objective == "one-class":
            return dist.mean()
        r2 = self.aux.radius.pow(2)
        return r2 + (dist - r2).clamp_min(0).mean() / self.settings.nu

    def step(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator,
             sync: GradientSync | None = None) -> dict[str, torch.Tensor]:
        if self.settings.objective == "one-class":
            return super().step(x, batch, noise, sync)
        nu, dist = self.settings.nu, self.distances(x)
        r2 = self.aux.radius.pow(2)
        hinge = (dist - r2).clamp_min(0).mean() / nu  # R^2 is a constant for the network's gradient
        self.update(self.optimizers[0], batch.scale * hinge, sync)
        with torch.no_grad():
            radius = torch.quantile(dist.detach().sqrt(), 1 - nu)
            if sync is not None:
                sync.mean_([radius])
            self.aux.radius.copy_(radius)
        return {"loss": (r2 + hinge).detach(), "radius": radius}

    @property
    def stream_problem(self) -> str | None:
        return "deep_svdd computes its centre from the whole class before training (prepare)"

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dist = self.distances(x)
        return {"score": dist - self.aux.radius.pow(2) if self.settings.objective == "soft-boundary" else dist}
