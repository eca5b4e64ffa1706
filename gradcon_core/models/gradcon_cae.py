"""The GradCon convolutional autoencoder, at any image size, by the official network's design rules.

At 28x28 it is the official network layer for layer: encoder 28->15->8->5->3 (latent 64x3x3, no FC
layer), decoder 3->4->8->14->28; 230,721 parameters at one channel, 232,771 at three. PyTorch
default init (the official `weights_init` is defined but never called).

At another size (H, W), the same rules:
- encoder: Conv2d(k=4, s=2, padding=2) + ReLU stages (each maps a side s to s // 2 + 1) until the
  smaller side is at most 4, so the latent is a small map (3x3 or 4x4 for a square image);
- widths 32, 32, 64, 64, 128, 128, 256, ... (doubling every second stage, capped at 256);
- decoder: the mirror, ConvTranspose2d(k=4, s=2) + ReLU stages (the layers GradCon constrains) back
  to exactly (H, W), then a Sigmoid. Each stage doubles (padding 1) or doubles minus 2 (padding 2);
  output_padding (one more row or column, reached by fewer kernel taps) is used only where an odd
  side forces it. Of the chains that reach the size with the fewest output paddings, the one that
  doubles exactly nearest the output is taken: at 28 that is the official 3->4->8->14->28.
"""
from __future__ import annotations

from functools import cache

import torch
import torch.nn as nn

from gradcon_core.data.sizes import ImageSize, as_hw
from gradcon_core.models.registry import register_model

KERNEL, STRIDE, ENCODER_PADDING = 4, 2, 2
LATENT_SIDE = 4  # encoder stages continue while the smaller side is larger than this
BASE_WIDTH, MAX_WIDTH = 32, 256
# ConvTranspose2d(k=4, s=2) maps a side t to 2t + 2 - 2 * padding + output_padding; the choices, in preference order.
DECODER_CHOICES = ((1, 0), (2, 0), (1, 1), (2, 1))


def encoder_sides(side: int, stages: int) -> list[int]:
    """The side after each encoder stage, input first."""
    sides = [side]
    for _ in range(stages):
        sides.append((sides[-1] + 2 * ENCODER_PADDING - KERNEL) // STRIDE + 1)
    return sides


def stage_count(hw: tuple[int, int]) -> int:
    stages, side = 0, min(hw)
    while side > LATENT_SIDE:
        side, stages = encoder_sides(side, 1)[1], stages + 1
    return stages


def stage_widths(stages: int) -> list[int]:
    return [min(BASE_WIDTH * 2 ** (k // 2), MAX_WIDTH) for k in range(stages)]


@cache
def decoder_steps(latent: int, side: int, stages: int) -> tuple[tuple[int, int], ...] | None:
    """(padding, output_padding) of each decoder stage taking `latent` to exactly `side`, fewest output
    paddings first; None if no chain of `stages` stages exists."""
    if stages == 0:
        return () if side == latent else None
    best = None
    for padding, output_padding in DECODER_CHOICES:
        before, odd = divmod(side + 2 * padding - KERNEL - output_padding, STRIDE)
        before += 1
        if odd or before < 1:
            continue
        rest = decoder_steps(latent, before, stages - 1)
        if rest is not None:
            chain = (*rest, (padding, output_padding))
            if best is None or sum(o for _, o in chain) < sum(o for _, o in best):
                best = chain
    return best


class GradConCAE(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: ImageSize = 28):
        super().__init__()
        self.in_channels, self.input_size = in_channels, as_hw(image_size, smallest=LATENT_SIDE + 1)
        stages = stage_count(self.input_size)
        widths = [in_channels, *stage_widths(stages)]
        sides = [encoder_sides(s, stages) for s in self.input_size]  # per dimension: [input, ..., latent]
        self.latent_shape = torch.Size((widths[-1], sides[0][-1], sides[1][-1]))
        steps = [decoder_steps(s[-1], s[0], stages) for s in sides]  # always found: the encoder's own sides are one
        # Encoder first, then decoder: the order torch's default init draws in, as in the official network.
        encoder: list[nn.Module] = []
        for k in range(stages):
            encoder += [nn.Conv2d(widths[k], widths[k + 1], KERNEL, stride=STRIDE, padding=ENCODER_PADDING), nn.ReLU()]
        decoder: list[nn.Module] = []
        for k, ((ph, oh), (pw, ow)) in enumerate(zip(*steps)):
            decoder += [nn.ConvTranspose2d(widths[stages - k], widths[stages - k - 1], KERNEL, stride=STRIDE,
                                           padding=(ph, pw), output_padding=(oh, ow)), nn.ReLU()]
        decoder[-1] = nn.Sigmoid()
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register_model
def gradcon_cae(in_channels: int = 1, image_size: ImageSize = 28) -> GradConCAE:
    return GradConCAE(in_channels, image_size)
