"""One-class protocols (docs/design.md §8): which rows train, validate and test a normal class.

A Selection holds row numbers into the image set (never copies of the images), made from the
`label` and `split` columns alone, with a seeded generator, so it can be recorded and rebuilt.
- "gradcon" (MNIST, CIFAR-10): 90/10 train/val of class c's train rows; test = all test rows of
  c plus as many test rows of other classes, drawn at random (balanced).
- "gradcon" for Fashion-MNIST: train+test merged; per class 5 folds of count//5 rows: folds 0-2
  train, 3 val, 4 test; the test adds as many rows drawn from the other classes' fold 4.
- "full" (ARAE, Deep SVDD papers): train on every train row of c, no validation, test = the
  whole test split.
- "labeled" (sets whose anomalies are labeled within a class, as the defects set or a real inspection
  set: an `is_anomaly` column): 90/10 train/val of class c's normal train rows; test = class c's test
  rows, anomalous where is_anomaly says so.
Validation anomalies (for tuning on AUROC) come only from `anomaly_pool`: other classes' rows that
no protocol puts in a test set, so tuning never sees a test image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PROTOCOLS = ("gradcon", "full", "labeled")


@dataclass
class Selection:
    normal_class: int
    protocol: str
    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_is_anomaly: np.ndarray
    anomaly_pool: np.ndarray

    def validation_anomalies(self, count: int) -> np.ndarray:
        """`count` rows of other classes, outside every test set, drawn reproducibly from the seed."""
        rng = np.random.default_rng([self.seed, self.normal_class, 1])
        return np.sort(rng.permutation(self.anomaly_pool)[:count])

    def summary(self) -> dict:
        """What to record next to results: sizes and the recipe, not the row lists."""
        d = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}
        d.update(train=len(self.train), val=len(self.val), test=len(self.test),
                 test_anomalies=int(self.test_is_anomaly.sum()))
        return d


def _finish(c, protocol, seed, train, val, test, labels, anomaly_pool, is_anomaly=None) -> Selection:
    if len(train) == 0:
        raise ValueError(f"class {c} has no training rows: is {c} a label of this image set?")
    test = np.asarray(test, dtype=np.int64)
    test_is_anomaly = labels[test] != c if is_anomaly is None else is_anomaly[test]
    return Selection(c, protocol, seed, np.sort(train), np.sort(val), test, test_is_anomaly,
                     np.sort(np.asarray(anomaly_pool, dtype=np.int64)))


def columns_for(protocol: str) -> list[str]:
    """The image set's columns a protocol selects rows by."""
    return ["label", "split", "is_anomaly"] if protocol == "labeled" else ["label", "split"]


def labeled_anomalies(meta) -> np.ndarray | None:
    """The is_anomaly column of a table read with columns_for(...), as booleans (None where it was not read)."""
    if "is_anomaly" not in meta.column_names:
        return None
    return meta.column("is_anomaly").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def select(
    labels: np.ndarray, splits: np.ndarray, normal_class: int, protocol: str = "gradcon", seed: int = 0,
    merge_splits: bool = False, is_anomaly: np.ndarray | None = None,
) -> Selection:
    """Rows for one normal class. merge_splits=True is the Fashion-MNIST variant of "gradcon"; is_anomaly
    (the set's column of that name) is what the "labeled" protocol needs."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    labels, splits = np.asarray(labels), np.asarray(splits).astype(str)
    rng = np.random.default_rng([seed, normal_class])
    is_c = labels == normal_class
    is_train, is_test = splits == "train", splits == "test"
    if protocol == "labeled":
        if is_anomaly is None:
            raise ValueError("the labeled protocol needs the image set's is_anomaly column")
        is_anomaly = np.asarray(is_anomaly, dtype=bool)
        rows = rng.permutation(np.flatnonzero(is_c & is_train & ~is_anomaly))
        n_val = len(rows) // 10
        return _finish(normal_class, protocol, seed, rows[n_val:], rows[:n_val], np.flatnonzero(is_c & is_test),
                       labels, np.flatnonzero(~is_c & is_train), is_anomaly)
    if protocol == "full":
        return _finish(normal_class, protocol, seed, np.flatnonzero(is_c & is_train), np.array([], np.int64),
                       np.flatnonzero(is_test), labels, np.flatnonzero(~is_c & is_train))
    if merge_splits:
        fold4 = {}
        parts = {}
        for cls in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == cls))
            k = len(rows) // 5
            parts[cls] = (rows[: 3 * k], rows[3 * k: 4 * k])
            fold4[cls] = rows[4 * k: 5 * k]
        if normal_class not in parts:
            raise ValueError(f"class {normal_class} has no rows in this image set")
        train, val = parts[normal_class]
        normal_test = fold4[normal_class]
        other_pool = np.concatenate([v for cls, v in fold4.items() if cls != normal_class])
        anomaly_pool = np.concatenate([np.concatenate(v) for cls, v in parts.items() if cls != normal_class])
    else:
        rows = rng.permutation(np.flatnonzero(is_c & is_train))
        n_val = len(rows) // 10
        val, train = rows[:n_val], rows[n_val:]
        normal_test = np.flatnonzero(is_c & is_test)
        other_pool = np.flatnonzero(~is_c & is_test)
        anomaly_pool = np.flatnonzero(~is_c & is_train)
    others = rng.permutation(other_pool)[: len(normal_test)]
    return _finish(normal_class, protocol, seed, train, val, np.concatenate([np.sort(normal_test), np.sort(others)]),
                   labels, anomaly_pool)
