import numpy as np
import pytest

from gradcon_core.metrics import aupr, auroc, evaluate, f1_at, fpr_at_tpr, threshold_from_scores


def test_metrics_on_a_hand_checked_example():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # 15 of the 16 (anomaly, normal) pairs are ordered correctly.
    assert auroc(scores, labels) == pytest.approx(15 / 16)
    # At threshold 0.5: TP=3, FP=1, FN=1 -> F1 = 6 / 8.
    assert f1_at(scores, labels, 0.5) == pytest.approx(0.75)
    # 95% TPR needs all four anomalies, i.e. threshold below 0.4: one normal (0.6) is above it.
    assert fpr_at_tpr(scores, labels) == pytest.approx(0.25)
    assert 0 < aupr(scores, labels) <= 1
    assert set(evaluate(scores, labels, 0.5)) == {"auroc", "aupr", "fpr95", "f1"}


def test_perfect_and_inverted_scores():
    labels = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.0, 0.1, 0.8, 0.9]), labels) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.1, 0.0]), labels) == 0.0
    assert fpr_at_tpr(np.array([0.0, 0.1, 0.8, 0.9]), labels) == 0.0


def test_auroc_counts_a_tie_as_half_a_pair_as_scikit_learn_does():
    from sklearn.metrics import roc_auc_score

    labels = np.array([0, 1, 0, 1])
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert auroc(np.array([0.1, 0.5, 0.5, 0.9]), labels) == pytest.approx(3.5 / 4)  # the tie: half a pair
    rng = np.random.default_rng(0)
    for n in (5, 200, 5000):
        scores = rng.integers(0, 20, n).astype(np.float32)  # many ties
        labels = rng.random(n) < 0.3
        labels[:2] = [True, False]
        assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_metrics_reject_single_class_labels():
    with pytest.raises(ValueError, match="both normal"):
        auroc(np.array([0.1, 0.2]), np.array([0, 0]))


def test_thresholds_from_contamination_and_percentile():
    scores = np.arange(101, dtype=float)
    assert threshold_from_scores(scores, contamination=0.1) == pytest.approx(90.0)
    assert threshold_from_scores(scores, percentile=95) == pytest.approx(95.0)
    with pytest.raises(ValueError, match="exactly one"):
        threshold_from_scores(scores)
    with pytest.raises(ValueError, match="contamination"):
        threshold_from_scores(scores, contamination=0.7)
    with pytest.raises(ValueError, match="finite"):
        threshold_from_scores(np.array([np.nan]), percentile=50)
