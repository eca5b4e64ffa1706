"""Puzzle-AE (Salehi et al. 2020): reconstruct the original image from a puzzle of its 2x2 tiles.

Training input: the image with its four tiles in a random non-identity order (optionally an FGSM
step of size epsilon against the reconstruction loss, as the official code's attack); target: the
original. Score: the reconstruction MSE of x from each of the 23 non-identity puzzles, averaged
(the official "avg" aggregation).

Differences from the official code: GradCon's CAE instead of a U-Net, no tile removal and no
adversarial feature loss from an image discriminator, no per-permutation normalisation of the
score by validation error; a single clean FGSM step (the official's random start can reach 2 eps).

Distributed: exact given the random permutations (a per-sample mean; the FGSM perturbation of an
image depends only on that image).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.detectors.cae import recon_error
from gradcon_core.detectors.neural import NeuralDetector, NeuralSettings
from gradcon_core.detectors.registry import register_detector
from gradcon_core.training.parallel import GradientSync, LocalBatch

PERMUTATIONS = torch.tensor([p for p in itertools.permutations(range(4)) if p != (0, 1, 2, 3)])  # 23 x 4


def puzzle(x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """x [N,C,H,W] with its 2x2 tiles reordered: tile k of the result is tile perms[n, k] of x[n]."""
    n, c, h, w = x.shape
    tiles = x.reshape(n, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(n, 4, c, h // 2, w // 2)
    tiles = tiles[torch.arange(n, device=x.device)[:, None], perms.to(x.device)]
    return tiles.reshape(n, 2, 2, c, h // 2, w // 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


@dataclass(kw_only=True)
class PuzzleAESettings(NeuralSettings):
    epsilon: float = 0.0  # > 0: one FGSM step of this size against the reconstruction loss (the paper's attack)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon < 0:
            raise ValueError(f"need epsilon >= 0, got {self.epsilon}")


@register_detector("puzzle_ae")
class PuzzleAEDetector(NeuralDetector):
    Settings = PuzzleAESettings

    def __init__(self, model: nn.Module, **kwargs):
        if any(s % 2 for s in model.input_size):
            raise ValueError(f"a 2x2 puzzle needs an even image size, got {model.input_size}")
        super().__init__(model, **kwargs)

    def random_puzzle(self, x: torch.Tensor) -> torch.Tensor:
        return puzzle(x, PERMUTATIONS[torch.randint(len(PERMUTATIONS), (len(x),))])

    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.model(self.random_puzzle(x)), x)

    def step(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator,
             sync: GradientSync | None = None) -> dict[str, torch.Tensor]:
        p = self.random_puzzle(x)
        epsilon = self.settings.epsilon
        if epsilon > 0:
            p.requires_grad_(True)
            (g,) = torch.autograd.grad(F.mse_loss(self.model(p), x), p)
            p = (p + epsilon * g.sign()).clamp(0, 1).detach()
        loss = F.mse_loss(self.model(p), x)
        self.update(self.optimizers[0], batch.scale * loss, sync)
        return {"loss": loss.detach()}

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        errs = torch.stack([recon_error(self.model(puzzle(x, perm.expand(len(x), 4))), x) for perm in PERMUTATIONS])
        err = errs.mean(0)
        return {"score": err, "recon_error": err}
