"""The contract every detector obeys (scikit-learn / PyOD style), and how a detector is saved and loaded.

Every detector:
- fit(x, epochs, batch_size, seed, x_val) -> self; decision_function(x) -> np.ndarray [N], higher = more
  anomalous; score_components(x) -> {"score", ...}; predict(x) -> 0/1 with threshold_;
  reconstruct(x) -> the images it reconstructs, or None;
- channels and input_size: what images it takes (the score job decodes to them);
- its settings: a typed dataclass (`Settings`, kw-only, defaults written once, checked in __post_init__),
  given to the constructor as keyword arguments and held as det.settings. Run-time choices (the device, the
  score batch size) are constructor arguments of their own, not settings: they are not saved;
- save(path) / load_detector(path).

Detectors with a trained network are also what the one training loop drives (training.loop.Trainable).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from gradcon_core.detectors.registry import detector_class
from gradcon_core.metrics import threshold_from_scores
from gradcon_core.models.registry import create_model
from gradcon_core.training import checkpoint

# What a training run records about itself, the same from fit() and from `gradcon train`.
FIT_INFO = ("epochs", "epoch", "batch_size", "seed", "data_fingerprint")


@dataclass(kw_only=True)
class Settings:
    """What every detector takes: where its threshold sits among normal images' scores."""

    threshold_percentile: float = 95.0

    def __post_init__(self) -> None:
        if not 0 <= self.threshold_percentile <= 100:
            raise ValueError(f"threshold_percentile must lie in [0, 100], got {self.threshold_percentile}")


class Detector:
    name: str = "detector"  # set by @register_detector
    default_model: str | None = None  # the registry network a fresh detector gets; None: no torch network
    Settings: type[Settings] = Settings
    threshold_: float | None = None

    def __init__(self, **settings: Any) -> None:
        self.settings = self.Settings(**settings)
        self.fit_info_: dict[str, Any] = {}

    # --- the contract -------------------------------------------------------------------------
    def fit(self, x, epochs: int = 10, batch_size: int = 64, seed: int = 0, x_val=None) -> Detector:
        raise NotImplementedError

    @property
    def channels(self) -> int:
        raise NotImplementedError

    @property
    def input_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def decision_function(self, x) -> np.ndarray:
        raise NotImplementedError

    def score_components(self, x) -> dict[str, np.ndarray]:
        """{"score", ...} per image; detectors with more than one part (GradCon's recon and grad) say so."""
        return {"score": self.decision_function(x)}

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

    def set_normal_threshold(self, scores: np.ndarray) -> float:
        """threshold_ at the settings' percentile of normal images' scores (what fit and `gradcon train` do)."""
        return self.set_threshold(scores=scores, percentile=self.settings.threshold_percentile)

    def predict(self, x) -> np.ndarray:
        """1 = anomaly (score above threshold_), 0 = normal."""
        if self.threshold_ is None:
            raise ValueError(f"{self.name} has no threshold_: call fit or set_threshold first")
        return (self.decision_function(x) > self.threshold_).astype(np.int64)

    # --- settings: one mechanism for every detector ---------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """The detector's settings: its Settings' fields."""
        return [f.name for f in dataclasses.fields(cls.Settings)]

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls.Settings)}

    def get_params(self) -> dict[str, Any]:
        return {n: _plain(getattr(self.settings, n)) for n in self.param_names()}

    # --- persistence ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Everything that rebuilds this detector with load_detector, beside its tensors."""
        model = getattr(self, "model", None)
        if model is not None and not hasattr(model, "spec"):
            raise ValueError("only models made by create_model can be saved (their spec rebuilds them)")
        network = {"model": dict(model.spec)} if model is not None else {}
        return {**network, "input_size": list(self.input_size), "in_channels": self.channels,
                **self.get_params(), **self.fit_info_}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Detector:
        params = {n: config[n] for n in cls.param_names() if n in config}
        det = cls(create_model(**config["model"]), **params) if cls.default_model else cls(**params)
        det.load_state_tensors(tensors)
        det.fit_info_ = {k: config[k] for k in FIT_INFO if k in config}
        return det

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


def _plain(value: Any) -> Any:
    """Settings as YAML writes them safely (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with prefix, with it removed (one module's state_dict)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_detector(path: str, filesystem: pafs.FileSystem | None = None) -> Detector:
    """Any registered detector from a checkpoint directory, or a run's folder (its best checkpoint): a local path,
    file:// or s3://."""
    path = checkpoint.locate(str(path), filesystem)
    tensors, config = checkpoint.load_checkpoint(path, filesystem)
    if "detector" not in config:
        raise checkpoint.CheckpointError(f"checkpoint {path}: config.yaml names no detector")
    try:
        det = detector_class(config["detector"]).from_state(config, tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a missing key, a bad setting, a wrong shape
        what = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:400]
        raise checkpoint.CheckpointError(f"checkpoint {path} does not rebuild its detector: {what}") from None
    det.threshold_ = config.get("threshold")
    return det
