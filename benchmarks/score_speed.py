"""Scoring speed: the official batch-size-1 loop vs our batched scorer vs a plain forward+backward.

(a) loop: per image forward, MSE, backward, cosine with the reference (the official way);
(b) ours: gradcon_core.detectors.scoring, method "fast" (and "vmap" for comparison);
(c) floor: one batched forward+backward of a summed loss, which any per-image-gradient scorer pays.

python benchmarks/score_speed.py [--device cuda] [--images 4096] [--image-size 64 --channels 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import images_per_second, machine  # noqa: E402

from gradcon_core import create_model  # noqa: E402
from gradcon_core.detectors.objective import constraint_layers  # noqa: E402
from gradcon_core.detectors.scoring import score_batch_size, score_components  # noqa: E402


def plain_backward(model: nn.Module, xb: torch.Tensor) -> None:
    """(c): what one batched forward+backward of the same network costs."""
    model.zero_grad()
    F.mse_loss(model(xb), xb, reduction="sum").backward()


def rate(fn, x: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Images/s of fn over x in batches of batch_size."""
    def run():
        for xb in x.split(batch_size):
            fn(xb)
    return images_per_second(run, len(x), device)


def scorer_rate(model: nn.Module, refs: list[torch.Tensor], x: torch.Tensor, batch_size: int,
                device: torch.device, method: str = "fast") -> float:
    return rate(lambda xb: score_components(model, refs, xb, 0.12, method), x, batch_size, device)


def plain_rate(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> float:
    return rate(lambda xb: plain_backward(model, xb), x, batch_size, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--loop-images", type=int, default=256, help="the loop is slow: time it on fewer")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma list; default 32,64,128 (CPU) / 256..4096 (GPU), and score_batch_size's choice")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model("gradcon_cae", in_channels=args.channels, image_size=args.image_size).to(device)
    chosen = score_batch_size(model, device)
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else sorted(
        {256, 1024, 4096, chosen} if device.type == "cuda" else {32, 64, 128, chosen})
    layers = constraint_layers(model)
    refs = [torch.randn_like(layer.weight) for layer in layers]
    x = (torch.rand(args.images, args.channels, args.image_size, args.image_size, device=device) ** 2).contiguous()
    print(f"machine: {machine(device)}; {args.images} images of {args.channels}x{args.image_size}x{args.image_size}; "
          f"score_batch_size picks {chosen}")

    def loop():
        for i in range(args.loop_images):
            model.zero_grad()
            xi = x[i : i + 1]
            F.mse_loss(model(xi), xi).backward()
            cos = sum(F.cosine_similarity(layer.weight.grad.view(-1, 1), r.view(-1, 1), dim=0)
                      for layer, r in zip(layers, refs))
            float(cos)  # the official code reads each score back, one image at a time

    rate_loop = images_per_second(loop, args.loop_images, device, repeats=1)
    rows = {"(a) loop, batch 1": rate_loop}
    best: dict[str, float] = {}
    for bs in sizes:
        for name, images_per_s in [("(b) ours fast", scorer_rate(model, refs, x, bs, device, "fast")),
                                   ("(b') ours vmap", scorer_rate(model, refs, x, bs, device, "vmap")),
                                   ("(c) plain fwd+bwd", plain_rate(model, x, bs, device))]:
            rows[f"{name}, batch {bs}"] = images_per_s
            best[name] = max(best.get(name, 0.0), images_per_s)
    for name, images_per_s in rows.items():
        print(f"  {name:<28} {images_per_s:>12,.0f} images/s")
    b, b_vmap, c = best["(b) ours fast"], best["(b') ours vmap"], best["(c) plain fwd+bwd"]
    print(f"best (b) / (a) = {b / rate_loop:.1f}x   best (b) / best (c) = {b / c:.2f}   vmap / (c) = {b_vmap / c:.2f}")


if __name__ == "__main__":
    main()
