"""A sink used in a forked child refuses every use there, and the parent's images stay intact
(issue 19, item 2). The child shares the parent's staging buffer, so before this check its
``submit`` wrote over images the parent had staged, and its futures never resolved."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import no_temp_files, read_rgb

from asyncdump import AsyncImageSink, DatasetSink

# a sink created at module level, as DataLoader workers and multiprocessing pools meet it
_MODULE_SINK: AsyncImageSink | None = None


def indexed(first: int, count: int, size: int = 16) -> np.ndarray:
    """RGB images whose pixels encode their index, so an overwrite by the child shows."""
    index = np.arange(first, first + count).reshape(count, 1, 1, 1)
    yy = np.arange(size).reshape(1, 1, size, 1)
    channel = np.arange(3).reshape(1, 3, 1, 1)
    return ((index * 13 + yy * 7 + channel * 5) % 256 * np.ones((1, 1, 1, size))).astype(np.uint8)


def in_forked_child(uses: list[Callable[[], Any]]) -> int:
    """Fork; in the child call each use and exit 0 if every one raised our RuntimeError."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            for number, use in enumerate(uses, start=1):
                try:
                    use()
                    code = code or number  # it did not refuse
                except RuntimeError as exc:
                    if "forked child" not in str(exc):
                        code = code or 100 + number
                except BaseException:
                    code = code or 200 + number
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.timeout(120, method="thread")
def test_forked_child_is_refused_and_the_parent_images_stay_intact(root: Path) -> None:
    per_batch, batches = 40, 20
    with AsyncImageSink(root, workers=1) as sink:
        for b in range(batches // 2):
            sink.submit(indexed(b * per_batch, per_batch))
        child_batch = np.zeros((per_batch, 3, 16, 16), np.uint8)  # would show as black files
        code = in_forked_child([
            lambda: sink.submit(child_batch), lambda: sink.encode(child_batch),
            lambda: sink.flush(), lambda: sink.stats, lambda: sink.worker_modules(),
            lambda: sink.close()])
        for b in range(batches // 2, batches):
            sink.submit(indexed(b * per_batch, per_batch))
    assert code == 0
    assert sink.stats.written == sink.stats.submitted == per_batch * batches
    expected = indexed(0, per_batch * batches)
    files = sorted(root.iterdir())
    assert len(files) == per_batch * batches
    for i, path in enumerate(files):
        np.testing.assert_array_equal(read_rgb(path), expected[i].transpose(1, 2, 0))
    assert not no_temp_files(root)


@pytest.mark.timeout(120, method="thread")
def test_dataset_sink_refuses_a_forked_child(tmp_path: Path) -> None:
    with DatasetSink(tmp_path / "ds", count=8, shard_size=4, workers=1) as ds:
        code = in_forked_child([lambda: ds.pending(4).__next__(), lambda: ds.submit(
            [0, 1, 2, 3], np.zeros((4, 3, 8, 8), np.uint8)), lambda: ds.close()])
        for indices in ds.pending(4):
            ds.submit(indices, indexed(indices[0], len(indices), size=8))
    assert code == 0
    assert ds.summary is not None and ds.summary.complete and ds.summary.images == 8


class _SubmitsFromWorker(torch.utils.data.Dataset[int]):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        assert _MODULE_SINK is not None
        _MODULE_SINK.submit(np.zeros((1, 3, 8, 8), np.uint8))
        return i


@pytest.mark.timeout(120, method="thread")
def test_dataloader_fork_worker_gets_a_clear_error(root: Path) -> None:
    global _MODULE_SINK
    _MODULE_SINK = AsyncImageSink(root, workers=1)
    try:
        loader = torch.utils.data.DataLoader(_SubmitsFromWorker(), num_workers=1,
                                             multiprocessing_context="fork")
        with pytest.raises(RuntimeError, match="forked child"):
            list(loader)
        _MODULE_SINK.submit(indexed(0, 3)).result(timeout=60)  # the parent's sink still works
    finally:
        _MODULE_SINK.close()
        _MODULE_SINK = None
    assert sorted(p.name for p in root.iterdir()) == ["00000000.png", "00000001.png", "00000002.png"]
