"""CAE: GradCon's autoencoder without the gradient constraint; score = per-image reconstruction MSE.

With epsilon > 0 it is ARAE (gradcon_core/detectors/autoencoder.py) on GradCon's network.
Distributed: exact (the loss is a per-sample mean; ARAE's attack is per image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gradcon_core.detectors.autoencoder import AutoencoderDetector
from gradcon_core.detectors.registry import register_detector


def recon_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image MSE, the mean over C*H*W (GradCon's recon term)."""
    return (x_hat - x).pow(2).flatten(1).mean(1)


@register_detector("cae")
class CAEDetector(AutoencoderDetector):
    def losses(self, x_in: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self.model(x_in), x)}

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        err = recon_error(self.model(x), x)
        return {"score": err, "recon_error": err}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output, flattened: the features OCSVM/KDE can work on."""
        self.model.eval()
        return self.model.encoder(x).flatten(1)
