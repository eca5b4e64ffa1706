"""The one-class neural network of Chalapathy et al. (2018) on autoencoder features.

y(x) = <w, sigmoid(V phi(x))>: one hidden layer, no biases, on phi = GradCon's conv encoder, which
(as in the paper) is pretrained as an autoencoder with `decoder` and then kept fixed.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gradcon_core.models.gradcon_cae import GradConCAE
from gradcon_core.models.sizes import ImageSize
from gradcon_core.registry import register_model


class OCNNNet(nn.Module):
    def __init__(self, in_channels: int = 1, hidden: int = 32, image_size: ImageSize = 28):
        super().__init__()
        self.in_channels, self.hidden = in_channels, hidden
        cae = GradConCAE(in_channels, image_size)
        self.input_size, self.encoder, self.decoder = cae.input_size, cae.encoder, cae.decoder
        self.V = nn.Linear(cae.latent_shape.numel(), hidden, bias=False)
        self.w = nn.Linear(hidden, 1, bias=False)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.w(torch.sigmoid(self.V(features))).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).flatten(1))


@register_model
def ocnn_net(in_channels: int = 1, hidden: int = 32, image_size: ImageSize = 28) -> OCNNNet:
    return OCNNNet(in_channels, hidden, image_size)
