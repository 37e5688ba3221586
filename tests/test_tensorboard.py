"""``asyncdump.tensorboard.ImageWriter`` against the real ``SummaryWriter``: the same tensors
through both, read back with TensorBoard's own reader, every pixel, size, tag, step, walltime."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard_events import images
from torch.utils.tensorboard import SummaryWriter

from asyncdump.tensorboard import ImageWriter

SIDE_H, SIDE_W = 5, 6


def float_values(shape: tuple[int, ...], seed: int, nan: bool = False) -> np.ndarray:
    """Values in and out of [0, 1], exact multiples of 1/255 (where truncating and rounding
    differ most), infinities, and NaN if asked."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.3, 1.3, shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7] = rng.integers(0, 256, flat[::7].shape) / np.float32(255)
    if nan:
        flat[1::11] = np.nan
    flat[2::13] = np.inf
    flat[3::17] = -np.inf
    return x


def make(dtype: str, source: str, shape: tuple[int, ...], seed: int, nan: bool = False) -> Any:
    if dtype == "uint8":
        array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    else:
        array = float_values(shape, seed, nan).astype(dtype)
    return torch.from_numpy(array) if source == "torch" else array


def shape_for(fmt: str, n: int, c: int) -> tuple[int, ...]:
    sizes = {"N": n, "C": c, "H": SIDE_H, "W": SIDE_W}
    return tuple(sizes[letter] for letter in fmt)


