"""Anomaly-detection metrics (anomaly = positive class, higher score = more anomalous) and thresholds."""
from __future__ import annotations

import numpy as np

# scikit-learn is imported inside the functions that need it: importing it costs seconds, and every Ray Train
# worker and controller imports this module (training's validation AUROC below needs only NumPy).


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of equal length, got {scores.shape} and {labels.shape}")
    if labels.all() or not labels.any():
        raise ValueError("labels must contain both normal (0) and anomalous (1) samples")
    return scores, labels


def auroc(scores, labels) -> float:
    """The probability that an anomaly scores above a normal sample, a tie counting one half (the
    Mann-Whitney U statistic over its maximum: what scikit-learn's roc_auc_score computes)."""
    scores, labels = _check(scores, labels)
    _, tie_group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[tie_group]  # 1-based ranks, a tie's ranks averaged
    positives, negatives = int(labels.sum()), int((~labels).sum())
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def aupr(scores, labels) -> float:
    from sklearn.metrics import average_precision_score

    scores, labels = _check(scores, labels)
    return float(average_precision_score(labels, scores))


def f1_at(scores, labels, threshold: float) -> float:
    from sklearn.metrics import f1_score

    scores, labels = _check(scores, labels)
    return float(f1_score(labels, scores > threshold))


def fpr_at_tpr(scores, labels, tpr_level: float = 0.95) -> float:
    """Smallest false-positive rate at which the true-positive rate reaches tpr_level."""
    from sklearn.metrics import roc_curve

    scores, labels = _check(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(fpr[np.searchsorted(tpr, tpr_level, side="left")])


def evaluate(scores, labels, threshold: float | None = None) -> dict[str, float]:
    """AUROC, AUPR, FPR@95%TPR and, given a threshold, F1 at it."""
    out = {"auroc": auroc(scores, labels), "aupr": aupr(scores, labels), "fpr95": fpr_at_tpr(scores, labels)}
    if threshold is not None:
        out["f1"] = f1_at(scores, labels, threshold)
    return out


def threshold_from_scores(scores, *, contamination: float | None = None, percentile: float | None = None) -> float:
    """A decision threshold: the (1 - contamination) quantile of scores from mixed data, or the given
    percentile of scores from normal-only data. Exactly one of the two must be given."""
    if (contamination is None) == (percentile is None):
        raise ValueError("give exactly one of contamination or percentile")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError("threshold needs a non-empty array of finite scores")
    if contamination is not None:
        if not 0 < contamination < 0.5:
            raise ValueError(f"contamination must lie in (0, 0.5), got {contamination}")
        return float(np.quantile(scores, 1 - contamination))
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    return float(np.percentile(scores, percentile))
