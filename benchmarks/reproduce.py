"""Accuracy reproduction: GradCon on MNIST, gradcon protocol, all 10 classes, under an epoch budget.

python benchmarks/reproduce.py [--epochs 20] [--seeds 0] [--data data/sets/mnist] [--device cuda]
python benchmarks/reproduce.py --detectors all|cae,vae,... [--classes 0,1] [--epochs 3] [--max-train 2000]

Prepares the image set from data/mnist if it is missing, then runs the eval job and prints the
per-class AUROC table beside the paper's mean (0.973 after 1000 epochs per class).
With --detectors, every named detector runs the same protocol under the same budget (epochs, batch
64, train images per class), each with its method's own defaults, and a last table puts their
per-class AUROC side by side beside the published mean for the same method where our notes have one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradcon_core import list_detectors  # noqa: E402
from jobs.eval import EvalConfig, run  # noqa: E402
from jobs.prepare import prepare  # noqa: E402

# Published MNIST mean AUROC under the gradcon protocol (the GradCon paper).
PUBLISHED = {"gradcon": ("GradCon (Kwon et al. 2020)", 0.973)}


def comparison(results: dict[str, list[dict]], epochs: int, max_train: int | None) -> str:
    classes = sorted({r["class"] for rows in results.values() for r in rows})
    lines = [f"# MNIST, gradcon protocol: AUROC per normal class ({epochs} epochs, "
             f"{max_train or 'all'} train images per class, batch 64)", "",
             "| detector | " + " | ".join(str(c) for c in classes) + " | mean | published mean |",
             "|---" * (len(classes) + 3) + "|"]
    for name, rows in results.items():
        per_class = [sum(r["auroc"] for r in rows if r["class"] == c) / sum(r["class"] == c for r in rows)
                     for c in classes]
        paper = PUBLISHED.get(name)
        lines.append(f"| {name} | " + " | ".join(f"{a:.4f}" for a in per_class)
                     + f" | **{sum(per_class) / len(per_class):.4f}** | "
                     + (f"{paper[1]:.3f} ({paper[0]}, 1000 epochs, all 10 classes)" if paper else "n/a") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/sets/mnist")
    parser.add_argument("--idx", default="data/mnist", help="IDX files to prepare the set from if it is missing")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--classes", default="all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="results")
    parser.add_argument("--detectors", default=None, help="comma list of registered detectors, or all")
    parser.add_argument("--max-train", type=int, default=None, help="cap on training images per class")
    args = parser.parse_args()
    if not Path(args.data).exists():
        prepare("mnist", args.idx, args.data)
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.detectors is None:
        cfg = EvalConfig(data=args.data, dataset="mnist", protocol="gradcon", classes=args.classes, seeds=seeds,
                         epochs=args.epochs, device=args.device, out=args.out, max_train=args.max_train,
                         name=f"reproduce-mnist-{args.epochs}ep")
        run(cfg)
        print(f"budget: {args.epochs} epochs per class (paper: 1000), seeds {cfg.seeds}, "
              f"{time.perf_counter() - start:.0f} s in all")
        return
    names = list_detectors() if args.detectors == "all" else args.detectors.split(",")
    unknown = sorted(set(names) - set(list_detectors()))
    if unknown:
        raise SystemExit(f"unknown detector(s) {unknown}; registered: {list_detectors()}")
    results, seconds = {}, {}
    for name in names:
        began = time.perf_counter()
        results[name] = run(EvalConfig(data=args.data, dataset="mnist", protocol="gradcon", classes=args.classes,
                                       seeds=seeds, epochs=args.epochs, device=args.device, out=args.out,
                                       max_train=args.max_train, detector=name,
                                       name=f"reproduce-mnist-{name}-{args.epochs}ep"))
        seconds[name] = time.perf_counter() - began
    print(comparison(results, args.epochs, args.max_train))
    print("seconds per detector: " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()))
    print(f"budget: {args.epochs} epochs per class (papers: hundreds to 1000), seeds {seeds}, "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
