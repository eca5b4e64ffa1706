"""GradCon's convolutional autoencoder with a dense bottleneck: a latent vector a prior can act on.

The CAE's latent is a ReLU map (non-negative; 64x3x3 at 28x28), which no Gaussian prior fits; the VAE,
AAE and WAE need an unconstrained vector z. Encoder = GradCon's conv stack at the image size +
Linear(F, z) (2z for the VAE: mean and log-variance); decoder = Linear(z, F) + ReLU + GradCon's
ConvTranspose2d stack, where F is the size of the CAE's latent map (576 at 28x28).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gradcon_core.data.sizes import ImageSize
from gradcon_core.models.gradcon_cae import GradConCAE
from gradcon_core.models.registry import register_model


class LatentAE(nn.Module):
    def __init__(self, in_channels: int = 1, z_dim: int = 16, variational: bool = False, image_size: ImageSize = 28):
        super().__init__()
        self.in_channels, self.z_dim, self.variational = in_channels, z_dim, variational
        cae = GradConCAE(in_channels, image_size)
        self.input_size, features = cae.input_size, cae.latent_shape.numel()
        head = nn.Linear(features, 2 * z_dim if variational else z_dim)
        self.encoder = nn.Sequential(*cae.encoder, nn.Flatten(), head)
        self.decoder = nn.Sequential(nn.Linear(z_dim, features), nn.ReLU(), nn.Unflatten(1, cae.latent_shape),
                                     *cae.decoder)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z (deterministic), or the posterior mean for the VAE."""
        h = self.encoder(x)
        return h.chunk(2, dim=1)[0] if self.variational else h

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z|x); VAE only."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Deterministic (the VAE decodes its posterior mean): scoring, and GradCon's gradient score, need that.
        return self.decoder(self.encode(x))


class LatentDiscriminator(nn.Module):
    """AAE's critic: tells codes of the data from samples of the prior; returns logits."""

    def __init__(self, z_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


@register_model
def latent_ae(in_channels: int = 1, z_dim: int = 16, image_size: ImageSize = 28) -> LatentAE:
    return LatentAE(in_channels, z_dim, image_size=image_size)


@register_model
def conv_vae(in_channels: int = 1, z_dim: int = 16, image_size: ImageSize = 28) -> LatentAE:
    return LatentAE(in_channels, z_dim, variational=True, image_size=image_size)


@register_model
def aae_net(in_channels: int = 1, z_dim: int = 8, hidden: int = 64, image_size: ImageSize = 28) -> LatentAE:
    """The latent autoencoder with its discriminator as a submodule, so one state_dict holds both."""
    model = LatentAE(in_channels, z_dim, image_size=image_size)
    model.discriminator = LatentDiscriminator(z_dim, hidden)
    return model
