"""Per-image GradCon scores, a whole batch at once.

s(x) = MSE(x_hat, x) + beta * mean_l -cos(dMSE_x/dW_l, ref_l), the official score computed with
a batch-size-1 loop, here for N images in one pass. Two equivalent ways:

- "fast" (default): one forward, one backward of the summed per-image losses to the *outputs*
  of the constrained layers only (no weight gradients, nothing below the first decoder layer).
  Since the loss is a sum of per-image terms, dL/dy at each layer output is exactly the
  per-image output gradient; a per-image weight gradient is then a small batched matmul of
  the layer input with the unfolded output gradient (on a CPU, one grouped convolution), or
  never built at all (the ghost norm), which is all the cosine needs.
- "vmap": torch.func.vmap(grad(...)) over functional_call, the textbook per-sample gradient.

Scoring needs autograd: never call it under torch.inference_mode().
score_batch_size picks how many images to score at once from the memory they need.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradcon_core.detectors.objective import COS_EPS, constraint_layers

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


def _per_image_weight_grads(
    layer: nn.Module, inp: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
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


CPU_WORKING_SET = 256 * 2**20  # bytes; larger CPU batches no longer score faster (benchmarks/score_speed.py)
CPU_MEMORY_FRACTION = 0.25  # of the memory available to this process
CUDA_MEMORY_FRACTION = 0.5  # of the device's free memory
MAX_BATCH = 4096  # a GPU is saturated well before this at 28x28
SAFETY = 1.5  # allocator slack, and what the estimate leaves out (the loss, the scores, copies)


def available_memory() -> int:
    """Bytes this process can still allocate: the system's MemAvailable, within a cgroup v2 limit (a pod)."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        if "MemAvailable" in fields:
            available = int(fields["MemAvailable"].split()[0]) * 1024
    limit, current = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.exists() and current.exists() and limit.read_text().strip().isdigit():
        available = min(available, int(limit.read_text()) - int(current.read_text()))
    return max(available, 0)


def scoring_bytes_per_image(model: nn.Module, method: str = "fast") -> int:
    """Estimated peak memory of scoring one more image: the activations autograd keeps, the output
    gradients of the constrained layers, the largest transient of the backward pass and of the
    per-layer cosine work (the per-image gradient, or the ghost norm's Gram matrices), times SAFETY.
    Measured by one forward of one blank image on the model's device."""
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}; choose one of {METHODS}")
    param = next(model.parameters())
    # A network without a decoder (Deep SVDD's) has no per-layer gradient work: its activations are the cost.
    layers = constraint_layers(model) if getattr(model, "decoder", None) is not None else []
    outputs: list[int] = []
    layer_io: dict[nn.Module, tuple[torch.Size, torch.Size]] = {}

    def record(module, inputs, output):
        outputs.append(output.numel())
        if module in layers:
            layer_io[module] = (inputs[0].shape, output.shape)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    x = torch.zeros(1, model.in_channels, *model.input_size, device=param.device, dtype=param.dtype)
    training = model.training
    try:
        with torch.no_grad():
            model.eval()  # a blank image must not move BatchNorm statistics
            model(x)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    kept = x.numel() + sum(outputs) + sum(out.numel() for _, out in layer_io.values())
    transient = 2 * max(outputs)
    for layer in layers:
        inp, _ = layer_io[layer]
        cin = inp[-1] if isinstance(layer, nn.Linear) else inp[1]
        t, k = inp.numel() // cin, layer.weight.numel() // cin
        if method == "vmap":
            kept += layer.weight.numel()  # vmap holds every layer's per-image gradient at once
        elif cin * k <= t * (cin + k):
            transient = max(transient, 2 * cin * k + k * t)  # g, g**2 and the unfolded output gradient
        else:
            transient = max(transient, k * t + 3 * t * t + 2 * t * cin)  # u, the Gram matrices, R u
    return int(SAFETY * (kept + transient) * param.element_size())


def score_batch_size(model: nn.Module, device: torch.device | str | None = None, budget_bytes: int | None = None,
                     method: str = "fast") -> int:
    """Images per scoring batch: as many as fit the memory budget, at most MAX_BATCH.

    Default budget: on CUDA, half the device's free memory; on a CPU, a quarter of the available
    memory, at most CPU_WORKING_SET (beyond it batches are no faster, only larger).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if budget_bytes is None:
        if device.type == "cuda":
            budget_bytes = int(CUDA_MEMORY_FRACTION * torch.cuda.mem_get_info(device)[0])
        else:
            budget_bytes = min(int(CPU_MEMORY_FRACTION * available_memory()), CPU_WORKING_SET)
    return max(1, min(MAX_BATCH, budget_bytes // scoring_bytes_per_image(model, method)))
