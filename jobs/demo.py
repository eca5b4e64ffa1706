"""End-to-end demo on the embedded default: fit GradCon on one MNIST digit, score a balanced test set.

python -m jobs.demo [--config FILE] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradcon_core import GradConDetector, create_model, evaluate, load_detector
from gradcon_core.config import add_config_arguments, config_from_arguments, save_config
from gradcon_core.idx import load_mnist


@dataclass
class DemoConfig:
    data_dir: str = "data/mnist"  # IDX files; `make data` puts MNIST here
    normal_class: int = 0
    train_images: int = 6000  # a slice of the class's training images (90% train, 10% validation)
    epochs: int = 10
    batch_size: int = 64
    alpha: float = 0.03
    beta: float = 0.12
    lr: float = 1e-3
    seed: int = 0
    out: str = "runs/demo"


def balanced_test_split(labels: np.ndarray, normal_class: int, rng: np.random.Generator) -> np.ndarray:
    """All test images of the normal class plus as many others drawn at random (GradCon protocol)."""
    normal = np.flatnonzero(labels == normal_class)
    others = rng.permutation(np.flatnonzero(labels != normal_class))[: len(normal)]
    return np.concatenate([normal, np.sort(others)])


def run(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    save_config(cfg, out / "config.yaml")
    rng = np.random.default_rng(cfg.seed)
    x_train, y_train = load_mnist(cfg.data_dir, "train")
    x_test, y_test = load_mnist(cfg.data_dir, "test")
    if not 0 <= cfg.normal_class <= 9:
        raise ValueError(f"normal_class must be a digit 0-9, got {cfg.normal_class}")
    pool = rng.permutation(np.flatnonzero(y_train == cfg.normal_class))[: cfg.train_images]
    n_val = max(1, len(pool) // 10)
    val_idx, train_idx = pool[:n_val], pool[n_val:]
    test_idx = balanced_test_split(y_test, cfg.normal_class, rng)

    torch.manual_seed(cfg.seed)
    det = GradConDetector(create_model("gradcon_cae", in_channels=1), alpha=cfg.alpha, beta=cfg.beta, lr=cfg.lr)
    print(f"training GradCon on {len(train_idx)} images of digit {cfg.normal_class} "
          f"({len(val_idx)} for validation), {cfg.epochs} epochs on {det.device}")
    start = time.perf_counter()
    det.fit(x_train[train_idx], epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
            x_val=x_train[val_idx])
    train_s = time.perf_counter() - start
    ckpt = det.save(out / "checkpoint")

    start = time.perf_counter()
    scores = load_detector(ckpt).decision_function(x_test[test_idx])
    score_s = time.perf_counter() - start
    is_anomaly = y_test[test_idx] != cfg.normal_class
    metrics = evaluate(scores, is_anomaly, det.threshold_)
    metrics.update(train_seconds=train_s, score_images_per_s=len(test_idx) / score_s,
                   test_images=len(test_idx), best_epoch=det.fit_info_["best_epoch"])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"scored {len(test_idx)} test images ({int(is_anomaly.sum())} anomalies) "
          f"at {metrics['score_images_per_s']:.0f} images/s")
    print(f"AUROC {metrics['auroc']:.4f}  AUPR {metrics['aupr']:.4f}  F1 {metrics['f1']:.4f}  "
          f"FPR@95TPR {metrics['fpr95']:.4f}")
    print(f"checkpoint: {ckpt}\nmetrics:    {out / 'metrics.json'}\nconfig:     {out / 'config.yaml'}")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


def main(args: argparse.Namespace) -> int:
    run(config_from_arguments(args, DemoConfig))
    return 0


if __name__ == "__main__":  # python -m jobs.demo ... == gradcon demo ...
    from jobs.cli import main as cli_main

    raise SystemExit(cli_main(["demo", *sys.argv[1:]]))
