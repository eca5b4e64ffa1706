"""How every job names and configures its detector: `detector=NAME params={...}`, the same in train, eval,
tune and demo.

A detector's settings are its constructor's keyword arguments (Detector.param_names); their defaults are
written once, there. `params.NAME=VALUE` on a command line sets one of them. The short forms alpha=,
beta=, lr=, epsilon=, ... keep today's commands and configs/mnist.yaml working: left at None they mean
"the detector's default".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gradcon_core.detector import Detector
from gradcon_core.registry import create_detector, detector_class

SHORT_FORMS = ("alpha", "beta", "lr", "epsilon", "gamma", "attack_steps", "attack_refresh")


@dataclass
class DetectorSettings:
    detector: str = "gradcon"  # any registered detector (gradcon_core.list_detectors())
    params: dict[str, Any] = field(default_factory=dict)  # its settings, e.g. {objective: soft-boundary, nu: 0.05}
    model: str | None = None  # its network from the model registry (e.g. arae_mlp); None: the detector's own
    # Short forms of params; None: the detector's default.
    alpha: float | None = None
    beta: float | None = None
    lr: float | None = None
    epsilon: float | None = None  # > 0: adversarially robust training (ARAE); alpha = beta = 0 is plain ARAE
    gamma: float | None = None
    attack_steps: int | None = None
    attack_refresh: str | None = None  # "batch", or "epoch" (the official ARAE schedule)

    def detector_params(self) -> dict[str, Any]:
        """The detector's settings given here (short forms and params), checked against its constructor."""
        cls = detector_class(self.detector)  # an unknown name fails here, listing the registered ones
        short = {k: getattr(self, k) for k in SHORT_FORMS if getattr(self, k) is not None}
        twice = sorted(short.keys() & self.params.keys())
        if twice:
            raise ValueError(f"{twice} given both on their own and in params: give each once")
        params = {**short, **self.params}
        unknown = sorted(set(params) - set(cls.param_names()))
        if unknown:
            raise ValueError(f"detector {self.detector!r} has no setting(s) {unknown}; its settings are "
                             f"{cls.param_names()}")
        return params

    def build(self, channels: int, device: str | torch.device = "cpu") -> Detector:
        """The untrained detector these settings describe, for images of `channels` channels."""
        try:
            return create_detector(self.detector, in_channels=channels, model=self.model, device=device,
                                   **self.detector_params())
        except TypeError as e:  # a setting of the wrong kind
            raise ValueError(f"bad settings for detector {self.detector!r}: {e}") from None
