"""The one-class neural network of Chalapathy et al. (2018): y(x) = <w, g(V x)>, one hidden layer, no biases."""
from __future__ import annotations

import torch
import torch.nn as nn

from gradcon_core.registry import register_model


class OCNNNet(nn.Module):
    input_size = (28, 28)

    def __init__(self, in_channels: int = 1, hidden: int = 32):
        super().__init__()
        self.in_channels, self.hidden = in_channels, hidden
        self.V = nn.Linear(in_channels * self.input_size[0] * self.input_size[1], hidden, bias=False)
        self.w = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(torch.sigmoid(self.V(x.flatten(1)))).squeeze(1)


@register_model
def ocnn_net(in_channels: int = 1, hidden: int = 32) -> OCNNNet:
    return OCNNNet(in_channels, hidden)
