"""NaN, +inf and -inf at every position of planes whose sizes fill no vector register.

Issue 18: the worker clamped with ``cv2.threshold`` and looked for NaN afterwards; on some
OpenCV builds the threshold's scalar tail (a plane's last few values) turns NaN into 255, so a
NaN pixel came out white depending on the OpenCV version, the image size and its alignment.
These tests put each special value at every position of odd-sized planes (the last value in
particular) and compare each conversion path with torchvision's rule computed in torch:
the worker's (every float dtype, NCHW and NHWC, 1/3/4 channels, both encoders' channel
orders), the device path's (``DeviceStager.to_hwc`` on CPU tensors: the same torch ops as on
a GPU), ``save_image``'s grid path, and real workers writing real files with both encoders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_rgb, torchvision_pixels

from asyncdump import AsyncImageSink
from asyncdump._convert import to_image
from asyncdump._device import DeviceStager
from asyncdump._protocol import FloatRule, ImageSpec
from asyncdump._staging import Batch, Conversion
from asyncdump.grid import _pixels_for_sink

SMALL_PLANES = [(1, 1), (1, 7), (3, 5), (5, 7), (9, 11), (13, 17)]
LARGE_PLANE = (67, 131)  # 8,777 values: odd, a multiple of no vector width
SPECIALS = {"nan": float("nan"), "+inf": float("inf"), "-inf": -float("inf")}
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
RULES = {
    "plain": ((0.0, 1.0), None, None),
    "range": ((-1.0, 1.0), None, None),
    "normalized": ((0.0, 1.0), (0.485, 0.456, 0.406, 0.5), (0.229, 0.224, 0.225, 0.25)),
}
RGB_FROM_BGR = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def positions(h: int, w: int) -> list[int]:
    """Every position of a small plane; the first 8, the last 40 and a spread of a large one."""
    n = h * w
    if n <= 256:
        return list(range(n))
    return sorted(set(range(8)) | set(range(n - 40, n)) | set(range(0, n, 4999)))


def special_batch(channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A float32 (B, C, H, W) batch over ``positions(h, w)``: image k has NaN at the k-th
    position, +inf at the next value and -inf at the one after (in every channel), so each
    special value sits at every position in some image; then one image all NaN, one all +inf,
    one all -inf (a register full of them takes the vector path, not the scalar tail)."""
    generator = torch.Generator().manual_seed(seed)
    n = h * w
    where = positions(h, w)
    x = (torch.rand(len(where), channels, n, generator=generator) * 1.4 - 0.2)
    for k, position in enumerate(where):
        for shift, value in enumerate(SPECIALS.values()):
            x[k, :, (position + shift) % n] = value
    full = torch.tensor(list(SPECIALS.values())).view(3, 1, 1).expand(3, channels, n)
    return torch.cat([x, full]).view(-1, channels, h, w)


def expected(x: torch.Tensor, rule: tuple = RULES["plain"]) -> np.ndarray:
    """torchvision's rule in torch for the (B, C, H, W) batch ``x`` as its dtype holds it:
    (B, H, W, C) in RGB order, (B, H, W) for one channel."""
    value_range, mean, std = rule
    b, c, h, w = x.shape
    tall = x.to(torch.float32).permute(1, 0, 2, 3).reshape(c, b * h, w)  # one tall image
    out = torchvision_pixels(tall, value_range, None if mean is None else mean[:c],
                             None if std is None else std[:c])
    return out.reshape(b, h, w, c) if c > 1 else out.reshape(b, h, w)


def worker_pixels(x: torch.Tensor, rule: tuple, layout: str, rgb: bool) -> np.ndarray:
    """The worker's conversion of one (C, H, W) image staged raw in ``layout``, in RGB order."""
    value_range, mean, std = rule
    c, h, w = x.shape
    dtype = str(x.dtype).replace("torch.", "")
    raw = (x if layout == "nchw" else x.permute(1, 2, 0)).contiguous()
    if x.dtype == torch.bfloat16:
        raw = raw.view(torch.int16)
    float_rule = FloatRule(value_range, None if mean is None else list(mean[:c]),
                           None if std is None else list(std[:c]))
    spec = ImageSpec(c, h, w, dtype, layout, converted=False, rule=float_rule)
    out = to_image(raw.numpy().view(np.uint8).reshape(-1), spec, rgb=rgb)
    if out.ndim == 3 and not rgb:
        out = out[..., RGB_FROM_BGR[c]]
    return out


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.array_equal(got, want):
        bad = np.argwhere(got != want)[:5].tolist()
        raise AssertionError(f"{what}: {int((got != want).sum())} values differ, first at "
                             f"{bad}: got {[got[tuple(i)] for i in bad]}, "
                             f"want {[want[tuple(i)] for i in bad]}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rule", list(RULES))
