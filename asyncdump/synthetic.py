"""The built-in procedural generator: coloured shapes on textured backgrounds.

Every image is a pure function of ``(seed, index)``: per-image parameters come from a
counter-based hash (splitmix64 of seed, index and a field number, in numpy), and the batch is
rendered with integer-only torch operations (comparisons, integer products, ``where``), which
give the same result whatever the batch composition, thread count or device.

Metadata per image: ``label`` (class of the first, largest shape), ``label_name``, and
``objects``: one ``{"class", "box": [x0, y0, x1, y1]}`` per shape (pixels, x1/y1 exclusive).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CLASSES = ("circle", "square", "triangle")
TEXTURES = ("stripes", "checker", "noise", "plain")
MAX_SHAPES = 3
MAX_SIZE = 16384  # keeps every integer product below 2**31
GENERATOR_ID = "asyncdump.synthetic/1"

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _M64


def parameters(seed: int, indices: Sequence[int], fields: int) -> np.ndarray:
    """``(len(indices), fields)`` uint64 draws that depend only on (seed, index, field)."""
    idx = np.asarray(indices, dtype=np.uint64)[:, None]
    key = _splitmix64(np.full_like(idx, np.uint64(seed % 2**64)))
    with np.errstate(over="ignore"):
        counters = _splitmix64(key ^ idx) + np.arange(fields, dtype=np.uint64)[None, :]
    return _splitmix64(counters)


def default_batch_size(size: int) -> int:
    """About 2 MPixel per batch, 1..256 images."""
    return max(1, min(256, (1 << 21) // (size * size)))


def render(indices: Sequence[int], *, seed: int, size: int,
           device: Any = "cpu") -> tuple[Any, list[dict[str, Any]]]:
    """A ``(B, 3, size, size)`` uint8 RGB tensor and one metadata dict per image."""
    import torch

    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"size must be in 1..{MAX_SIZE}, got {size}")
    count = len(indices)
    draws = parameters(seed, indices, 12 + 6 * MAX_SHAPES)

    def pick(column: int, lo: int, hi: int) -> np.ndarray:  # uniform ints in lo..hi
        return lo + (draws[:, column] % np.uint64(hi - lo + 1)).astype(np.int64)

    colours = np.stack([pick(c, 0, 255) for c in range(6)], 1).reshape(count, 2, 3)
    texture = pick(6, 0, len(TEXTURES) - 1)
    period = pick(7, 2, max(2, size // 4))
    slope = pick(8, -2, 2)
    noise_key = pick(9, 0, 250)
    shapes = pick(10, 1, MAX_SHAPES)

    def col(values: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32)).to(device)

    yy = torch.arange(size, dtype=torch.int32, device=device).view(1, 1, size, 1)
    xx = torch.arange(size, dtype=torch.int32, device=device).view(1, 1, 1, size)
    b4 = (count, 1, 1, 1)
    p = col(period).view(b4)
    kind = col(texture).view(b4)
    stripes = torch.div(xx + col(slope).view(b4) * yy, p, rounding_mode="floor") % 2
    checker = (torch.div(xx, p, rounding_mode="floor") + torch.div(yy, p, rounding_mode="floor")) % 2
    noise = ((xx % 1021) * (xx % 1021) * 31 + (yy % 1021) * (yy % 1021) * 17
             + (xx % 1021) * (yy % 1021) * 7 + col(noise_key).view(b4)) % 251
    second = torch.where(kind == 0, stripes, torch.where(kind == 1, checker, 0))
    base = col(colours).view(count, 2, 3, 1, 1).to(torch.int16)
    image = torch.where(second.bool(), base[:, 1], base[:, 0])  # (B, 3, H, W), int16: less traffic
    image += torch.where(kind == 2, noise % 49 - 24, 0).to(torch.int16)
    image = image.clamp_(0, 255).to(torch.uint8)

    metadata: list[dict[str, Any]] = [{"objects": []} for _ in range(count)]
    lo_r, hi_r = max(1, size // 10), max(1, size // 4)
    for k in range(MAX_SHAPES):
        first = 11 + 6 * k
        cls = pick(first, 0, len(CLASSES) - 1)
        radius = pick(first + 1, lo_r, hi_r) if k == 0 else pick(first + 1, lo_r, max(lo_r, hi_r * 2 // 3))
        cx, cy = pick(first + 2, 0, size - 1), pick(first + 3, 0, size - 1)
        colour = np.stack([pick(first + 4, 0, 255), pick(first + 5, 0, 255),
                           (pick(first + 4, 0, 255) * 7 + 91) % 256], 1)
        active = k < shapes
        # A radius of -1 makes a mask empty: each slot draws only its own class, if active.
        radius_of = [np.where(active & (cls == c), radius, -1) for c in range(len(CLASSES))]
        dx = (xx - col(cx).view(b4)).abs()  # (B, 1, 1, W)
        dy = yy - col(cy).view(b4)  # (B, 1, H, 1)
        rc, rs, rt = (col(r).view(b4) for r in radius_of)
        mask = dx * dx + dy * dy <= torch.where(rc < 0, -1, rc * rc)
        mask |= (dx <= rs) & (dy.abs() <= rs)
        mask |= (dy >= -rt) & (dy <= rt) & (2 * dx <= dy + rt)
        image = torch.where(mask, col(colour).view(count, 3, 1, 1).to(torch.uint8), image)
        for i in np.flatnonzero(active):
            box = [max(0, int(cx[i] - radius[i])), max(0, int(cy[i] - radius[i])),
                   min(size, int(cx[i] + radius[i]) + 1), min(size, int(cy[i] + radius[i]) + 1)]
            metadata[i]["objects"].append({"class": CLASSES[int(cls[i])], "box": box})
    for meta in metadata:
        label = CLASSES.index(meta["objects"][0]["class"])
        meta["label"], meta["label_name"] = label, CLASSES[label]
    return image, metadata
