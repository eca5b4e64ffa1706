"""The papers' per-class AUROC tables reproduced under a budget: `make reproduce-mnist` / `make reproduce-fmnist`.

python benchmarks/reproduce.py --dataset mnist [--epochs 20] [--seeds 0,1,2] [--gpus-per-run 0.25] [--write-docs]
python benchmarks/reproduce.py --detectors all|cae,vae,... [--classes 0,1] [--epochs 3] [--max-train 2000]

Prepares the image set from data/mnist (data/fashion-mnist) if it is missing, then runs `gradcon eval` (one
Ray task per class and seed, as many at once as the machine fits) under the GradCon paper's protocol
(Fashion-MNIST: its merged-splits variant) and prints the per-class table beside the published rows. With
--write-docs the table goes to docs/results/<dataset>-<epochs>ep.md with the machine, budget and wall time
in its header. The official budget is 1000 epochs per class (a GPU's work: EPOCHS=1000 GPUS_PER_RUN=0.25).
With --detectors, every named detector runs the same protocol under the same budget, each with its method's
own defaults, and a last table puts their per-class AUROC side by side beside the published mean for the
same method where the papers have one.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gradcon_core import list_detectors  # noqa: E402
from gradcon_core.results.evaluation import saved_runs  # noqa: E402
from gradcon_core.results.papers import our_method, published_rows  # noqa: E402
from jobs.eval import EvalConfig, run  # noqa: E402
from jobs.prepare import prepare  # noqa: E402

SOURCES = {"mnist": "data/mnist", "fashion-mnist": "data/fashion-mnist"}


def comparison(dataset: str, results: dict[str, list[dict]], epochs: int, max_train: int | None) -> str:
    classes = sorted({r["class"] for rows in results.values() for r in rows})
    rows = published_rows("gradcon", dataset)
    lines = [f"# {dataset}, gradcon protocol: AUROC per normal class ({epochs} epochs, "
             f"{max_train or 'all'} train images per class, batch 64)", "",
             "| detector | " + " | ".join(str(c) for c in classes) + " | mean | published mean |",
             "|---" * (len(classes) + 3) + "|"]
    for name, runs in results.items():
        per_class = [sum(r["auroc"] for r in runs if r["class"] == c) / sum(r["class"] == c for r in runs)
                     for c in classes]
        method = our_method(name, {})
        paper = next((r for r in rows if r.method == method or r.method.startswith(f"{method} (")), None)
        lines.append(f"| {name} | " + " | ".join(f"{a:.4f}" for a in per_class)
                     + f" | **{sum(per_class) / len(per_class):.4f}** | "
                     + (f"{paper.mean:.3f} ({paper.label}, all classes)" if paper else "n/a") + " |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """CPU model and count, and the GPU when there is one."""
    import torch

    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    text = f"{cpu}, {os.cpu_count()} CPUs"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return f"{text}; torch {torch.__version__}"


def write_docs(out: Path, dataset: str, args: argparse.Namespace, seconds: float, resumed: int) -> Path:
    """docs/results/<dataset>-<epochs>ep.md: the eval's table.md under a header saying how it was made (resumed:
    runs an earlier invocation had finished, stopped or run with fewer seeds, whose time this one's wall time
    leaves out)."""
    runs = list(csv.DictReader(open(out / "results.csv")))
    earlier = (f" ({resumed} of the {len(runs)} runs were finished by an earlier invocation (stopped, or run with "
               "fewer seeds); this wall time leaves them out)" if resumed else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    recipe = f" PARAMS=\"{' '.join(args.param)}\"" if args.param else ""
    header = (f"<!-- made by `make reproduce-{'fmnist' if dataset == 'fashion-mnist' else dataset} "
              f"EPOCHS={args.epochs} SEEDS={args.seeds}{recipe}` -->\n\n"
              f"- machine: {machine()}\n"
              f"- budget: {args.epochs} epochs per class and seed (the GradCon paper: 1000), seeds {args.seeds}, "
              f"{args.cpus_per_run:g} CPU and {args.gpus_per_run:g} GPU per run; recipe: "
              f"{', '.join(args.param) or 'the official one'}\n"
              f"- wall time: {seconds / 60:.1f} min{earlier}, on {time.strftime('%Y-%m-%d')}, at commit {commit}; "
              f"one run's training and scoring took {min(float(r['seconds']) for r in runs):.0f}-"
              f"{max(float(r['seconds']) for r in runs):.0f} s\n\n")
    path = ROOT / "docs" / "results" / f"{out.name.removeprefix('reproduce-')}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + (out / "table.md").read_text())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(SOURCES), default="mnist")
    parser.add_argument("--data", help="the image set (default data/sets/<dataset>, prepared if missing)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--classes", default="all")
    parser.add_argument("--cpus-per-run", type=float, default=1.0)
    parser.add_argument("--gpus-per-run", type=float, default=0.0)
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--write-docs", action="store_true", help="write the table to docs/results/")
    parser.add_argument("--detectors", default=None, help="comma list of registered detectors, or all")
    parser.add_argument("--max-train", type=int, default=None, help="cap on training images per class")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a detector setting, e.g. output_init=mean (the fast-start recipe); repeatable")
    args = parser.parse_args()
    params = dict(p.split("=", 1) for p in args.param)
    data = args.data or str(ROOT / "data" / "sets" / args.dataset)
    if not Path(data).exists():
        prepare(args.dataset, str(ROOT / SOURCES[args.dataset]), data)
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = dict(data=data, dataset=args.dataset, protocol="gradcon", classes=args.classes, seeds=seeds,
                    epochs=args.epochs, out=args.out, max_train=args.max_train, cpus_per_run=args.cpus_per_run,
                    gpus_per_run=args.gpus_per_run, params=params)
    if args.detectors is None:
        name = "-".join([f"reproduce-{args.dataset}-{args.epochs}ep", *(f"{k}-{v}" for k, v in params.items())])
        saved = saved_runs(Path(args.out) / name / "runs")  # by an earlier, stopped invocation
        resumed = sum(1 for _, seed in saved if seed in seeds)
        run(EvalConfig(**settings, name=name))
        seconds = time.perf_counter() - start
        print(f"budget: {args.epochs} epochs per class (paper: 1000), seeds {seeds}, {seconds:.0f} s in all")
        if args.write_docs:
            print(f"wrote {write_docs(Path(args.out) / name, args.dataset, args, seconds, resumed)}")
        return
    names = list_detectors() if args.detectors == "all" else args.detectors.split(",")
    unknown = sorted(set(names) - set(list_detectors()))
    if unknown:
        raise SystemExit(f"unknown detector(s) {unknown}; registered: {list_detectors()}")
    results, seconds = {}, {}
    for name in names:
        began = time.perf_counter()
        results[name] = run(EvalConfig(**settings, detector=name,
                                       name=f"reproduce-{args.dataset}-{name}-{args.epochs}ep"))
        seconds[name] = time.perf_counter() - began
    print(comparison(args.dataset, results, args.epochs, args.max_train))
    print("seconds per detector: " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()))
    print(f"budget: {args.epochs} epochs per class (papers: hundreds to 1000), seeds {seeds}, "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
