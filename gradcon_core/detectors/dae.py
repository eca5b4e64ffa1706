"""DAE: the CAE trained to reconstruct x from x + Gaussian noise (clipped to [0,1]); scored on clean x.

Distributed: exact given the noise (a per-sample mean; each worker draws its own noise, as one
process would draw different noise for the same images anyway). The validation loss is noisy too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.detectors.cae import CAEDetector
from gradcon_core.detectors.registry import register_detector


@register_detector("dae")
class DAEDetector(CAEDetector):
    def __init__(self, model: nn.Module, noise_std: float = 0.2, lr: float = 1e-3, device: str | torch.device = "auto",
                 score_batch_size: int | None = None, threshold_percentile: float = 95.0, epsilon: float = 0.0,
                 gamma: float = 0.1, attack_steps: int = 40, attack_refresh: str = "batch"):
        if noise_std <= 0:
            raise ValueError(f"need noise_std > 0, got {noise_std}")
        self.noise_std = noise_std
        super().__init__(model, lr, device, score_batch_size, threshold_percentile, epsilon, gamma, attack_steps,
                         attack_refresh)

    def losses(self, x_in: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        noisy = (x_in + self.noise_std * torch.randn_like(x_in)).clamp(0, 1)
        return {"loss": F.mse_loss(self.model(noisy), x)}
