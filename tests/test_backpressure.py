"""on_full under a flood into a tiny buffer: block, drop and raise, and the byte bound."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from asyncdump import AsyncDumpError, AsyncImageSink, BufferFullError

BATCH = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)  # 48 KiB
BUFFER = 2 * BATCH.nbytes + 1000


def test_block_waits_and_loses_nothing(root: Path) -> None:
    with AsyncImageSink(root, workers=1, max_buffer_bytes=BUFFER, on_full="block") as sink:
        futures = [sink.submit(BATCH) for _ in range(40)]
        concurrent.futures.wait(futures, timeout=60)
        stats = sink.stats
    assert all(len(f.result()) == 4 for f in futures)
    assert stats.peak_buffered_bytes <= BUFFER
    assert stats.blocked_seconds > 0
    assert stats.blocked_seconds <= stats.submit_seconds
    assert len(list(root.iterdir())) == 160


def test_drop_cancels_and_counts(root: Path) -> None:
    with AsyncImageSink(root, workers=1, max_buffer_bytes=BUFFER, on_full="drop") as sink:
        futures = [sink.submit(BATCH) for _ in range(40)]
        sink.flush(timeout=60)
    stats = sink.stats
    dropped = [f for f in futures if f.cancelled()]
    assert dropped, "a flood into a 2-batch buffer must drop something"
    assert stats.dropped == 4 * len(dropped)
    assert stats.written == 4 * (40 - len(dropped))
    assert stats.written + stats.failed + stats.dropped == stats.submitted == 160
    assert stats.peak_buffered_bytes <= BUFFER
    assert len(list(root.iterdir())) == stats.written


def test_raise_refuses_and_counts_nowhere(root: Path) -> None:
    with AsyncImageSink(root, workers=1, max_buffer_bytes=BUFFER, on_full="raise") as sink:
        accepted, refused = [], 0
        for _ in range(40):
            try:
                accepted.append(sink.submit(BATCH))
            except BufferFullError as exc:
                assert "on_full='raise'" in str(exc)
                refused += 1
        sink.flush(timeout=60)
        stats = sink.stats
        # still usable after refusals
        assert len(sink.submit(BATCH).result(timeout=30)) == 4
    assert refused > 0
    assert stats.submitted == 4 * len(accepted) == stats.written
    assert stats.dropped == 0


def test_blocked_producer_wakes_when_sink_breaks(root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sink = AsyncImageSink(root, workers=1, max_buffer_bytes=BATCH.nbytes, on_full="block")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")  # no replacement can start
    sink.submit(BATCH)
    os.kill(sink.worker_pids[0], signal.SIGKILL)  # a fatal fault: the sink breaks
    with pytest.raises(AsyncDumpError, match=r"broken|no new one could be started"):
        for _ in range(20):  # blocks on the full buffer until the sink breaks
            sink.submit(BATCH)
    with pytest.raises(AsyncDumpError):
        sink.close()
    assert sink.worker_pids == []


@pytest.fixture
def keyboard_interrupt_on_sigint() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this test whatever the process inherited: a shell's
    background job starts with SIGINT ignored, and Python then never installs its handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("keyboard_interrupt_on_sigint")
def test_interrupt_between_parts_of_an_oversized_batch_fails_the_rest(root: Path) -> None:
    """A batch bigger than the buffer is staged in parts. Ctrl-C while a later part waits for
    space: the staged part is written, the rest fail as "not staged", nothing is lost silently."""
    image = np.zeros((1, 3, 16, 16), np.uint8)
    sink = AsyncImageSink(root, workers=1, max_buffer_bytes=image.nbytes, on_full="block")
    worker = sink.worker_pids[0]
    os.kill(worker, signal.SIGSTOP)  # the buffer frees nothing until it continues

    def interrupt_once_staged() -> None:
        while sink.stats.buffered_bytes == 0:
            time.sleep(0.001)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]

    interrupter = threading.Thread(target=interrupt_once_staged)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sink.submit(np.repeat(image, 3, axis=0))
    finally:
        interrupter.join()
        os.kill(worker, signal.SIGCONT)
    with pytest.raises(AsyncDumpError, match="not staged"):
        sink.close()
    stats = sink.stats
    assert (stats.submitted, stats.written, stats.failed) == (3, 1, 2)
    assert sorted(p.name for p in root.iterdir()) == ["00000000.png"]
