"""One test per row of the input table (docs/inputs.md), on every path.

Each row is run with a numpy array, a CPU tensor and a CUDA tensor (skipped without CUDA),
through real workers and real files, and read back with OpenCV. The CUDA path may differ by 1
where its float math rounds differently (docs/api.md); the others must be exact.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from helpers import read_rgb, torchvision_pixels
from sink_pool import Sinks, shared_sinks

PATHS = [
    "numpy",
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA")),
]
TORCH_ONLY = [p for p in PATHS if p != "numpy"]


def to_path(x: np.ndarray | torch.Tensor, kind: str) -> Any:
    """The same values as a numpy array, a CPU tensor or a CUDA tensor."""
    if kind == "numpy":
        return x.numpy() if isinstance(x, torch.Tensor) else x
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.cuda() if kind == "cuda" else t


def assert_pixels(got: np.ndarray, expected: np.ndarray, kind: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if kind == "cuda":
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    else:
        np.testing.assert_array_equal(got, expected)


def rule(x: Any, **kwargs: Any) -> np.ndarray:
    """docs/api.md's rule (= torchvision's) for one (C, H, W) image, computed in float32."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return torchvision_pixels(t.detach().cpu().float(), **kwargs)


def hwc(x: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(np.moveaxis(x, 0, -1))
    return out[..., 0] if out.shape[-1] == 1 else out


@pytest.fixture(scope="module")
def sinks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sinks]:
    yield from shared_sinks(tmp_path_factory.mktemp("inputs"))


RNG = np.random.default_rng(7)
FLOATS = (RNG.standard_normal((3, 3, 6, 5)) * 0.7 + 0.5).astype(np.float32)
FLOATS[0, 0, 0, :3] = [0.5 / 255, 254.5 / 255, 1.5 / 255]  # exact .5 ties


# ---------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_row_float_dtypes_follow_the_rule(sinks: Sinks, kind: str, dtype: str) -> None:
    x = FLOATS.astype(dtype)
    with nullcontext(sinks()) as sink:
        paths = sink.submit(to_path(x, kind)).result(timeout=30)
    for i, path in enumerate(paths):  # float64 is rounded to float32 first (the rule's input)
        assert_pixels(read_rgb(path), rule(x[i].astype(np.float32)), kind)


@pytest.mark.parametrize("kind", TORCH_ONLY)
def test_row_bfloat16_follows_the_rule(sinks: Sinks, kind: str) -> None:
    x = torch.from_numpy(FLOATS).to(torch.bfloat16)
    with nullcontext(sinks()) as sink:
        paths = sink.submit(to_path(x, kind)).result(timeout=30)
    for i, path in enumerate(paths):
        assert_pixels(read_rgb(path), rule(x[i]), kind)


@pytest.mark.parametrize("kind", PATHS)
def test_row_uint8_as_is(sinks: Sinks, kind: str) -> None:
    x = RNG.integers(0, 256, size=(2, 3, 5, 7), dtype=np.uint8)
    with nullcontext(sinks()) as sink:
        paths = sink.submit(to_path(x, kind)).result(timeout=30)
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(read_rgb(path), hwc(x[i]))


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_row_uint16_as_is_in_16_bit_png_and_tiff(sinks: Sinks, kind: str, fmt: str) -> None:
    x = RNG.integers(0, 65536, size=(2, 3, 5, 7), dtype=np.uint16)
    x[0, :, 0, 0] = (0, 65535, 257)
    with nullcontext(sinks(format=fmt)) as sink:
        paths = sink.submit(to_path(x, kind)).result(timeout=30)
        gray = sink.submit(to_path(x[0, 0], kind), names=[f"u16_gray_{kind}"]).result(timeout=30)
    for i, path in enumerate(paths):
        back = read_rgb(path)
        assert back.dtype == np.uint16
        np.testing.assert_array_equal(back, hwc(x[i]))
    np.testing.assert_array_equal(read_rgb(gray[0]), x[0, 0])


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("fmt", ["jpg", "jpeg", "webp", "bmp"])
def test_row_uint16_refused_by_8_bit_formats(sinks: Sinks, kind: str, fmt: str) -> None:
    with nullcontext(sinks(format=fmt)) as sink:
        before = sink.stats.submitted
        with pytest.raises(ValueError, match=rf"format '{fmt}' cannot store 16-bit images; "
                                             r"use png or tiff"):
            sink.submit(to_path(np.zeros((3, 4, 4), np.uint16), kind))
        assert sink.stats.submitted == before


