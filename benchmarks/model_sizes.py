"""Parameter counts of every registered network at S x S images, one and three channels (Markdown).

python benchmarks/model_sizes.py [--sizes 28,32,64,128,256]
"""
from __future__ import annotations

import argparse

import torch

from gradcon_core import create_model, list_models


def parameter_count(name: str, channels: int, size: int) -> int:
    with torch.device("meta"):  # shapes only: ARAE's MLP at 256x256x3 would take 800 MB of weights
        model = create_model(name, in_channels=channels, image_size=size)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="28,32,64,128,256")
    sizes = [int(s) for s in parser.parse_args().sizes.split(",")]
    print("| model | C | " + " | ".join(f"{s}x{s}" for s in sizes) + " |")
    print("|---|---|" + "---:|" * len(sizes))
    for name in list_models():
        for channels in (1, 3):
            counts = " | ".join(f"{parameter_count(name, channels, s):,}" for s in sizes)
            print(f"| {name} | {channels} | {counts} |")


if __name__ == "__main__":
    main()
