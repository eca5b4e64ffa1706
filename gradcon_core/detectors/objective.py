"""The GradCon objective: the gradient constraint, its reference gradients and one training step.

Semantics follow the official code (docs/design.md §3):
- the constraint acts on the weights (not biases) of the decoder's ConvTranspose2d layers;
- L_grad = mean over those layers of -cos(dL/dW_l, ref_l), differentiated through the
  gradient (second order), and forced to 0 on the very first iteration;
- ref_l is the cumulative arithmetic mean, over every iteration so far, of W_l.grad after
  J.backward() and before optimizer.step(): the gradient of the total J, second-order term included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcon_core.detectors.adversarial import arae_loss
from gradcon_core.training.parallel import GradientSync, all_reduce_gradients

COS_EPS = 1e-8  # F.cosine_similarity's default, as in the official code


def constraint_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose weight gradients GradCon constrains: the decoder's ConvTranspose2d, in order."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no `decoder` attribute; GradCon needs one")
    layers = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d | nn.Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__}.decoder has no ConvTranspose2d or Linear layer to constrain")
    return layers


class ReferenceGradients(nn.Module):
    """Cumulative mean of the training gradient of each constrained weight, kept as buffers.

    Being a module, it goes into state_dict and checkpoints beside the weights it belongs to.
    """

    def __init__(self, shapes: list[torch.Size]):
        super().__init__()
        self.num_layers = len(shapes)
        for i, shape in enumerate(shapes):
            self.register_buffer(f"ref_{i}", torch.zeros(shape))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        # count > 0, mirrored on the host so that a training step need not wait on the GPU to ask it.
        self.started = False
        self.register_load_state_dict_post_hook(ReferenceGradients._mirror_count)

    @staticmethod
    def _mirror_count(module: ReferenceGradients, _incompatible_keys) -> None:
        module.started = bool(module.count)

    @classmethod
    def for_model(cls, model: nn.Module) -> ReferenceGradients:
        return cls([layer.weight.shape for layer in constraint_layers(model)])

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f"ref_{i}") for i in range(self.num_layers)]

    @torch.no_grad()
    def update(self, grads: list[torch.Tensor]) -> None:
        # Incremental form of the running mean (sum/count): same value, no unbounded sum.
        self.count += 1
        self.started = True
        for ref, g in zip(self.tensors, grads, strict=True):
            ref.add_((g - ref) / self.count)


def gradient_loss(grads: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
    """L_grad = mean over layers of -cos(flat(g_l), flat(ref_l))."""
    cos = [F.cosine_similarity(g.flatten(), r.flatten(), dim=0, eps=COS_EPS) for g, r in zip(grads, refs, strict=True)]
    return -torch.stack(cos).mean()


@dataclass
class StepStats:
    """A step's values on this worker's images, unweighted: J = recon + alpha * grad_loss.

    0-dim tensors on the model's device, detached: reading them (float()) waits for the device, so a
    training loop sums them there and reads once per epoch.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    grad_loss: torch.Tensor


def gradient_constraint(
    loss: torch.Tensor, model: nn.Module, reference: ReferenceGradients, *, create_graph: bool,
    sync: GradientSync | None = None,
) -> torch.Tensor:
    """L_grad of a loss: mean over the constrained layers of -cos(dloss/dW_l, ref_l), 0 on the first iteration.

    With a sync, the inner gradients are mean-all-reduced (differentiably) before the cosine: the cosine of
    the global batch's gradient, not the mean of the workers' cosines.
    """
    if not reference.started:
        # First iteration: no history of training gradients yet, so no constraint.
        return loss.new_zeros(())
    weights = [layer.weight for layer in constraint_layers(model)]
    grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
    if sync is not None:
        grads = [sync.mean_differentiable(g) for g in grads]
    return gradient_loss(list(grads), reference.tensors)


def gradcon_losses(
    model: nn.Module,
    reference: ReferenceGradients,
    x: torch.Tensor,
    alpha: float,
    *,
    create_graph: bool,
    sync: GradientSync | None = None,
    scale: float = 1.0,
    x_adv: torch.Tensor | None = None,
    gamma: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(J, recon, L_grad) on a batch. With create_graph=False it is the official validation loss.

    scale weights this batch's reconstruction loss: a data-parallel worker holding n_r of a global
    batch of B images across N workers uses N * n_r / B, so that the mean over workers of its
    gradients is the gradient of the global batch mean (gradcon_core/training/parallel.py); J and recon come back
    weighted.
    With adversarial images x_adv (ARAE), "recon" is the ARAE loss and the constraint acts on its gradients.
    """
    recon = scale * (F.mse_loss(model(x), x) if x_adv is None else arae_loss(model, x, x_adv, gamma))
    if alpha == 0:
        grad_loss = recon.new_zeros(())
    else:
        grad_loss = gradient_constraint(recon, model, reference, create_graph=create_graph, sync=sync)
    return recon + alpha * grad_loss, recon, grad_loss


def constrained_update(
    model: nn.Module, reference: ReferenceGradients, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
    sync: GradientSync | None = None,
) -> None:
    """The official order: J.backward(), (all-reduce), reference <- the gradient of J, optimizer.step()."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_gradients(optimizer, sync)
    reference.update([layer.weight.grad for layer in constraint_layers(model)])
    optimizer.step()


def gradcon_step(
    model: nn.Module,
    reference: ReferenceGradients,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    alpha: float,
    sync: GradientSync | None = None,
    scale: float = 1.0,
    x_adv: torch.Tensor | None = None,
    gamma: float = 0.1,
) -> StepStats:
    """One official GradCon iteration: J.backward(), update the reference, then optimizer.step()."""
    loss, recon, grad_loss = gradcon_losses(model, reference, x, alpha, create_graph=True, sync=sync, scale=scale,
                                            x_adv=x_adv, gamma=gamma)
    constrained_update(model, reference, optimizer, loss, sync)
    recon = recon.detach() / scale if scale else torch.zeros_like(recon)  # unweighted, as one process reports it
    grad_loss = grad_loss.detach()
    return StepStats(recon + alpha * grad_loss, recon, grad_loss)


def validation_loss(
    model: nn.Module, reference: ReferenceGradients, x: torch.Tensor, alpha: float, batch_size: int = 64
) -> float:
    """Official validation J (recon + alpha * L_grad per batch, first order), averaged over images."""
    device = reference.count.device
    total = 0.0
    for xb in x.split(batch_size):
        loss, _, _ = gradcon_losses(model, reference, xb.to(device), alpha, create_graph=False)
        total += float(loss.detach()) * len(xb)
    return total / len(x)
