"""Per-class result tables (CSV + Markdown) and plots (ROC, histograms)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

METRICS = ("auroc", "aupr", "f1", "fpr95")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend. Imported when a plot is drawn, not with the module:
    matplotlib and scikit-learn cost seconds in each process that imports them, and every job's process
    (Ray's workers among them) imports gradcon_core."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def summarize(rows: list[dict]) -> list[dict]:
    """Per-class mean and std over seeds of each metric, plus a final 'mean' row over classes."""
    classes = sorted({r["class"] for r in rows})
    table = []
    for c in classes:
        runs = [r for r in rows if r["class"] == c]
        entry = {"class": c, "seeds": len(runs)}
        for m in METRICS:
            values = np.array([r[m] for r in runs], dtype=float)
            entry[m], entry[f"{m}_std"] = float(values.mean()), float(values.std())
        table.append(entry)
    mean = {"class": "mean", "seeds": min(e["seeds"] for e in table)}
    for m in METRICS:
        # std of the class-mean over seeds: how much the headline number moves with the seed
        per_seed = [np.mean([r[m] for r in rows if r["seed"] == s]) for s in sorted({r["seed"] for r in rows})]
        mean[m], mean[f"{m}_std"] = float(np.mean(per_seed)), float(np.std(per_seed))
    return [*table, mean]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(table: list[dict], title: str) -> str:
    """The per-class table of every metric, mean +- std over seeds (gradcon_core/results/papers.py puts it beside the
    papers)."""
    lines = [f"# {title}", "", "| class | AUROC | AUPR | F1 | FPR@95%TPR | seeds |", "|---|---|---|---|---|---|"]
    for e in table:
        cells = [f"{e[m]:.4f} ± {e[f'{m}_std']:.4f}" for m in METRICS]
        name = f"**{e['class']}**" if e["class"] == "mean" else str(e["class"])
        lines.append(f"| {name} | {' | '.join(cells)} | {e['seeds']} |")
    return "\n".join(lines) + "\n"


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """curves: name -> (scores, is_anomaly)."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=name, lw=1.2)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (anomaly = positive)")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_histograms(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    n = len(curves)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, (scores, labels)) in zip(axes.flat, curves.items()):
        bins = np.linspace(scores.min(), scores.max(), 40)
        ax.hist(scores[~labels], bins=bins, alpha=0.6, label="normal")
        ax.hist(scores[labels], bins=bins, alpha=0.6, label="anomaly")
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
