"""The GradCon convolutional autoencoder, layer for layer as in the official code.

28x28 input; encoder 28->15->8->5->3 (latent 64x3x3, no FC layer), decoder 3->4->8->14->28.
230,721 parameters at one channel, 232,771 at three. PyTorch default init (the official
`weights_init` is defined but never called).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gradcon_core.registry import register_model


class GradConCAE(nn.Module):
    input_size = (28, 28)

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 32, 4, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 32, 4, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(64, 64, 4, stride=2, padding=2), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 64, 4, stride=2, padding=2), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=2), nn.ReLU(),
            nn.ConvTranspose2d(32, in_channels, 4, stride=2, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register_model
def gradcon_cae(in_channels: int = 1) -> GradConCAE:
    return GradConCAE(in_channels)
