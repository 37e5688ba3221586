"""The built-in procedural generator: coloured shapes on textured backgrounds.

Every image is a pure function of ``(seed, index)``: per-image parameters come from a
counter-based hash (splitmix64 of seed, index and a field number, in numpy) and are turned into
small exact tables (background rows, noise levels, per-row shape half-widths). Two renderers
paint the same pixels from those tables (a test checks they agree byte for byte):

- on the CPU at sizes >= ``NUMPY_MIN_SIZE``, numpy and OpenCV per image: a one-byte label per
  pixel (one gather of background rows, or the noise hash), each shape written into it inside
  its bounding box only, then one table lookup per channel into RGB HWC. The result is
  returned as a channels-last ``(B, 3, H, W)`` tensor, so the sink copies it with one memcpy
  and fpng reads it without a reorder;
- otherwise (small images, where per-image Python would dominate, and CUDA), integer-only torch
  operations over the whole batch (a gather of per-image row windows into a texture table,
  comparisons with per-row shape half-widths, wrapping uint8 blends), which give the same result
  whatever the batch composition, thread count or device.

Metadata per image: ``label`` (class of the first, largest shape), ``label_name``, and
``objects``: one ``{"class", "box": [x0, y0, x1, y1]}`` per shape (pixels, x1/y1 exclusive).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CLASSES = ("circle", "square", "triangle")
TEXTURES = ("stripes", "checker", "noise", "plain")
MAX_SHAPES = 3
MAX_SIZE = 16384  # keeps every integer product below 2**31
GENERATOR_ID = "asyncdump.synthetic/1"
SHAPE_LABEL = 251  # labels 0..250 are background (noise hashes), 251.. the shapes
NUMPY_MIN_SIZE = 64  # below it, per-image numpy costs more than the batched torch path

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


@dataclass
class _Shape:
    """Shape ``k`` of every image of a batch: all ``(count,)`` arrays except ``half``."""

    active: np.ndarray  # bool: image has at least k + 1 shapes
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    colour: np.ndarray  # (count, 3) uint8-valued
    half: np.ndarray  # (count, size) int64: |x - cx| <= half[y] is inside; -1: row not touched


@dataclass
class _Scene:
    """Everything both renderers need, computed exactly in numpy from the draws."""

    count: int
    size: int
    colours: np.ndarray  # (count, 2, 3): background first and second colour
    table: np.ndarray  # (count, T) uint8 0/1: row y of image b is table[b, offsets[b, y]:][:size]
    offsets: np.ndarray  # (count, size) int64
    noisy: np.ndarray  # indices of images with the noise texture
    noise_lut: np.ndarray  # (len(noisy), 3, 251) uint8: level of each hash value per channel
    shapes: list[_Shape]
    metadata: list[dict[str, Any]]


def render(indices: Sequence[int], *, seed: int, size: int,
           device: Any = "cpu") -> tuple[Any, list[dict[str, Any]]]:
    """A ``(B, 3, size, size)`` uint8 RGB tensor and one metadata dict per image."""
    import torch

    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"size must be in 1..{MAX_SIZE}, got {size}")
    scene = _scene(indices, seed, size)
    if torch.device(device).type == "cpu" and size >= NUMPY_MIN_SIZE:
        return torch.from_numpy(_pixels_numpy(scene)).permute(0, 3, 1, 2), scene.metadata
    return _pixels_torch(scene, device), scene.metadata


def _scene(indices: Sequence[int], seed: int, size: int) -> _Scene:
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

    # noise: first colour + ((hash(x, y) + key) % 251) % 49 - 24, clamped
    noisy = np.flatnonzero(texture == 2)
    levels = (np.arange(251)[None, :] + noise_key[noisy, None]) % 251 % 49 - 24
    noise_lut = np.clip(colours[noisy, 0, :, None] + levels[:, None, :], 0, 255).astype(np.uint8)

    metadata: list[dict[str, Any]] = [{"objects": []} for _ in range(count)]
    painted = []
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
        # Every half[row] is <= r, so a shape stays inside its box of side 2 r + 1.
        r = radius[:, None]
        dy = ys[None, :] - cy[:, None]
        half = np.select([cls[:, None] == 0, cls[:, None] == 1],
                         [_isqrt(np.maximum(r * r - dy * dy, 0)), r], (dy + r) // 2)
        half = np.where(active[:, None] & (np.abs(dy) <= r), half, -1)
        painted.append(_Shape(active, cx, cy, radius, colour, half))
        for i in np.flatnonzero(active):
            box = [max(0, int(cx[i] - radius[i])), max(0, int(cy[i] - radius[i])),
                   min(size, int(cx[i] + radius[i]) + 1), min(size, int(cy[i] + radius[i]) + 1)]
            metadata[i]["objects"].append({"class": CLASSES[int(cls[i])], "box": box})
    for meta in metadata:
        label = CLASSES.index(meta["objects"][0]["class"])
        meta["label"], meta["label_name"] = label, CLASSES[label]
    return _Scene(count, size, colours, table, offsets, noisy, noise_lut, painted, metadata)


@functools.lru_cache(maxsize=4)
def _noise_hash(size: int) -> np.ndarray:
    """``(size, size)`` uint8 hash(x, y) in 0..250 of the noise texture, row y, column x (cached:
    read-only, callers copy)."""
    axis = np.arange(size, dtype=np.int64) % 1021
    hashed = (31 * axis[None, :] ** 2 + 17 * axis[:, None] ** 2 + 7 * axis[:, None] * axis[None, :]) % 251
    hashed = hashed.astype(np.uint8)
    hashed.flags.writeable = False
    return hashed


def _pixels_numpy(scene: _Scene) -> np.ndarray:
    """``(B, size, size, 3)`` RGB, image by image, through a one-byte label per pixel: the
    background's (0/1: first/second colour; noise: the hash 0..250), overwritten inside each
    shape's box by ``SHAPE_LABEL + k``; then one table lookup per channel colours it."""
    import cv2

    count, size = scene.count, scene.size
    out = np.empty((count, size, size, 3), np.uint8)
    noise_of = {int(b): j for j, b in enumerate(scene.noisy)}
    windows = np.lib.stride_tricks.sliding_window_view(scene.table, size, axis=1)
    xs = np.arange(size, dtype=np.int16)
    halves = [shape.half.astype(np.int16) for shape in scene.shapes]
    for b in range(count):
        palette = np.zeros((3, 256), np.uint8)
        j = noise_of.get(b)
        if j is not None:
            label = _noise_hash(size).copy()
            palette[:, :251] = scene.noise_lut[j]
        else:
            label = windows[b, scene.offsets[b]]  # a new (size, size) array: one row gather
            palette[:, :2] = scene.colours[b].T
        for k, shape in enumerate(scene.shapes):
            if not shape.active[b]:
                continue
            r, cx, cy = int(shape.radius[b]), int(shape.cx[b]), int(shape.cy[b])
            y0, y1 = max(0, cy - r), min(size, cy + r + 1)
            x0, x1 = max(0, cx - r), min(size, cx + r + 1)
            inside = (np.abs(xs[None, x0:x1] - np.int16(cx)) <= halves[k][b, y0:y1, None])
            box = label[y0:y1, x0:x1]
            # box + inside * (value - box) wraps to value inside and keeps box elsewhere
            step = np.subtract(SHAPE_LABEL + k, box, dtype=np.uint8)
            np.multiply(step, inside.view(np.uint8), out=step)
            np.add(box, step, out=box)
            palette[:, SHAPE_LABEL + k] = shape.colour[b]
        cv2.merge([cv2.LUT(label, palette[c]) for c in range(3)], dst=out[b])
    return out


