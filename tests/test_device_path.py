"""The CUDA staging path's conversion, run on CPU tensors (the same torch ops as on a GPU).

On a CUDA machine the pixels may differ by at most 1 (CUDA divides by a scalar through its
reciprocal); on the CPU the device conversion must equal the worker's numpy conversion exactly.
The copy waiter (the thread that hands jobs on once a copy's event completes) runs here with
stand-in events. The pinned buffer, the non-blocking copy and real events are covered by
benchmarks/gpu_check.py.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from asyncdump._device import CopyWaiter, DeviceStager
from asyncdump._protocol import ImageSpec
from asyncdump._staging import Batch, Conversion
from asyncdump._worker import to_opencv_image


def device_batch(x: torch.Tensor) -> Batch:
    b, c, h, w = x.shape
    out = "uint16" if x.dtype == torch.uint16 else "uint8"
    return Batch(x, True, b, c, h, w, out, "nhwc", c * h * w * (2 if out == "uint16" else 1))


def worker_pixels(x: torch.Tensor, conversion: Conversion) -> np.ndarray:
    """What a worker writes for a CPU copy of ``x`` (raw values, converted in the worker)."""
    b, c, h, w = x.shape
    dtype = str(x.dtype).replace("torch.", "")
    raw = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    spec = ImageSpec(c, h, w, dtype, "nchw", converted=False, rule=conversion.for_channels(c))
    arrays = [to_opencv_image(np.ascontiguousarray(raw[i].numpy()).view(np.uint8).reshape(-1), spec)
              for i in range(b)]
    return np.stack(arrays)


MEAN, STD = (0.485, 0.456, 0.406, 0.5), (0.229, 0.224, 0.225, 0.25)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("value_range,normalized", [((0.0, 1.0), False), ((-1.0, 1.0), False),
                                                    ((0.1, 0.7), True)])
def test_device_conversion_equals_worker_conversion(
        channels: int, value_range: tuple[float, float], normalized: bool) -> None:
    conversion = Conversion(value_range, MEAN[:channels] if normalized else None,
                            STD[:channels] if normalized else None)
    torch.manual_seed(channels)
    x = torch.randn(3, channels, 9, 13) * 1.5
    x[0, 0, 0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5 / 255, 0.0])
    got = DeviceStager(conversion).to_hwc(device_batch(x), 0, 3, rgb=False).numpy()
    want = worker_pixels(x, conversion)
    np.testing.assert_array_equal(got.reshape(want.shape), want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_device_conversion_other_dtypes(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    elif dtype == torch.bool:
        x = torch.rand(2, 3, 5, 7) > 0.5
    else:
        x = torch.rand(2, 3, 5, 7).to(dtype)
    conversion = Conversion((0.0, 1.0), None, None)
    got = DeviceStager(conversion).to_hwc(device_batch(x), 0, 2, rgb=False).numpy()
    np.testing.assert_array_equal(got, worker_pixels(x, conversion))


def test_device_conversion_keeps_uint16_and_slices_the_batch() -> None:
    x = torch.from_numpy(np.arange(4 * 3 * 2 * 2, dtype=np.uint16).reshape(4, 3, 2, 2) * 1000)
    got = DeviceStager(Conversion((0.0, 1.0), None, None)).to_hwc(device_batch(x), 1, 3, rgb=False)
    assert got.dtype == torch.uint16 and got.shape == (2, 2, 2, 3) and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), x[1:3].numpy()[:, ::-1].transpose(0, 2, 3, 1))


class StandInEvent:
    """What CopyWaiter needs of a torch.cuda.Event."""

    def __init__(self, error: str | None = None):
        self.error = error

    def synchronize(self) -> None:
        if self.error:
            raise RuntimeError(self.error)


class CopySource:
    """A stand-in for the GPU tensor a pending copy reads."""


def test_copy_waiter_hands_on_in_order_frees_sources_and_reports_failed_copies() -> None:
    handed: list[list[str]] = []
    errors: list[BaseException] = []
    sources_alive: list[bool] = []
    source = CopySource()
    ref = weakref.ref(source)

    def hand_on(jobs: list[str]) -> None:
        handed.append(jobs)
        sources_alive.append(ref() is not None)

    waiter = CopyWaiter(hand_on, errors.append)
    waiter.put(["a"], StandInEvent(), keepalive=source)
    del source  # only the waiter holds it now, until its copy is done
    waiter.put(["b"], StandInEvent("an illegal memory access"), keepalive=None)
    waiter.put(["c"], StandInEvent(), keepalive=None)
    waiter.close()
    assert handed == [["a"], ["b"], ["c"]]  # a failed copy's jobs still go on, to be failed
    assert sources_alive[0] is False
    assert len(errors) == 1 and "illegal memory access" in str(errors[0])