@pytest.mark.parametrize("kind", PATHS)
def test_row_bool_is_0_or_255(sinks: Sinks, kind: str) -> None:
    x = RNG.random((2, 3, 4, 6)) > 0.5
    with nullcontext(sinks()) as sink:
        paths = sink.submit(to_path(x, kind)).result(timeout=30)
        gray = sink.submit(to_path(x[0, :1], kind), names=[f"bool_gray_{kind}"]).result(timeout=30)
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(read_rgb(path), hwc(x[i].astype(np.uint8) * 255))
    np.testing.assert_array_equal(read_rgb(gray[0]), x[0, 0].astype(np.uint8) * 255)


# ---------------------------------------------------------------------- shapes and channels
@pytest.mark.parametrize("kind", PATHS)
def test_row_shapes_bchw_chw_hw(sinks: Sinks, kind: str) -> None:
    x = FLOATS
    with nullcontext(sinks()) as sink:
        batch = sink.submit(to_path(x, kind)).result(timeout=30)
        one = sink.submit(to_path(x[1], kind)).result(timeout=30)
        plane = sink.submit(to_path(x[2, 1], kind)).result(timeout=30)
    assert len(batch) == 3 and len(one) == 1 and len(plane) == 1
    assert_pixels(read_rgb(one[0]), rule(x[1]), kind)
    gray = cv2.imread(str(plane[0]), cv2.IMREAD_UNCHANGED)
    assert gray.ndim == 2  # (H, W) -> a one-channel file
    assert_pixels(gray, rule(x[2, 1:2]), kind)


def bmp32_rgba(path: Path) -> np.ndarray:
    """A 32-bit BMP's pixels as RGBA, read from the file's bytes (bottom-up BGRA rows)."""
    data = path.read_bytes()
    offset = int.from_bytes(data[10:14], "little")
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)
    assert int.from_bytes(data[28:30], "little") == 32
    pixels = np.frombuffer(data, np.uint8, abs(height) * width * 4, offset)
    bgra = pixels.reshape(abs(height), width, 4)
    if height > 0:
        bgra = bgra[::-1]
    return bgra[..., [2, 1, 0, 3]]


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("fmt", ["png", "tiff", "webp", "bmp"])
def test_row_channels_1_3_4_and_alpha_kept(sinks: Sinks, kind: str, fmt: str) -> None:
    x = RNG.integers(0, 256, size=(3, 4, 8, 8), dtype=np.uint8)
    x[:, 3] = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # a visible alpha ramp
    quality = {"quality": 100} if fmt == "webp" else {}
    with nullcontext(sinks(format=fmt, **quality)) as sink:
        gray, rgb, rgba = (sink.submit(to_path(x[:, :c], kind), names=[f"{kind}_c{c}_{i}" for i in range(3)])
                           .result(timeout=30) for c in (1, 3, 4))
    # OpenCV 4 writes a 32-bit BMP with a plain header (no alpha mask): the alpha bytes are in
    # the file, but readers (OpenCV 4's own, PIL) take them for padding (docs/inputs.md)
    read_rgba = bmp32_rgba if fmt == "bmp" and int(cv2.__version__.split(".")[0]) < 5 else read_rgb
    back = read_rgba(rgba[0])
    assert back.shape == (8, 8, 4)
    if fmt == "webp":  # lossy even at 100; alpha stays (WebP has no gray mode: 1 -> R=G=B)
        assert np.abs(back[..., 3].astype(int) - x[0, 3]).max() <= 2
        assert read_rgb(rgb[0]).shape == (8, 8, 3)
        return
    for i in range(3):
        np.testing.assert_array_equal(read_rgba(rgba[i]), hwc(x[i]))
        np.testing.assert_array_equal(read_rgb(rgb[i]), hwc(x[i, :3]))
        back_gray = read_rgb(gray[i])
        if fmt == "bmp" and back_gray.ndim == 3:  # BMP may store gray as a palette image
            back_gray = back_gray[..., 0]
        np.testing.assert_array_equal(back_gray, x[i, 0])


