"""Our per-class AUROC beside the papers' published rows for the same dataset and protocol.

The published tables are CSV files under docs/paper_results/ (its README cites each paper); PUBLISHED
says which of them hold rows for a (protocol, dataset). A set that is none of the papers' datasets (a
user's folder, the generated defects) gets no comparison. The difference per class is taken against the
published row of the same method when there is one (GradCon for gradcon, VAE for vae, ...), else against
the method whose paper defined the protocol (GradCon's for `gradcon`, ARAE's for `full`). A paired Wilcoxon
signed-rank test over classes says whether a difference is more than the spread between classes.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradcon_core.results.plots import pyplot

PAPER_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "paper_results"
GRADCON, ARAE, PUZZLE = "Kwon et al. 2020", "Salehi et al. 2020 (ARAE)", "Salehi et al. 2020 (Puzzle-AE)"


@dataclass(frozen=True)
class _Table:
    file: str
    paper: str
    percent: bool
    dataset: str | None = None  # means files: the value of their `dataset` column


# (protocol, dataset) -> the tables with published rows for it.
PUBLISHED = {
    ("gradcon", "mnist"): (_Table("gradcon_mnist_auroc.csv", GRADCON, False),),
    ("gradcon", "cifar10"): (_Table("gradcon_cifar10_auroc.csv", GRADCON, False),
                             _Table("gradcon_cifar10_ablation_auroc.csv", GRADCON, False)),
    ("gradcon", "fashion-mnist"): (_Table("gradcon_means.csv", GRADCON, True, "Fashion-MNIST"),),
    ("full", "mnist"): (_Table("arae_mnist_auroc.csv", ARAE, True),
                        _Table("puzzle_ae_means.csv", PUZZLE, True, "MNIST")),
    ("full", "fashion-mnist"): (_Table("arae_fmnist_auroc.csv", ARAE, True),
                                _Table("puzzle_ae_means.csv", PUZZLE, True, "Fashion-MNIST")),
    ("full", "cifar10"): (_Table("puzzle_ae_means.csv", PUZZLE, True, "CIFAR-10"),),
}
PROTOCOL_METHOD = {"gradcon": "GradCon", "full": "ARAE"}  # whose paper each protocol comes from
# Our registered detectors under the names the papers print.
PAPER_NAMES = {"gradcon": "GradCon", "cae": "CAE", "dae": "DAE", "vae": "VAE", "vae_grad": "VAE+Grad",
               "deep_svdd": "DSVDD", "ocsvm": "OCSVM", "kde": "KDE", "puzzle_ae": "Puzzle-AE", "aae": "AAE",
               "wae": "WAE"}


@dataclass(frozen=True)
class PublishedRow:
    method: str
    paper: str
    per_class: dict[int, float]  # AUROC in [0, 1] by class label; empty when only the mean is published
    mean: float  # the published mean over all classes

    @property
    def label(self) -> str:
        return f"{self.method} ({self.paper})"


def published_rows(protocol: str, dataset: str) -> list[PublishedRow]:
    """Every published AUROC row for this protocol and dataset, in the papers' order; [] if none."""
    rows = []
    for table in PUBLISHED.get((protocol, dataset), ()):
        scale = 0.01 if table.percent else 1.0
        with open(PAPER_RESULTS / table.file, newline="") as f:
            for record in csv.DictReader(f):
                if table.dataset is not None:
                    if record["dataset"] == table.dataset:
                        rows.append(PublishedRow(record["method"], table.paper, {},
                                                 float(record["mean_auroc_percent"]) * scale))
                    continue
                method = record.get("model") or record["method"]
                if "score" in record:  # the ablation: one row per (model, score used)
                    method = f"{method} ({record['score']} score)"
                values = [float(v) * scale for k, v in record.items() if k not in ("method", "model", "score", "mean")]
                rows.append(PublishedRow(method, table.paper, dict(enumerate(values)), float(record["mean"]) * scale))
    return rows


def our_method(detector: str, params: dict) -> str:
    """The papers' name for what was run: gradcon with epsilon > 0 and alpha = beta = 0 is ARAE."""
    if detector == "gradcon" and params.get("epsilon", 0) > 0 and params.get("alpha") == params.get("beta") == 0:
        return "ARAE"
    return PAPER_NAMES.get(detector, detector)


def reference_row(rows: list[PublishedRow], method: str, protocol: str) -> PublishedRow | None:
    """The per-class row to take differences against: the same method's, else the protocol's own method's."""
    per_class = [r for r in rows if r.per_class]
    for wanted in (method, PROTOCOL_METHOD.get(protocol)):
        for r in per_class:
            if r.method == wanted or r.method.startswith(f"{wanted} ("):
                return r
    return None


