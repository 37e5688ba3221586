"""A worker dies (SIGKILL, CPU-limit kill standing in for a codec crash), or cannot start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import no_temp_files, read_rgb

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
            sink.submit(indexed_batch(b * per_batch, per_batch))
            if b in (10, 25):
                while not any(w.inflight for w in sink._workers):  # kill one mid-job
                    time.sleep(0.001)
                victim = next(w for w in sink._workers if w.inflight)
                os.kill(victim.pid, signal.SIGKILL)
    stats = sink.stats
    assert stats.worker_restarts == 2
    assert stats.written == stats.submitted == per_batch * batches and stats.failed == 0
    files = sorted(root.iterdir())
    assert len(files) == per_batch * batches
    expected = indexed_batch(0, per_batch * batches)
    for i, path in enumerate(files):
        assert path.name == f"{i:08d}.png"
        np.testing.assert_array_equal(read_rgb(path), expected[i].transpose(1, 2, 0))
    assert not no_temp_files(root)
    assert len(sink._restart_seconds) == 2 and max(sink._restart_seconds) < 10


def test_poison_image_fails_alone_after_three_worker_deaths(tmp_path: Path) -> None:
    # RLIMIT_CPU is inherited by the workers: an image that takes seconds of CPU to encode
    # kills each worker that tries it (SIGXCPU), as a crashing codec would. The parent
    # survives its own SIGXCPU with a Python handler, which exec() resets for the children.
    script = tmp_path / "poison.py"
    script.write_text(textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from asyncdump import AsyncImageSink
        signal.signal(signal.SIGXCPU, lambda *args: None)
        resource.setrlimit(resource.RLIMIT_CPU, (1, resource.RLIM_INFINITY))
        rng = np.random.default_rng(0)
        batch = np.zeros((3, 3, 4000, 4000), np.uint8)
        batch[1] = rng.integers(0, 256, (3, 4000, 4000), dtype=np.uint8)  # slow at level 9
        sink = AsyncImageSink({str(tmp_path / 'out')!r}, workers=1, quality=9)
        future = sink.submit(batch)
        try:
            future.result(timeout=90)
        except Exception as exc:
            print("FAILED", [p.name for p, _ in exc.failures], "died 3 times" in str(exc))
        try:
            sink.submit(np.zeros((1, 3, 8, 8), np.uint8))
        except Exception as exc:  # on_error="raise": the next submit reports it once
            print("RAISED", "00000001.png" in str(exc))
        small = sink.submit(np.zeros((2, 3, 8, 8), np.uint8)).result(timeout=30)
        try:
            sink.close()
        except Exception:
            pass
        print("STATS", sink.stats.written, sink.stats.failed, sink.stats.worker_restarts, len(small))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["FAILED"] == "['00000001.png'] True"
    assert lines["RAISED"] == "True"
    written, failed, restarts, small = (int(v) for v in lines["STATS"].split())
    assert (written, failed, small) == (4, 1, 2)  # the two innocent images of the batch + 2 more
    assert restarts >= 3
    produced = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert produced == ["00000000.png", "00000002.png", "00000003.png", "00000004.png"]
    assert not no_temp_files(tmp_path / "out")


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


def test_no_replacement_possible_breaks_the_sink(root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sink = AsyncImageSink(root, workers=1)
    pid = sink.worker_pids[0]
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while sink._broken is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(AsyncDumpError, match="no new one could be started"):
        sink.submit(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(AsyncDumpError):
        sink.close()
