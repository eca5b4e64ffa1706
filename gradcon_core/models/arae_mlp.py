"""ARAE's dense autoencoder (Salehi et al.): 784-512-256-128 with sigmoids everywhere, Glorot-normal init.

1,132,944 parameters at one 28x28 channel, as in the official Keras model. At another size the hidden
layers stay 512-256-128 and the outer ones follow the pixel count C*H*W. The encoder flattens and
the decoder unflattens, so it takes and returns images like every other model here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gradcon_core.data.sizes import ImageSize, as_hw
from gradcon_core.models.registry import register_model


def _dense(sizes: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    return layers


class AraeMLP(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: ImageSize = 28):
        super().__init__()
        self.in_channels, self.input_size = in_channels, as_hw(image_size)
        pixels = in_channels * self.input_size[0] * self.input_size[1]
        self.encoder = nn.Sequential(nn.Flatten(), *_dense([pixels, 512, 256, 128]))
        self.decoder = nn.Sequential(*_dense([128, 256, 512, pixels]), nn.Unflatten(1, (in_channels, *self.input_size)))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register_model
def arae_mlp(in_channels: int = 1, image_size: ImageSize = 28) -> AraeMLP:
    return AraeMLP(in_channels, image_size)
