"""A seeded, procedural anomaly set at any resolution: RGB textures with synthetic defects.

It exists to test the system at resolution (64 to 512 pixels, RGB, defects covering 0.5-5% of an
image) where no real inspection set can be downloaded. It is not a model of, and makes no claim
about, any real product line, material or inspection task: a good score here says the pipeline
works at that size, not that a detector will find real defects.

Normal images: four texture kinds, each a class (`label` = its index in CLASSES, `class_name` its
name), made from Gaussian random fields (white noise filtered in the Fourier domain, numpy only):
woven fabric (a plain weave of two-tone yarns), wood grain (warped growth rings and fibres),
brushed metal (long anisotropic streaks under uneven light) and carpet (tufts, clumps and rows).
Every image varies in colour, orientation and phase within its kind; structures scale with the
image, so a kind looks alike at every size.

Defects, made the way the literature's synthetic anomalies are (DRAEM's and CutPaste's families):
scratch (a thin curved line, lighter or darker), hole (a dark irregular blob with a frayed rim),
stain (a translucent irregular blob of a foreign tint), colour spot (a small opaque blob of a
saturated colour) and cut-paste (a rectangle of the same image moved, flipped and re-lit). Each
covers between MIN_AREA and MAX_AREA of the image, exactly: a defect's shape is the k pixels with
the highest value of a shape field, and it changes no pixel outside its mask.

Each image draws from its own generator seeded by (seed, class, split, normal or defective, index), so
an image does not depend on how many others are asked for, and the same arguments give the same PNG bytes (with the
same numpy; floating point in other builds may move a pixel by one level).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gradcon_core.data.images import encode_png
from gradcon_core.data.sizes import ImageSize, as_hw

CLASSES = ("fabric", "wood", "metal", "carpet")
DEFECT_TYPES = ("scratch", "hole", "stain", "color_spot", "cut_paste")
SPLITS = ("train", "test")
MIN_AREA, MAX_AREA = 0.005, 0.05  # fraction of the image a defect covers
SMALLEST = 32  # below this a 0.5% defect is a handful of pixels

SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("label", pa.int64()), ("split", pa.string()),
    ("class_name", pa.string()), ("is_anomaly", pa.bool_()), ("defect_type", pa.string()),
    ("mask", pa.binary()),  # PNG of the defect's pixels (255) for defective rows, null for normal ones
])


@dataclass(frozen=True)
class DefectCounts:
    """Images per class: normal training images, normal and defective test images."""

    train: int = 200
    test_normal: int = 40
    test_defective: int = 40  # spread evenly over DEFECT_TYPES

    def __post_init__(self):
        if min(self.train, self.test_normal, self.test_defective) < 0:
            raise ValueError(f"image counts must be >= 0, got {self}")


DEFAULT_COUNTS = DefectCounts()


# ---------------------------------------------------------------- noise and geometry


def field(rng: np.random.Generator, hw: tuple[int, int], along: float, across: float | None = None,
          angle: float = 0.0) -> np.ndarray:
    """A Gaussian random field, mean 0 and std 1, smooth over `along` pixels in direction `angle`
    (radians from the x axis) and `across` pixels perpendicular to it (isotropic when across is None).
    Periodic: it tiles, so no seam or border effect."""
    h, w = hw
    across = along if across is None else across
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f_along = fx * math.cos(angle) + fy * math.sin(angle)
    f_across = -fx * math.sin(angle) + fy * math.cos(angle)
    kernel = np.exp(-2 * math.pi ** 2 * ((f_along * along) ** 2 + (f_across * across) ** 2))  # a Gaussian blur
    out = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(hw)) * kernel, s=hw)
    return ((out - out.mean()) / (out.std() + 1e-12)).astype(np.float32)


def rotated_grid(hw: tuple[int, int], angle: float, offset: tuple[float, float] = (0.0, 0.0)):
    """Pixel coordinates (u, v) along and across direction `angle`, shifted by offset."""
    y, x = np.mgrid[0: hw[0], 0: hw[1]].astype(np.float32)
    u = x * math.cos(angle) + y * math.sin(angle) + offset[0]
    v = -x * math.sin(angle) + y * math.cos(angle) + offset[1]
    return u, v


def jitter(rng: np.random.Generator, color: tuple[float, float, float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


def blend(low: np.ndarray, high: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per pixel low + (high - low) * t, for colours low, high and a map t."""
    return low + (high - low) * t[..., None]


# ---------------------------------------------------------------- textures (float32 [H, W, 3] in [0, 1])


