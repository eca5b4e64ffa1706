"""Name -> class registry of detectors: @register_detector("gradcon"), create_detector("gradcon", ...)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradcon_core.models.registry import create_model

_DETECTORS: dict[str, type] = {}


def register_detector(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        _DETECTORS[name] = cls
        return cls

    return wrap


def detector_class(name: str) -> type:
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered detectors: {sorted(_DETECTORS)}")
    return _DETECTORS[name]


def create_detector(name: str, in_channels: int = 1, model: str | None = None,
                    model_kwargs: dict[str, Any] | None = None, image_size: Any = None, **params: Any):
    """A fresh detector by name with these settings, on the registry network `model` (default: the
    detector's `default_model`) for images of in_channels and image_size (an int, (height, width), or None:
    the network's default); detectors without a torch network take in_channels and input_size themselves."""
    cls = detector_class(name)
    if cls.default_model is None:
        if model is not None:
            raise ValueError(f"detector {name!r} has no network to choose (model={model!r})")
        size = {} if image_size is None else {"input_size": image_size}
        return cls(in_channels=in_channels, **size, **params)
    size = {} if image_size is None else {"image_size": image_size}
    return cls(create_model(model or cls.default_model, in_channels=in_channels, **size, **(model_kwargs or {})),
               **params)


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)
