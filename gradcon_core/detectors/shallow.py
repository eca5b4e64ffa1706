"""OCSVM and KDE (scikit-learn) on flattened pixels or on a trained CAE's encoder features.

scikit-learn fits them; the score is then rebuilt from the fitted numbers with NumPy in float64
(OCSVM: support vectors, dual coefficients, intercept, gamma; KDE: training points, bandwidth), so
a checkpoint holds tensors and no pickle, and a loaded detector gives identical scores.
Both scale quadratically with the training set: fit subsamples max_train images (seeded).
features="cae" first trains GradCon's CAE (the cae detector, same epochs/batch/seed) on the
training images and uses its encoder output (at 28x28: 64x3x3 = 576 features).

Distributed: not applicable; these fit in one process.

scikit-learn and SciPy are imported where they are used: gradcon_core loads every detector, and importing
scikit-learn costs seconds in each process that imports gradcon_core (every Ray Train worker among them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradcon_core.data.arrays import as_image_batch
from gradcon_core.data.sizes import ImageSize, as_hw
from gradcon_core.detectors.cae import CAEDetector
from gradcon_core.detectors.contract import Detector, Settings, with_prefix
from gradcon_core.detectors.registry import register_detector
from gradcon_core.models.registry import create_model
from gradcon_core.training.checkpoint import data_fingerprint

FEATURES = ("pixels", "cae")


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a_i - b_j||^2 for every pair, float64, clipped at 0 (rounding of the expansion)."""
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)


@dataclass(kw_only=True)
class ShallowSettings(Settings):
    in_channels: int = 1
    input_size: ImageSize | None = None  # None: 28x28; held as (height, width)
    features: str = "pixels"  # or "cae": a CAE's encoder output, the CAE trained first
    max_train: int = 2000  # training images fitted (a seeded subsample): both scale quadratically

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features not in FEATURES:
            raise ValueError(f"unknown features {self.features!r}; choose one of {FEATURES}")
        if self.max_train < 2:
            raise ValueError(f"need max_train >= 2, got {self.max_train}")
        self.input_size = as_hw(28 if self.input_size is None else self.input_size)