# ---------------------------------------------------------------------- layouts
def layouts(kind: str) -> list[tuple[str, Any, np.ndarray]]:
    """(label, input, the NCHW values it holds) for channels-last and non-contiguous views."""
    base = np.ascontiguousarray(RNG.random((4, 3, 10, 12), dtype=np.float32))
    t = torch.from_numpy(base).cuda() if kind == "cuda" else torch.from_numpy(base)
    cases: list[tuple[str, Any, np.ndarray]] = []
    if kind == "numpy":
        nhwc = np.ascontiguousarray(base.transpose(0, 2, 3, 1))
        cases += [("channels-last", nhwc.transpose(0, 3, 1, 2), base),
                  ("negative strides", base[:, :, ::-1, ::-1], base[:, :, ::-1, ::-1]),
                  ("hwc view", nhwc[0].transpose(2, 0, 1), base[0:1])]
    else:
        cases += [("channels-last", t.contiguous(memory_format=torch.channels_last), base),
                  ("hwc view", t[0].permute(1, 2, 0).contiguous().permute(2, 0, 1), base[0:1])]
    view = base if kind == "numpy" else t
    cases += [("strided slice", view[::2, :, 1::3, ::2], base[::2, :, 1::3, ::2]),
              ("transposed H/W", view.transpose(0, 1, 3, 2) if kind == "numpy" else view.transpose(2, 3),
               base.transpose(0, 1, 3, 2)),
              ("channel subset", view[:, 1:2], base[:, 1:2])]
    return cases


@pytest.mark.parametrize("kind", PATHS)
def test_row_channels_last_and_non_contiguous_views(sinks: Sinks, kind: str) -> None:
    with nullcontext(sinks()) as sink:
        results = [(label, sink.submit(x).result(timeout=30), values)
                   for label, x, values in layouts(kind)]
    for label, paths, values in results:
        values = values[None] if values.ndim == 3 else values
        assert len(paths) == len(values), label
        for i, path in enumerate(paths):
            assert_pixels(read_rgb(path), rule(values[i]), kind)


# ---------------------------------------------------------------------- autograd, reuse
@pytest.mark.parametrize("kind", TORCH_ONLY)
def test_row_requires_grad_keeps_no_graph_alive(sinks: Sinks, kind: str) -> None:
    leaf = to_path(FLOATS, kind).requires_grad_(True)
    with nullcontext(sinks()) as sink:
        out = leaf * 2.0 - 0.5  # a non-leaf with a graph behind it
        ref = weakref.ref(out)
        future = sink.submit(out)
        expected = [rule(out[i]) for i in range(3)]
        del out
        gc.collect()
        assert ref() is None  # nothing in the sink holds the tensor (or its graph)
        paths = future.result(timeout=30)
    assert leaf.grad is None
    for i, path in enumerate(paths):
        assert_pixels(read_rgb(path), expected[i], kind)


@pytest.mark.parametrize("kind", PATHS)
def test_row_caller_may_overwrite_right_after_submit(sinks: Sinks, kind: str) -> None:
    x = to_path(FLOATS.copy(), kind)
    values = [(FLOATS * (step + 1) / 4).astype(np.float32) for step in range(4)]
    with nullcontext(sinks()) as sink:
        futures = []
        for step in range(4):
            if kind == "numpy":
                x[...] = values[step]
            else:
                x.copy_(torch.from_numpy(values[step]))
            futures.append(sink.submit(x, step=step))
            # At once: on CUDA this is queued on the same stream, after the staging copy.
            x[...] = -3.0
        for step, future in enumerate(futures):
            for i, path in enumerate(future.result(timeout=30)):
                assert_pixels(read_rgb(path), rule(values[step][i]), kind)


