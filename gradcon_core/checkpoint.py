"""Checkpoint directories (DESIGN section 6): model.safetensors + config.yaml, local or any fsspec URL.

The same directory is a ray.train.Checkpoint. No pickled objects anywhere: the tensors are
safetensors, the optional training state is a torch.save file that loads with weights_only=True.
"""
from __future__ import annotations

import hashlib
import io
import platform
from typing import Any

import fsspec
import numpy as np
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TRAINING_STATE_FILE = "training_state.pt"


def _fs(path: str):
    return fsspec.core.url_to_fs(str(path))


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        gradcon = version("gradcon")
    except PackageNotFoundError:
        gradcon = "source"
    return {"gradcon": gradcon, "torch": str(torch.__version__), "numpy": np.__version__,
            "python": platform.python_version()}


def save_checkpoint(
    path: str,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> None:
    fs, root = _fs(path)
    fs.makedirs(root, exist_ok=True)
    blobs = {
        WEIGHTS_FILE: save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
        CONFIG_FILE: yaml.safe_dump({**config, "versions": package_versions()}, sort_keys=False).encode(),
    }
    if training_state is not None:
        buf = io.BytesIO()
        torch.save(training_state, buf)
        blobs[TRAINING_STATE_FILE] = buf.getvalue()
    for name, data in blobs.items():
        with fs.open(f"{root}/{name}", "wb") as f:
            f.write(data)


def read_config(path: str) -> dict[str, Any]:
    fs, root = _fs(path)
    target = f"{root}/{CONFIG_FILE}"
    if not fs.exists(target):
        raise FileNotFoundError(f"{path} is not a gradcon checkpoint: no {CONFIG_FILE} in it")
    with fs.open(target, "rb") as f:
        return yaml.safe_load(f)


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config = read_config(path)
    fs, root = _fs(path)
    with fs.open(f"{root}/{WEIGHTS_FILE}", "rb") as f:
        return load_safetensors(f.read()), config


def load_training_state(path: str) -> dict[str, Any] | None:
    fs, root = _fs(path)
    target = f"{root}/{TRAINING_STATE_FILE}"
    if not fs.exists(target):
        return None
    with fs.open(target, "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


def checkpoint_id(path: str) -> str:
    """Content hash of the weights and config: names the model in result tables."""
    fs, root = _fs(path)
    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        with fs.open(f"{root}/{name}", "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def data_fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()[:16]
