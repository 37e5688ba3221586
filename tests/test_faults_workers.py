"""A worker dies (SIGKILL from outside, or a codec that crashes on one image), or cannot start."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import POISON, install_poison_harness, no_temp_files, read_rgb

from asyncdump import AsyncDumpError, AsyncImageSink

pytestmark = pytest.mark.usefixtures("both_png_encoders")  # each fault, each encoder


def indexed_batch(first: int, count: int, size: int = 24) -> np.ndarray:
    """Images whose pixels encode their global index, so a mix-up or loss is visible."""
    index = np.arange(first, first + count, dtype=np.int64).reshape(count, 1, 1, 1)
    yy = np.arange(size).reshape(1, 1, size, 1)
    xx = np.arange(size).reshape(1, 1, 1, size)
    channel = np.arange(3).reshape(1, 3, 1, 1)
    return ((index * 7 + yy * 3 + xx * 5 + channel * 11) % 256).astype(np.uint8)


def test_killed_workers_lose_nothing(root: Path) -> None:
    per_batch, batches = 50, 40
    with AsyncImageSink(root, workers=2) as sink:
        for b in range(batches):
            if b in (10, 25):  # every worker (the replacements too) has started and answers
                while len(sink.worker_modules()) < sink.workers:
                    time.sleep(0.01)
            sink.submit(indexed_batch(b * per_batch, per_batch))
            if b in (10, 25):  # kill every worker, with this batch's images still to write
                for pid in sink.worker_pids:
                    os.kill(pid, signal.SIGKILL)
    stats = sink.stats
    assert stats.worker_restarts == 4
    assert stats.written == stats.submitted == per_batch * batches and stats.failed == 0
    files = sorted(root.iterdir())
    assert len(files) == per_batch * batches
    expected = indexed_batch(0, per_batch * batches)
    for i, path in enumerate(files):
        assert path.name == f"{i:08d}.png"
        np.testing.assert_array_equal(read_rgb(path), expected[i].transpose(1, 2, 0))
    assert not no_temp_files(root)
    assert 0 < stats.max_restart_seconds < 10


def test_poison_image_fails_alone_after_three_worker_deaths(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_poison_harness(tmp_path / "harness", monkeypatch)
    batch = np.zeros((3, 3, 8, 8), np.uint8)
    batch[1] = POISON
    sink = AsyncImageSink(root, workers=1, png_encoder="opencv")  # the harness wraps OpenCV's encoder
    with pytest.raises(AsyncDumpError) as failed:
        sink.submit(batch).result(timeout=60)
    assert [p.name for p, _ in failed.value.failures] == ["00000001.png"]
    assert "died 3 times" in str(failed.value)
    with pytest.raises(AsyncDumpError, match=r"00000001\.png"):  # on_error="raise": reported once
        sink.submit(np.zeros((1, 3, 8, 8), np.uint8))
    small = sink.submit(np.zeros((2, 3, 8, 8), np.uint8)).result(timeout=30)
    with pytest.raises(AsyncDumpError, match=r"00000001\.png"):  # close flushes: failures since
        sink.close()                                             # the last flush
    stats = sink.stats
    assert (stats.written, stats.failed, stats.worker_restarts, len(small)) == (4, 1, 3, 2)
    produced = sorted(p.name for p in root.iterdir())
    assert produced == ["00000000.png", "00000002.png", "00000003.png", "00000004.png"]
    assert not no_temp_files(root)


def test_workers_that_cannot_start_fail_the_constructor(root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with pytest.raises(AsyncDumpError, match="could not start"):
        AsyncImageSink(root)


def test_workers_dying_at_start_break_the_sink(root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    broken_env = tmp_path / "broken_env"
    broken_env.mkdir()
    (broken_env / "cv2.py").write_text("raise ImportError('simulated broken OpenCV install')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken_env))
    sink = AsyncImageSink(root, workers=1)
    future = sink.submit(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(AsyncDumpError, match="died while starting"):
        future.result(timeout=60)
    with pytest.raises(AsyncDumpError, match="broken"):
        sink.submit(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(AsyncDumpError):
        sink.close()
    assert sink.stats.failed == 2 and sink.stats.written == 0


def test_killed_workers_lose_nothing_with_fsync(root: Path) -> None:
    """With fsync, a worker reports each synced temp file (Encoded) before its rename: a dead
    worker's synced files are renamed into place by the parent, the rest re-sent."""
    per_batch, batches = 20, 10
    with AsyncImageSink(root, workers=2, fsync=True) as sink:
        for b in range(batches):
            if b in (3, 6):
                while len(sink.worker_modules()) < sink.workers:
                    time.sleep(0.01)
            sink.submit(indexed_batch(b * per_batch, per_batch))
            if b in (3, 6):
                for pid in sink.worker_pids:
                    os.kill(pid, signal.SIGKILL)
    stats = sink.stats
    assert stats.worker_restarts == 4
    assert stats.written == stats.submitted == per_batch * batches and stats.failed == 0
    expected = indexed_batch(0, per_batch * batches)
    for i in range(per_batch * batches):
        np.testing.assert_array_equal(read_rgb(root / f"{i:08d}.png"), expected[i].transpose(1, 2, 0))
    assert not no_temp_files(root)


def test_no_replacement_possible_breaks_the_sink(root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sink = AsyncImageSink(root, workers=1)
    pid = sink.worker_pids[0]
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    with pytest.raises(AsyncDumpError, match="no new one could be started"):
        while time.monotonic() < deadline:  # until the collector has noticed the death
            sink.submit(np.zeros((1, 3, 8, 8), np.uint8))
            time.sleep(0.01)
    with pytest.raises(AsyncDumpError):
        sink.close()


def test_probe_racing_a_worker_death_still_answers(root: Path) -> None:
    """A worker killed just before it answers a probe: the probe answers for the live ones."""
    with AsyncImageSink(root, workers=2) as sink:
        for _ in range(5):
            victim = sink.worker_pids[0]
            os.kill(victim, signal.SIGKILL)
            answers = sink.worker_modules(timeout=60)  # hung forever when the victim was asked
            assert victim not in answers and len(answers) <= 2
        sink.submit(indexed_batch(0, 4)).result(timeout=60)
    assert sink.stats.worker_restarts == 5 and sink.stats.written == 4
