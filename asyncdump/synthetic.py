"""The built-in procedural generator: coloured shapes on textured backgrounds.

Every image is a pure function of ``(seed, index)``: per-image parameters come from a
counter-based hash (splitmix64 of seed, index and a field number, in numpy), and the batch is
rendered with integer-only torch operations (a gather of per-image row windows into a texture
table, comparisons with per-row shape half-widths, wrapping uint8 blends), which give the same
result whatever the batch composition, thread count or device. Small per-image tables are
computed exactly in numpy; only whole-image operations run on the device.

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

    def put(values: np.ndarray, dtype: Any) -> Any:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=dtype)).to(device)

    colours = np.stack([pick(c, 0, 255) for c in range(6)], 1).reshape(count, 2, 3)
    texture = pick(6, 0, len(TEXTURES) - 1)
    period = pick(7, 2, max(2, size // 4))
    slope = pick(8, -2, 2)
    noise_key = pick(9, 0, 250)
    shapes = pick(10, 1, MAX_SHAPES)

    # Background: 0 = first colour, 1 = second. Row y of image b is the window
    # table[b, offsets[b, y]:][:size], so one gather of rows builds every texture.
    pad = 2 * (size - 1)
    table = np.zeros((count, max(5 * size - 4, 2 * size)), np.uint8)
    offsets = np.zeros((count, size), np.int64)
    ys = np.arange(size)
    stripes, checker = texture == 0, texture == 1
    # stripes: ((x + slope * y) // period) % 2
    table[stripes] = (np.arange(table.shape[1])[None, :] - pad) // period[stripes, None] & 1
    offsets[stripes] = slope[stripes, None] * ys[None, :] + pad
    # checker: (x // period + y // period) % 2, the column parities or their complement
    parity = ys[None, :] // period[checker, None] & 1
    table[checker, :size], table[checker, size:2 * size] = parity, 1 - parity
    offsets[checker] = size * parity
    second = put(table, np.uint8).unfold(1, size, 1)[
        torch.arange(count, device=device)[:, None], put(offsets, np.int64)]
    # uint8 arithmetic wraps: first + (second - first) is the second colour, exactly
    delta = put((colours[:, 1] - colours[:, 0]) % 256, np.uint8).view(count, 3, 1, 1)
    image = second.view(count, 1, size, size) * delta
    image += put(colours[:, 0], np.uint8).view(count, 3, 1, 1)

    noisy = np.flatnonzero(texture == 2)
    if noisy.size:  # first colour + ((hash(x, y) + key) % 251) % 49 - 24, clamped
        axis = torch.arange(size, device=device) % 1021
        hashed = (31 * axis.view(1, size) ** 2 + 17 * axis.view(size, 1) ** 2
                  + 7 * axis.view(size, 1) * axis.view(1, size)) % 251
        levels = (np.arange(251)[None, :] + noise_key[noisy, None]) % 251 % 49 - 24
        lut = np.clip(colours[noisy, 0, :, None] + levels[:, None, :], 0, 255)
        image[put(noisy, np.int64)] = torch.gather(
            put(lut, np.uint8), 2, hashed.view(1, 1, -1).expand(noisy.size, 3, -1)
        ).view(noisy.size, 3, size, size)

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
        # Each shape is, per row, the pixels with |x - cx| <= half[row] (-1: none):
        # circle dx^2 + dy^2 <= r^2, square |dy| <= r, triangle 2 dx <= dy + r with |dy| <= r.
        r = radius[:, None]
        dy = ys[None, :] - cy[:, None]
        half = np.select([cls[:, None] == 0, cls[:, None] == 1],
                         [_isqrt(np.maximum(r * r - dy * dy, 0)), r], (dy + r) // 2)
        half = np.where(active[:, None] & (np.abs(dy) <= r), half, -1)
        dx = np.abs(ys[None, :] - cx[:, None])
        mask = (put(dx, np.int16).view(count, 1, 1, size)
                <= put(half, np.int16).view(count, 1, size, 1)).view(torch.uint8)
        image += mask * (put(colour, np.uint8).view(count, 3, 1, 1) - image)
        for i in np.flatnonzero(active):
            box = [max(0, int(cx[i] - radius[i])), max(0, int(cy[i] - radius[i])),
                   min(size, int(cx[i] + radius[i]) + 1), min(size, int(cy[i] + radius[i]) + 1)]
            metadata[i]["objects"].append({"class": CLASSES[int(cls[i])], "box": box})
    for meta in metadata:
        label = CLASSES.index(meta["objects"][0]["class"])
        meta["label"], meta["label_name"] = label, CLASSES[label]
    return image, metadata


def _isqrt(values: np.ndarray) -> np.ndarray:
    """Exact floor(sqrt(v)) of int64 values below 2**52."""
    root = np.sqrt(values.astype(np.float64)).astype(np.int64)
    root -= root * root > values
    root += (root + 1) * (root + 1) <= values
    return root
