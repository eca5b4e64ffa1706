"""Adversarially robust autoencoder training (ARAE, Salehi et al.; docs/design.md §5).

x* = clip(x + delta, 0, 1), delta an L-inf PGD perturbation (|delta| <= eps) that *maximises the
latent distance* ||E(x + delta) - E(x)||^2 with E(x) held fixed: a random uniform start in
[-eps, eps], then `steps` signed ascent steps of 2.5 * eps / steps, as the official code does.
The autoencoder then learns to map x* back to x:

    L = MSE(D(E(x*)), x) + gamma * MSE(E(x*), E(x))

Random starts come from the caller, drawn for the whole global batch from one generator, so a
data-parallel worker attacks its own slice with exactly the noise one process would use: the
attack is per image (the loss is a sum of per-image terms), so N workers craft the same x*.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

REFRESH = ("batch", "epoch")


def code(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An autoencoder's code of x: its `encode` where it has one (the VAE's posterior mean), else its encoder's
    output."""
    encode = getattr(model, "encode", None)
    return encode(x) if encode is not None else model.encoder(x)


@dataclass
class LatentAttack:
    """ARAE's settings: epsilon (0 = off), PGD steps, latent weight gamma, and when x* is refreshed.

    refresh="batch" (our default) crafts x* for each batch with the current weights; "epoch" crafts
    it once per epoch for the whole training set, as the official code does.
    """

    epsilon: float = 0.0
    steps: int = 40
    gamma: float = 0.1
    refresh: str = "batch"

    def __post_init__(self):
        if self.epsilon < 0 or self.steps < 1 or self.gamma < 0:
            raise ValueError(f"ARAE needs epsilon >= 0, steps >= 1, gamma >= 0; got epsilon={self.epsilon}, "
                             f"steps={self.steps}, gamma={self.gamma}")
        if self.refresh not in REFRESH:
            raise ValueError(f"unknown ARAE refresh {self.refresh!r}; choose one of {REFRESH}")

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0

    def random_start(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """Uniform noise in [-eps, eps] (on the CPU, so every device draws the same numbers)."""
        return (torch.rand(shape, generator=generator) * 2 - 1) * self.epsilon

    def craft(self, model: nn.Module, x: torch.Tensor, start: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """x* for images x from the random start `start` (same shape); no gradient flows out of it."""
        return torch.cat([self._pgd(model, xb, sb.to(xb.device))
                          for xb, sb in zip(x.split(batch_size), start.split(batch_size), strict=True)])

    def _pgd(self, model: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        step = 2.5 * self.epsilon / self.steps
        was_training = model.training
        model.eval()
        with torch.no_grad():
            target = code(model, x)
        for _ in range(self.steps):
            x_adv = (x + delta).clamp(0, 1).requires_grad_(True)
            # Sum over images (not mean): each image's ascent direction is its own gradient's sign.
            distance = (code(model, x_adv) - target).pow(2).flatten(1).mean(1).sum()
            (g,) = torch.autograd.grad(distance, x_adv)
            delta = (delta + step * g.sign()).clamp(-self.epsilon, self.epsilon)
        model.train(was_training)
        return (x + delta).clamp(0, 1).detach()


def arae_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, gamma: float) -> torch.Tensor:
    """MSE(D(E(x*)), x) + gamma * MSE(E(x*), E(x)); gradients reach both encoder passes, as in the official loss."""
    z_adv = model.encoder(x_adv)
    return F.mse_loss(model.decoder(z_adv), x) + gamma * F.mse_loss(z_adv, model.encoder(x))
