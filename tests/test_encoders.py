"""The PNG encoder choice: fpng and OpenCV write the same pixels, on every input row.

Every row of the input table goes through real workers with png_encoder="fpng" and "opencv";
each file is decoded with OpenCV and with PIL and the pixels must be equal. fpng files carry
its private ``fdEC`` chunk, which tells which encoder really wrote a file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import read_rgb
from PIL import Image
from sink_pool import Sinks, shared_sinks

from asyncdump import AsyncImageSink, DatasetError, DatasetSink
from asyncdump._convert import to_image
from asyncdump._device import DeviceStager
from asyncdump._protocol import ImageSpec
from asyncdump._staging import Batch, Conversion

RNG = np.random.default_rng(11)
FLOATS = (RNG.standard_normal((2, 4, 7, 9)) * 0.7 + 0.5).astype(np.float32)
FLOATS[0, :, 0, :4] = [[np.nan, np.inf, -np.inf, 0.5 / 255]] * 4
FLOATS[1, 0, 0, :3] = [254.5 / 255, 1.5 / 255, -0.0]


def rows() -> dict[str, tuple[Any, dict[str, Any]]]:
    """Input-table rows: (batch as numpy, sink options). All shapes (B, C, H, W)."""
    u8 = RNG.integers(0, 256, size=(2, 4, 5, 7), dtype=np.uint8)
    return {
        "float32": (FLOATS[:, :3], {}),
        "float16": (FLOATS[:, :3].astype(np.float16), {}),
        "float64": (FLOATS[:, :3].astype(np.float64), {}),
        "rgba float32": (FLOATS, {}),
        "gray float32": (FLOATS[:, :1], {}),
        "uint8": (u8[:, :3], {}),
        "rgba uint8": (u8, {}),
        "gray uint8": (u8[:, :1], {}),
        "uint16": ((u8[:, :3].astype(np.uint16) * 257), {}),
        "bool": (u8[:, :3] > 128, {}),
        "channels-last float32": (np.ascontiguousarray(FLOATS[:, :3].transpose(0, 2, 3, 1))
                                  .transpose(0, 3, 1, 2), {}),
        "channels-last rgba uint8": (np.ascontiguousarray(u8.transpose(0, 2, 3, 1))
                                     .transpose(0, 3, 1, 2), {}),
        "strided view": (FLOATS[:, :3, ::2, 1:], {}),
        "mean/std": (FLOATS[:, :3], {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}),
        "value_range": (FLOATS[:, :3] * 3 - 1, {"value_range": (-1.0, 2.0)}),
    }


ROWS = rows()
PATHS = ["numpy", "cpu"]


def as_input(x: np.ndarray, kind: str) -> Any:
    return x if kind == "numpy" else torch.from_numpy(x)


@pytest.fixture(scope="module")
def sinks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sinks]:
    yield from shared_sinks(tmp_path_factory.mktemp("encoders"))


def read_pil(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def written_by_fpng(path: Path) -> bool:
    return b"fdEC" in Path(path).read_bytes()[:64]


@pytest.mark.parametrize("kind", PATHS)
@pytest.mark.parametrize("row", list(ROWS))
def test_fpng_files_decode_to_the_opencv_paths_pixels(sinks: Sinks, row: str, kind: str) -> None:
    x, options = ROWS[row]
    fast = sinks(png_encoder="fpng", **options).submit(as_input(x, kind)).result(timeout=30)
    slow = sinks(png_encoder="opencv", **options).submit(as_input(x, kind)).result(timeout=30)
    eight_bit_colour = x.dtype != np.uint16 and x.shape[1] in (3, 4)
    for a, b in zip(fast, slow, strict=True):
        assert written_by_fpng(a) == eight_bit_colour  # gray and 16-bit go to OpenCV
        assert not written_by_fpng(b)
        np.testing.assert_array_equal(read_rgb(a), read_rgb(b))
        np.testing.assert_array_equal(read_pil(a), read_pil(b))
        assert read_pil(a).shape == read_rgb(b).shape


def test_auto_uses_fpng_for_rgb_png_only(sinks: Sinks, tmp_path: Path) -> None:
    x = FLOATS[:, :3]
    assert all(written_by_fpng(p) for p in sinks().submit(x).result(timeout=30))
    # quality is OpenCV's compression level: asking for it picks OpenCV
    assert not any(written_by_fpng(p) for p in sinks(quality=9).submit(x).result(timeout=30))
    assert not any(written_by_fpng(p) for p in sinks(png_encoder="opencv").submit(x).result(timeout=30))


def test_bad_png_encoder_values_are_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"png_encoder must be one of \('auto', 'fpng', 'opencv'\)"):
        AsyncImageSink(tmp_path, png_encoder="zlib")
    with pytest.raises(ValueError, match="writes PNG only"):
        AsyncImageSink(tmp_path, format="jpg", png_encoder="fpng")
    with pytest.raises(ValueError, match="no compression levels"):
        AsyncImageSink(tmp_path, quality=3, png_encoder="fpng")
    with pytest.raises(ValueError, match="png_encoder must be one of"):
        DatasetSink(tmp_path / "d", count=4, png_encoder=None)  # type: ignore[arg-type]


def test_workers_import_fpng_but_never_torch(sinks: Sinks) -> None:
    sink = sinks(png_encoder="fpng")
    sink.submit(FLOATS[:, :3]).result(timeout=30)
    for modules in sink.worker_modules().values():
        assert "fpng" in modules
        assert "torch" not in modules


WITHOUT_FPNG = """
import sys, numpy as np
sys.modules["fpng"] = None  # import fpng now raises ImportError
from asyncdump import AsyncImageSink
from asyncdump.cli.info import collect
print(collect()["png encoder (auto)"])
try:
    AsyncImageSink(sys.argv[1], png_encoder="fpng")
