"""Every bad input of docs/api.md: a clear TypeError/ValueError at the call, nothing staged,
and the sink still works afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from asyncdump import AsyncImageSink

GOOD = np.zeros((2, 3, 8, 8), np.uint8)

BAD_INPUTS: list[tuple[str, Any, dict[str, Any], type[Exception], str]] = [
    ("list", [[1, 2]], {}, TypeError, "torch.Tensor or numpy.ndarray"),
    ("ndim 1", np.zeros(8, np.uint8), {}, ValueError, r"\(B, C, H, W\)"),
    ("ndim 5", np.zeros((1, 1, 3, 4, 4), np.uint8), {}, ValueError, "shape"),
    ("2 channels", np.zeros((2, 2, 8, 8), np.uint8), {}, ValueError,
     r"1, 3 or 4 channels.*got 2 channels in shape \(2, 2, 8, 8\)"),
    ("HWC array", np.zeros((8, 8, 3), np.uint8), {}, ValueError,
     r"got 8 channels in shape \(8, 8, 3\).*transpose"),
    ("BHWC batch", np.zeros((2, 8, 8, 3), np.uint8), {}, ValueError,
     r"1, 3 or 4 channels.*got 8 channels.*channels-last arrays: pass .*\(0, 3, 1, 2\)"),
    ("empty H", np.zeros((1, 3, 0, 8), np.uint8), {}, ValueError, "H, W >= 1"),
    ("int32", np.zeros((1, 3, 8, 8), np.int32), {}, TypeError, "accepted: float16"),
    ("int64 tensor", torch.zeros(1, 3, 8, 8, dtype=torch.int64), {}, TypeError, "unsupported dtype"),
    ("names length", GOOD, {"names": ["a"]}, ValueError, "names has 1 entries"),
    ("names str", GOOD, {"names": "ab"}, TypeError, "list of str"),
    ("missing field", GOOD, {}, ValueError, "uses field 'epoch'"),
    ("dotdot", GOOD, {"names": ["../x", "y"]}, ValueError, "outside root"),
    ("absolute", GOOD, {"names": ["/etc/x", "y"]}, ValueError, "absolute"),
    ("duplicate in batch", GOOD, {"names": ["same", "same"]}, ValueError, "same|two images"),
]


@pytest.mark.parametrize("label,images,kwargs,error,match", BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected_and_sink_stays_usable(
        root: Path, label: str, images: Any, kwargs: dict[str, Any], error: type[Exception],
        match: str) -> None:
    template = "{epoch}_{index}" if label == "missing field" else "{index:08d}"
    with AsyncImageSink(root, name=template) as sink:
        with pytest.raises(error, match=match):
            sink.submit(images, **kwargs)
        assert sink.stats.submitted == 0 and sink.stats.buffered_bytes == 0
        fields = {"epoch": 1} if label == "missing field" else {}
        assert len(sink.submit(GOOD, **fields).result(timeout=30)) == 2
    assert len(list(root.iterdir())) == 2


def test_image_larger_than_buffer_is_value_error(root: Path) -> None:
    with AsyncImageSink(root, max_buffer_bytes=1000) as sink:
        with pytest.raises(ValueError, match="max_buffer_bytes"):
            sink.submit(np.zeros((3, 20, 20), np.uint8))  # 1200 bytes
        assert sink.submit(np.zeros((3, 10, 10), np.uint8)).result(timeout=30)


def test_batch_larger_than_buffer_is_staged_in_parts(root: Path) -> None:
    batch = np.arange(10 * 3 * 10 * 10, dtype=np.uint32).astype(np.uint8).reshape(10, 3, 10, 10)
    with AsyncImageSink(root, max_buffer_bytes=700) as sink:  # two 300-byte images at a time
        paths = sink.submit(batch).result(timeout=30)
        assert sink.stats.peak_buffered_bytes <= 700
    assert len(paths) == 10


def test_format_limits(root: Path) -> None:
    with AsyncImageSink(root, format="jpg") as sink:
        with pytest.raises(ValueError, match="cannot store 4-channel"):
            sink.submit(np.zeros((4, 8, 8), np.uint8))
        with pytest.raises(ValueError, match="16-bit"):
            sink.submit(np.zeros((3, 8, 8), np.uint16))


def test_mean_std_length_must_match_channels(root: Path) -> None:
    with AsyncImageSink(root, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) as sink:
        with pytest.raises(ValueError, match="3 values but the images have 1"):
            sink.submit(torch.zeros(1, 8, 8))


@pytest.mark.parametrize("kwargs,match", [
    ({"format": "gif"}, "format must be one of"),
    ({"workers": 0}, "workers"),
    ({"quality": 101, "format": "jpg"}, "1..100"),
    ({"quality": 10}, "0..9"),
    ({"quality": 5, "format": "bmp"}, "takes no quality"),
    ({"on_full": "wait"}, "on_full"),
    ({"on_error": "explode"}, "on_error"),
    ({"value_range": (1.0, 0.0)}, "lo < hi"),
    ({"mean": (0.5,)}, "both mean and std"),
    ({"max_buffer_bytes": 0}, "max_buffer_bytes"),
    ({"name": ""}, "template"),
])
def test_bad_constructor_arguments(root: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AsyncImageSink(root, **kwargs)
