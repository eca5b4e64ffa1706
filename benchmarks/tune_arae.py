"""Tuned vs default: GradCon, ARAE and GradCon+ARAE on MNIST, test AUROC measured once after tuning.

python benchmarks/tune_arae.py [--classes 0,2] [--trials 3] [--epochs 3] [--train-images 1500] [--attack-steps 10]

Per normal class and method: one train run with the defaults, and a Tune sweep (ASHA, random
search) of the method's knobs on *validation* AUROC (validation 0s against other digits' train
images). Only then is each chosen checkpoint scored on the test split (gradcon protocol: the
class's test images plus as many others), once. Prints a Markdown table and the budget.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradcon_core import load_detector  # noqa: E402
from gradcon_core.data.images import decode_images  # noqa: E402
from gradcon_core.data.imageset import read_columns, take_rows  # noqa: E402
from gradcon_core.data.protocols import select  # noqa: E402
from gradcon_core.metrics import auroc  # noqa: E402
from jobs import train, tune  # noqa: E402
from jobs.prepare import prepare  # noqa: E402

# method -> (default settings, searched knobs)
METHODS = {
    "GradCon": ({"alpha": 0.03, "beta": 0.12, "epsilon": 0.0},
                {"alpha": "loguniform(0.003,0.3)", "beta": "loguniform(0.01,1)"}),
    "ARAE": ({"alpha": 0.0, "beta": 0.0, "epsilon": 0.2}, {"epsilon": "uniform(0.05,0.3)"}),
    "GradCon+ARAE": ({"alpha": 0.03, "beta": 0.12, "epsilon": 0.2},
                     {"alpha": "loguniform(0.003,0.3)", "epsilon": "uniform(0.05,0.3)"}),
}


def test_auroc(data: str, normal_class: int, checkpoint: str) -> float:
    """The one look at the test split: the chosen checkpoint's AUROC on the gradcon protocol's test rows."""
    meta = read_columns(data, ["label", "split"])
    sel = select(meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False), normal_class)
    pixels, errors = decode_images(take_rows(data, sel.test).images, 1, (28, 28))
    assert not any(errors)
    return auroc(load_detector(checkpoint).decision_function(pixels), sel.test_is_anomaly)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/sets/mnist")
    parser.add_argument("--idx", default="data/mnist")
    parser.add_argument("--classes", default="0,2")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--out", default="runs/bench-tune")
    args = parser.parse_args()
    if not Path(args.data).exists():
        prepare("mnist", args.idx, args.data)

    from cluster.ray_init import init_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # With the dashboard: the State API lets Ray Train free the workers of trials that ASHA stops.
    init_ray("local", num_cpus=4, log_to_driver=False)
    common = dict(data=str(Path(args.data).resolve()), epochs=args.epochs, max_train_images=args.train_images,
                  attack_steps=args.attack_steps, num_workers=1, val_anomalies=-1, select_by="val_auroc",
                  storage=str(Path(args.out).resolve()))
    rows, start = [], time.perf_counter()
    for c in [int(c) for c in args.classes.split(",")]:
        for method, (defaults, knobs) in METHODS.items():
            t0 = time.perf_counter()
            tag = f"c{c}-{method.lower().replace('+', '-')}"
            _, default_ckpt = train.run(train.TrainConfig(**common, **defaults, normal_class=c, name=f"{tag}-default"))
            _, summary = tune.run(tune.TuneConfig(**common, **defaults, normal_class=c, name=f"{tag}-tune",
                                                  search=knobs, num_samples=args.trials, metric="val_auroc"))
            rows.append({"class": c, "method": method, "default": test_auroc(common["data"], c, default_ckpt),
                         "tuned": test_auroc(common["data"], c, summary["best_checkpoint"]),
                         "val_tuned": summary["best_value"], "values": summary["best_values"],
                         "stopped": summary["stopped_early"], "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    print("\n| class | method | test AUROC, defaults | test AUROC, tuned | best val AUROC | tuned values | "
          "trials stopped early | wall s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        values = ", ".join(f"{k}={v:.3g}" for k, v in r["values"].items())
        print(f"| {r['class']} | {r['method']} | {r['default']:.4f} | {r['tuned']:.4f} | {r['val_tuned']:.4f} | "
              f"{values} | {r['stopped']}/{args.trials} | {r['seconds']:.0f} |")
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        print(f"mean {method}: defaults {np.mean([r['default'] for r in mine]):.4f}, "
              f"tuned {np.mean([r['tuned'] for r in mine]):.4f}")
    print(f"budget: classes {args.classes}; per run {args.train_images} training images x {args.epochs} epochs, "
          f"1 worker; {args.trials} trials per sweep (ASHA, random search); PGD {args.attack_steps} steps; "
          f"{time.perf_counter() - start:.0f} s in all on {os.cpu_count()} CPU(s)")


if __name__ == "__main__":
    main()
