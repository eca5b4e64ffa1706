"""Deep SVDD's LeNets (Ruff et al. 2018): no bias terms and BatchNorm without affine parameters.

Both matter: a bias, or BN's shift, would let the network map every input to the centre c, the
trivial solution of the one-class objective ("hypersphere collapse"). BN keeps a cumulative average
of batch statistics (momentum=None), not Ruff's exponential one: after a short training the
eval-mode statistics are then those of the data, not of the initial N(0, 1).

Stages of conv 5x5 (padding 2) + BN + leaky ReLU + 2x2 max pool, until the smaller side is at most
7, then one linear map to rep_dim. Two stages (images up to 31 pixels) take Ruff's MNIST widths 8, 4:
at 28x28 this is his MNIST LeNet. More stages take his CIFAR-10 widths 32, 64, 128 (then 128 on):
at 32x32, three stages down to 4x4, the convolutions of his CIFAR-10 LeNet.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.data.sizes import ImageSize, as_hw
from gradcon_core.models.registry import register_model

MNIST_WIDTHS, CIFAR_WIDTHS = (8, 4), (32, 64, 128)
FINAL_SIDE = 7  # pool while the smaller side is larger than this (28 -> 14 -> 7)


def stage_widths(hw: tuple[int, int]) -> list[int]:
    stages, side = 1, min(hw) // 2
    while side > FINAL_SIDE:
        side, stages = side // 2, stages + 1
    if stages <= len(MNIST_WIDTHS):
        return list(MNIST_WIDTHS[:stages])
    return [CIFAR_WIDTHS[min(k, len(CIFAR_WIDTHS) - 1)] for k in range(stages)]


class DeepSVDDNet(nn.Module):
    def __init__(self, in_channels: int = 1, rep_dim: int = 32, image_size: ImageSize = 28):
        super().__init__()
        self.in_channels, self.rep_dim, self.input_size = in_channels, rep_dim, as_hw(image_size, smallest=2)
        widths = stage_widths(self.input_size)
        self.stages = len(widths)
        for k, (a, b) in enumerate(zip([in_channels, *widths], widths), start=1):
            self.add_module(f"conv{k}", nn.Conv2d(a, b, 5, padding=2, bias=False))
            self.add_module(f"bn{k}", nn.BatchNorm2d(b, eps=1e-4, momentum=None, affine=False))
        h, w = (s >> self.stages for s in self.input_size)
        self.fc = nn.Linear(widths[-1] * h * w, rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(1, self.stages + 1):
            x = F.max_pool2d(F.leaky_relu(getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(x))), 2)
        return self.fc(x.flatten(1))


@register_model
def deep_svdd_lenet(in_channels: int = 1, rep_dim: int = 32, image_size: ImageSize = 28) -> DeepSVDDNet:
    return DeepSVDDNet(in_channels, rep_dim, image_size)
