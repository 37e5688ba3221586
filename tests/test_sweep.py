"""The 8.4-million-value sweep: asyncdump's own conversions against torchvision's ops.

Every 509th float32 bit pattern (8,438,094 values: every exponent, both signs, NaNs, infs) plus
129 float steps around every ``k/255`` and ``(k + 0.5)/255``, through the worker's conversion
(``_convert.to_image``, both channel orders) and the device path's (``DeviceStager.to_hwc``, on
a CPU tensor), compared with what torchvision's ``save_image`` computes, written out in torch:
``mul(255).add_(0.5).clamp_(0, 255)`` and the uint8 cast, after ``make_grid``'s
``clamp_``/``sub_``/``div_`` when ``normalize=True, value_range=(lo, hi)``. torchvision leaves
NaN to the cast (undefined); asyncdump's rule makes it 0, so NaN positions are expected 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncdump._convert import to_image
from asyncdump._device import DeviceStager
from asyncdump._protocol import FloatRule, ImageSpec
from asyncdump._staging import Batch, Conversion


def sweep() -> np.ndarray:
    patterns = np.arange(0, 2**32, 509, dtype=np.uint64).astype(np.uint32).view(np.float32)
    centres = np.concatenate([np.arange(256) / 255.0, (np.arange(256) + 0.5) / 255.0])
    around = centres.astype(np.float32)[:, None].view(np.uint32).astype(np.int64) + np.arange(-64, 65)
    values = np.concatenate([patterns, around.reshape(-1).astype(np.uint32).view(np.float32),
                             np.array([np.nan, np.inf, -np.inf, 1.0, 0.0, -0.0], np.float32)])
    assert values.size > 8_400_000
    return values


def torchvision_ops(x: torch.Tensor, value_range: tuple[float, float] | None) -> np.ndarray:
    """torchvision.utils.save_image's arithmetic; ``value_range`` None: normalize=False."""
    y = x.clone()
    if value_range is not None:  # make_grid(normalize=True, value_range=...)'s norm_ip
        lo, hi = value_range
        y.clamp_(min=lo, max=hi)
        y.sub_(lo).div_(max(hi - lo, 1e-5))
    y = y.mul(255).add_(0.5).clamp_(0, 255)
    y[torch.isnan(y)] = 0  # the rule's NaN -> 0; torchvision leaves it to the cast
    return y.to(torch.uint8).numpy()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("value_range", [None, (-1.0, 1.0)])
def test_asyncdump_conversions_equal_torchvision_on_the_sweep(
        value_range: tuple[float, float] | None) -> None:
    values = sweep()
    height, width = 2, values.size // 2  # one gray image: the sweep as one plane
    values = values[: height * width]
    x = torch.from_numpy(values.reshape(1, height, width))
    expected = torchvision_ops(x, value_range)[0]
    rule_range = (0.0, 1.0) if value_range is None else value_range

    spec = ImageSpec(1, height, width, "float32", "nchw", converted=False,
                     rule=FloatRule(rule_range, None, None))
    for rgb in (False, True):
        with np.errstate(over="ignore", invalid="ignore"):  # huge values and NaN, on purpose
            worker = to_image(values.view(np.uint8), spec, rgb=rgb)
        mismatches = np.flatnonzero(worker != expected)
        assert mismatches.size == 0, (f"worker (rgb={rgb}): {mismatches.size} values differ, "
                                      f"first {values.reshape(height, width).flat[mismatches[0]]!r}")

    batch = Batch(source=x.unsqueeze(0), on_cuda=False, count=1, channels=1, height=height,
                  width=width, dtype="float32", layout="nchw", image_bytes=values.nbytes)
    stager = DeviceStager(Conversion.parse(rule_range, None, None))
    for rgb in (False, True):
        device = stager.to_hwc(batch, 0, 1, rgb=rgb).numpy()[0, ..., 0]
        mismatches = np.flatnonzero(device != expected)
        assert mismatches.size == 0, f"device path (rgb={rgb}): {mismatches.size} values differ"
