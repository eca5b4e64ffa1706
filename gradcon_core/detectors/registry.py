"""Name -> class registry of detectors: @register_detector("gradcon"), create_detector("gradcon", ...).

Detectors of other packages are plug-ins: an installed package declares them under the entry-point group
`gradcon.detectors` (name = the detector's name, value = "module:Class"), and the registry imports one the
first time its name is asked for. A checkpoint names its detector by that name only, so loading a checkpoint
never imports a module the checkpoint names: only what an installed package declares.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from gradcon_core.models.registry import create_model

ENTRY_POINTS = "gradcon.detectors"
_DETECTORS: dict[str, type] = {}


def register_detector(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        _DETECTORS[name] = cls
        return cls

    return wrap


def detector_class(name: str) -> type:
    if name not in _DETECTORS:
        _load_plugin(name)
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered detectors: {list_detectors()}")
    return _DETECTORS[name]


def _load_plugin(name: str) -> None:
    """The detector an installed package declares under `name`, registered under that name."""
    for entry in entry_points(group=ENTRY_POINTS, name=name):
        try:
            cls = entry.load()
        except Exception as e:  # whatever the plug-in's import raises: say which plug-in
            raise ValueError(f"detector {name!r} (plug-in {entry.value}) does not load: {e}") from e
        if not isinstance(cls, type) or not hasattr(cls, "decision_function"):
            raise ValueError(f"plug-in {entry.value} for detector {name!r} is not a detector class")
        register_detector(name)(cls)
        return


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
    """Every detector by name: the registered ones and those installed packages declare (not yet loaded)."""
    return sorted(_DETECTORS.keys() | {entry.name for entry in entry_points(group=ENTRY_POINTS)})