def both(tmp_path: Path, calls: list[tuple[str, str, Any, dict[str, Any]]],
         **sink_options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Make each ``(method, tag, tensor, kwargs)`` call on a SummaryWriter and through an
    ImageWriter; return both event files' images by tag."""
    reference = SummaryWriter(str(tmp_path / "reference"))
    ours = SummaryWriter(str(tmp_path / "ours"))
    with ImageWriter(ours, **sink_options) as writer:
        for method, tag, tensor, kwargs in calls:
            getattr(reference, method)(tag, tensor, **kwargs)
            getattr(writer, method)(tag, tensor, **kwargs)
    reference.close()
    ours.close()
    return images(tmp_path / "reference"), images(tmp_path / "ours")


def assert_same(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert sorted(got) == sorted(expected)
    for tag, events in expected.items():
        assert len(got[tag]) == len(events), tag
        for want, have in zip(events, got[tag], strict=True):
            assert (have.step, have.wall_time, have.width, have.height) == \
                (want.step, want.wall_time, want.width, want.height), tag
            assert have.pixels.shape == want.pixels.shape, tag
            np.testing.assert_array_equal(have.pixels, want.pixels, err_msg=tag)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # SummaryWriter on NaN
def test_add_images_matches_summary_writer(tmp_path: Path) -> None:
    calls = []
    seed = 0
    for dtype in ("float32", "float16", "uint8"):
        for source in ("torch", "numpy"):
            for channels in (1, 3):
                for fmt in ("NCHW", "NHWC"):
                    for n in (1, 7, 9, 64):
                        seed += 1
                        tensor = make(dtype, source, shape_for(fmt, n, channels), seed)
                        tag = f"{dtype}/{source}/c{channels}/{fmt}/n{n}"
                        calls.append(("add_images", tag, tensor,
                                      {"global_step": seed, "walltime": 1000.0 + seed,
                                       "dataformats": fmt}))
    expected, got = both(tmp_path, calls, workers=2)
    assert len(expected) == 96
    assert_same(expected, got)
    grid = got["float32/torch/c3/NCHW/n9"][0]
    assert (grid.height, grid.width) == (2 * SIDE_H, 8 * SIDE_W)  # 8 columns, no padding


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
@pytest.mark.usefixtures("both_png_encoders")  # fpng and OpenCV give the same pixels
def test_add_image_matches_summary_writer(tmp_path: Path) -> None:
    calls = []
    seed = 100
    for dtype in ("float32", "float16", "uint8", "float64", "bool"):
        for source in ("torch", "numpy"):
            for fmt, channel_counts in (("CHW", (1, 3, 4)), ("HWC", (1, 3, 4)), ("HW", (1,)),
                                        ("WCH", (3,)), ("NCHW", (3,))):
                for channels in channel_counts:
                    seed += 1
                    shape = shape_for(fmt, 3, channels)
                    if dtype == "bool":
                        tensor = make("uint8", source, shape, seed) > 127
                    else:
                        tensor = make(dtype, source, shape, seed)
                    calls.append(("add_image", f"{dtype}/{source}/{fmt}/c{channels}", tensor,
                                  {"global_step": seed, "walltime": 5.0 + seed, "dataformats": fmt}))
    calls.append(("add_image", "bfloat16", torch.from_numpy(float_values((3, 4, 4), 7)).bfloat16(), {}))
    calls.append(("add_image", "strided", torch.rand(3, 8, 12)[:, ::2, 1::3], {"global_step": 1}))
    calls.append(("add_images", "channels_last", torch.rand(5, 3, 4, 6).to(
        memory_format=torch.channels_last), {}))
    expected, got = both(tmp_path, calls, workers=1)
    for events in (expected, got):  # walltime None: each writer stamps its own clock
        for tag in ("bfloat16", "strided", "channels_last"):
            events[tag] = [e._replace(wall_time=0.0) for e in events[tag]]
    assert_same(expected, got)
    assert got["float32/torch/CHW/c4"][0].pixels.shape == (SIDE_H, SIDE_W, 4)  # RGBA stays RGBA
    assert got["uint8/numpy/HW/c1"][0].pixels.shape == (SIDE_H, SIDE_W, 3)  # gray -> RGB


def test_range_is_clipped_then_truncated(tmp_path: Path) -> None:
    value = np.array([-np.inf, -0.5, 0.5, 1.0 / 255 - 1e-7, 254.9 / 255, 2.0, np.inf], np.float32)
    image = np.broadcast_to(value.reshape(1, 1, 7), (3, 1, 7)).copy()
    with ImageWriter(SummaryWriter(str(tmp_path)), workers=1) as writer:
        writer.add_image("x", image)
    writer.writer.close()
    pixels = images(tmp_path)["x"][0].pixels[0, :, 0]
    assert pixels.tolist() == [0, 0, 127, 0, 254, 255, 255]  # rounding: 128, 1, 255


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_nan_is_black_as_in_summary_writer(tmp_path: Path) -> None:
    calls = [("add_images", f"{dtype}/{fmt}", make(dtype, "numpy", shape_for(fmt, 9, 3), i, nan=True),
              {"global_step": i, "walltime": 1.0, "dataformats": fmt})
             for i, (dtype, fmt) in enumerate((("float32", "NCHW"), ("float16", "NHWC"),
                                               ("float64", "NCHW")))]
    calls.append(("add_image", "gray", make("float32", "torch", (1, 8, 8), 9, nan=True),
                  {"walltime": 1.0}))
    expected, got = both(tmp_path, calls, workers=1)
    assert_same(expected, got)
    assert (got["gray"][0].pixels[0, 1] == 0).all()  # flat index 1 is NaN: black


def test_walltime_is_the_calls_and_the_pixels_are_the_calls(tmp_path: Path) -> None:
    tensor = torch.full((2, 3, 4, 4), 0.5)
    with ImageWriter(SummaryWriter(str(tmp_path)), workers=1) as writer:
        before = time.time()
        writer.add_images("x", tensor, global_step=3)
        after = time.time()
        tensor.fill_(1.0)  # the caller may reuse the memory at once
        time.sleep(0.2)  # the encode happens later than the call
    writer.writer.close()
    (event,) = images(tmp_path)["x"]
    assert before <= event.wall_time <= after and event.step == 3
    assert (event.pixels == 127).all()


def test_signatures_are_summary_writers() -> None:
    for name in ("add_image", "add_images"):
        theirs = inspect.signature(getattr(SummaryWriter, name)).parameters
        ours = inspect.signature(getattr(ImageWriter, name)).parameters
        assert list(ours) == list(theirs)
        assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


REJECTED_BY_BOTH = [
    ("add_images", torch.rand(2, 4, 5, 5), {}),  # 4 channels in a grid
    ("add_images", torch.rand(2, 2, 5, 5), {}),
    ("add_images", torch.rand(0, 3, 5, 5), {}),  # no image
    ("add_images", torch.rand(3, 5, 5), {}),  # 3 dims, 4 letters
    ("add_image", torch.rand(3, 0, 5), {}),  # empty
    ("add_image", torch.rand(5, 5, 5), {}),  # 5 channels
    ("add_image", torch.rand(3, 5, 5), {"dataformats": "CCW"}),
    ("add_image", torch.rand(1, 3, 5, 5), {}),  # 4 dims, 3 letters
]


@pytest.mark.parametrize(("method", "tensor", "kwargs"), REJECTED_BY_BOTH)
def test_rejects_what_summary_writer_rejects(tmp_path: Path, method: str, tensor: Any,
                                             kwargs: dict[str, Any]) -> None:
    reference = SummaryWriter(str(tmp_path / "reference"))
    with pytest.raises(Exception):  # noqa: B017 - SummaryWriter raises AssertionError and others
        getattr(reference, method)("x", tensor, **kwargs)
    reference.close()
    with ImageWriter(SummaryWriter(str(tmp_path / "ours")), workers=1) as writer:
        with pytest.raises(ValueError):
            getattr(writer, method)("x", tensor, **kwargs)
        writer.add_image("ok", torch.rand(3, 4, 4))  # still usable, nothing half-written
    writer.writer.close()
    assert list(images(tmp_path / "ours")) == ["ok"]


def test_rejects_what_it_does_not_support_with_a_clear_error(tmp_path: Path) -> None:
    with ImageWriter(SummaryWriter(str(tmp_path)), workers=1) as writer:
        with pytest.raises(TypeError, match="dtype"):
            writer.add_image("x", torch.ones(3, 4, 4, dtype=torch.int32))
        with pytest.raises(ValueError, match="1, 3 or 4 channels"):  # SummaryWriter: gray+alpha
            writer.add_image("x", torch.rand(2, 4, 4))
        with pytest.raises(TypeError, match=r"torch\.Tensor or numpy\.ndarray"):
            writer.add_image("x", [[0.0]])
        with pytest.raises(TypeError, match="tag"):
            writer.add_image(3, torch.rand(3, 4, 4))
        with pytest.raises(TypeError, match="global_step"):
            writer.add_image("x", torch.rand(3, 4, 4), global_step="later")
    with pytest.raises(TypeError, match="accepted"):
        ImageWriter(writer.writer, value_range=(-1, 1))
    with pytest.raises(TypeError, match="SummaryWriter"):
        ImageWriter(str(tmp_path))
    with pytest.raises(RuntimeError, match="closed"):
        writer.add_image("x", torch.rand(3, 4, 4))
    writer.close()  # idempotent
    writer.writer.close()


def test_device_picture_is_summary_writers_rule() -> None:
    """The CUDA path's conversion (run here on CPU tensors): TensorBoard's pixels exactly."""
    from torch.utils.tensorboard._convert_np import make_np
    from torch.utils.tensorboard._utils import convert_to_HWC

    from asyncdump._tb_layout import device_picture, plan

    for tensor, fmt in ((torch.from_numpy(float_values((9, 1, 3, 4), 1, nan=True)), "NCHW"),
                        (torch.from_numpy(float_values((7, 3, 4, 3), 2)).half(), "NHWC"),
                        (torch.from_numpy(float_values((3, 4, 5), 3)).bfloat16(), "CHW"),
                        (torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8), "HWC")):
        hwc = convert_to_HWC(make_np(tensor), fmt)
        scale = 1 if hwc.dtype == np.uint8 else 255
        with np.errstate(invalid="ignore"):
            want = (hwc.astype(np.float32) * scale).clip(0, 255).astype(np.uint8)
        got = device_picture(tensor, plan(tuple(tensor.shape), fmt)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_match_summary_writer(tmp_path: Path) -> None:
    x = torch.from_numpy(float_values((9, 3, 6, 5), 4))
    calls = [("add_images", "cuda", x.cuda(), {"global_step": 1, "walltime": 2.0}),
             ("add_image", "cuda1", x[0, :1].cuda(), {"global_step": 2, "walltime": 3.0})]
    expected, got = both(tmp_path, calls, workers=1)
    assert_same(expected, got)


def test_import_asyncdump_does_not_import_tensorboard() -> None:
    code = ("import sys, asyncdump; print(any(m == 'tensorboard' or m.startswith('tensorboard.') "
            "or m.endswith('.tensorboard') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_workers_import_neither_torch_nor_tensorboard(tmp_path: Path) -> None:
    with ImageWriter(SummaryWriter(str(tmp_path)), workers=1) as writer:
        writer.add_images("x", torch.rand(2, 3, 4, 4))
        for modules in writer._sink.worker_modules().values():
            assert not any(m.split(".")[0] in ("torch", "tensorboard") for m in modules)
    writer.writer.close()
