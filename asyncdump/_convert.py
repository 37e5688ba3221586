"""The worker's conversion: raw values from the buffer -> the uint8/uint16 HWC image an encoder
takes, in its channel order (RGB for fpng, BGR for OpenCV), made in one go.

Float input is converted one contiguous channel plane at a time, so the float work stays in
the cache: (1) the rule's float ops on the plane (a plane is read from the buffer once),
(2) the truncating cast into a uint8 plane, (3) one interleave of the uint8 planes, in the
encoder's order (``cv2.merge``). The rule is torchvision's, exactly: ``x * std + mean``,
clamp to ``value_range`` and scale to [0, 1], ``* 255 + 0.5``, clamp to [0, 255] with NaN -> 0,
truncate. NaN -> 0 holds by construction, not by any clamp's NaN semantics: right after the
arithmetic that can make a NaN (the load and ``x * std + mean``) and before the first clamp,
NaN is replaced by -inf, which every clamp that follows sends to the bottom of its range
(``cv2.threshold`` does not keep NaN on every path: its scalar tail turned it into 255 on some
builds, issue 18). The clamps are ``cv2.threshold`` (TOZERO, TRUNC), several times faster than
numpy's ``clip``/``fmax``/``fmin``.

Imports numpy and cv2 only (this runs in the workers, which never import torch).
"""

from __future__ import annotations

import cv2
import numpy as np

from asyncdump._protocol import FloatRule, ImageSpec

BGR_ORDER = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}
RGB_ORDER = {1: [0], 3: [0, 1, 2], 4: [0, 1, 2, 3]}
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def to_image(raw: np.ndarray, spec: ImageSpec, rgb: bool = False) -> np.ndarray:
    """One image's raw bytes from the buffer -> ``(H, W)`` or ``(H, W, C)`` for an encoder.

    ``rgb``: RGB(A) channel order (fpng) instead of OpenCV's BGR(A). The result may be a
    read-only view of ``raw`` when no conversion is needed.
    """
    channels, height, width, dtype = spec.channels, spec.height, spec.width, spec.dtype
    if spec.converted:  # staged on the GPU: already in the encoder's layout and order
        img = raw.view(dtype).reshape(height, width, channels)
        return img[..., 0] if channels == 1 else img
    order = (RGB_ORDER if rgb else BGR_ORDER)[channels]
    storage = "uint16" if dtype == "bfloat16" else dtype
    values = raw.view(storage)
    if spec.layout == "nchw":
        planes = values.reshape(channels, height * width)
    else:
        planes = values.reshape(height * width, channels).T  # strided views, one per channel
    if dtype in _FLOATS:
        assert spec.rule is not None, "float input needs the conversion rule"
        out = np.empty((channels, height * width), np.uint8)
        scratch = np.empty(height * width, np.float32)
        # Values beyond float32's range become +-inf (in the cast or in x * 255, x * std),
        # which the clamps map to 255 / 0, as torch computes them: numpy need not warn on stderr.
        with np.errstate(over="ignore"):
            for k, source in enumerate(order):
                _convert_plane(planes[source], dtype, spec.rule, source, scratch)
                np.copyto(out[k], scratch, casting="unsafe")  # truncation of a value in [0, 255]
        return _interleave(out, list(range(channels)), height, width)
    if dtype == "bool":
        img = _interleave(planes.view(np.uint8), order, height, width, copy=True)
        np.multiply(img, 255, out=img)
        return img
    if spec.layout == "nhwc" and order == RGB_ORDER[channels]:
        hwc = values.reshape(height, width, channels)  # already what the encoder takes
        return hwc[..., 0] if channels == 1 else hwc
    return _interleave(planes, order, height, width)


def to_opencv_image(raw: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """``to_image`` in OpenCV's BGR(A) order (what ``cv2.imencode`` takes)."""
    return to_image(raw, spec, rgb=False)


def _interleave(planes: np.ndarray, order: list[int], height: int, width: int,
                copy: bool = False) -> np.ndarray:
    """Planes ``order`` of ``(C, H*W)`` -> contiguous ``(H, W, C)`` (``(H, W)`` for one)."""
    if len(order) == 1:
        plane = planes[order[0]].reshape(height, width)
        return plane.copy() if copy else plane
    return cv2.merge([np.ascontiguousarray(planes[c]).reshape(height, width) for c in order])


def _convert_plane(plane: np.ndarray, dtype: str, rule: FloatRule, channel: int,
                   y: np.ndarray) -> None:
    """The float rule on one channel plane, into the float32 scratch ``y`` (in [0, 255.5])."""
    std, mean = rule.std, rule.mean
    lo, hi = rule.value_range
    plain = dtype == "float32" and std is None and (lo, hi) == (0.0, 1.0)
    if plain:  # the common case: the first op reads the buffer directly
        np.multiply(plane, np.float32(255.0), out=y)
    elif dtype == "bfloat16":  # bf16 is the top half of a float32
        np.left_shift(plane, 16, out=y.view(np.uint32), dtype=np.uint32)
    else:  # float16/float64 -> float32, as the rule computes (beyond float32's range: +-inf)
        np.copyto(y, plane, casting="unsafe")
    if not plain and std is not None and mean is not None:
        y *= np.float32(std[channel])
        y += np.float32(mean[channel])
    _nan_to_minus_inf(y)
    if not plain:
        if (lo, hi) != (0.0, 1.0):  # for (0, 1) the clamp and scale are exact no-ops
            np.clip(y, lo, hi, out=y)
            y -= np.float32(lo)
            y /= np.float32(max(hi - lo, 1e-5))  # in double first, as torchvision computes it
        y *= np.float32(255.0)
    if not rule.truncate:  # asyncdump.tensorboard's rule truncates, as SummaryWriter does
        y += np.float32(0.5)
    cv2.threshold(y, 0.0, 0.0, cv2.THRESH_TOZERO, dst=y)  # -inf and negatives -> 0
    cv2.threshold(y, 255.0, 0.0, cv2.THRESH_TRUNC, dst=y)  # +inf and > 255 -> 255


def _nan_to_minus_inf(y: np.ndarray) -> None:
    """NaN -> -inf in place: every clamp after this sees ordered values only, and -inf ends
    as 0, the pixel torchvision's rule gives NaN (docs/inputs.md)."""
    nan = np.isnan(y)
    if nan.any():
        y[nan] = -np.inf
