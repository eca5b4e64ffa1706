"""Every benchmark, one Markdown report: numbers, ratios, a plot per benchmark, and the machine.

python benchmarks/run_all.py [--quick] [--gpu | --cpu] [--out runs/bench-report] [--only score_speed,...]

Runs each benchmark script as its own process (so one's memory or threads do not colour the
next), keeps its output, and writes <out>/report.md with a PNG per benchmark (its images/s
figures as bars). GPU mode (the default where CUDA is available) passes the CUDA options.
--quick shrinks every benchmark to a smoke-sized run (minutes, not the numbers to quote).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import describe_machine  # noqa: E402

RATE = re.compile(r"^\s*(?:\(\w\)\s*)?(?P<name>[^\n]*?)\s+(?P<rate>[\d,]+(?:\.\d+)?) images/s", re.M)


def plan(gpu: bool, quick: bool) -> dict[str, list[str]]:
    """benchmark name -> its arguments."""
    device = ["--device", "cuda"] if gpu else []
    return {
        "score_speed": device + (["--images", "512", "--loop-images", "64"] if quick else []),
        "train_speed": device + (["--steps", "10"] if quick else []),
        "decode_speed": device + (["--images", "400", "--repeats", "2"] if quick else []),
        "resolution": device + (["--images", "256", "--steps", "3", "--train-batch", "16"] if quick else []),
        "model_sizes": [],
        "score_pipeline": ["--rows", "40000"] if quick else [],
        "score_targets": ["--rows", "4000", "--fit-images", "256", "--ceiling-images", "256"] if quick else [],
        "train_scaling": ["--epochs", "1", "--steps", "10"] if quick else [],
        "stream_memory": ["--rows", "300,1200", "--image-size", "32"] if quick else [],
        "two_nodes": ["--rows", "100", "--epochs", "1"] if quick else [],
        "reproduce": ["--epochs", "1", "--classes", "0,1"] if quick else ["--epochs", "3"],
        "tune_arae": ["--classes", "0", "--trials", "2", "--epochs", "1", "--train-images", "300",
                      "--attack-steps", "3"] if quick else [],
    }


def plot(name: str, output: str, path: Path) -> bool:
    rates = [(m["name"].strip(" :")[:40], float(m["rate"].replace(",", ""))) for m in RATE.finditer(output)]
    if not rates:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rates) + 1.2))
    ax.barh([r[0] for r in rates][::-1], [r[1] for r in rates][::-1])
    ax.set(xlabel="images/s", title=name)
    ax.set_xscale("log" if max(r[1] for r in rates) > 50 * min(r[1] for r in rates) else "linear")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true", default=None)
    parser.add_argument("--cpu", dest="gpu", action="store_false")
    parser.add_argument("--out", default="runs/bench-report")
    parser.add_argument("--only", default=None, help="comma list of benchmark names")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(gpu, args.quick)
    if args.only:
        unknown = set(args.only.split(",")) - set(runs)
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    lines = [f"# Benchmark report ({time.strftime('%Y-%m-%d %H:%M')}, {'GPU' if gpu else 'CPU'} mode"
             f"{', quick' if args.quick else ''})", "", describe_machine(), ""]
    failed = []
    for name, extra in runs.items():
        cmd = [sys.executable, str(HERE / f"{name}.py"), *extra]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        wall = time.perf_counter() - start
        print(done.stdout[-2000:], flush=True)
        lines += [f"## {name}", "", f"`python benchmarks/{name}.py {' '.join(extra)}` ({wall:.0f} s"
                  f"{'' if done.returncode == 0 else f', FAILED with exit code {done.returncode}'})", "",
                  "```", done.stdout.strip() or "(no output)", "```", ""]
        if done.returncode != 0:
            failed.append(name)
            lines += ["stderr (last lines):", "```", "\n".join(done.stderr.strip().splitlines()[-15:]), "```", ""]
        elif plot(name, done.stdout, out / f"{name}.png"):
            lines += [f"![{name}]({name}.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print(f"report: {out / 'report.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