except ImportError as exc:
    print("explicit:", exc)
with AsyncImageSink(sys.argv[1], workers=1) as sink:
    paths = sink.submit(np.zeros((1, 3, 4, 4), np.uint8)).result(timeout=30)
print("auto wrote fdEC:", b"fdEC" in open(paths[0], "rb").read()[:64])
"""


def test_without_fpng_auto_falls_back_and_explicit_fpng_says_how_to_install(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_FPNG, str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("OpenCV (fpng unavailable") and "pip install fpng" in lines[0]
    assert lines[1].startswith("explicit: png_encoder='fpng' needs the fpng package (pip install fpng)")
    assert lines[2] == "auto wrote fdEC: False"


# ------------------------------------------------------------------ one pass into each layout
SPECS = [("float32", "nchw"), ("float16", "nchw"), ("float64", "nhwc"), ("uint8", "nchw"),
         ("uint8", "nhwc"), ("uint16", "nchw"), ("bool", "nhwc")]


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype,layout", SPECS)
def test_worker_conversion_makes_rgb_for_fpng_and_bgr_for_opencv(
        dtype: str, layout: str, channels: int) -> None:
    x = (FLOATS[0, :channels] * (300 if dtype in ("uint8", "uint16") else 1))
    x = np.nan_to_num(x).clip(0, 255).astype(dtype) if dtype in ("uint8", "uint16", "bool") \
        else x.astype(dtype)
    stored = x.transpose(1, 2, 0) if layout == "nhwc" else x
    raw = np.ascontiguousarray(stored).view(np.uint8).reshape(-1)
    spec = ImageSpec(*x.shape, dtype, layout, converted=False,
                     rule=Conversion((0.0, 1.0), None, None).for_channels(channels))
    rgb, bgr = to_image(raw, spec, rgb=True), to_image(raw, spec, rgb=False)
    assert rgb.flags.c_contiguous and bgr.flags.c_contiguous
    order = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}[channels]
    np.testing.assert_array_equal(bgr, rgb if channels == 1 else rgb[..., order])


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("normalized", [False, True])
def test_device_staging_makes_the_encoders_order_in_one_go(channels: int, normalized: bool) -> None:
    conversion = Conversion((0.0, 1.0), (0.4,) * channels if normalized else None,
                            (0.3,) * channels if normalized else None)
    x = torch.from_numpy(FLOATS[:, :channels].copy())
    batch = Batch(x, True, 2, channels, 7, 9, "uint8", "nhwc", channels * 63)
    stager = DeviceStager(conversion)
    rgb = stager.to_hwc(batch, 0, 2, rgb=True)
    bgr = stager.to_hwc(batch, 0, 2, rgb=False)
    assert rgb.is_contiguous() and bgr.is_contiguous()
    spec = ImageSpec(channels, 7, 9, "float32", "nchw", converted=False,
                     rule=conversion.for_channels(channels))
    for i in range(2):
        raw = np.ascontiguousarray(FLOATS[i, :channels]).view(np.uint8).reshape(-1)
        want = to_image(raw, spec, rgb=True)
        got = rgb[i].numpy()
        np.testing.assert_array_equal(got[..., 0] if channels == 1 else got, want)
    order = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}[channels]
    np.testing.assert_array_equal(bgr.numpy(), rgb.numpy()[..., order])


# ------------------------------------------------------------------ datasets
def make(indices: list[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    rng = np.random.default_rng(indices[0])
    return rng.random((len(indices), 3, 16, 16), dtype=np.float32), [{"label": i} for i in indices]


def test_dataset_records_the_encoder_and_resume_with_another_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with DatasetSink(root, count=6, shard_size=4, workers=1, png_encoder="fpng") as sink:
        for indices in sink.pending(3):
            if indices[0] >= 3:
                break
            sink.submit(indices, *make(indices))
    assert json.loads((root / "dataset.json").read_text())["png_encoder"] == "fpng"
    with pytest.raises(DatasetError, match=r"png_encoder: stored 'fpng', asked 'opencv'.*"
                                           r"--png-encoder fpng"):
        DatasetSink(root, count=6, shard_size=4, workers=1, resume=True, png_encoder="opencv")
    with DatasetSink(root, count=6, shard_size=4, workers=1, resume=True) as sink:  # auto = fpng
        for indices in sink.pending(3):
            sink.submit(indices, *make(indices))
    assert sink.summary is not None and sink.summary.complete


@pytest.mark.parametrize("mode", ["files", "tar"])
@pytest.mark.parametrize("encoder", ["fpng", "opencv"])
def test_manifest_sha256_from_the_workers_matches_the_bytes(tmp_path: Path, mode: str,
                                                            encoder: str) -> None:
    import hashlib
    import tarfile

    root = tmp_path / mode
    with DatasetSink(root, count=5, shard_size=3, workers=2, mode=mode, png_encoder=encoder) as sink:
        for indices in sink.pending(2):
            sink.submit(indices, *make(indices))
    entries = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(5))
    for entry in entries:
        if mode == "files":
            data = (root / entry["path"]).read_bytes()
        else:
            shard, member = entry["path"].split("/")
            with tarfile.open(root / shard) as tar:
                handle = tar.extractfile(member)
                assert handle is not None
                data = handle.read()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
        assert (b"fdEC" in data[:64]) == (encoder == "fpng")
