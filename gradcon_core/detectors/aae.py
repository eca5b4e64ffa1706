"""AAE (Makhzani et al. 2016): an autoencoder whose codes a latent discriminator pushes towards N(0, I).

Three steps per batch, each with its own Adam: reconstruction (encoder + decoder, MSE; ARAE's loss with
epsilon > 0: gradcon_core/detectors/autoencoder.py), discriminator
(prior samples = real, codes = fake, BCE), generator (the encoder fools the discriminator).
Score = reconstruction MSE; validation loss = reconstruction MSE.

Distributed: the reconstruction step is exact; the discriminator and generator losses are
per-sample means too, but each worker draws its own prior samples (exact given those draws).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.detectors.autoencoder import AutoencoderDetector, AutoencoderSettings
from gradcon_core.detectors.cae import recon_error
from gradcon_core.detectors.registry import register_detector
from gradcon_core.training.parallel import GradientSync, LocalBatch


@dataclass(kw_only=True)
class AAESettings(AutoencoderSettings):
    adversarial_weight: float = 1.0  # of the generator's loss
    disc_lr: float = 2e-4  # the discriminator's and the generator's learning rate


@register_detector("aae")
class AAEDetector(AutoencoderDetector):
    default_model = "aae_net"
    Settings = AAESettings

    def __init__(self, model: nn.Module, **kwargs):
        if not hasattr(model, "discriminator"):
            raise ValueError(f"{type(model).__name__} has no latent discriminator: "
                             "build it with create_model('aae_net')")
        super().__init__(model, **kwargs)

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        m, s = self.model, self.settings
        autoencoder = [*m.encoder.parameters(), *m.decoder.parameters()]
        return [torch.optim.Adam(autoencoder, lr=s.lr),
                torch.optim.Adam(m.discriminator.parameters(), lr=s.disc_lr, betas=(0.5, 0.999)),
                torch.optim.Adam(m.encoder.parameters(), lr=s.disc_lr, betas=(0.5, 0.999))]

    def losses(self, x_in: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self.model(x_in), x)}

    def step(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator,
             sync: GradientSync | None = None) -> dict[str, torch.Tensor]:
        ae_opt, disc_opt, gen_opt = self.optimizers
        scale = batch.scale
        parts = self.training_losses(x, self.adversarial_images(x, batch, noise))  # ARAE's with epsilon > 0
        self.update(ae_opt, scale * parts["loss"], sync)

        z = self.model.encode(x)
        real, fake = self.model.discriminator(torch.randn_like(z)), self.model.discriminator(z.detach())
        disc = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        self.update(disc_opt, scale * disc, sync)

        fooled = self.model.discriminator(z)
        gen = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        self.update(gen_opt, scale * self.settings.adversarial_weight * gen, sync)
        return {**{k: v.detach() for k, v in parts.items()}, "disc": disc.detach(), "gen": gen.detach()}

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        err = recon_error(self.model(x), x)
        return {"score": err, "recon_error": err}
