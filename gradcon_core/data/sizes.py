"""Image sizes as the networks take them: an int for a square image, else (height, width)."""
from __future__ import annotations

import operator
from collections.abc import Sequence

ImageSize = int | Sequence[int]


def as_hw(image_size: ImageSize, smallest: int = 1) -> tuple[int, int]:
    """(height, width) of an image size; ValueError unless both are integers >= smallest."""
    try:
        hw = (operator.index(image_size),) * 2 if not isinstance(image_size, Sequence) else \
            tuple(operator.index(s) for s in image_size)
    except TypeError:
        hw = ()
    if len(hw) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    if min(hw) < smallest:
        raise ValueError(f"this network needs images of at least {smallest}x{smallest} pixels, got {hw}")
    return hw
