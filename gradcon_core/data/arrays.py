"""Validation of user-supplied image arrays, with errors that name the problem."""
from __future__ import annotations

import numpy as np
import torch


def as_image_batch(x, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N,H,W] / [N,H,W,C] (0..255) or float [N,C,H,W] in [0,1] -> float32 tensor [N,C,H,W].

    Raises ValueError for anything else: empty input, wrong rank, dtype, size or channel count,
    NaN/inf or float values outside [0,1].
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"images must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.size == 0 or x.shape[0] == 0:
        raise ValueError(f"images are empty (shape {x.shape})")
    if x.dtype == np.uint8:
        batch = uint8_images(x).float().div_(255)
    elif x.dtype in (np.float32, np.float64, np.float16):
        if x.ndim != 4:
            raise ValueError(f"float images must have shape [N,C,H,W], got {x.shape}")
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
            raise ValueError(f"images contain NaN or inf values ({bad} image(s))")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise ValueError(f"images must be uint8 (0..255) or float (0..1), got dtype {x.dtype}")
    if batch.shape[1] != channels:
        raise ValueError(f"the model takes {channels}-channel images, got {batch.shape[1]} channel(s)")
    if tuple(batch.shape[2:]) != tuple(size):
        raise ValueError(
            f"the model takes {size[0]}x{size[1]} images, got {batch.shape[2]}x{batch.shape[3]} "
            "(decode_images resizes encoded images for you)"
        )
    return batch


def uint8_images(x: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,C] -> uint8 tensor [N,C,H,W] (what crosses to a GPU before it becomes floats)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"uint8 images must have shape [N,H,W] or [N,H,W,C], got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))
