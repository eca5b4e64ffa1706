"""Training speed: one GradCon step (second-order constraint) vs one plain autoencoder step.

python benchmarks/train_speed.py [--device cuda] [--batch-size 64] [--image-size 64 --channels 3]
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
from gradcon_core.detectors.objective import ReferenceGradients, gradcon_step  # noqa: E402


def step_rates(model: nn.Module, batches: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(GradCon steps, plain autoencoder steps) in images/s over batches [steps, B, C, H, W]."""
    reference = ReferenceGradients.for_model(model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def gradcon():
        for x in batches:
            gradcon_step(model, reference, opt, x, alpha=0.03)

    def plain():
        for x in batches:
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x), x).backward()
            opt.step()

    images = batches.shape[0] * batches.shape[1]
    return images_per_second(gradcon, images, device), images_per_second(plain, images, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.steps, args.batch_size, args.channels, args.image_size, args.image_size)
    batches = torch.rand(*shape, device=device) ** 2
    print(f"machine: {machine(device)}; batch {args.batch_size} of {args.channels}x{args.image_size}x"
          f"{args.image_size}, {args.steps} steps per timing")
    model = create_model("gradcon_cae", in_channels=args.channels, image_size=args.image_size).to(device)
    rate_gradcon, rate_plain = step_rates(model, batches, device)
    print(f"  GradCon step      {rate_gradcon:>10,.0f} images/s")
    print(f"  plain CAE step    {rate_plain:>10,.0f} images/s")
    print(f"GradCon step cost / plain step cost = {rate_plain / rate_gradcon:.2f}x")


if __name__ == "__main__":
    main()
