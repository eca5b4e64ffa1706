"""OC-NN (Chalapathy et al. 2018): the one-class SVM objective with a one-hidden-layer network.

min_{w,V,r} 1/2 ||w||^2 + 1/2 ||V||_F^2 + 1/nu * mean max(0, r - y(x)) - r,  y(x) = <w, sigmoid(V phi(x))>.
phi is GradCon's conv encoder, pretrained as an autoencoder for pretrain_steps batches before the
first step (prepare) and then fixed, as in the paper. The network and r are optimised alternately:
a gradient step on w, V with r fixed, then r <- the nu-quantile of y on the batch (the paper's code
does this per epoch on all the training outputs). Score = r - y(x): positive outside the boundary.

Caveat, seen on MNIST: the boundary is a hyperplane away from the origin of a non-negative feature
space, so images with larger encoder features (more ink) come out "more normal". With the thin digit
1 as the normal class, 2 epochs on 300 images reach AUROC 0.94 against other digits, but 3-5 epochs
fall to 0.04 (inverted) while the objective keeps decreasing: the objective, not a bug.

Distributed: the regulariser is the same on every worker and is not scaled, the hinge is a
per-sample mean, so a step is exact; r is the mean over workers of their local-batch nu-quantiles
(identical on every worker, not the global quantile). Pretraining (prepare with sync) takes
pretrain_steps all-reduced steps on each worker's own images: the same number on every worker.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.detectors.neural import NeuralDetector
from gradcon_core.parallel import GradientSync
from gradcon_core.registry import register_detector


@register_detector("ocnn")
class OCNNDetector(NeuralDetector):
    default_model = "ocnn_net"

    def __init__(self, model: nn.Module, nu: float = 0.1, pretrain_steps: int = 200, pretrain_batch_size: int = 64,
                 lr: float = 1e-3, device: str | torch.device = "auto", score_batch_size: int | None = None,
                 threshold_percentile: float = 95.0):
        if not 0 < nu <= 1:
            raise ValueError(f"nu must lie in (0, 1], got {nu}")
        self.nu, self.pretrain_steps, self.pretrain_batch_size = nu, pretrain_steps, pretrain_batch_size
        super().__init__(model, lr, device, score_batch_size, threshold_percentile)

    def make_aux(self) -> nn.Module:
        aux = nn.Module()
        aux.register_buffer("r", torch.full((), 0.1))  # the paper's initial r
        return aux

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam([*self.model.V.parameters(), *self.model.w.parameters()], lr=self.lr)]

    def prepare(self, x: torch.Tensor, sync: GradientSync | None = None) -> None:
        """Pretrain the encoder as an autoencoder (reconstruction MSE) on the training images."""
        self.model.train()
        optimizer = torch.optim.Adam([*self.model.encoder.parameters(), *self.model.decoder.parameters()], lr=self.lr)
        order, batches = torch.Generator().manual_seed(0), []
        for _ in range(self.pretrain_steps):
            if not batches:
                batches = list(torch.randperm(len(x), generator=order).split(self.pretrain_batch_size))
            xb = x[batches.pop(0)].to(self.device)
            self.update(optimizer, F.mse_loss(self.model.reconstruct(xb), xb), sync)

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the pretrained encoder stays fixed
            features = self.model.encoder(x).flatten(1)
        return self.model.head(features)

    def losses(self, y: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to differentiate, its unscaled value); r is a constant for the gradient step."""
        hinge = (self.aux.r - y).clamp_min(0).mean() / self.nu
        reg = 0.5 * (self.model.V.weight.pow(2).sum() + self.model.w.weight.pow(2).sum())
        return reg + scale * hinge, reg + hinge - self.aux.r

    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.losses(self.outputs(x))[1]

    def train_step(self, x: torch.Tensor, sync: GradientSync | None = None, scale: float = 1.0) -> dict[str, float]:
        y = self.outputs(x)
        loss, value = self.losses(y, scale)
        self.update(self.optimizers[0], loss, sync)
        with torch.no_grad():
            r = torch.quantile(y.detach(), self.nu)
            if sync is not None:
                sync.mean_([r])
            self.aux.r.copy_(r)
        return {"loss": float(value.detach()), "r": float(r)}

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": self.aux.r - self.outputs(x)}

    def reconstruct(self, x) -> None:
        """Not reconstruction-based: its decoder only pretrains the encoder."""
        return None