def fabric(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Plain weave: warp and weft yarns alternate on top; round yarn profiles, fibre noise along each yarn."""
    size = min(hw)
    period = max(3.0, size / rng.uniform(14, 18))
    angle = rng.uniform(-0.05, 0.05)
    u, v = rotated_grid(hw, angle, tuple(rng.uniform(0, 2 * period, 2)))
    a, b = u / period, v / period
    fa, fb = a - np.floor(a), b - np.floor(b)
    warp_on_top = (np.floor(a) + np.floor(b)) % 2 == 0
    warp = np.sin(np.pi * fa) ** 0.6 * (0.7 + 0.3 * np.sin(np.pi * fb))  # across the yarn, and its bulge
    weft = np.sin(np.pi * fb) ** 0.6 * (0.7 + 0.3 * np.sin(np.pi * fa))
    fibres_warp = field(rng, hw, 1.5 * period, 0.5, angle + math.pi / 2)
    fibres_weft = field(rng, hw, 1.5 * period, 0.5, angle)
    shade = np.where(warp_on_top, warp + 0.12 * fibres_warp, weft + 0.12 * fibres_weft)
    shade = shade + 0.05 * field(rng, hw, size / 6)  # uneven dye
    warp_color, weft_color = jitter(rng, (0.22, 0.32, 0.58), 0.04), jitter(rng, (0.62, 0.66, 0.78), 0.04)
    color = np.where(warp_on_top[..., None], warp_color, weft_color)
    return color * (0.3 + 0.7 * np.clip(shade, 0, 1.2))[..., None]


def wood(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Growth rings warped by smooth noise (dark late wood), with fine fibres along the grain."""
    size = min(hw)
    angle = rng.uniform(-0.15, 0.15)
    u, v = rotated_grid(hw, angle, tuple(rng.uniform(0, size, 2)))
    period = size / rng.uniform(6, 10)
    phase = v / period + 0.6 * field(rng, hw, 0.5 * size, 0.08 * size, angle) + 0.15 * field(rng, hw, 0.3 * size)
    ring = phase - np.floor(phase)
    late_wood = ring ** 3
    fibres = field(rng, hw, 0.15 * size, 0.6, angle)
    tone = np.clip(0.65 * late_wood + 0.1 * fibres + 0.06 * field(rng, hw, 0.05 * size) + 0.15, 0, 1)
    light, dark = jitter(rng, (0.78, 0.58, 0.36), 0.04), jitter(rng, (0.42, 0.26, 0.13), 0.03)
    return blend(light, dark, tone)


def metal(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Brushed metal: long thin streaks along one direction, fine grain, a soft light gradient."""
    size = min(hw)
    angle = rng.uniform(-0.08, 0.08)
    streaks = 0.6 * field(rng, hw, 0.6 * size, 0.5, angle) + 0.4 * field(rng, hw, 0.2 * size, 0.8, angle)
    u, _ = rotated_grid(hw, rng.uniform(0, 2 * math.pi))
    light = rng.uniform(-0.04, 0.04) * (u - u.mean()) / size + 0.02 * field(rng, hw, 0.4 * size)
    gray = rng.uniform(0.58, 0.64) + 0.05 * streaks + 0.012 * field(rng, hw, 0.7) + light
    return np.clip(gray, 0, 1)[..., None] * jitter(rng, (0.97, 0.99, 1.0), 0.01)


def carpet(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Cut-pile carpet: pixel-scale tufts, clumps of them, faint tufting rows, a deep dyed colour."""
    size = min(hw)
    _, v = rotated_grid(hw, rng.uniform(-0.05, 0.05), tuple(rng.uniform(0, size, 2)))
    tufts = np.tanh(2 * field(rng, hw, 0.7))
    clumps = field(rng, hw, size / 20)
    rows = np.sin(2 * np.pi * v / max(2.5, size / 24))
    shade = 0.6 + 0.16 * tufts + 0.12 * clumps + 0.05 * rows
    dye = jitter(rng, (0.55, 0.12, 0.16), 0.04)
    hue_drift = 1 + 0.06 * np.stack([field(rng, hw, size / 8) for _ in range(3)], axis=-1)
    return np.clip(shade[..., None] * dye * hue_drift, 0, 1)


TEXTURES = {"fabric": fabric, "wood": wood, "metal": metal, "carpet": carpet}
assert tuple(TEXTURES) == CLASSES


# ---------------------------------------------------------------- defects: (image, mask) -> changed inside mask only


def top_pixels(score: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of exactly the k pixels with the highest score."""
    mask = np.zeros(score.size, bool)
    mask[np.argpartition(-score.ravel(), k - 1)[:k]] = True
    return mask.reshape(score.shape)


def blob(rng: np.random.Generator, hw: tuple[int, int], k: int, roughness: float) -> np.ndarray:
    """A compact irregular blob of exactly k pixels somewhere inside the image."""
    radius = math.sqrt(k / math.pi)
    margin = min(radius + 2, min(hw) / 2 - 1)
    cy, cx = rng.uniform(margin, hw[0] - margin), rng.uniform(margin, hw[1] - margin)
    y, x = np.mgrid[0: hw[0], 0: hw[1]].astype(np.float32)
    stretch = rng.uniform(0.6, 1.0)  # a little elliptic, at a random angle
    theta = rng.uniform(0, math.pi)
    du = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
    dv = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
    distance = np.sqrt((du * stretch) ** 2 + (dv / stretch) ** 2) / radius
    return top_pixels(-distance + roughness * field(rng, hw, max(1.0, radius / 2)), k)


def segment_distance(y: np.ndarray, x: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance of every pixel (y, x) to the segment p-q (points as (y, x))."""
    d = q - p
    t = np.clip(((y - p[0]) * d[0] + (x - p[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    return np.hypot(y - p[0] - t * d[0], x - p[1] - t * d[1])


def scratch_mask(rng: np.random.Generator, hw: tuple[int, int], k: int) -> np.ndarray:
    """A thin curved line (a quadratic Bezier curve as 12 segments) of exactly k pixels, 1-3 pixels wide."""
    length = min(k / rng.uniform(1.0, 2.5), 0.8 * min(hw))
    start = rng.uniform(0.1, 0.9, 2) * hw
    direction = rng.uniform(0, 2 * math.pi)
    end = start + length * np.array([math.sin(direction), math.cos(direction)])
    end = np.clip(end, 1, np.array(hw) - 2)
    bend = (end - start)[::-1] * np.array([-1, 1]) * rng.uniform(-0.3, 0.3)  # perpendicular bow
    control = (start + end) / 2 + bend
    t = np.linspace(0, 1, 13)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end
    # Distances only near the curve (far enough for k pixels whatever its length); -inf elsewhere.
    reach = 2 + k / max(float(np.linalg.norm(np.diff(curve, axis=0), axis=1).sum()), 1.0)
    lo = np.maximum(np.floor(curve.min(0) - reach), 0).astype(int)
    hi = np.minimum(np.ceil(curve.max(0) + reach) + 1, hw).astype(int)
    y, x = np.mgrid[lo[0]: hi[0], lo[1]: hi[1]].astype(np.float32)
    score = np.full(hw, -np.inf, np.float32)
    near = -np.min([segment_distance(y, x, p, q) for p, q in zip(curve, curve[1:])], axis=0)
    score[lo[0]: hi[0], lo[1]: hi[1]] = near + 0.2 * field(rng, hw, 1.0)[lo[0]: hi[0], lo[1]: hi[1]]
    return top_pixels(score, k)


def scratch(rng, image, k):
    mask = scratch_mask(rng, image.shape[:2], k)
    tone = rng.uniform(0.85, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.15)
    alpha = rng.uniform(0.6, 0.9)
    image[mask] = image[mask] * (1 - alpha) + tone * alpha
    return mask


def erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of mask whose four neighbours are all in mask."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def hole(rng, image, k):
    mask = blob(rng, image.shape[:2], k, roughness=0.25)
    rim = mask & ~erode(mask)
    edge = image[rim] * rng.uniform(0.35, 0.55)  # a frayed edge: the material, darkened
    depth = rng.uniform(0.02, 0.1) + 0.03 * field(rng, image.shape[:2], 1.5)
    image[mask] = np.clip(depth[mask], 0, 1)[:, None]
    image[rim] = edge
    return mask


def stain(rng, image, k):
    hw = image.shape[:2]
    mask = blob(rng, hw, k, roughness=0.5)
    # Oil, rust, yellowing or bleach: one that shows on this material (far from its mean colour).
    tints = np.array([(0.08, 0.08, 0.08), (0.45, 0.22, 0.08), (0.85, 0.75, 0.25), (0.92, 0.9, 0.85)], np.float32)
    visible = tints[np.linalg.norm(tints - image[mask].mean(0), axis=1) > 0.35]
    tint = visible[rng.integers(len(visible))]
    strength = np.clip(0.7 + 0.2 * field(rng, hw, 2.0), 0.3, 1)[mask] * rng.uniform(0.45, 0.75)
    image[mask] = image[mask] * (1 - strength[:, None]) + tint * strength[:, None]
    return mask


def color_spot(rng, image, k):
    mask = blob(rng, image.shape[:2], k, roughness=0.15)
    hue = rng.uniform(0, 1)
    color = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1).astype(np.float32)  # HSV, S=V=1
    alpha = rng.uniform(0.75, 0.95)
    image[mask] = image[mask] * (1 - alpha) + color * alpha
    return mask


def cut_paste(rng, image, k):
    """CutPaste (Li et al. 2021): a rectangle of the image, flipped and re-lit, pasted elsewhere."""
    hw = image.shape[:2]
    lo, hi = math.ceil(MIN_AREA * hw[0] * hw[1]), math.floor(MAX_AREA * hw[0] * hw[1])
    aspect = math.exp(rng.uniform(-1.0, 1.0))
    h = min(max(1, round(math.sqrt(k * aspect))), hw[0] // 2)
    w = min(max(1, round(k / h)), hw[1] // 2)
    while h * w < lo:
        h, w = (h + 1, w) if h < hw[0] // 2 else (h, w + 1)
    while h * w > hi:
        h, w = (h - 1, w) if h > w else (h, w - 1)
    src = rng.integers(0, hw[0] - h + 1), rng.integers(0, hw[1] - w + 1)
    dst = src
    while abs(dst[0] - src[0]) < h / 2 and abs(dst[1] - src[1]) < w / 2:  # somewhere else
        dst = rng.integers(0, hw[0] - h + 1), rng.integers(0, hw[1] - w + 1)
    patch = image[src[0]: src[0] + h, src[1]: src[1] + w].copy()
    patch = patch[::-1] if rng.random() < 0.5 else patch[:, ::-1]
    patch = np.clip(patch * (1 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.3)), 0, 1)  # re-lit: brighter or darker
    image[dst[0]: dst[0] + h, dst[1]: dst[1] + w] = patch
    mask = np.zeros(hw, bool)
    mask[dst[0]: dst[0] + h, dst[1]: dst[1] + w] = True
    return mask


DEFECTS = {"scratch": scratch, "hole": hole, "stain": stain, "color_spot": color_spot, "cut_paste": cut_paste}
assert tuple(DEFECTS) == DEFECT_TYPES


# ---------------------------------------------------------------- images and tables


def image_rng(seed: int, class_name: str, split: str, index: int, defective: bool = False) -> np.random.Generator:
    """The generator of one image: the index-th normal (or defective) image of a class and split."""
    return np.random.default_rng([seed, CLASSES.index(class_name), SPLITS.index(split), int(defective), index])


def render(class_name: str, defect_type: str | None, hw: tuple[int, int], rng: np.random.Generator):
    """(clean uint8 [H,W,3], shown uint8 [H,W,3], mask bool [H,W] or None): the texture, and with a defect."""
    clean = np.clip(TEXTURES[class_name](rng, hw), 0, 1)
    if defect_type is None:
        pixels = np.round(clean * 255).astype(np.uint8)
        return pixels, pixels, None
    lo, hi = math.ceil(MIN_AREA * hw[0] * hw[1]), math.floor(MAX_AREA * hw[0] * hw[1])
    k = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))  # log-uniform: small defects as often as big
    shown = clean.copy()
    mask = DEFECTS[defect_type](rng, shown, k)
    return np.round(clean * 255).astype(np.uint8), np.round(np.clip(shown, 0, 1) * 255).astype(np.uint8), mask


def defect_tables(
    image_size: ImageSize = 128,
    seed: int = 0,
    counts: DefectCounts = DEFAULT_COUNTS,
    classes: tuple[str, ...] = CLASSES,
    defect_types: tuple[str, ...] = DEFECT_TYPES,
    rows_per_table: int = 512,
) -> Iterator[pa.Table]:
    """The set as pyarrow tables (SCHEMA): per class, counts.train normal "train" rows, then "test" rows,
    counts.test_normal normal ones and counts.test_defective defective ones (defect_types in turn)."""
    hw = as_hw(image_size, smallest=SMALLEST)
    for given, known in ((classes, CLASSES), (defect_types, DEFECT_TYPES)):
        unknown = [c for c in given if c not in known]
        if unknown or not given:
            raise ValueError(f"unknown or no texture class / defect type: {list(given)}; choose from {known}")
    rows: list[dict] = []
    for class_name in classes:
        plan = [("train", i, None) for i in range(counts.train)]
        plan += [("test", i, None) for i in range(counts.test_normal)]
        plan += [("test", i, defect_types[i % len(defect_types)]) for i in range(counts.test_defective)]
        for split, index, defect_type in plan:
            defective = defect_type is not None
            rng = image_rng(seed, class_name, split, index, defective)
            _, pixels, mask = render(class_name, defect_type, hw, rng)
            rows.append({
                "id": f"{class_name}-{split}-{'defect-' if defective else ''}{index:05d}", "image": encode_png(pixels),
                "label": CLASSES.index(class_name), "split": split, "class_name": class_name,
                "is_anomaly": defective, "defect_type": defect_type,
                "mask": None if mask is None else encode_png(mask.astype(np.uint8) * 255),
            })
            if len(rows) == rows_per_table:
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=SCHEMA)
