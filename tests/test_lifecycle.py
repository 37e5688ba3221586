"""close/flush/context manager, stats, worker imports, and nothing left in /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest

from asyncdump import AsyncImageSink, SinkStats

IMG = np.zeros((3, 3, 16, 16), np.uint8)


def test_stats_add_up_after_close(root: Path) -> None:
    with AsyncImageSink(root, workers=2) as sink:
        for _ in range(10):
            sink.submit(IMG)
    stats = sink.stats
    assert isinstance(stats, SinkStats)
    assert stats.submitted == 30
    assert stats.written + stats.failed + stats.dropped == stats.submitted
    assert stats.written == 30 and stats.failed == 0
    on_disk = sum(p.stat().st_size for p in root.iterdir())
    assert stats.bytes_written == on_disk
    assert stats.buffered_bytes == 0
    assert stats.submit_seconds > 0 and stats.images_per_second > 0
    with pytest.raises(AttributeError):
        stats.written = 0  # type: ignore[misc]  # frozen snapshot


def test_close_is_idempotent_and_submit_after_close_raises(root: Path) -> None:
    sink = AsyncImageSink(root)
    sink.submit(IMG)
    sink.close()
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.submit(IMG)
    assert len(list(root.iterdir())) == 3


def test_context_manager_writes_everything_when_block_raises(root: Path) -> None:
    with pytest.raises(ZeroDivisionError), AsyncImageSink(root) as sink:
        for _ in range(5):
            sink.submit(IMG)
        1 / 0  # noqa: B018
    assert len(list(root.iterdir())) == 15


def test_workers_are_stopped_and_reaped(root: Path) -> None:
    sink = AsyncImageSink(root, workers=2)
    pids = sink.worker_pids
    assert len(pids) == 2 and sink.stats.workers == 2
    assert all(psutil.pid_exists(pid) for pid in pids)
    assert sink.stats.worker_rss_bytes > 0
    sink.close()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_worker_rss_is_small(root: Path) -> None:
    with AsyncImageSink(root, workers=1) as sink:
        sink.submit(np.zeros((8, 3, 256, 256), np.float32)).result(timeout=30)
        assert sink.stats.worker_rss_bytes < 120 * 2**20


def test_worker_never_imports_torch_even_if_parent_did(tmp_path: Path) -> None:
    # A user script with no main guard, that imports torch first, as training scripts do.
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from asyncdump import AsyncImageSink
        sink = AsyncImageSink({str(tmp_path / 'out')!r}, workers=2)
        sink.submit(torch.rand(2, 3, 8, 8)).result(timeout=30)
        modules = sink.worker_modules()
        sink.close()
        assert len(modules) == 2, modules
        for pid, names in modules.items():
            assert "numpy" in names and "cv2" in names, names
            assert not [n for n in names if n == "torch" or n.startswith("torch.")], pid
        print("OK", len(modules))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK 2"


def test_nothing_left_in_dev_shm(root: Path) -> None:
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    buffers_before = _memfd_buffers()  # save_image's cached sinks of earlier tests may be open
    with AsyncImageSink(root, max_buffer_bytes=8 << 20) as sink:
        sink.submit(IMG).result(timeout=30)
        during = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        assert _memfd_buffers() - buffers_before  # the buffer is a memfd (mmap holds a dup)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert during == before and after == before
    assert _memfd_buffers() <= buffers_before


def _memfd_buffers() -> set[tuple[str, str]]:
    """(fd, link) of this process's open asyncdump buffers."""
    links = {(fd, _readlink(f"/proc/self/fd/{fd}")) for fd in os.listdir("/proc/self/fd")}
    return {(fd, link) for fd, link in links if "memfd:asyncdump" in link}


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_flush_waits_for_everything_before_the_call(root: Path) -> None:
    with AsyncImageSink(root, workers=1) as sink:
        futures = [sink.submit(IMG) for _ in range(10)]
        sink.flush(timeout=30)
        assert all(f.done() for f in futures)
        assert sink.stats.written == 30


def test_write_failure_reaches_future_flush_and_next_submit(root: Path) -> None:
    root.mkdir()
    (root / "blocker").write_text("a file where a folder is needed")
    sink = AsyncImageSink(root)
    future = sink.submit(IMG[:1], names=["blocker/x"])
    with pytest.raises(Exception) as info:
        future.result(timeout=30)
    assert "blocker" in str(info.value)
    from asyncdump import AsyncDumpError

    with pytest.raises(AsyncDumpError, match="1 image"):
        sink.submit(IMG)  # raised once by the next submit ...
    sink.submit(IMG).result(timeout=30)  # ... and only once
    with pytest.raises(AsyncDumpError) as flushed:
        sink.flush()
    assert flushed.value.failures[0][0] == root / "blocker" / "x.png"
    assert isinstance(flushed.value.failures[0][1], OSError)
    sink.flush()  # reported once per flush
    sink.close()
    assert sink.stats.failed == 1 and sink.stats.written == 3


def test_on_error_warn_and_callable(root: Path) -> None:
    root.mkdir()
    (root / "blocker").write_text("x")
    with pytest.warns(RuntimeWarning, match="failed to write"), \
            AsyncImageSink(root, on_error="warn") as sink:
        sink.submit(IMG[:1], names=["blocker/x"])
        sink.flush()
    seen: list[BaseException] = []
    with AsyncImageSink(root, on_error=seen.append) as sink:
        sink.submit(IMG[:1], names=["blocker/y"])
        sink.flush()
    assert len(seen) == 1 and "blocker" in str(seen[0])


def test_flush_and_close_time_out_then_close_frees_everything(root: Path) -> None:
    slow = np.random.default_rng(0).integers(0, 256, (8, 3, 1024, 1024), dtype=np.uint8)
    sink = AsyncImageSink(root, workers=1, quality=9)  # ~0.5 s of encoding per image
    pids = sink.worker_pids
    future = sink.submit(slow)
    with pytest.raises(TimeoutError, match=r"not written after 0\.05 s"):
        sink.flush(timeout=0.05)
    with pytest.warns(RuntimeWarning, match=r"image\(s\) were not written"), \
            pytest.raises(TimeoutError):
        sink.close(timeout=0.05)
    assert future.done() and future.exception() is not None  # failed, not left hanging
    stats = sink.stats
    assert stats.written + stats.failed == 8 and stats.failed > 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
