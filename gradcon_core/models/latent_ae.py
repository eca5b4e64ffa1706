"""GradCon's convolutional autoencoder with a dense bottleneck: a latent vector a prior can act on.

The CAE's latent is a 64x3x3 ReLU map (non-negative), which no Gaussian prior fits; the VAE, AAE and
WAE need an unconstrained vector z. Encoder = GradCon's conv stack + Linear(576, z) (2z for the VAE:
mean and log-variance); decoder = Linear(z, 576) + ReLU + GradCon's ConvTranspose2d stack.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gradcon_core.models.gradcon_cae import GradConCAE
from gradcon_core.registry import register_model

FEATURE_MAP = (64, 3, 3)  # GradCon's encoder output at 28x28
FEATURES = 64 * 3 * 3


class LatentAE(nn.Module):
    input_size = (28, 28)

    def __init__(self, in_channels: int = 1, z_dim: int = 16, variational: bool = False):
        super().__init__()
        self.in_channels, self.z_dim, self.variational = in_channels, z_dim, variational
        cae = GradConCAE(in_channels)
        head = nn.Linear(FEATURES, 2 * z_dim if variational else z_dim)
        self.encoder = nn.Sequential(*cae.encoder, nn.Flatten(), head)
        self.decoder = nn.Sequential(nn.Linear(z_dim, FEATURES), nn.ReLU(), nn.Unflatten(1, FEATURE_MAP), *cae.decoder)

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
def latent_ae(in_channels: int = 1, z_dim: int = 16) -> LatentAE:
    return LatentAE(in_channels, z_dim)


@register_model
def conv_vae(in_channels: int = 1, z_dim: int = 16) -> LatentAE:
    return LatentAE(in_channels, z_dim, variational=True)


@register_model
def aae_net(in_channels: int = 1, z_dim: int = 8, hidden: int = 64) -> LatentAE:
    """The latent autoencoder with its discriminator as a submodule, so one state_dict holds both."""
    model = LatentAE(in_channels, z_dim)
    model.discriminator = LatentDiscriminator(z_dim, hidden)
    return model
