"""GradConDetector: the GradCon autoencoder, trained with the gradient constraint, scored by its gradients.

An AutoencoderDetector whose score-time state is its ReferenceGradients, whose step is the official
gradcon_step (objective.py) and whose score is scoring.py's. With epsilon > 0 it trains adversarially
(ARAE: autoencoder.py), the constraint acting on the gradients of ARAE's loss.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gradcon_core.detectors.autoencoder import AutoencoderDetector
from gradcon_core.detectors.objective import ReferenceGradients, gradcon_step, validation_loss
from gradcon_core.detectors.registry import register_detector
from gradcon_core.detectors.scoring import METHODS, score_components
from gradcon_core.training.parallel import GradientSync

OUTPUT_INITS = ("default", "mean")


@register_detector("gradcon")
class GradConDetector(AutoencoderDetector):
    """Autoencoder trained with the gradient constraint (weight alpha); score = recon + beta * grad score.

    alpha = 0 trains a plain autoencoder (the reference gradients are still tracked, so the
    gradient score stays defined). epsilon > 0 trains it adversarially (ARAE, gradcon_core.detectors.adversarial):
    alpha = beta = 0 with epsilon > 0 is ARAE itself, alpha > 0 GradCon + ARAE.

    output_init="mean" (a recipe, not the official code's; docs/design.md §3): before the first step the
    output layer's bias is set so the untrained network outputs the training images' mean intensity (per
    channel, over every worker's images). With PyTorch's default init the output starts near 0.5 and the
    first Adam steps drive the sigmoid towards 0, the background; with some initial weights it saturates there
    for good (every image reconstructed as black, the gradients vanish, AUROC near 0.5).
    """

    cpu_score_batch_size = 64  # the per-image gradient work stays in cache
    aux_name = "reference"

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 0.03,
        beta: float = 0.12,
        lr: float = 1e-3,
        device: str | torch.device = "auto",
        score_method: str = "fast",
        score_batch_size: int | None = None,
        threshold_percentile: float = 95.0,
        epsilon: float = 0.0,
        gamma: float = 0.1,
        attack_steps: int = 40,
        attack_refresh: str = "batch",
        output_init: str = "default",
    ):
        if output_init not in OUTPUT_INITS:
            raise ValueError(f"unknown output_init {output_init!r}; choose one of {OUTPUT_INITS}")
        if score_method not in METHODS:
            raise ValueError(f"unknown score_method {score_method!r}; choose one of {METHODS}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"need alpha >= 0 and beta >= 0; got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.score_method, self.output_init = alpha, beta, score_method, output_init
        super().__init__(model, lr, device, score_batch_size, threshold_percentile, epsilon, gamma, attack_steps,
                         attack_refresh)
        if output_init == "mean":
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
        if self.output_init != "mean":
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
    def prepares(self) -> bool:
        return self.output_init == "mean"

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

    def train_step(self, x: torch.Tensor, sync: GradientSync | None = None, scale: float = 1.0,
                   x_adv: torch.Tensor | None = None) -> dict[str, float]:
        s = gradcon_step(self.model, self.aux, self.optimizer, x, self.alpha, sync, scale, x_adv=x_adv,
                         gamma=self.gamma)
        return {"loss": s.loss, "recon": s.recon, "grad_loss": s.grad_loss}  # tensors: summed on the device

    def validation_loss(self, x) -> float:
        """The official validation J on held-out normal images (first order, batches of 64), averaged."""
        return validation_loss(self.model, self.aux, self._batch(x), self.alpha)

    def score_batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Differentiates through the network (score_components turns autograd on under score's no_grad).
        return score_components(self.model, self.aux.tensors, x, self.beta, self.score_method)
