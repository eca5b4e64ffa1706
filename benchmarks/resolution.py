"""GradCon at resolution: scoring and training speed, and scoring memory, for S x S x C images.

Per size: the fast scorer's images/s at score_batch_size's batch and its ratio to a plain batched
forward+backward of the same network (target >= 0.75), a GradCon training step against a plain
CAE step (target <= 2.5x), and the peak memory of GradConDetector.decision_function at its default
batch. On a CPU, memory is the resident-set high-water mark (Linux), on CUDA allocated tensors.

python benchmarks/resolution.py [--device cuda] [--sizes 28:1,64:3,128:3] [--images 2048] [--steps 20]
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_memory, publish  # noqa: E402
from score_speed import plain_rate, scorer_rate  # noqa: E402
from train_speed import step_rates  # noqa: E402

from gradcon_core import create_model  # noqa: E402
from gradcon_core.detectors.gradcon import GradConDetector  # noqa: E402
from gradcon_core.detectors.objective import constraint_layers  # noqa: E402
from gradcon_core.detectors.scoring import score_batch_size  # noqa: E402


def decision_function_peak(size: int, channels: int, device_name: str) -> tuple[int, int | None]:
    """(GradConDetector's default score batch, peak bytes of decision_function on two such batches).

    Run in a fresh process: one that has scored before keeps freed memory and would show no peak."""
    device = torch.device(device_name)
    detector = GradConDetector(create_model("gradcon_cae", in_channels=channels, image_size=size), device=device)
    images = torch.rand(2 * detector.score_batch_size, channels, size, size)
    return detector.score_batch_size, peak_memory(partial(detector.decision_function, images), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="28:1,64:3,128:3", help="comma list of SIZE:CHANNELS")
    parser.add_argument("--images", type=int, default=2048, help="images scored at 28x28; fewer at larger sizes")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timing")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--write-docs", action="store_true", help="the table into docs/benchmarks.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine(device)}")
    rows = []
    for item in args.sizes.split(","):
        size, channels = (int(v) for v in item.split(":"))
        torch.manual_seed(0)
        model = create_model("gradcon_cae", in_channels=channels, image_size=size).to(device)
        refs = [torch.randn_like(layer.weight) for layer in constraint_layers(model)]
        batch = score_batch_size(model, device)
        images = max(2 * batch, args.images * 28 * 28 // (size * size))  # about the same work at every size
        x = torch.rand(images, channels, size, size, device=device) ** 2
        fast, plain = scorer_rate(model, refs, x, batch, device), plain_rate(model, x, batch, device)
        batches = torch.rand(args.steps, args.train_batch, channels, size, size, device=device) ** 2
        gradcon_step, plain_step = step_rates(model, batches, device)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            det_batch, peak = pool.submit(decision_function_peak, size, channels, str(device)).result()
        name = f"{size}x{size}x{channels}"
        print(f"  scorer {name}, batch {batch:<5} {fast:>10,.0f} images/s")
        print(f"  plain fwd+bwd {name}, batch {batch:<5} {plain:>10,.0f} images/s")
        rows.append((name, batch, fast, fast / plain, plain_step / gradcon_step, det_batch,
                     "n/a" if peak is None else f"{peak / 2**20:,.0f} MiB"))
    table = "\n".join(["| image | score batch | scorer images/s | scorer / plain fwd+bwd | GradCon step / plain step "
                       "| decision_function batch | its peak memory |", "|---|---:|---:|---:|---:|---:|---:|",
                       *(f"| {name} | {batch} | {fast:,.0f} | {ratio:.2f} | {step_ratio:.2f}x | {det_batch} | {peak} |"
                         for name, batch, fast, ratio, step_ratio, det_batch, peak in rows)])
    print("\n" + table)
    if args.write_docs:
        publish(f"resolution-{device.type}", f"GradCon at resolution ({device.type.upper()})", table)


if __name__ == "__main__":
    main()
