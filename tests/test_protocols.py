import numpy as np
import pytest

from gradcon_core.data.protocols import select


@pytest.fixture(scope="module")
def mnist_meta(mnist_train, mnist_test):
    labels = np.concatenate([mnist_train[1], mnist_test[1]])
    splits = np.array(["train"] * len(mnist_train[1]) + ["test"] * len(mnist_test[1]))
    return labels, splits


@pytest.mark.parametrize("c", [0, 7])
def test_gradcon_protocol_on_mnist_follows_the_rule(mnist_meta, c):
    labels, splits = mnist_meta
    sel = select(labels, splits, c, "gradcon", seed=0)
    n_train_c = int(((labels == c) & (splits == "train")).sum())
    n_test_c = int(((labels == c) & (splits == "test")).sum())
    assert len(sel.val) == n_train_c // 10 and len(sel.train) == n_train_c - n_train_c // 10
    assert (labels[sel.train] == c).all() and (labels[sel.val] == c).all()
    assert (splits[sel.train] == "train").all() and (splits[sel.val] == "train").all()
    # Balanced test: every test image of c plus as many others, none of them seen in training.
    assert (splits[sel.test] == "test").all() and len(set(sel.test)) == len(sel.test) == 2 * n_test_c
    assert int((~sel.test_is_anomaly).sum()) == n_test_c == int(sel.test_is_anomaly.sum())
    assert not set(sel.test) & (set(sel.train) | set(sel.val)) and not set(sel.train) & set(sel.val)
    assert sel.summary() == {"normal_class": c, "protocol": "gradcon", "seed": 0, "train": len(sel.train),
                             "val": len(sel.val), "test": 2 * n_test_c, "test_anomalies": n_test_c}


def test_selection_is_seeded(mnist_meta):
    labels, splits = mnist_meta
    a, b, other = (select(labels, splits, 3, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.val, b.val) and np.array_equal(a.test, b.test)
    assert not np.array_equal(a.val, other.val)


def test_full_protocol_trains_on_the_whole_class_and_tests_on_everything(mnist_meta):
    labels, splits = mnist_meta
    sel = select(labels, splits, 5, "full")
    assert len(sel.train) == int(((labels == 5) & (splits == "train")).sum()) and len(sel.val) == 0
    assert len(sel.test) == 10_000
    assert int((~sel.test_is_anomaly).sum()) == int(((labels == 5) & (splits == "test")).sum())


def test_fashion_mnist_variant_merges_splits_into_60_20_20():
    labels = np.repeat(np.arange(10), 700)
    splits = np.array(["train", "test"] * 3500)
    sel = select(labels, splits, 2, "gradcon", seed=0, merge_splits=True)
    assert (len(sel.train), len(sel.val), len(sel.test)) == (420, 140, 280)
    assert int(sel.test_is_anomaly.sum()) == 140
    assert not set(sel.test) & (set(sel.train) | set(sel.val))


def test_bad_protocol_and_empty_class():
    labels, splits = np.array([0, 1]), np.array(["train", "test"])
    with pytest.raises(ValueError, match="unknown protocol"):
        select(labels, splits, 0, "leave-one-out")
    with pytest.raises(ValueError, match="no training rows"):
        select(labels, splits, 4)


def test_labeled_protocol_trains_on_normal_rows_and_tests_the_class_by_is_anomaly():
    labels = np.array([0] * 12 + [1] * 4 + [0] * 6)
    splits = np.array(["train"] * 16 + ["test"] * 6)
    is_anomaly = np.array([False] * 11 + [True] + [False] * 4 + [False, True] * 3)  # row 11: a labeled train defect
    sel = select(labels, splits, 0, "labeled", seed=0, is_anomaly=is_anomaly)
    assert sorted([*sel.train, *sel.val]) == list(range(11)) and len(sel.val) == 1  # 90/10, the defect left out
    assert list(sel.test) == list(range(16, 22)) and list(sel.test_is_anomaly) == [False, True] * 3
    assert list(sel.anomaly_pool) == [12, 13, 14, 15]  # other classes' train rows, for validation only
    with pytest.raises(ValueError, match="needs the image set's is_anomaly column"):
        select(labels, splits, 0, "labeled")
