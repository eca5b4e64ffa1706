"""How every job names and configures its detector: `detector=NAME params={...}`, the same in train, eval,
tune and demo.

A detector's settings are the fields of its Settings dataclass (Detector.param_names); their defaults are
written once, there. `params.NAME=VALUE` on a command line sets one of them. The short forms alpha=,
beta=, lr=, epsilon=, ... keep today's commands and configs/mnist.yaml working: left at None they mean
"the detector's default".

image_size and channels say what images the detector takes. Left at None, a job takes them from the image
set's recorded shape (gradcon prepare records it; gradcon_core/data/imageset.py), else the channels from the
set's first image and the size from the network's default (28x28 for every registered one), with a notice.
Images of another size are resized to it when decoded (gradcon_core/data/images.py); the checkpoint records both.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradcon_core.config import Config, bounded
from gradcon_core.data.images import channels_of
from gradcon_core.data.imageset import ImageShape
from gradcon_core.data.sizes import ImageSize, as_hw
from gradcon_core.detectors.contract import Detector
from gradcon_core.detectors.registry import create_detector, detector_class

SHORT_FORMS = ("alpha", "beta", "lr", "epsilon", "gamma", "attack_steps", "attack_refresh")


@dataclass
class DetectorSettings(Config):
    detector: str = "gradcon"  # any registered detector (gradcon_core.list_detectors())
    params: dict[str, Any] = field(default_factory=dict)  # its settings, e.g. {objective: soft-boundary, nu: 0.05}
    model: str | None = None  # its network from the model registry (e.g. arae_mlp); None: the detector's own
    image_size: list[int] | None = bounded(None, at_least=1)  # one side (64) or height,width (48,64); None: the data's
    channels: int | None = None  # 1 or 3; None: the data's
    # Short forms of params; None: the detector's default.
    alpha: float | None = None
    beta: float | None = None
    lr: float | None = None
    epsilon: float | None = None  # > 0: adversarially robust training (ARAE); alpha = beta = 0 is plain ARAE
    gamma: float | None = None
    attack_steps: int | None = None
    attack_refresh: str | None = None  # "batch", or "epoch" (the official ARAE schedule)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels is not None and self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        self.image_hw()  # a size no network takes fails here
        params = self.detector_params()
        try:  # the detector's own checks of its settings' values
            detector_class(self.detector).Settings(**params)
        except TypeError as e:  # a setting of the wrong kind
            raise ValueError(f"bad settings for detector {self.detector!r}: {e}") from None

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

    def build(self, channels: int, image_size: ImageSize | None = None,
              device: str | torch.device = "cpu") -> Detector:
        """The untrained detector these settings describe, for images of `channels` channels and image_size
        (None: the network's default)."""
        size = {} if image_size is None else {"image_size": as_hw(image_size)}
        try:
            return create_detector(self.detector, in_channels=channels, model=self.model, device=device,
                                   **size, **self.detector_params())
        except TypeError as e:  # a setting of the wrong kind
            raise ValueError(f"bad settings for detector {self.detector!r}: {e}") from None

    def image_hw(self) -> tuple[int, int] | None:
        """image_size as (height, width): [S] is S x S; None if not set."""
        if self.image_size is None:
            return None
        return as_hw(self.image_size[0] if len(self.image_size) == 1 else self.image_size)

    def image_shape(self, recorded: ImageShape | None, first_image: Callable[[], bytes | None]) -> ImageShape:
        """The shape the detector takes: these settings', else the set's `recorded` one, else the channels of
        its first image and the network's default size (said on stderr, once per call)."""
        if self.channels and recorded and self.channels != recorded.channels:
            raise ValueError(f"channels={self.channels}, but the image set's images have {recorded.channels} "
                             "(an image is never converted to another channel count: leave channels unset)")
        channels = self.channels or (recorded.channels if recorded else channels_of(first_image()))
        if self.image_size is not None:
            size = self.image_hw()
        elif recorded is not None:
            size = recorded.image_size
        else:
            size = self.build(channels).input_size
            print(f"note: the image set records no image size; the detector takes {size[0]}x{size[1]} (its "
                  "network's default) and every image is resized to it. Set image_size= to choose, or prepare "
                  "the set with image_size=.", file=sys.stderr)
        if recorded is not None and size != recorded.image_size:
            print(f"note: the image set's {recorded.image_size[0]}x{recorded.image_size[1]} images are resized "
                  f"to {size[0]}x{size[1]} (image_size={list(self.image_size)})", file=sys.stderr)
        return ImageShape(size, channels)
