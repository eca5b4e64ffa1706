"""Deep SVDD's MNIST LeNet (Ruff et al. 2018): no bias terms and BatchNorm without affine parameters.

Both matter: a bias, or BN's shift, would let the network map every input to the centre c, the
trivial solution of the one-class objective ("hypersphere collapse"). BN keeps a cumulative average
of batch statistics (momentum=None), not Ruff's exponential one: after a short training the
eval-mode statistics are then those of the data, not of the initial N(0, 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.registry import register_model


class DeepSVDDNet(nn.Module):
    input_size = (28, 28)

    def __init__(self, in_channels: int = 1, rep_dim: int = 32):
        super().__init__()
        self.in_channels, self.rep_dim = in_channels, rep_dim
        self.conv1 = nn.Conv2d(in_channels, 8, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-4, momentum=None, affine=False)
        self.conv2 = nn.Conv2d(8, 4, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4, eps=1e-4, momentum=None, affine=False)
        self.fc = nn.Linear(4 * 7 * 7, rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.leaky_relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.leaky_relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


@register_model
def deep_svdd_lenet(in_channels: int = 1, rep_dim: int = 32) -> DeepSVDDNet:
    return DeepSVDDNet(in_channels, rep_dim)
