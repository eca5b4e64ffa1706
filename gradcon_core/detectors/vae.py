"""VAE, and VAE + Grad (the GradCon paper's "VAE + Grad" row): a variational autoencoder on GradCon's conv stack.

Loss per image: squared error of the reconstruction from a sampled z + kl_weight * KL(q(z|x) || N(0, I)),
divided by the pixel count C*H*W so its scale matches the MSE of the other detectors (alpha keeps
GradCon's meaning). Score: score="recon" the MSE of the posterior-mean reconstruction, score="kl"
the KL term alone.

Distributed: exact given the noise (a per-sample mean; each worker draws its own z).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.detectors.autoencoder import AutoencoderDetector, AutoencoderSettings
from gradcon_core.detectors.cae import recon_error
from gradcon_core.detectors.objective import ReferenceGradients, constrained_update, gradient_constraint
from gradcon_core.detectors.registry import register_detector
from gradcon_core.detectors.scoring import score_components
from gradcon_core.training.parallel import GradientSync, LocalBatch

SCORES = ("recon", "kl")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


@dataclass(kw_only=True)
class VAESettings(AutoencoderSettings):
    kl_weight: float = 1.0


@dataclass(kw_only=True)
class VAEScoreSettings(VAESettings):
    score: str = "recon"  # or "kl"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {SCORES}")


class VariationalDetector(AutoencoderDetector):
    """What the VAE and the VAE + Grad share: a variational network and the ELBO's losses."""

    default_model = "conv_vae"

    def __init__(self, model: nn.Module, **kwargs):
        if not getattr(model, "variational", False):
            raise ValueError(f"{type(model).__name__} is not variational: build the VAE with create_model('conv_vae')")
        super().__init__(model, **kwargs)

    def losses(self, x_in: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """loss, recon MSE and KL per pixel: x reconstructed from a z sampled from x_in's posterior."""
        mu, logvar = self.model.posterior(x_in)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        recon = F.mse_loss(self.model.decoder(z), x)
        kl = kl_divergence(mu, logvar).mean() / x[0].numel()
        return {"loss": recon + self.settings.kl_weight * kl, "recon": recon, "kl": kl}


@register_detector("vae")
class VAEDetector(VariationalDetector):
    Settings = VAEScoreSettings

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.model.posterior(x)
        err, kl = recon_error(self.model.decoder(mu), x), kl_divergence(mu, logvar)
        return {"score": err if self.settings.score == "recon" else kl, "recon_error": err, "kl": kl}


@dataclass(kw_only=True)
class VAEGradSettings(VAESettings):
    alpha: float = 0.03
    beta: float = 0.12

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"need alpha >= 0 and beta >= 0, got alpha={self.alpha}, beta={self.beta}")


@register_detector("vae_grad")
class VAEGradDetector(VariationalDetector):
    """The VAE trained with GradCon's gradient constraint on its decoder; score = recon + beta * grad score.

    The constraint and the reference gradients are GradCon's (objective.py), over all the decoder's weights (its
    Linear layer and the four ConvTranspose2d). The constrained gradient is that of the reconstruction MSE from
    the sampled z (the KL term has no decoder gradient); the score is scoring.py's, on the deterministic
    posterior-mean reconstruction.

    Distributed: as GradConDetector: the inner gradients are mean-all-reduced (differentiably) before
    the cosine and the reference is updated from the all-reduced gradient, so it is exact given the noise.
    """

    Settings = VAEGradSettings

    def make_aux(self) -> nn.Module:
        return ReferenceGradients.for_model(self.model)

    def constrained_losses(self, x: torch.Tensor, create_graph: bool, sync: GradientSync | None = None,
                           scale: float = 1.0, x_adv: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(J, the loss's parts, L_grad): GradCon's constraint on the gradient of the reconstruction term (of x
        from x* with adversarial images; ARAE's code term has no decoder gradient)."""
        parts = self.training_losses(x, x_adv)
        alpha = self.settings.alpha
        if alpha == 0:
            return scale * parts["loss"], parts, parts["recon"].new_zeros(())
        grad_loss = gradient_constraint(scale * parts["recon"], self.model, self.aux, create_graph=create_graph,
                                        sync=sync)
        return scale * parts["loss"] + alpha * grad_loss, parts, grad_loss

    def step(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator,
             sync: GradientSync | None = None) -> dict[str, torch.Tensor]:
        x_adv = self.adversarial_images(x, batch, noise)
        loss, parts, grad_loss = self.constrained_losses(x, True, sync, batch.scale, x_adv)
        constrained_update(self.model, self.aux, self.optimizers[0], loss, sync)
        parts, grad_loss = {k: v.detach() for k, v in parts.items()}, grad_loss.detach()
        return {**parts, "loss": parts["loss"] + self.settings.alpha * grad_loss, "grad_loss": grad_loss}

    def validation_loss(self, x) -> float:
        x = self._batch(x)
        self.model.eval()
        total = 0.0
        for xb in x.split(self.score_batch_size):
            loss, _, _ = self.constrained_losses(xb.to(self.device), create_graph=False)
            total += float(loss.detach()) * len(xb)
        return total / len(x)

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return score_components(self.model, self.aux.tensors, x, self.settings.beta)
