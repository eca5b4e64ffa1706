"""CAE: GradCon's autoencoder without the gradient constraint; score = per-image reconstruction MSE.

Distributed: exact (the loss is a per-sample mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gradcon_core.detectors.neural import NeuralDetector
from gradcon_core.registry import register_detector


def recon_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image MSE, the mean over C*H*W (GradCon's recon term)."""
    return (x_hat - x).pow(2).flatten(1).mean(1)


@register_detector("cae")
class CAEDetector(NeuralDetector):
    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.model(x), x)

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        err = recon_error(self.model(x), x)
        return {"score": err, "recon_error": err}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output, flattened: the features OCSVM/KDE can work on."""
        self.model.eval()
        return self.model.encoder(x).flatten(1)
