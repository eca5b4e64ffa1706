"""WAE-MMD (Tolstikhin et al. 2018): an autoencoder whose aggregate code distribution matches N(0, I) by MMD.

Loss: per-image squared error + mmd_weight * MMD^2(codes, prior samples) (inverse multiquadratic
kernels at the paper's scales, unbiased estimate), divided by the pixel count C*H*W so its scale
matches the MSE of the other detectors; mmd_weight = 10 is the paper's lambda.
Score = reconstruction MSE.

Distributed: not exact. MMD^2 compares all pairs of a batch, so the mean over workers of local
MMD^2 gradients is not the gradient of the global batch's MMD^2 (each worker's estimate is an
unbiased one from fewer pairs). The reconstruction term is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradcon_core.detectors.autoencoder import AutoencoderDetector, AutoencoderSettings
from gradcon_core.detectors.cae import recon_error
from gradcon_core.detectors.registry import register_detector

SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def mmd_imq(z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 between two samples with the sum of IMQ kernels C / (C + ||a - b||^2), C = 2 d s."""
    n, d = z.shape
    if n < 2:
        return z.new_zeros(())
    off_diag = 1 - torch.eye(n, device=z.device)
    dzz, dpp, dzp = torch.cdist(z, z).pow(2), torch.cdist(prior, prior).pow(2), torch.cdist(z, prior).pow(2)
    total = z.new_zeros(())
    for s in SCALES:
        c = 2 * d * s
        kzz, kpp, kzp = c / (c + dzz), c / (c + dpp), c / (c + dzp)
        total = total + ((kzz + kpp) * off_diag).sum() / (n * (n - 1)) - 2 * kzp.mean()
    return total


@dataclass(kw_only=True)
class WAESettings(AutoencoderSettings):
    mmd_weight: float = 10.0  # the paper's lambda


@register_detector("wae")
class WAEDetector(AutoencoderDetector):
    default_model = "latent_ae"
    Settings = WAESettings

    def losses(self, x_in: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.model.encode(x_in)
        recon = F.mse_loss(self.model.decoder(z), x)
        mmd = mmd_imq(z, torch.randn_like(z))
        return {"loss": recon + self.settings.mmd_weight * mmd / x[0].numel(), "recon": recon, "mmd": mmd}

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        err = recon_error(self.model(x), x)
        return {"score": err, "recon_error": err}
