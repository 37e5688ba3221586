"""Pixel parity with torchvision's rule, property-tested.

The big sweeps call the worker's conversion (``to_opencv_image``) directly; a smaller sweep goes
through real workers and files; the CUDA path gets the same properties with a tolerance of 1
(its scalar division is a multiplication by the reciprocal, which can round differently).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import read_rgb, torchvision_pixels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asyncdump import AsyncImageSink
from asyncdump._protocol import FloatRule, ImageSpec
from asyncdump._worker import to_opencv_image

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
RGB = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}


def worker_pixels(x: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0),
                  mean: Any = None, std: Any = None) -> np.ndarray:
    """What a worker encodes for one (C, H, W) float array, back in RGB(A) order."""
    c, h, w = x.shape
    rule = FloatRule(value_range, None if mean is None else list(mean),
                     None if std is None else list(std))
    spec = ImageSpec(c, h, w, x.dtype.name, "nchw", converted=False, rule=rule)
    raw = np.ascontiguousarray(x).view(np.uint8).reshape(-1)
    out = to_opencv_image(raw, spec)
    return out if out.ndim == 2 else out[..., RGB[c]]


def tie_values(value_range: tuple[float, float]) -> np.ndarray:
    """Inputs whose scaled value lands on (or one float step around) k + 0.5, and beyond range."""
    lo, hi = value_range
    k = np.arange(-2, 258, dtype=np.float64)
    exact = lo + (k + 0.5) / 255.0 * (hi - lo)
    centre = exact.astype(np.float32)
    return np.concatenate([centre, np.nextafter(centre, np.float32(np.inf)),
                           np.nextafter(centre, np.float32(-np.inf)),
                           (lo + k / 255.0 * (hi - lo)).astype(np.float32)])


def f32(lo: float, hi: float) -> st.SearchStrategy[float]:
    """float32 values in [lo, hi] (any finite bounds)."""
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(
        lambda v: float(np.float32(v)))


def ranges() -> st.SearchStrategy[tuple[float, float]]:
    finite = f32(-1000, 1000)
    return st.one_of(st.just((0.0, 1.0)), st.just((-1.0, 1.0)), st.just((0.0, 255.0)),
                     st.tuples(finite, finite).filter(lambda r: r[0] < r[1]))


@settings(max_examples=300, deadline=None)
@given(value_range=ranges(), c=st.sampled_from([1, 3, 4]), data=st.data())
def test_worker_equals_torchvision_rule_for_float32(value_range: tuple[float, float], c: int,
                                                    data: st.DataObject) -> None:
    lo, hi = value_range
    span = hi - lo
    values = st.one_of(
        f32(lo - span, hi + span),  # inside and outside the range
        st.sampled_from(tie_values(value_range).tolist()),  # exact .5 ties and their neighbours
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0]),
    )
    h, w = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    x = data.draw(hnp.arrays(np.float32, (c, h, w), elements=values))
    expected = torchvision_pixels(torch.from_numpy(x.copy()), value_range=value_range)
    np.testing.assert_array_equal(worker_pixels(x, value_range), expected)


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0), (-3.7, 12.25)])
def test_every_tie_in_range(value_range: tuple[float, float]) -> None:
    x = tie_values(value_range).reshape(1, 1, -1)
    expected = torchvision_pixels(torch.from_numpy(x.copy()), value_range=value_range)
    np.testing.assert_array_equal(worker_pixels(x, value_range), expected)


@settings(max_examples=150, deadline=None)
@given(c=st.sampled_from([1, 3, 4]), data=st.data())
def test_mean_std_per_channel_equals_torchvision(c: int, data: st.DataObject) -> None:
    per_channel = st.lists(f32(-2, 2), min_size=c, max_size=c)
    mean = data.draw(per_channel)
    std = data.draw(st.lists(f32(0.01, 3), min_size=c, max_size=c))
    x = data.draw(hnp.arrays(np.float32, (c, 3, 4), elements=f32(-4, 4)))
    expected = torchvision_pixels(torch.from_numpy(x.copy()), mean=mean, std=std)
    np.testing.assert_array_equal(worker_pixels(x, mean=mean, std=std), expected)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value_range=ranges(), seed=st.integers(0, 2**16), data=st.data())
def test_end_to_end_through_workers(root: Path, value_range: tuple[float, float], seed: int,
                                    data: st.DataObject) -> None:
    """Real workers and files: batches of mixed shapes/ties/out-of-range values, one sink."""
    lo, hi = value_range
    rng = np.random.default_rng(seed)
    c = data.draw(st.sampled_from([1, 3, 4]))
    b, h, w = (int(v) for v in rng.integers(1, 6, size=3))
    span = hi - lo
    x = rng.uniform(lo - span / 2, hi + span / 2, size=(b, c, h, w)).astype(np.float32)
    ties = tie_values(value_range)
    flat = x.reshape(-1)
    flat[: min(flat.size, ties.size)] = rng.permutation(ties)[: flat.size]
    flat[-1] = np.nan
    root.mkdir(exist_ok=True)  # a fresh folder per example: hypothesis may draw a seed twice
    folder = tempfile.mkdtemp(prefix=f"s{seed}-", dir=root)
    with AsyncImageSink(folder, workers=1, value_range=value_range) as sink:
        paths = sink.submit(torch.from_numpy(x)).result(timeout=30)
    for i, path in enumerate(paths):
        expected = torchvision_pixels(torch.from_numpy(x[i].copy()), value_range=value_range)
        np.testing.assert_array_equal(read_rgb(path), expected)


@CUDA
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value_range=ranges(), c=st.sampled_from([1, 3, 4]), seed=st.integers(0, 2**16))
def test_cuda_path_within_one_of_torchvision(root: Path, value_range: tuple[float, float], c: int,
                                             seed: int) -> None:
    lo, hi = value_range
    rng = np.random.default_rng(seed)
    span = hi - lo
    x = rng.uniform(lo - span / 2, hi + span / 2, size=(3, c, 6, 7)).astype(np.float32)
    ties = tie_values(value_range)
    x.reshape(-1)[: ties.size] = ties[: x.size]
    with AsyncImageSink(root / f"c{seed}", workers=1, value_range=value_range) as sink:
        paths = sink.submit(torch.from_numpy(x).cuda()).result(timeout=30)
    for i, path in enumerate(paths):
        expected = torchvision_pixels(torch.from_numpy(x[i].copy()), value_range=value_range)
        diff = np.abs(read_rgb(path).astype(int) - expected.astype(int))
        assert diff.max() <= 1


@CUDA
def test_cuda_default_range_and_mean_std_are_exact_or_within_one(root: Path) -> None:
    torch.manual_seed(3)
    x = torch.randn(4, 3, 16, 16)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    with AsyncImageSink(root / "d") as sink:
        plain = sink.submit(x.cuda()).result(timeout=30)
    with AsyncImageSink(root / "ms", mean=mean, std=std) as sink:
        normed = sink.submit(x.cuda()).result(timeout=30)
    for i in range(4):
        np.testing.assert_array_equal(read_rgb(plain[i]), torchvision_pixels(x[i]))
        diff = read_rgb(normed[i]).astype(int) - torchvision_pixels(x[i], mean=mean, std=std)
        assert np.abs(diff).max() <= 1