class ShallowDetector(Detector):
    Settings = ShallowSettings

    def __init__(self, *, device: str = "cpu", **settings):
        super().__init__(**settings)
        self.device = device  # the CAE's, for features="cae"
        self.encoder_: CAEDetector | None = None

    @property
    def channels(self) -> int:
        return self.settings.in_channels

    @property
    def input_size(self) -> tuple[int, int]:
        return self.settings.input_size

    def _features(self, x: torch.Tensor) -> np.ndarray:
        if self.settings.features == "pixels":
            return x.flatten(1).double().numpy()
        out = [self.encoder_.features(xb.to(self.encoder_.device)).cpu() for xb in x.split(256)]
        return torch.cat(out).double().numpy()

    def fit(self, x, epochs: int = 10, batch_size: int = 64, seed: int = 0, x_val=None) -> ShallowDetector:
        """Fit on normal images x (epochs, batch_size: the CAE's, for features="cae"); x_val sets the threshold."""
        x = as_image_batch(x, self.channels, self.input_size)
        xv = as_image_batch(x_val, self.channels, self.input_size) if x_val is not None else None
        if self.settings.features == "cae":
            torch.manual_seed(seed)
            self.encoder_ = self._new_encoder()
            self.encoder_.fit(x, epochs=epochs, batch_size=batch_size, seed=seed, x_val=xv)
        rows = np.random.default_rng(seed).permutation(len(x))[: self.settings.max_train]
        self.fit_features(self._features(x[np.sort(rows)]))
        self.fit_info_ = {"epochs": epochs, "epoch": epochs - 1, "batch_size": batch_size, "seed": seed,
                          "data_fingerprint": data_fingerprint(x)}
        self.set_normal_threshold(self.decision_function(xv if xv is not None else x))
        return self

    def decision_function(self, x) -> np.ndarray:
        x = as_image_batch(x, self.channels, self.input_size)
        feats = self._features(x)
        return np.concatenate([self.score_features(f) for f in np.array_split(feats, -(-len(feats) // 512))]
                              ).astype(np.float32)

    def _new_encoder(self) -> CAEDetector:
        model = create_model("gradcon_cae", in_channels=self.channels, image_size=self.input_size)
        return CAEDetector(model, device=self.device)

    # Subclasses: fit on and score a float64 feature matrix, and name the tensors that hold the fit.
    def fit_features(self, feats: np.ndarray) -> None:
        raise NotImplementedError

    def score_features(self, feats: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_fitted(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.fitted_tensors())
        if self.encoder_ is not None:
            tensors.update({f"encoder.{k}": v for k, v in self.encoder_.model.state_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.settings.features == "cae":
            self.encoder_ = self._new_encoder()
            self.encoder_.model.load_state_dict(with_prefix(tensors, "encoder."))
        self.load_fitted(tensors)


@dataclass(kw_only=True)
class OCSVMSettings(ShallowSettings):
    nu: float = 0.1
    gamma: float | None = None  # the RBF kernel's; None: scikit-learn's "scale"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.nu <= 1:
            raise ValueError(f"nu must lie in (0, 1], got {self.nu}")


@register_detector("ocsvm")
class OCSVMDetector(ShallowDetector):
    """One-class SVM, RBF kernel; score = -decision_function (gamma=None: scikit-learn's "scale")."""

    Settings = OCSVMSettings

    def fit_features(self, feats: np.ndarray) -> None:
        from sklearn.svm import OneClassSVM

        gamma = self.settings.gamma or 1.0 / (feats.shape[1] * feats.var())
        svm = OneClassSVM(kernel="rbf", nu=self.settings.nu, gamma=gamma).fit(feats)
        self.support_vectors_, self.dual_coef_ = svm.support_vectors_, svm.dual_coef_[0]
        self.intercept_, self.gamma_ = float(svm.intercept_[0]), float(gamma)

    def score_features(self, feats: np.ndarray) -> np.ndarray:
        kernel = np.exp(-self.gamma_ * squared_distances(feats, self.support_vectors_))
        return -(kernel @ self.dual_coef_ + self.intercept_)

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {"support_vectors": torch.from_numpy(self.support_vectors_),
                "dual_coef": torch.from_numpy(self.dual_coef_),
                "intercept": torch.tensor(self.intercept_, dtype=torch.float64),
                "gamma": torch.tensor(self.gamma_, dtype=torch.float64)}

    def load_fitted(self, tensors: dict[str, torch.Tensor]) -> None:
        self.support_vectors_, self.dual_coef_ = tensors["support_vectors"].numpy(), tensors["dual_coef"].numpy()
        self.intercept_, self.gamma_ = float(tensors["intercept"]), float(tensors["gamma"])


@dataclass(kw_only=True)
class KDESettings(ShallowSettings):
    bandwidth: float | None = None  # None: Scott's rule scaled by the features' mean standard deviation

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"need bandwidth > 0, got {self.bandwidth}")


@register_detector("kde")
class KDEDetector(ShallowDetector):
    """Gaussian kernel density; score = -log density. bandwidth=None: Scott's rule scaled by the data's
    mean feature standard deviation, sigma * n^(-1/(d+4)).

    The log density is a logsumexp over all training points: scikit-learn's tree evaluation
    underflows in hundreds of dimensions at such bandwidths (errors of thousands of nats on MNIST).
    """

    Settings = KDESettings

    def fit_features(self, feats: np.ndarray) -> None:
        from sklearn.neighbors import KernelDensity

        n, d = feats.shape
        h = self.settings.bandwidth or float(feats.std(0).mean()) * n ** (-1 / (d + 4))
        kde = KernelDensity(kernel="gaussian", bandwidth=h).fit(feats)
        self.points_, self.bandwidth_ = np.asarray(kde.tree_.data), float(kde.bandwidth_)

    def score_features(self, feats: np.ndarray) -> np.ndarray:
        from scipy.special import logsumexp

        n, d = self.points_.shape
        h = self.bandwidth_
        log_kernel = -squared_distances(feats, self.points_) / (2 * h * h)
        return -(logsumexp(log_kernel, axis=1) - np.log(n) - 0.5 * d * np.log(2 * np.pi * h * h))

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {"points": torch.from_numpy(self.points_),
                "bandwidth": torch.tensor(self.bandwidth_, dtype=torch.float64)}

    def load_fitted(self, tensors: dict[str, torch.Tensor]) -> None:
        self.points_, self.bandwidth_ = tensors["points"].numpy(), float(tensors["bandwidth"])
