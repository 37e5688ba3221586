"""asyncdump.save_image against golden grids from torchvision's own algorithm.

``golden`` below is torchvision.utils.make_grid + save_image transcribed op for op (torchvision
is not a dependency): list -> stack, gray -> 3 channels, clone + norm_ip with value_range or
(float(min), float(max)) per batch or per image, B == 1 -> the image itself, else a pad_value
canvas with images at (y * (H + padding) + padding, x * (W + padding) + padding); then
mul(255).add_(0.5).clamp_(0, 255) -> uint8 -> PIL. Files are compared decoded, pixel for pixel,
and in PIL mode (RGB / RGBA).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import asyncdump
from asyncdump import AsyncDumpError, grid

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def golden_grid(tensor: Any, nrow: int = 8, padding: int = 2, normalize: bool = False,
                value_range: tuple[float, float] | None = None, scale_each: bool = False,
                pad_value: float = 0.0) -> torch.Tensor:
    if isinstance(tensor, list):
        tensor = torch.stack(tensor, dim=0)
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() == 3:
        if tensor.size(0) == 1:
            tensor = torch.cat((tensor, tensor, tensor), 0)
        tensor = tensor.unsqueeze(0)
    if tensor.dim() == 4 and tensor.size(1) == 1:
        tensor = torch.cat((tensor, tensor, tensor), 1)
    if normalize is True:
        tensor = tensor.clone()

        def norm_ip(img: torch.Tensor, low: float, high: float) -> None:
            img.clamp_(min=low, max=high)
            img.sub_(low).div_(max(high - low, 1e-5))

        def norm_range(t: torch.Tensor, value_range: Any) -> None:
            if value_range is not None:
                norm_ip(t, value_range[0], value_range[1])
            else:
                norm_ip(t, float(t.min()), float(t.max()))

        if scale_each is True:
            for t in tensor:
                norm_range(t, value_range)
        else:
            norm_range(tensor, value_range)
    if tensor.size(0) == 1:
        return tensor.squeeze(0)
    nmaps = tensor.size(0)
    xmaps = min(nrow, nmaps)
    ymaps = math.ceil(nmaps / xmaps)  # torchvision: int(math.ceil(float(...)))
    height, width = int(tensor.size(2) + padding), int(tensor.size(3) + padding)
    num_channels = tensor.size(1)
    out = tensor.new_full((num_channels, height * ymaps + padding, width * xmaps + padding),
                          pad_value)
    k = 0
    for y in range(ymaps):
        for x in range(xmaps):
            if k >= nmaps:
                break
            out.narrow(1, y * height + padding, height - padding).narrow(
                2, x * width + padding, width - padding).copy_(tensor[k])
            k = k + 1
    return out


def golden(tensor: Any, **kwargs: Any) -> np.ndarray:
    """The HWC uint8 array torchvision hands to PIL."""
    with torch.no_grad():
        g = golden_grid(tensor, **kwargs)
        return g.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def assert_same_file_pixels(path: Path, expected: np.ndarray, tmp_path: Path) -> None:
    ours = Image.open(path)
    reference_path = tmp_path / f"pil_{path.name}"
    Image.fromarray(expected).save(reference_path)  # what torchvision would have written
    theirs = Image.open(reference_path)
    assert ours.mode == theirs.mode and ours.size == theirs.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


BATCH = torch.Generator().manual_seed(0)
X = torch.randn(10, 3, 9, 7, generator=BATCH) * 1.5  # values well outside [0, 1] and [-1, 1]

CASES: list[tuple[str, Any, dict[str, Any]]] = [
    ("plain", X, {}),
    ("normalize_minmax", X, {"normalize": True}),
    ("normalize_value_range", X, {"normalize": True, "value_range": (-1, 1)}),
    ("value_range_without_normalize_is_ignored", X, {"value_range": (-1, 1)}),
    ("scale_each_minmax", X, {"normalize": True, "scale_each": True}),
    ("scale_each_value_range", X, {"normalize": True, "scale_each": True,
                                   "value_range": (-2.0, 0.5)}),
    ("padding_0", X, {"padding": 0, "normalize": True}),
    ("padding_5_pad_value", X, {"padding": 5, "pad_value": 0.7}),
    ("nrow_3_not_dividing_10", X, {"nrow": 3, "normalize": True}),
    ("nrow_larger_than_batch", X, {"nrow": 16}),
    ("nrow_1", X[:4], {"nrow": 1}),
    ("single_image_4d", X[:1], {"normalize": True}),
    ("single_image_3d", X[0], {"padding": 7}),
    ("gray_batch", X[:, :1], {"nrow": 4}),
    ("gray_3d", X[0, :1], {"normalize": True}),
    ("hw_2d", X[0, 0], {"normalize": True, "value_range": (-1, 1)}),
    ("list_of_tensors", list(X[:5]), {"nrow": 2}),
    ("rgba", torch.rand(5, 4, 6, 6, generator=BATCH), {"pad_value": 1.0}),
    ("constant_image_normalize", torch.full((3, 3, 4, 4), 0.25), {"normalize": True}),
    ("ties", torch.tensor([(k + 0.5) / 255 for k in range(48)]).view(1, 3, 4, 4), {}),
]


@pytest.mark.parametrize("label,tensor,kwargs", CASES, ids=[c[0] for c in CASES])
def test_matches_golden_grid(tmp_path: Path, label: str, tensor: Any, kwargs: dict[str, Any]) -> None:
    path = tmp_path / f"{label}.png"
    future = asyncdump.save_image(tensor, path, **kwargs)
    assert future.result(timeout=30) == [path]
    assert_same_file_pixels(path, golden(tensor, **kwargs), tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"normalize": True}, {"normalize": True, "value_range": (-1, 1)}])
def test_other_float_dtypes_follow_torchvision_in_their_own_dtype(
        tmp_path: Path, dtype: torch.dtype, kwargs: dict[str, Any]) -> None:
    x = X.to(dtype)
    path = tmp_path / "g.png"
    asyncdump.save_image(x, path, nrow=4, **kwargs).result(timeout=30)
    assert_same_file_pixels(path, golden(x, nrow=4, **kwargs), tmp_path)


def test_uint8_and_bool_which_torchvision_rejects(tmp_path: Path) -> None:
    u8 = (torch.rand(3, 3, 5, 5, generator=BATCH) * 255).to(torch.uint8)
    asyncdump.save_image(u8, tmp_path / "u8.png", pad_value=1.0).result(timeout=30)
    expected = golden(u8.float() / 255, pad_value=1.0)  # as is, padding white
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "u8.png")), expected)
    flags = torch.rand(2, 1, 4, 4, generator=BATCH) > 0.5
    asyncdump.save_image(flags, tmp_path / "b.png").result(timeout=30)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), golden(flags.float()))


def test_uint16_grid_is_16_bit_png(tmp_path: Path) -> None:
    x = torch.randint(0, 65536, (2, 3, 4, 4), generator=BATCH, dtype=torch.int32).to(torch.uint16)
    asyncdump.save_image(x, tmp_path / "w.png", padding=1, pad_value=1.0).result(timeout=30)
    import cv2

    back = cv2.imread(str(tmp_path / "w.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert back.dtype == np.uint16 and back.shape == (6, 11, 3)
    np.testing.assert_array_equal(back[1:5, 1:5], x[0].permute(1, 2, 0).numpy())
    assert (back[0] == 65535).all()
    with pytest.raises(ValueError, match="16-bit"):
        asyncdump.save_image(x, tmp_path / "w.jpg")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 11), c=st.sampled_from([1, 3, 4]), h=st.integers(1, 6), w=st.integers(1, 6),
       nrow=st.integers(1, 12), padding=st.integers(0, 3), normalize=st.booleans(),
       value_range=st.one_of(st.none(), st.tuples(st.floats(-3, 0), st.floats(0.01, 3))),
       scale_each=st.booleans(), pad_value=st.floats(-0.5, 1.5), seed=st.integers(0, 2**16))
def test_random_arguments_match_golden(tmp_path: Path, b: int, c: int, h: int, w: int, nrow: int,
                                       padding: int, normalize: bool, value_range: Any,
                                       scale_each: bool, pad_value: float, seed: int) -> None:
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2
    kwargs = {"nrow": nrow, "padding": padding, "normalize": normalize,
              "value_range": value_range, "scale_each": scale_each, "pad_value": pad_value}
    path = tmp_path / f"h{seed}_{b}_{c}.png"
    asyncdump.save_image(x, path, **kwargs).result(timeout=30)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), golden(x, **kwargs))


def test_make_grid_equals_golden_values() -> None:
    for kwargs in ({}, {"normalize": True}, {"normalize": True, "scale_each": True},
                   {"nrow": 3, "padding": 0, "pad_value": 0.3}):
        torch.testing.assert_close(grid.make_grid(X, **kwargs), golden_grid(X, **kwargs),
                                   rtol=0, atol=0)


def test_same_path_every_step_keeps_the_last(tmp_path: Path) -> None:
    path = tmp_path / "latest.png"
    for step in range(12):
        asyncdump.save_image(torch.full((3, 4, 4), step / 255), path)
    asyncdump.flush()
    assert int(np.asarray(Image.open(path))[0, 0, 0]) == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.png"]  # no temp files left


def test_caller_may_overwrite_at_once_and_grad_is_fine(tmp_path: Path) -> None:
    x = torch.zeros(3, 8, 8, requires_grad=True)
    y = x * 1.0  # a non-leaf with a graph
    future = asyncdump.save_image(y[None], tmp_path / "single.png")  # B == 1: a view of y
    with torch.no_grad():
        y.fill_(1.0)
    future.result(timeout=30)
    assert np.asarray(Image.open(tmp_path / "single.png")).max() == 0


def test_format_from_extension_or_argument(tmp_path: Path) -> None:
    ramp = torch.linspace(0, 1, 16)
    x = torch.stack([ramp.expand(16, 16), ramp[:, None].expand(16, 16), 1 - ramp.expand(16, 16)])
    x = torch.stack([x, x.flip(2)])  # smooth: a lossy check can be tight
    names = {"a.PNG": None, "b.tif": None, "c.tiff": None, "d.bmp": None, "e.dat": "png",
             "f": "tiff", "g.jpeg": None, "h.jpg": None, "i.webp": None, "j.png": "TIF"}
    futures = [asyncdump.save_image(x, tmp_path / n, format=fmt) for n, fmt in names.items()]
    assert [f.result(timeout=30)[0].name for f in futures] == list(names)
    expected = golden(x)
    for name in names:
        back = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        if name[0] in "ghi":  # lossy: at PIL's default quality, so close to what PIL writes
            pil = tmp_path / f"pil.{name.split('.')[1]}"
            Image.fromarray(expected).save(pil)
            pil_back = np.asarray(Image.open(pil).convert("RGB")).astype(int)
            assert np.abs(back.astype(int) - pil_back).mean() < 2
        else:
            np.testing.assert_array_equal(back, expected)
    assert Image.open(tmp_path / "j.png").format == "TIFF"
    assert Image.open(tmp_path / "e.dat").format == "PNG"


def test_format_is_the_third_positional_argument_as_in_torchvision(tmp_path: Path) -> None:
    """torchvision's ``save_image(tensor, fp, format=None, **kwargs)``: valid torchvision code
    runs unchanged; the grid options are keyword-only there too (they go to make_grid)."""
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    asyncdump.save_image(x, tmp_path / "y.png", "PNG").result(timeout=30)
    asyncdump.save_image(x, tmp_path / "y.dat", "png", nrow=2, normalize=True).result(timeout=30)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "y.png")), golden(x))
    assert Image.open(tmp_path / "y.dat").format == "PNG"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "y.dat")),
                                  golden(x, nrow=2, normalize=True))
    with pytest.raises(TypeError):
        asyncdump.save_image(x, tmp_path / "z.png", None, 4)  # type: ignore[misc]
    assert not (tmp_path / "z.png").exists()


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((X, "x.gif"), {}, ValueError, r"extensions .*\.png.* or pass format="),
    ((X, "noext"), {}, ValueError, "cannot tell the image format"),
    ((X, "x.png"), {"format": "gif"}, ValueError, "format must be one of"),
    ((X, "x.png"), {"nrow": 0}, ValueError, "nrow must be an int >= 1"),
    ((X, "x.png"), {"padding": -1}, ValueError, "padding must be an int >= 0"),
    ((X, "x.png"), {"normalize": True, "value_range": (0, 1, 2)}, ValueError, "value_range"),
    ((X.long(), "x.png"), {}, TypeError, "unsupported dtype torch.int64; accepted: float16"),
    (([], "x.png"), {}, ValueError, "empty list"),
    ((X[:0], "x.png"), {}, ValueError, "empty batch"),
    ((torch.zeros(2, 2, 4, 4), "x.png"), {}, ValueError, r"C in \{1, 3, 4\}"),
    ((torch.zeros(1, 1, 1, 4, 4), "x.png"), {}, ValueError, "got shape"),
    (("not a tensor", "x.png"), {}, TypeError, "torch.Tensor, a list of tensors"),
    ((torch.rand(4, 4, 4), "x.jpg"), {}, ValueError, "cannot store 4-channel"),
])
def test_rejections_say_what_is_accepted(tmp_path: Path, args: tuple[Any, str], kwargs: dict[str, Any],
                                         error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        asyncdump.save_image(args[0], tmp_path / args[1], **kwargs)
    assert not list(tmp_path.iterdir())


def test_file_objects_are_refused_with_the_reason(tmp_path: Path) -> None:
    with open(tmp_path / "f.png", "wb") as handle, pytest.raises(TypeError, match="file objects"):
        asyncdump.save_image(X, handle)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must name a file"):
        asyncdump.save_image(X, tmp_path)


def test_failure_reaches_future_and_flush(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at most 255"):  # can never be written: at the call
        asyncdump.save_image(X, tmp_path / ("x" * 300 + ".png"))
    folder = tmp_path / "out"
    folder.mkdir()
    asyncdump.save_image(X, folder / "a.png").result(timeout=30)
    shutil.rmtree(folder)
    folder.write_bytes(b"")  # the sink's folder is now a file: the write fails in the worker
    future = asyncdump.save_image(X, folder / "b.png")
    with pytest.raises(AsyncDumpError, match="Not a directory"):
        future.result(timeout=30)
    with pytest.raises(AsyncDumpError, match="Not a directory"):
        asyncdump.flush()
    asyncdump.flush()  # reported once
    asyncdump.save_image(X, tmp_path / "fine.png").result(timeout=30)  # still usable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fine.png", "out"]


def test_many_folders_close_old_sinks_and_write_everything(tmp_path: Path) -> None:
    paths = [tmp_path / f"step{i}" / "grid.png" for i in range(grid.MAX_OPEN_SINKS + 3)]
    for i, path in enumerate(paths):
        path.parent.mkdir()
        asyncdump.save_image(torch.full((2, 3, 4, 4), i / 255), path)
    assert len(grid._SINKS.open) <= grid.MAX_OPEN_SINKS
    asyncdump.flush()
    for i, path in enumerate(paths):
        assert int(np.asarray(Image.open(path))[3, 3, 0]) == i


def test_flushed_at_exit_without_warnings(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import torch, asyncdump
        for step in range(5):
            asyncdump.save_image(torch.rand(16, 3, 32, 32), {str(tmp_path)!r} + f"/s{{step}}.png")
        asyncdump.save_image(torch.rand(3, 8, 8), {str(tmp_path)!r} + "/last.png")
    """)
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.png"] + [f"s{i}.png" for i in range(5)]