def _pixels_torch(scene: _Scene, device: Any) -> Any:
    """``(B, 3, size, size)`` RGB with whole-batch integer torch operations on ``device``."""
    import torch

    count, size = scene.count, scene.size

    def put(values: np.ndarray, dtype: Any) -> Any:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=dtype)).to(device)

    colours = scene.colours
    second = put(scene.table, np.uint8).unfold(1, size, 1)[
        torch.arange(count, device=device)[:, None], put(scene.offsets, np.int64)]
    # uint8 arithmetic wraps: first + (second - first) is the second colour, exactly
    delta = put((colours[:, 1] - colours[:, 0]) % 256, np.uint8).view(count, 3, 1, 1)
    image = second.view(count, 1, size, size) * delta
    image += put(colours[:, 0], np.uint8).view(count, 3, 1, 1)

    noisy = scene.noisy
    if noisy.size:
        hashed = put(_noise_hash(size), np.int64)
        image[put(noisy, np.int64)] = torch.gather(
            put(scene.noise_lut, np.uint8), 2, hashed.view(1, 1, -1).expand(noisy.size, 3, -1)
        ).view(noisy.size, 3, size, size)

    xs = np.arange(size)
    for shape in scene.shapes:
        dx = np.abs(xs[None, :] - shape.cx[:, None])
        mask = (put(dx, np.int16).view(count, 1, 1, size)
                <= put(shape.half, np.int16).view(count, 1, size, 1)).view(torch.uint8)
        image += mask * (put(shape.colour, np.uint8).view(count, 3, 1, 1) - image)
    return image


def _isqrt(values: np.ndarray) -> np.ndarray:
    """Exact floor(sqrt(v)) of int64 values below 2**52."""
    root = np.sqrt(values.astype(np.float64)).astype(np.int64)
    root -= root * root > values
    root += (root + 1) * (root + 1) <= values
    return root
