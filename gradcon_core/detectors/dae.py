"""DAE: the CAE trained to reconstruct x from x + Gaussian noise (clipped to [0,1]); scored on clean x.

Distributed: exact given the noise (a per-sample mean; each worker draws its own noise, as one
process would draw different noise for the same images anyway). The validation loss is noisy too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradcon_core.detectors.autoencoder import AutoencoderSettings
from gradcon_core.detectors.cae import CAEDetector
from gradcon_core.detectors.registry import register_detector


@dataclass(kw_only=True)
class DAESettings(AutoencoderSettings):
    noise_std: float = 0.2  # of the Gaussian noise added to the training input

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_std <= 0:
            raise ValueError(f"need noise_std > 0, got {self.noise_std}")


@register_detector("dae")
class DAEDetector(CAEDetector):
    Settings = DAESettings

    def losses(self, x_in: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        noisy = (x_in + self.settings.noise_std * torch.randn_like(x_in)).clamp(0, 1)
        return {"loss": F.mse_loss(self.model(noisy), x)}
