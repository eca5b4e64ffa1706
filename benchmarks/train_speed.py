"""Training speed: one GradCon step (second-order constraint) vs one plain autoencoder step.

python benchmarks/train_speed.py [--device cuda] [--batch-size 64]
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
from gradcon_core.objective import ReferenceGradients, gradcon_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = torch.rand(args.steps, args.batch_size, 1, 28, 28, device=device) ** 2
    print(f"machine: {machine(device)}; batch {args.batch_size}, {args.steps} steps per timing")

    model = create_model("gradcon_cae").to(device)
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

    images = args.steps * args.batch_size
    rate_gradcon = images_per_second(gradcon, images, device)
    rate_plain = images_per_second(plain, images, device)
    print(f"  GradCon step      {rate_gradcon:>10,.0f} images/s")
    print(f"  plain CAE step    {rate_plain:>10,.0f} images/s")
    print(f"GradCon step cost / plain step cost = {rate_plain / rate_gradcon:.2f}x")


if __name__ == "__main__":
    main()
