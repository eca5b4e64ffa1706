"""GradConDetector: the GradCon autoencoder, trained with the gradient constraint, scored by its gradients.

An AutoencoderDetector whose score-time state is its ReferenceGradients, whose step is the official
gradcon_step (objective.py) and whose score is scoring.py's. With epsilon > 0 it trains adversarially
(ARAE: autoencoder.py), the constraint acting on the gradients of ARAE's loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gradcon_core.detectors.autoencoder import AutoencoderDetector, AutoencoderSettings
from gradcon_core.detectors.objective import ReferenceGradients, gradcon_step, validation_loss
from gradcon_core.detectors.registry import register_detector
from gradcon_core.detectors.scoring import METHODS, score_components
from gradcon_core.training.parallel import GradientSync, LocalBatch

OUTPUT_INITS = ("default", "mean")


@dataclass(kw_only=True)
class GradConSettings(AutoencoderSettings):
    alpha: float = 0.03  # weight of the gradient constraint in training (0: a plain autoencoder)
    beta: float = 0.12  # weight of the gradient score in the anomaly score
    score_method: str = "fast"  # or "vmap" (scoring.py): the same numbers
    output_init: str = "default"  # or "mean" (see GradConDetector)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_init not in OUTPUT_INITS:
            raise ValueError(f"unknown output_init {self.output_init!r}; choose one of {OUTPUT_INITS}")
        if self.score_method not in METHODS:
            raise ValueError(f"unknown score_method {self.score_method!r}; choose one of {METHODS}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"need alpha >= 0 and beta >= 0; got alpha={self.alpha}, beta={self.beta}")


@register_detector("gradcon")
class GradConDetector(AutoencoderDetector):
    """Autoencoder trained with the gradient constraint (weight alpha); score = recon + beta * grad score.

    alpha = 0 trains a plain autoencoder (the reference gradients are still tracked, so the
    gradient score stays defined). epsilon > 0 trains it adversarially (ARAE, adversarial.py):
    alpha = beta = 0 with epsilon > 0 is ARAE itself, alpha > 0 GradCon + ARAE.

    output_init="mean" (a recipe, not the official code's; docs/design.md §3): before the first step the
    output layer's bias is set so the untrained network outputs the training images' mean intensity (per
    channel, over every worker's images). With PyTorch's default init the output starts near 0.5 and the
    first Adam steps drive the sigmoid towards 0, the background; with some initial weights it saturates there
    for good (every image reconstructed as black, the gradients vanish, AUROC near 0.5).
    """

    Settings = GradConSettings
    cpu_score_batch_size = 64  # the per-image gradient work stays in cache
    aux_name = "reference"

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        if self.settings.output_init == "mean":
            self._output_bias()  # a network it cannot apply to fails here, not at the first step

    def _output_bias(self) -> torch.Tensor:
        """The bias of the convolution right before the decoder's final Sigmoid, one value per channel."""
        decoder = list(self.model.decoder)
        if len(decoder) < 2 or not isinstance(decoder[-1], nn.Sigmoid) or \
                not isinstance(decoder[-2], (nn.Conv2d, nn.ConvTranspose2d)) or decoder[-2].bias is None:
            raise ValueError("output_init=mean needs a decoder ending in a biased convolution and a Sigmoid "
                             f"(as gradcon_cae's), not {type(self.model).__name__}'s")
        return decoder[-2].bias

    def prepare(self, x: torch.Tensor, sync: GradientSync | None = None) -> None:
        if self.settings.output_init != "mean":
            return
        sums = torch.zeros(self.channels, device=self.device)
        for xb in self._batch(x).split(self.score_batch_size):
            sums += xb.to(self.device).sum((0, 2, 3))
        count = torch.tensor(float(len(x) * self.input_size[0] * self.input_size[1]), device=self.device)
        if sync is not None:
            sync.mean_([sums, count])  # mean of sums / mean of counts = the mean over every worker's images
        mean = (sums / count).clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self._output_bias().copy_(torch.log(mean / (1 - mean)))  # sigmoid(bias) = the mean intensity

    @property
    def stream_problem(self) -> str | None:
        if self.settings.output_init == "mean":
            return "output_init=mean computes the class's mean image before training (prepare)"
        return super().stream_problem

    def make_aux(self) -> nn.Module:
        return ReferenceGradients.for_model(self.model)

    @property
    def reference(self) -> ReferenceGradients:
        return self.aux

    @property
    def reference_gradients(self) -> list[torch.Tensor]:
        return self.aux.tensors

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers[0]

    def step(self, x: torch.Tensor, batch: LocalBatch, noise: torch.Generator,
             sync: GradientSync | None = None) -> dict[str, torch.Tensor]:
        s = gradcon_step(self.model, self.aux, self.optimizer, x, self.settings.alpha, sync, batch.scale,
                         x_adv=self.adversarial_images(x, batch, noise), gamma=self.settings.gamma)
        return {"loss": s.loss, "recon": s.recon, "grad_loss": s.grad_loss}  # tensors: summed on the device

    def validation_loss(self, x) -> float:
        """The official validation J on held-out normal images (first order, batches of 64), averaged."""
        return validation_loss(self.model, self.aux, self._batch(x), self.settings.alpha)

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Differentiates through the network (score_components turns autograd on under score's no_grad).
        return score_components(self.model, self.aux.tensors, x, self.settings.beta, self.settings.score_method)
