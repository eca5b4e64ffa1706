"""Per-image GradCon scores, a whole batch at once.

s(x) = MSE(x_hat, x) + beta * mean_l -cos(dMSE_x/dW_l, ref_l), the official score computed with
a batch-size-1 loop, here for N images in one pass. Two equivalent ways:

- "fast" (default): one forward, one backward of the summed per-image losses to the *outputs*
  of the constrained layers only (no weight gradients, nothing below the first decoder layer).
  Since the loss is a sum of per-image terms, dL/dy at each layer output is exactly the
  per-image output gradient; a per-image weight gradient is then a small batched matmul of
  the layer input with the unfolded output gradient, which is all the cosine needs.
- "vmap": torch.func.vmap(grad(...)) over functional_call, the textbook per-sample gradient.

Scoring needs autograd: never call it under torch.inference_mode().
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradcon_core.objective import COS_EPS, constraint_layers

METHODS = ("fast", "vmap")


def _unfolded_output_grads(layer: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
    """u [N, K, T]: per image, the output-gradient factor of the weight gradient g_i = x_i u_i^T."""
    if isinstance(layer, nn.Linear):
        return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1]).transpose(1, 2)
    # ConvTranspose2d(x; W) is the input-gradient of Conv2d(.; W), so its weight gradient is the
    # Conv2d weight gradient with the roles swapped: "input" = grad_out, "output gradient" = x.
    # Unfold the batch as one image of N*C channels: CUDA's unfold launches a kernel per image.
    n, c, h, w = grad_out.shape
    u = F.unfold(grad_out.reshape(1, n * c, h, w), layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return u.view(n, -1, u.shape[-1])


def _per_image_weight_grads(layer: nn.Module, inp: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """g [N, C_in, K]: every image's own weight gradient (x: the input as [N, C_in, T])."""
    if isinstance(layer, nn.ConvTranspose2d) and inp.device.type == "cpu":
        # The same Conv2d weight gradient, as one grouped convolution (group i = image i): on a CPU,
        # MKL-DNN's kernel is 2-6x faster than unfold + bmm at 28-128 pixels (the unfold dominates).
        n, c, h, w = grad_out.shape
        cin = inp.shape[1]
        g = torch.nn.grad.conv2d_weight(grad_out.reshape(1, n * c, h, w), (n * cin, c, *layer.kernel_size),
                                        inp.reshape(1, n * cin, *inp.shape[2:]), layer.stride, layer.padding,
                                        layer.dilation, groups=n)
        return g.view(n, cin, -1)
    return torch.bmm(x, _unfolded_output_grads(layer, grad_out).transpose(1, 2))


def _layer_cosines(layer: nn.Module, inp: torch.Tensor, grad_out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """cos(dL_i/dW, ref) for every image i, from the layer's input and output gradient alone.

    Needs only <g_i, ref> and ||g_i||. A per-image gradient is a sum over T output positions of
    outer products x_t u_t^T, so ||g_i||^2 = <X^T X, U^T U> (the "ghost norm": two T x T Gram
    matrices) and <g_i, R> = sum_t x_t^T R u_t. Where g_i is larger than its factors (few positions
    T against the weight: the deep, narrow end of a decoder) this never builds g_i; elsewhere
    building it is cheaper.
    """
    if isinstance(layer, nn.ConvTranspose2d) and layer.groups != 1:
        raise NotImplementedError("fast scoring supports ConvTranspose2d with groups=1")
    if isinstance(layer, nn.Linear):
        x = inp.reshape(inp.shape[0], -1, inp.shape[-1]).transpose(1, 2)  # [N, C_in, T]
        r = ref.t()  # [C_in, C_out]
    else:
        x = inp.flatten(2)  # [N, C_in, T]
        r = ref.reshape(x.shape[1], -1)  # [C_in, K]
    cin, k, t = x.shape[1], r.shape[1], x.shape[2]
    if cin * k <= t * (cin + k):
        g = _per_image_weight_grads(layer, inp, x, grad_out)
        dot = g.flatten(1) @ r.flatten()
        sq = g.pow(2).flatten(1).sum(1)
    else:
        u = _unfolded_output_grads(layer, grad_out)  # [N, K, T]
        sq = (torch.bmm(x.transpose(1, 2), x) * torch.bmm(u.transpose(1, 2), u)).flatten(1).sum(1)
        ru = (u.transpose(1, 2).reshape(-1, k) @ r.t()).view(-1, t, cin)  # one GEMM for the whole batch
        dot = (x.transpose(1, 2) * ru).flatten(1).sum(1)
    return dot / (sq.sqrt().clamp_min(COS_EPS) * r.norm().clamp_min(COS_EPS))


def _cosines(per_image_grads: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """cos(g_i, ref) with F.cosine_similarity's eps convention, for every row i."""
    g = per_image_grads.flatten(1)
    r = ref.flatten()
    return (g @ r) / (g.norm(dim=1).clamp_min(COS_EPS) * r.norm().clamp_min(COS_EPS))


def _fast_components(model: nn.Module, layers: list[nn.Module], refs: list[torch.Tensor], x: torch.Tensor):
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(_module, inputs, output):
        captured.append((inputs[0], output))

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        x_hat = model(x)
    finally:
        for h in handles:
            h.remove()
    recon = (x_hat - x).pow(2).flatten(1).mean(dim=1)
    outputs = [out for _, out in captured]
    grad_outs = torch.autograd.grad(recon.sum(), outputs)
    cos = [
        _layer_cosines(layer, inp.detach(), g_out, ref)
        for layer, (inp, _), g_out, ref in zip(layers, captured, grad_outs, refs, strict=True)
    ]
    return recon.detach(), torch.stack(cos, dim=1)


def _vmap_components(model: nn.Module, layers: list[nn.Module], refs: list[torch.Tensor], x: torch.Tensor):
    names = {id(p): n for n, p in model.named_parameters()}
    weight_names = [names[id(layer.weight)] for layer in layers]
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in weight_names}
    frozen.update(dict(model.named_buffers()))

    def image_loss(weights: dict[str, torch.Tensor], xi: torch.Tensor):
        x_hat = functional_call(model, {**frozen, **weights}, (xi.unsqueeze(0),))
        loss = F.mse_loss(x_hat, xi.unsqueeze(0))
        return loss, loss

    weights = {n: dict(model.named_parameters())[n].detach() for n in weight_names}
    grads, recon = vmap(grad(image_loss, has_aux=True), in_dims=(None, 0))(weights, x)
    cos = [_cosines(grads[n], ref) for n, ref in zip(weight_names, refs, strict=True)]
    return recon.detach(), torch.stack(cos, dim=1)


def score_components(
    model: nn.Module,
    refs: list[torch.Tensor],
    x: torch.Tensor,
    beta: float,
    method: str = "fast",
) -> dict[str, torch.Tensor]:
    """{"score", "recon_error", "grad_score"} per image for a float batch [N, C, H, W] on the model's device.

    grad_score is mean_l -cos(g_l, ref_l); score = recon_error + beta * grad_score.
    """
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}; choose one of {METHODS}")
    layers = constraint_layers(model)
    with torch.enable_grad():
        fn = _fast_components if method == "fast" else _vmap_components
        recon, cos = fn(model, layers, refs, x)
    grad_score = -cos.mean(dim=1)
    return {"score": recon + beta * grad_score, "recon_error": recon, "grad_score": grad_score}
