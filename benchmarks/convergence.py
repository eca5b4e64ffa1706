"""How GradCon converges on MNIST: test AUROC, reconstruction loss and how far the output is from the mean image,
epoch by epoch, for a few classes and initialisations (issue: short budgets lose much; some fits stall).

python benchmarks/convergence.py [--classes 1,5,8] [--seeds 0,1] [--epochs 20] [--max-train 2000]

Each (class, seed) is the eval job's run (gradcon protocol, batch 64, the official recipe), except that the
test AUROC is measured after every epoch: for understanding only, never to choose anything. "Mean-image
distance" is the mean squared difference between the reconstructions of the test images and the mean training
image: near 0 while the network sits on the plateau where it outputs the mean image. Prints a table per run
and writes runs/bench-convergence/convergence.png (AUROC and recon loss against epochs).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gradcon_core import GradConDetector, create_model  # noqa: E402
from gradcon_core.data.arrays import as_image_batch  # noqa: E402
from gradcon_core.data.images import decode_images  # noqa: E402
from gradcon_core.data.imageset import read_columns, take_rows  # noqa: E402
from gradcon_core.data.protocols import select  # noqa: E402
from gradcon_core.metrics import auroc  # noqa: E402
from gradcon_core.training.loop import EpochReport, TrainingData, train_epochs  # noqa: E402


def images(data: str, rows: np.ndarray, det: GradConDetector) -> torch.Tensor:
    pixels, _ = decode_images(take_rows(data, rows).images, det.channels, det.input_size)
    return as_image_batch(pixels, det.channels, det.input_size)


def study(data: str, labels: np.ndarray, splits: np.ndarray, normal_class: int, seed: int, epochs: int,
          max_train: int) -> list[dict]:
    torch.manual_seed(seed)
    det = GradConDetector(create_model("gradcon_cae"), device="cpu")
    sel = select(labels, splits, normal_class, "gradcon", seed)
    train, val, test = (images(data, rows, det) for rows in (sel.train[:max_train], sel.val, sel.test))
    mean_image = train.mean(0, keepdim=True)
    history: list[dict] = []

    def measure(report: EpochReport) -> None:
        with torch.no_grad():
            away = float((det.model(test) - mean_image).pow(2).mean())
        history.append({"epoch": report.epoch + 1, "recon": report.metrics["recon"],
                        "val_loss": report.metrics["val_loss"],
                        "test_auroc": auroc(det.decision_function(test), sel.test_is_anomaly), "mean_image": away})

    train_epochs(det, TrainingData(train, val), epochs=epochs, batch_size=64, seed=seed, on_epoch=measure)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "sets" / "mnist"))
    parser.add_argument("--classes", default="1,5,8")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-convergence"))
    args = parser.parse_args()
    meta = read_columns(args.data, ["label", "split"])
    labels, splits = meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False)
    runs = {}
    for c in (int(c) for c in args.classes.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            runs[(c, seed)] = history = study(args.data, labels, splits, c, seed, args.epochs, args.max_train)
            print(f"class {c} seed {seed} ({time.perf_counter() - start:.0f} s): epoch: test AUROC / recon / "
                  "mean-image distance")
            print("  " + "  ".join(f"{h['epoch']}: {h['test_auroc']:.3f}/{h['recon']:.4f}/{h['mean_image']:.4f}"
                                   for h in history))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (c, seed), history in runs.items():
        epochs = [h["epoch"] for h in history]
        line, = left.plot(epochs, [h["test_auroc"] for h in history], label=f"class {c} seed {seed}")
        right.plot(epochs, [h["recon"] for h in history], color=line.get_color())
    left.set(xlabel="epoch", ylabel="test AUROC (measured, never used)", title="AUROC by epoch")
    right.set(xlabel="epoch", ylabel="training recon loss", yscale="log", title="reconstruction loss by epoch")
    left.legend(fontsize=7)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(args.out) / "convergence.png", dpi=110, bbox_inches="tight")
    print(f"plot: {Path(args.out) / 'convergence.png'}")


if __name__ == "__main__":
    main()