@dataclass(frozen=True)
class PairedTest:
    classes: int
    statistic: float | None
    p_value: float | None

    def sentence(self, ours: str, theirs: str) -> str:
        if self.p_value is None:
            return (f"Paired Wilcoxon test, {ours} vs {theirs}: needs 2+ classes with a difference "
                    f"({self.classes} here).")
        return (f"Paired Wilcoxon signed-rank test over {self.classes} classes, {ours} vs {theirs}: "
                f"W = {self.statistic:g}, p = {self.p_value:.3g}.")


def paired_test(ours: dict[int, float], theirs: dict[int, float]) -> PairedTest:
    """Wilcoxon signed-rank over the classes both have (two-sided)."""
    classes = sorted(ours.keys() & theirs.keys())
    a, b = np.array([ours[c] for c in classes]), np.array([theirs[c] for c in classes])
    if np.count_nonzero(a - b) < 2:
        return PairedTest(len(classes), None, None)
    from scipy.stats import wilcoxon

    result = wilcoxon(a, b)
    return PairedTest(len(classes), float(result.statistic), float(result.pvalue))


@dataclass
class Comparison:
    """Ours (per-class mean and std over seeds) beside published rows and, optionally, another run."""

    method: str
    protocol: str
    dataset: str
    ours: dict[int, float]
    ours_std: dict[int, float]
    rows: list[PublishedRow]
    other: tuple[str, dict[int, float]] | None = None  # (name, per-class AUROC) of another eval to compare

    @property
    def reference(self) -> PublishedRow | None:
        return reference_row(self.rows, self.method, self.protocol)

    def markdown(self) -> str:
        classes = sorted(self.ours)
        n_all = max((len(r.per_class) for r in self.rows), default=0)
        lines = [f"## AUROC beside the published rows ({self.dataset}, {self.protocol} protocol)", "",
                 "| | " + " | ".join(str(c) for c in classes) + " | mean of these classes |",
                 "|---" * (len(classes) + 2) + "|"]

        def cells(values: dict[int, float], fmt: str = "{:.4f}") -> str:
            shown = [values.get(c) for c in classes]
            mean = fmt.format(np.mean(shown)) if None not in shown else "n/a"
            return " | ".join("n/a" if v is None else fmt.format(v) for v in shown) + f" | {mean}"

        ours = " | ".join(f"{self.ours[c]:.4f} ± {self.ours_std[c]:.4f}" for c in classes)
        lines.append(f"| **ours: {self.method}** | {ours} | **{np.mean([self.ours[c] for c in classes]):.4f}** |")
        ref = self.reference
        if ref is not None:
            diff = {c: self.ours[c] - ref.per_class[c] for c in classes if c in ref.per_class}
            lines.append(f"| ours − {ref.method} | {cells(diff, '{:+.4f}')} |")
        if self.other is not None:
            lines.append(f"| {self.other[0]} | {cells(self.other[1])} |")
        for r in self.rows:
            if r.per_class:
                lines.append(f"| {r.label} | {cells(r.per_class)} |")
            else:
                lines.append(f"| {r.label} | " + " | ".join("–" for _ in classes) + f" | {r.mean:.4f} (all classes) |")
        notes = [""]
        if n_all and len(classes) < n_all:
            notes.append(f"Only {len(classes)} of {n_all} classes were run: the means above are over these "
                         f"{len(classes)}, the papers' own means (all classes) are not comparable with ours.")
        if ref is not None:
            notes.append(paired_test(self.ours, ref.per_class).sentence(f"ours ({self.method})", ref.label))
        if self.other is not None:
            notes.append(paired_test(self.ours, self.other[1]).sentence(f"ours ({self.method})", self.other[0]))
        return "\n".join(lines + notes) + "\n"

    def plot(self, path: Path) -> None:
        """Per-class bars: ours (std over seeds as error bars), the reference row, the other run."""
        classes = sorted(self.ours)
        bars = [(f"ours: {self.method}", [self.ours[c] for c in classes], [self.ours_std[c] for c in classes])]
        ref = self.reference
        if ref is not None:
            bars.append((ref.label, [ref.per_class.get(c, np.nan) for c in classes], None))
        if self.other is not None:
            bars.append((self.other[0], [self.other[1].get(c, np.nan) for c in classes], None))
        width = 0.8 / len(bars)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(classes) * len(bars)), 3.6))
        x = np.arange(len(classes))
        for i, (name, values, errors) in enumerate(bars):
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, yerr=errors, label=name, capsize=2)
        low = np.nanmin([v for _, values, _ in bars for v in values])
        ax.set(xticks=x, xticklabels=[str(c) for c in classes], xlabel="normal class", ylabel="AUROC",
               ylim=(max(0.0, low - 0.05), 1.0), title=f"{self.dataset}, {self.protocol} protocol")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(bars), frameon=False)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
