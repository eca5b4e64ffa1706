"""GradConDetector: the GradCon autoencoder, trained with the gradient constraint, scored by its gradients.

An AutoencoderDetector whose score-time state is its ReferenceGradients, whose step is the official
gradcon_step (gradcon_core/objective.py) and whose score is gradcon_core/scoring.py's. With epsilon > 0 it
trains adversarially (ARAE: gradcon_core/detectors/autoencoder.py), the constraint acting on the gradients
of ARAE's loss.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gradcon_core.detectors.autoencoder import AutoencoderDetector
from gradcon_core.objective import ReferenceGradients, gradcon_step, validation_loss
from gradcon_core.parallel import GradientSync
from gradcon_core.registry import register_detector
from gradcon_core.scoring import METHODS, score_components


@register_detector("gradcon")
class GradConDetector(AutoencoderDetector):
    """Autoencoder trained with the gradient constraint (weight alpha); score = recon + beta * grad score.

    alpha = 0 trains a plain autoencoder (the reference gradients are still tracked, so the
    gradient score stays defined). epsilon > 0 trains it adversarially (ARAE, gradcon_core.adversarial):
    alpha = beta = 0 with epsilon > 0 is ARAE itself, alpha > 0 GradCon + ARAE.
    """

    cpu_score_batch_size = 64  # the per-image gradient work stays in cache
    aux_name = "reference"

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
        if alpha < 0 or beta < 0:
            raise ValueError(f"need alpha >= 0 and beta >= 0; got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.score_method = alpha, beta, score_method
        super().__init__(model, lr, device, score_batch_size, threshold_percentile, epsilon, gamma, attack_steps,
                         attack_refresh)

    def make_aux(self) -> nn.Module:
        return ReferenceGradients.for_model(self.model)

    @property
    def reference(self) -> ReferenceGradients:
        return self.aux

    @property
    def reference_gradients(self) -> list[torch.Tensor]:
        return self.aux.tensors

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers[0]

    def train_step(self, x: torch.Tensor, sync: GradientSync | None = None, scale: float = 1.0,
                   x_adv: torch.Tensor | None = None) -> dict[str, float]:
        s = gradcon_step(self.model, self.aux, self.optimizer, x, self.alpha, sync, scale, x_adv=x_adv,
                         gamma=self.gamma)
        return {"loss": s.loss, "recon": s.recon, "grad_loss": s.grad_loss}  # tensors: summed on the device

    def validation_loss(self, x) -> float:
        """The official validation J on held-out normal images (first order, batches of 64), averaged."""
        return validation_loss(self.model, self.aux, self._batch(x), self.alpha)

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Differentiates through the network (score_components turns autograd on under score's no_grad).
        return score_components(self.model, self.aux.tensors, x, self.beta, self.score_method)