def test_worker_conversion_at_every_position(dtype: torch.dtype, rule: str) -> None:
    for h, w in [*SMALL_PLANES, LARGE_PLANE]:
        for channels in (1, 3, 4):
            batch = special_batch(channels, h, w).to(dtype)
            want = expected(batch, RULES[rule])
            for k, x in enumerate(batch):
                for layout in ("nchw", "nhwc"):
                    for rgb in (False, True):
                        assert_same(worker_pixels(x, RULES[rule], layout, rgb), want[k],
                                    f"image {k} of {channels}x{h}x{w} {dtype} {layout} rgb={rgb}")


def device_pixels(x: torch.Tensor, rule: tuple, rgb: bool) -> np.ndarray:
    """The device path's conversion of a (B, C, H, W) tensor, back in RGB order."""
    value_range, mean, std = rule
    b, c, h, w = x.shape
    conversion = Conversion(value_range, None if mean is None else tuple(mean[:c]),
                            None if std is None else tuple(std[:c]))
    batch = Batch(x, True, b, c, h, w, "uint8", "nhwc", c * h * w)
    out = DeviceStager(conversion).to_hwc(batch, 0, b, rgb=rgb).cpu().numpy()
    if not rgb:
        out = out[..., RGB_FROM_BGR[c]]
    return out[..., 0] if c == 1 else out


def check_device_path(device: str) -> None:
    for dtype in FLOAT_DTYPES:
        for rule in RULES.values():
            for h, w in [*SMALL_PLANES, LARGE_PLANE]:
                for channels in (1, 3, 4):
                    batch = special_batch(channels, h, w).to(dtype)
                    want = expected(batch, rule)
                    special_at = ~torch.isfinite(batch.to(torch.float32)).all(1).numpy()
                    for rgb in (False, True):
                        got = device_pixels(batch.to(device), rule, rgb)
                        what = f"{channels}x{h}x{w} {dtype} rgb={rgb}"
                        if device == "cpu":
                            assert_same(got, want, what)
                        else:  # CUDA divides by a scalar through its reciprocal: only specials
                            assert_same(got[special_at], want[special_at], what)


def test_device_conversion_at_every_position_on_cpu_tensors() -> None:
    check_device_path("cpu")


@CUDA
def test_device_conversion_at_every_position_on_cuda() -> None:
    check_device_path("cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_save_image_grid_conversion_at_every_position(dtype: torch.dtype) -> None:
    """save_image converts non-float32 grids itself (torchvision's ops in the grid's dtype)."""
    for h, w in [*SMALL_PLANES, LARGE_PLANE]:
        batch = special_batch(3, h, w).to(dtype)
        want = expected(batch)
        special_at = ~torch.isfinite(batch.to(torch.float32)).all(1).numpy()
        for k, x in enumerate(batch):
            got = _pixels_for_sink(x).permute(1, 2, 0).numpy()
            # its own dtype may round a finite product differently: compare the specials
            assert_same(got[special_at[k]], want[k][special_at[k]],
                        f"image {k} of 3x{h}x{w} {dtype}")


@pytest.mark.parametrize("png_encoder", ["fpng", "opencv"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_real_workers_write_black_for_nan_at_every_position(tmp_path: Path, png_encoder: str,
                                                            channels: int) -> None:
    """Real workers, real encoders, real files: NaN at each position of odd planes is 0."""
    with AsyncImageSink(tmp_path, workers=2, png_encoder=png_encoder,
                        name="{shape}-{index:05d}") as sink:
        submitted = []
        for h, w in SMALL_PLANES:
            batch = special_batch(channels, h, w, seed=h * w)
            submitted.append((batch, sink.submit(batch, shape=f"{h}x{w}")))
        for batch, future in submitted:
            want = expected(batch)
            for k, path in enumerate(future.result(timeout=60)):
                assert_same(read_rgb(path), want[k], f"{path.name}")