# ---------------------------------------------------------------------- conversion options
@pytest.mark.parametrize("kind", PATHS)
def test_row_mean_std_per_channel(sinks: Sinks, kind: str) -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = ((FLOATS - 0.5) * 2).astype(np.float32)
    with nullcontext(sinks(mean=mean, std=std)) as sink:
        paths = sink.submit(to_path(x, kind)).result(timeout=30)
    with nullcontext(sinks(mean=(0.5,), std=(0.25,))) as sink:
        gray = sink.submit(to_path(x[:, :1], kind)).result(timeout=30)
    for i in range(3):
        assert_pixels(read_rgb(paths[i]), rule(x[i], mean=mean, std=std), kind)
        assert_pixels(read_rgb(gray[i]), rule(x[i, :1], mean=(0.5,), std=(0.25,)), kind)


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 255.0), (0.25, 0.5)])
def test_row_value_range(sinks: Sinks, kind: str, value_range: tuple[float, float]) -> None:
    lo, hi = value_range
    x = (FLOATS * (hi - lo) + lo).astype(np.float32)
    with nullcontext(sinks(value_range=value_range)) as sink:
        paths = sink.submit(to_path(x, kind)).result(timeout=30)
    for i, path in enumerate(paths):
        assert_pixels(read_rgb(path), rule(x[i], value_range=value_range), kind)


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_row_nan_is_0_and_inf_is_clamped(sinks: Sinks, kind: str, dtype: str) -> None:
    x = np.array([[[np.nan, np.inf, -np.inf, 0.5, 2.0, -1.0]]], dtype=dtype)
    with nullcontext(sinks(value_range=(-1.0, 1.0))) as sink:
        ranged = sink.submit(to_path(x, kind), names=[f"ranged_{kind}_{dtype}"]).result(timeout=30)
    with nullcontext(sinks()) as sink:
        plain = sink.submit(to_path(x, kind), names=[f"plain_{kind}_{dtype}"]).result(timeout=30)
    np.testing.assert_array_equal(read_rgb(plain[0])[0], [0, 255, 0, 128, 255, 0])
    np.testing.assert_array_equal(read_rgb(ranged[0])[0], [0, 255, 0, 191, 255, 0])


# ---------------------------------------------------------------------- rejections
REJECTIONS: list[tuple[str, Any, type[Exception], str]] = [
    ("1-D", np.zeros(8, np.float32), ValueError,
     r"must have shape \(B, C, H, W\), \(C, H, W\) or \(H, W\).*got shape \(8,\)"),
    ("5-D", np.zeros((1, 1, 3, 4, 4), np.float32), ValueError, r"C in \{1, 3, 4\}.*got shape"),
    ("2 channels", np.zeros((2, 8, 8), np.float32), ValueError,
     r"must have 1, 3 or 4 channels \(C in \{1, 3, 4\}.*got 2 channels in shape \(2, 8, 8\)"),
    ("HWC", np.zeros((8, 8, 3), np.uint8), ValueError, r"channels-last arrays: pass arr\.transpose"),
    ("empty W", np.zeros((3, 8, 0), np.uint8), ValueError, "H, W >= 1"),
    ("int16", np.zeros((3, 4, 4), np.int16), TypeError,
     "unsupported dtype int16; accepted: float16, bfloat16 .torch., float32, float64, uint8, "
     "uint16, bool"),
    ("complex", np.zeros((3, 4, 4), np.complex64), TypeError, "unsupported dtype complex64; accepted"),
    ("list", [[0.0]], TypeError, "must be a torch.Tensor or numpy.ndarray, got list"),
]


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("label,x,error,match", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_row_rejections_name_the_problem_and_the_alternatives(
        sinks: Sinks, kind: str, label: str, x: Any, error: type[Exception], match: str) -> None:
    if kind != "numpy" and isinstance(x, np.ndarray):
        if x.dtype == np.int16:
            x, match = torch.zeros(3, 4, 4, dtype=torch.int16), match.replace("int16;", "torch.int16;")
        elif x.dtype == np.complex64:
            x, match = torch.zeros(3, 4, 4, dtype=torch.complex64), "unsupported dtype torch.complex64"
        else:
            x = to_path(x, kind)
    with nullcontext(sinks(format="png")) as sink:
        before = sink.stats.submitted
        with pytest.raises(error, match=match):
            sink.submit(x)
        assert sink.stats.submitted == before and sink.stats.buffered_bytes == 0
        assert sink.submit(np.zeros((3, 4, 4), np.uint8)).result(timeout=30)  # still usable


@pytest.mark.parametrize("kind", PATHS)
def test_row_rgba_refused_by_jpeg_with_the_alternatives(sinks: Sinks, kind: str) -> None:
    with nullcontext(sinks(format="jpg")) as sink:
        with pytest.raises(ValueError, match=r"cannot store 4-channel.*use png, webp or tiff"):
            sink.submit(to_path(np.zeros((4, 4, 4), np.uint8), kind))
