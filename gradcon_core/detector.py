"""The one contract every detector obeys (scikit-learn / PyOD style).

fit(x) -> self; decision_function(x) -> np.ndarray [N], higher = more anomalous;
predict(x) -> 0/1 with threshold_; save(path) / load_detector(path) for any registered detector.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from gradcon_core import checkpoint
from gradcon_core.metrics import threshold_from_scores
from gradcon_core.registry import detector_class


class Detector:
    name: str = "detector"  # set by @register_detector
    threshold_: float | None = None

    def fit(self, x, **kwargs) -> Detector:
        raise NotImplementedError

    # What the score job decodes images to, for every detector (with or without a torch model).
    @property
    def channels(self) -> int:
        raise NotImplementedError

    @property
    def input_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def decision_function(self, x) -> np.ndarray:
        raise NotImplementedError

    def reconstruct(self, x) -> np.ndarray | None:
        """The detector's reconstruction of images x: float32 [N,C,H,W] in [0,1], or None for a detector
        that does not reconstruct (the report then shows the images without reconstruction and error map)."""
        return None

    def set_threshold(
        self, x=None, *, scores=None, contamination: float | None = None, percentile: float | None = None
    ) -> float:
        """threshold_ from normal-only data (percentile) or mixed data (contamination), given images or scores."""
        if scores is None:
            if x is None:
                raise ValueError("set_threshold needs images x or precomputed scores")
            scores = self.decision_function(x)
        self.threshold_ = threshold_from_scores(scores, contamination=contamination, percentile=percentile)
        return self.threshold_

    def predict(self, x) -> np.ndarray:
        """1 = anomaly (score above threshold_), 0 = normal."""
        if self.threshold_ is None:
            raise ValueError(f"{self.name} has no threshold_: call fit or set_threshold first")
        return (self.decision_function(x) > self.threshold_).astype(np.int64)

    # Persistence: a subclass says what its tensors and config are and how to rebuild itself.
    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Detector:
        raise NotImplementedError

    def save(
        self, path: str, training_state: dict[str, Any] | None = None, filesystem: pafs.FileSystem | None = None
    ) -> str:
        config = {"detector": self.name, **self.config(), "threshold": self.threshold_}
        checkpoint.save_checkpoint(str(path), self.state_tensors(), config, training_state, filesystem)
        return str(path)

    @classmethod
    def load(cls, path: str) -> Detector:
        det = load_detector(path)
        if not isinstance(det, cls):
            raise ValueError(f"{path} holds a {det.name!r} detector, not {cls.name!r}")
        return det


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with prefix, with it removed (one module's state_dict)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_detector(path: str, filesystem: pafs.FileSystem | None = None) -> Detector:
    """Any registered detector from a checkpoint directory (local path, file:// or s3://)."""
    tensors, config = checkpoint.load_checkpoint(str(path), filesystem)
    det = detector_class(config["detector"]).from_state(config, tensors)
    det.threshold_ = config.get("threshold")
    return det
