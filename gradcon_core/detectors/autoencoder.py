"""AutoencoderDetector: what every autoencoder detector shares, ARAE's adversarial training among it.

With epsilon > 0 an autoencoder trains adversarially (ARAE, Salehi et al.; gradcon_core/detectors/adversarial.py):
on x* = x + delta, delta the L-inf attack (|delta| <= epsilon) that moves x's code furthest, it learns
to reconstruct x, with gamma times the distance of the codes added:

    L = loss(input x*, target x) + gamma * MSE(code(x*), code(x))

where loss(input, target) is the detector's own (CAE: MSE; DAE: MSE from the noised input; VAE: the ELBO's
terms with the posterior of the input; WAE: MSE + MMD; AAE: its reconstruction phase) and the code is the
encoder's output (the VAE's posterior mean). For the CAE this is ARAE's own loss; GradCon puts its gradient
constraint on it (gradcon_core/detectors/objective.py).

Random starts for the whole global batch are drawn from the run's noise generator, each worker attacking
its own slice of them, so N workers craft exactly the x* one process would (with attack_refresh="epoch",
x* of every row this worker uses is crafted before the epoch, as the official code does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.detectors.adversarial import LatentAttack, code
from gradcon_core.detectors.neural import NeuralDetector, NeuralSettings
from gradcon_core.training.parallel import GradientSync, LocalBatch


@dataclass(kw_only=True)
class AutoencoderSettings(NeuralSettings):
    """ARAE's settings, which every autoencoder takes (adversarial.LatentAttack says what each means)."""

    epsilon: float = 0.0  # > 0: adversarially robust training
    gamma: float = 0.1
    attack_steps: int = 40
    attack_refresh: str = "batch"  # or "epoch" (the official schedule)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attack()  # checks them

    def attack(self) -> LatentAttack:
        return LatentAttack(self.epsilon, self.attack_steps, self.gamma, self.attack_refresh)


class AutoencoderDetector(NeuralDetector):
    Settings = AutoencoderSettings

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self.attack = self.settings.attack()
        self._x_adv: torch.Tensor | None = None  # this epoch's x* (refresh="epoch")

    # --- what subclasses provide -------------------------------------------------------------
    def losses(self, x_in: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss", its parts...}: the training loss (a per-sample mean) of reconstructing x from input x_in."""
        raise NotImplementedError

    # --- shared machinery ----------------------------------------------------------------------
    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.losses(x, x)["loss"]

    def training_losses(self, x: torch.Tensor, x_adv: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """losses(x, x), or with adversarial images ARAE's: losses(x*, x) + gamma * the code distance."""
        if x_adv is None:
            return self.losses(x, x)
        parts = self.losses(x_adv, x)
        latent = F.mse_loss(code(self.model, x_adv), code(self.model, x))
        return {**parts, "loss": parts["loss"] + self.attack.gamma * latent, "latent": latent}

    def step(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator,
             sync: GradientSync | None = None) -> dict[str, torch.Tensor]:
        parts = self.training_losses(x, self.adversarial_images(x, batch, noise))
        self.update(self.optimizers[0], batch.scale * parts["loss"], sync)
        return {k: v.detach() for k, v in parts.items()}  # tensors: summed on the device

    @property
    def epoch_attack(self) -> bool:
        return self.attack.enabled and self.attack.refresh == "epoch"

    @property
    def stream_problem(self) -> str | None:
        if self.epoch_attack:
            return "attack_refresh=epoch crafts the whole class's adversarial images before each epoch"
        return super().stream_problem

    def start_epoch(self, x: torch.Tensor, batches: list[LocalBatch], noise: torch.Generator) -> None:
        if not self.epoch_attack:
            return
        # Official schedule: x* for the whole set with this epoch's weights, from random starts drawn for every
        # row; this worker crafts only its own rows (the others stay clean images, used only with weight 0).
        start = self.attack.random_start(x.shape, noise)
        rows = torch.cat([b.rows[: b.own] for b in batches])
        self._x_adv = x.clone()
        self._x_adv[rows] = self.attack.craft(self.model, x[rows].to(self.device), start[rows.cpu()]).to(x.device)

    def adversarial_images(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator) -> torch.Tensor | None:
        """x* of this worker's images of the step (None when ARAE is off)."""
        if self.epoch_attack:
            return self._x_adv[batch.rows].to(self.device)
        if not self.attack.enabled:
            return None
        # Random starts for the whole global batch (as one process draws them), this worker's slice.
        start = self.attack.random_start((batch.global_size, *x.shape[1:]), noise)
        mine = start[batch.offset: batch.offset + batch.own] if batch.own else start[:1]
        return self.attack.craft(self.model, x, mine)
