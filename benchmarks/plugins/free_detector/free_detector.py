"""A detector whose score costs nothing: every image scores 0. What the score job does around it is the
pipeline's own cost (read, decode, result rows, write), which bounds the job whatever the model."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradcon_core.detectors.contract import Detector, Settings


@dataclass(kw_only=True)
class FreeSettings(Settings):
    in_channels: int = 1
    input_size: list[int] | None = None  # (height, width); None: 28x28

    def __post_init__(self) -> None:
        super().__post_init__()
        self.input_size = list(self.input_size or (28, 28))


class FreeDetector(Detector):
    Settings = FreeSettings

    def __init__(self, *, device: str = "cpu", **settings):
        super().__init__(**settings)

    @property
    def channels(self) -> int:
        return self.settings.in_channels

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.settings.input_size)

    def fit(self, x, epochs: int = 1, batch_size: int = 64, seed: int = 0, x_val=None) -> FreeDetector:
        self.threshold_ = 0.5
        return self

    def decision_function(self, x) -> np.ndarray:
        return np.zeros(len(x), np.float32)

    def score_components(self, x) -> dict[str, np.ndarray]:
        zeros = np.zeros(len(x), np.float32)
        return {"score": zeros, "recon_error": zeros}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"nothing": torch.zeros(1)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
