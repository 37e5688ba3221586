"""The worker's half of ``save_image``: torchvision's ``make_grid`` from the staged batch.

``save_image`` stages the batch as it is (B x C x H x W, float32 or uint8, one copy) and a
``GridSpec``; the worker converts each image with the float rule (``_convert.to_image``), with
``make_grid``'s normalisation range for it, and places it on a canvas filled with the padding's
pixel value, as ``make_grid`` places it:
image ``k`` at row ``k // nrow``, column ``k % nrow``, at
``(row * (H + padding) + padding, column * (W + padding) + padding)``; one image: no padding.

Normalisation without ``value_range`` uses the batch's (or with ``scale_each`` each image's)
own min and max, computed here in float32 and handed to the rule as Python floats, as
torchvision's ``norm_ip(t, float(t.min()), float(t.max()))`` does.

Imports numpy and cv2 only (this runs in the workers).
"""

from __future__ import annotations

import math

import numpy as np

from asyncdump._convert import to_image
from asyncdump._protocol import FloatRule, GridSpec, ImageSpec


def grid_image(raw: np.ndarray, grid: GridSpec, rgb: bool) -> np.ndarray:
    """The grid as an HWC uint8 image in the encoder's channel order (RGB for fpng)."""
    b, c, h, w = grid.images, grid.channels, grid.height, grid.width
    values = raw.view(grid.dtype).reshape(b, c * h * w)
    ranges = _ranges(values, grid)
    image_bytes = c * h * w * values.itemsize
    flat = raw.reshape(b, image_bytes)
    channels = 3 if c == 1 else c  # make_grid makes gray images RGB
    if b == 1:
        return _broadcast(_image(flat[0], grid, ranges[0], rgb), channels)
    cols = min(grid.nrow, b)
    rows = math.ceil(b / cols)
    pad = grid.padding
    canvas = np.full((h * rows + pad * (rows + 1), w * cols + pad * (cols + 1), channels),
                     grid.pad_pixel, np.uint8)
    for k in range(b):
        y = (k // cols) * (h + pad) + pad
        x = (k % cols) * (w + pad) + pad
        image = _image(flat[k], grid, ranges[k], rgb)
        canvas[y: y + h, x: x + w] = image if image.ndim == 3 else image[..., None]
    return canvas


def _image(raw: np.ndarray, grid: GridSpec, value_range: tuple[float, float] | None,
           rgb: bool) -> np.ndarray:
    rule = None if value_range is None else FloatRule(value_range, None, None)
    spec = ImageSpec(grid.channels, grid.height, grid.width, grid.dtype, "nchw", converted=False,
                     rule=rule)
    return to_image(raw, spec, rgb=rgb)


def _broadcast(image: np.ndarray, channels: int) -> np.ndarray:
    if image.ndim == 3:
        return image
    return np.repeat(image[..., None], channels, axis=2)


def _ranges(values: np.ndarray, grid: GridSpec) -> list[tuple[float, float] | None]:
    """The rule's (lo, hi) per image: the given range, or the images' own extrema."""
    if grid.dtype != "float32":
        return [None] * grid.images  # uint8: written as is
    if grid.value_range is not None:
        return [grid.value_range] * grid.images
    if grid.scale_each:
        return [(float(v.min()), float(v.max())) for v in values]
    extrema = (float(values.min()), float(values.max()))
    return [extrema] * grid.images
