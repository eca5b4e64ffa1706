"""Scoring speed: the official batch-size-1 loop vs our batched scorer vs a plain forward+backward.

(a) loop: per image forward, MSE, backward, cosine with the reference (the official way);
(b) ours: gradcon_core.scoring, method "fast" (and "vmap" for comparison);
(c) floor: one batched forward+backward of a summed loss, which any per-image-gradient scorer pays.

python benchmarks/score_speed.py [--device cuda] [--images 4096]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import images_per_second, machine  # noqa: E402

from gradcon_core import create_model  # noqa: E402
from gradcon_core.objective import constraint_layers  # noqa: E402
from gradcon_core.scoring import score_components  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--loop-images", type=int, default=256, help="the loop is slow: time it on fewer")
    parser.add_argument("--batch-sizes", default=None, help="comma list; default 32,64,128 (CPU) / 256..4096 (GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else (
        [256, 1024, 4096] if device.type == "cuda" else [32, 64, 128])
    torch.manual_seed(0)
    model = create_model("gradcon_cae", in_channels=1).to(device)
    layers = constraint_layers(model)
    refs = [torch.randn_like(layer.weight) for layer in layers]
    x = (torch.rand(args.images, 1, 28, 28, device=device) ** 2).contiguous()
    print(f"machine: {machine(device)}; {args.images} images of 1x28x28")

    def loop():
        for i in range(args.loop_images):
            model.zero_grad()
            xi = x[i : i + 1]
            F.mse_loss(model(xi), xi).backward()
            cos = sum(F.cosine_similarity(layer.weight.grad.view(-1, 1), r.view(-1, 1), dim=0)
                      for layer, r in zip(layers, refs))
            float(cos)  # the official code reads each score back, one image at a time

    def batched(fn, bs):
        def run():
            for xb in x.split(bs):
                fn(xb)
        return run

    def plain(xb):
        model.zero_grad()
        F.mse_loss(model(xb), xb, reduction="sum").backward()

    rate_loop = images_per_second(loop, args.loop_images, device, repeats=1)
    rows = {"(a) loop, batch 1": rate_loop}
    best = {}
    for name, fn in [("(b) ours fast", lambda xb: score_components(model, refs, xb, 0.12, "fast")),
                     ("(b') ours vmap", lambda xb: score_components(model, refs, xb, 0.12, "vmap")),
                     ("(c) plain fwd+bwd", plain)]:
        for bs in sizes:
            rate = images_per_second(batched(fn, bs), args.images, device)
            rows[f"{name}, batch {bs}"] = rate
            best[name] = max(best.get(name, 0.0), rate)
    for name, rate in rows.items():
        print(f"  {name:<28} {rate:>12,.0f} images/s")
    b, b_vmap, c = best["(b) ours fast"], best["(b') ours vmap"], best["(c) plain fwd+bwd"]
    print(f"best (b) / (a) = {b / rate_loop:.1f}x   best (b) / best (c) = {b / c:.2f}   vmap / (c) = {b_vmap / c:.2f}")


if __name__ == "__main__":
    main()
