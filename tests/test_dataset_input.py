"""DatasetSink.submit checks every batch the same way: metadata, shape and pixel depth
(issue 19). A refused batch is not written, fixes nothing, and the sink stays usable."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from asyncdump import DatasetSink


def images(count: int, dtype: type = np.uint8, side: int = 6) -> np.ndarray:
    return np.full((count, 3, side, side), 7, dtype)


def lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad, error, words", [
    ({"caption": "caf\udce9"}, ValueError, r"'\\udce9' is a lone surrogate"),
    ({1: "one", "1": "also one"}, ValueError, "two keys are both written as '1'"),
    ({"box": [0.0, math.nan]}, ValueError, "NaN or infinity is not JSON"),
    ({"score": -math.inf}, ValueError, "NaN or infinity is not JSON"),
    ({"x": object()}, TypeError, "not JSON-serialisable"),
])
@pytest.mark.parametrize("mode", ["files", "tar"])
def test_bad_metadata_in_any_batch_names_the_index_and_writes_nothing(
        tmp_path: Path, mode: str, bad: dict, error: type, words: str) -> None:
    with DatasetSink(tmp_path, count=8, shard_size=4, workers=1, mode=mode) as sink:
        batches = sink.pending(2)
        first = next(batches)
        sink.submit(first, images(2), [{"label": 0}, {"label": 1}])
        second = next(batches)
        remaining = sink.remaining
        with pytest.raises(error, match=f"metadata of index 3 .*{words}"):
            sink.submit(second, images(2), [{"label": 2}, bad])
        assert sink.remaining == remaining  # not taken: the same batch can be submitted again
        sink.submit(second, images(2), [{"label": 2}, {"label": 3}])
    assert [e["index"] for e in lines(tmp_path)] == [0, 1, 2, 3]
    assert all("\\ud" not in line for line in (tmp_path / "manifest.jsonl").read_text().splitlines())


def test_int_and_str_keys_that_do_not_collide_are_written_as_json_strings(tmp_path: Path) -> None:
    """JSON keys are strings: {1: .., "a": ..} is written as {"1": .., "a": ..}, sorted, in the
    manifest and in the tar's .json member alike (tar mode once raised TypeError here)."""
    with DatasetSink(tmp_path, count=2, workers=1, mode="tar") as sink:
        batch = next(sink.pending(2))
        sink.submit(batch, images(2), [{"scores": {10: 0.5, 9: 0.25, "a": 0.25}}] * 2)
    assert lines(tmp_path)[0]["meta"] == {"scores": {"10": 0.5, "9": 0.25, "a": 0.25}}
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        member = tar.extractfile("000000000.json")
        assert member is not None
        assert member.read() == b'{"scores":{"10":0.5,"9":0.25,"a":0.25}}'


def test_a_refused_first_batch_fixes_neither_shape_nor_depth(tmp_path: Path) -> None:
    with DatasetSink(tmp_path, count=6, workers=1) as sink:
        batches = sink.pending(2)
        batch = next(batches)
        with pytest.raises(TypeError, match="int32"):
            sink.submit(batch, images(2, np.int32, side=8))
        sink.submit(batch, images(2, side=6))  # another shape: the refused batch fixed nothing
        batch = next(batches)
        with pytest.raises(ValueError, match="one pixel depth"):
            sink.submit(batch, images(2, np.uint16))
        sink.submit(batch, images(2, np.float32))  # floats make 8-bit files, as uint8 does
    assert [e["shape"] for e in lines(tmp_path)] == [[6, 6, 3]] * 4


def test_uint16_then_uint8_is_refused(tmp_path: Path) -> None:
    with DatasetSink(tmp_path, count=4, workers=1) as sink:
        batches = sink.pending(2)
        sink.submit(next(batches), images(2, np.uint16))
        with pytest.raises(ValueError, match="uint16 like them"):
            sink.submit(next(batches), images(2))
    assert len(lines(tmp_path)) == 2