def test_with_torchvision_directly_when_installed(tmp_path: Path) -> None:
    tv_utils = pytest.importorskip("torchvision.utils")
    for i, (_, tensor, kwargs) in enumerate(CASES):
        ours, theirs = tmp_path / f"ours{i}.png", tmp_path / f"tv{i}.png"
        asyncdump.save_image(tensor, ours, **kwargs)
        tv_utils.save_image(tensor, theirs, **kwargs)
    asyncdump.flush()
    for i in range(len(CASES)):
        a, b = Image.open(tmp_path / f"ours{i}.png"), Image.open(tmp_path / f"tv{i}.png")
        assert a.mode == b.mode
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@CUDA
@pytest.mark.parametrize("kwargs", [{}, {"normalize": True}, {"normalize": True, "scale_each": True},
                                    {"normalize": True, "value_range": (-1, 1), "nrow": 3}])
def test_cuda_grid_within_one_of_golden(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    x = X.cuda()
    path = tmp_path / "cuda.png"
    asyncdump.save_image(x, path, **kwargs).result(timeout=30)
    diff = np.abs(np.asarray(Image.open(path)).astype(int) - golden(X, **kwargs).astype(int))
    assert diff.max() <= 1


def test_float32_and_uint8_grids_are_tiled_by_the_worker(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller stages the batch as it is: make_grid never runs in save_image's call for
    float32/uint8 CPU tensors (the pixels are still the golden grid's)."""
    def no_grid(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("make_grid ran in the caller")

    monkeypatch.setattr(grid, "make_grid", no_grid)
    x = torch.randn(7, 3, 5, 6, generator=torch.Generator().manual_seed(8))
    cases = [({"nrow": 3, "normalize": True}, x), ({"normalize": True, "scale_each": True}, x),
             ({"padding": 1, "pad_value": 0.5}, x.clamp(0, 1)), ({"nrow": 4}, (x.abs() * 40).to(torch.uint8))]
    for k, (kwargs, tensor) in enumerate(cases):
        asyncdump.save_image(tensor, tmp_path / f"{k}.png", **kwargs).result(timeout=30)
        expected = golden(tensor, **kwargs) if tensor.dtype != torch.uint8 else \
            golden(tensor.float() / 255, **kwargs)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{k}.png")), expected)


@pytest.mark.timeout(120)
def test_saves_to_one_path_land_in_call_order_across_an_eviction(tmp_path: Path) -> None:
    """Issue 19, item 6: saves queued to A/latest.webp, then saves to 4 other folders close
    A's sink in the background; the last save to A/latest.webp (black) must still win."""
    latest = tmp_path / "A" / "latest.webp"
    latest.parent.mkdir()
    noise = torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0))
    for _ in range(40):  # slow to encode: A's sink is still busy when it is evicted
        asyncdump.save_image(noise, latest)
    for i in range(grid.MAX_OPEN_SINKS):
        (tmp_path / f"other{i}").mkdir()
        asyncdump.save_image(torch.ones(3, 4, 4), tmp_path / f"other{i}" / "x.webp")
    asyncdump.save_image(torch.zeros(3, 512, 512), latest)
    asyncdump.flush()
    assert np.asarray(Image.open(latest)).max() <= 2  # black (lossy WebP: within 2)
