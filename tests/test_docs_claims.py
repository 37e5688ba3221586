"""Claims in the docs that no other test pinned: dropped batches use up indices (api.md),
and ``shard_bytes`` bounds every tar part except one holding a single sample (datasets.md)."""

from __future__ import annotations

import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest

from asyncdump import AsyncImageSink, write_dataset


@pytest.mark.timeout(60)
def test_a_dropped_batch_still_uses_up_its_indices(tmp_path: Path) -> None:
    image = np.zeros((1, 3, 64, 64), np.uint8)  # 12,288 bytes: exactly the buffer
    with AsyncImageSink(tmp_path, workers=1, max_buffer_bytes=image.nbytes, on_full="drop") as sink:
        sink.worker_modules()  # the worker is up
        [pid] = sink.worker_pids
        os.kill(pid, signal.SIGSTOP)  # nothing is written until SIGCONT: the buffer stays full
        try:
            kept = sink.submit(image)
            dropped = sink.submit(np.concatenate([image, image]))
            assert dropped.cancelled() and sink.stats.dropped == 2
        finally:
            os.kill(pid, signal.SIGCONT)
        kept.result(timeout=30)
        later = sink.submit(image).result(timeout=30)
    assert [p.name for p in later] == ["00000003.png"]  # indices 1 and 2 went to the drop
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000000.png", "00000003.png"]


def _parts(root: Path) -> dict[str, tuple[int, set[str]]]:
    """Each tar part: its size and the sample keys it holds."""
    parts = {}
    for path in sorted(root.glob("*.tar")):
        with tarfile.open(path) as tar:
            keys = {name.split(".")[0] for name in tar.getnames()}
        parts[path.name] = (path.stat().st_size, keys)
    return parts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shard_bytes", [1000, 20_000])
def test_shard_bytes_bounds_every_part_but_a_lone_oversized_sample(tmp_path: Path,
                                                                   shard_bytes: int) -> None:
    def generate(indices: list[int]) -> tuple[np.ndarray, list[dict[str, int]]]:
        rng = np.random.default_rng(indices[0])
        images = rng.integers(0, 256, (len(indices), 3, 16, 16), dtype=np.uint8)
        return images, [{"label": i % 3} for i in indices]

    write_dataset(generate, tmp_path, count=12, batch_size=4, mode="tar", shard_size=6,
                  shard_bytes=shard_bytes, progress=False)
    parts = _parts(tmp_path)
    assert sorted(k for _, keys in parts.values() for k in keys) == [f"{i:09d}" for i in range(12)]
    for name, (size, keys) in parts.items():
        assert size <= shard_bytes or len(keys) == 1, (name, size, keys)
    one_sample = [size for size, keys in parts.values() if len(keys) == 1]
    if shard_bytes == 1000:  # every sample alone exceeds the bound: one part each
        assert len(one_sample) == 12 and min(one_sample) > shard_bytes
    else:
        assert max(size for size, _ in parts.values()) <= shard_bytes
        assert any(len(keys) > 1 for _, keys in parts.values())
