"""Checkpoint directories (docs/design.md §7): model.safetensors + config.yaml, local, file:// or s3://.

The same directory is a ray.train.Checkpoint. No pickled objects anywhere: the tensors are
safetensors, the optional training state is a torch.save file that loads with weights_only=True.
"""
from __future__ import annotations

import hashlib
import io
import math
import platform
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from gradcon_core.files import exists, read_bytes, resolve, write_bytes

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TRAINING_STATE_FILE = "training_state.pt"
BEST_POINTER = "best_checkpoint"  # in a run's folder: the URI of its best checkpoint (gradcon train writes it)


class CheckpointError(ValueError):
    """A checkpoint that cannot be what it claims to be; the message names it and what is wrong."""


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
    filesystem: pafs.FileSystem | None = None,
) -> None:
    fs, root = resolve(path, filesystem)
    blobs = {
        WEIGHTS_FILE: save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
        CONFIG_FILE: yaml.safe_dump({**config, "versions": package_versions()}, sort_keys=False).encode(),
    }
    if training_state is not None:
        buf = io.BytesIO()
        torch.save(training_state, buf)
        blobs[TRAINING_STATE_FILE] = buf.getvalue()
    for name, data in blobs.items():
        write_bytes(fs, f"{root}/{name}", data)


def locate(path: str, filesystem: pafs.FileSystem | None = None) -> str:
    """The checkpoint a user names, as they hold it: a run's folder, or the best_checkpoint file in it, stands for
    the checkpoint that file points to; anything else is itself."""
    fs, root = resolve(path, filesystem)
    pointer = root if root.endswith(f"/{BEST_POINTER}") else f"{root}/{BEST_POINTER}"
    if fs.get_file_info(pointer).type == pafs.FileType.File:
        return read_bytes(fs, pointer).decode().strip()
    return path


def read_config(path: str, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """The checkpoint's config.yaml as a mapping (safe YAML: plain values only, no tags, no objects)."""
    fs, root = resolve(path, filesystem)
    if not exists(fs, f"{root}/{CONFIG_FILE}"):
        raise FileNotFoundError(f"{path} is not a gradcon checkpoint: no {CONFIG_FILE} in it")
    try:
        config = yaml.safe_load(read_bytes(fs, f"{root}/{CONFIG_FILE}"))
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} is not plain YAML ({e})".replace("\n", " ")) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} must be a mapping, got {type(config).__name__}")
    threshold = config.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise CheckpointError(f"checkpoint {path}: threshold must be a finite number or null, got {threshold!r}")
    return config


def load_checkpoint(
    path: str, filesystem: pafs.FileSystem | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config), checked: readable safetensors, finite values."""
    config = read_config(path, filesystem)
    fs, root = resolve(path, filesystem)
    if not exists(fs, f"{root}/{WEIGHTS_FILE}"):
        raise CheckpointError(f"checkpoint {path}: no {WEIGHTS_FILE}")
    try:
        tensors = load_safetensors(read_bytes(fs, f"{root}/{WEIGHTS_FILE}"))
    except Exception as e:  # safetensors raises its own error types on malformed bytes
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS_FILE} is not readable safetensors ({e})") from None
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise CheckpointError(f"checkpoint {path}: non-finite values (nan or inf) in {bad[:5]}")
    return tensors, config


def load_training_state(path: str, filesystem: pafs.FileSystem | None = None) -> dict[str, Any] | None:
    fs, root = resolve(path, filesystem)
    if not exists(fs, f"{root}/{TRAINING_STATE_FILE}"):
        return None
    return torch.load(io.BytesIO(read_bytes(fs, f"{root}/{TRAINING_STATE_FILE}")), weights_only=True)


def checkpoint_id(path: str, filesystem: pafs.FileSystem | None = None) -> str:
    """Content hash of the weights and config: names the model in result tables."""
    fs, root = resolve(path, filesystem)
    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        h.update(read_bytes(fs, f"{root}/{name}"))
    return h.hexdigest()[:16]


def data_fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()[:16]
