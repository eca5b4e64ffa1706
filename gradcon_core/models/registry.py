"""Name -> constructor registry of networks (timm-style): create_model("gradcon_cae", in_channels=3)."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def create_model(name: str, **kwargs: Any) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_MODELS)}")
    args = inspect.signature(_MODELS[name]).bind(**kwargs)
    args.apply_defaults()
    model = _MODELS[name](**args.arguments)
    # How to build it again, written into checkpoints as YAML (which has lists, not tuples: image_size=(H, W)).
    model.spec = {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in args.arguments.items()}}
    return model


def list_models() -> list[str]:
    return sorted(_MODELS)
