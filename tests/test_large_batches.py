"""One submit of very many tiny images, under a long root, never deadlocks the sink, and
close(timeout) returns whatever the workers are doing (issue 19, item 1).

The collector used to block sending a large job while its worker blocked sending reports
that only the collector reads. Sends now never wait (``WorkerProcess.post``); these tests
fail by hanging (pytest-timeout) on the old code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import no_temp_files, read_rgb

from asyncdump import AsyncDumpError, AsyncImageSink


def long_root(tmp_path: Path, length: int = 250) -> Path:
    """A root whose absolute path is ``length`` characters long (folders of 50 characters)."""
    root = tmp_path
    while len(str(root)) < length - 51:
        root = root / ("d" * 50)
    return root / ("r" * (length - len(str(root)) - 1))


def tiny_images(count: int) -> np.ndarray:
    """1x1 gray images whose value is their index mod 251, so a mix-up is visible."""
    return (np.arange(count) % 251).astype(np.uint8).reshape(count, 1, 1, 1)


@pytest.mark.timeout(600, method="thread")  # a hang fails, even one in close()
@pytest.mark.parametrize("count", [1, 4096, 65536])
def test_one_large_batch_of_tiny_images_is_written(tmp_path: Path, count: int) -> None:
    root = long_root(tmp_path)
    assert len(str(root)) == 250
    with AsyncImageSink(root, workers=1) as sink:
        paths = sink.submit(tiny_images(count)).result()
    assert sink.stats.written == count and sink.stats.failed == 0
    assert len(paths) == count
    assert sum(1 for _ in os.scandir(root)) == count
    for i in sorted({0, count // 2, count - 1}):
        assert paths[i].name == f"{i:08d}.png"
        assert read_rgb(paths[i]).tolist() == [[i % 251]]
    assert not no_temp_files(root)


@pytest.mark.timeout(600, method="thread")  # a hang fails, even one in close()
def test_generate_with_one_worker_and_large_batches_finishes(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    done = subprocess.run(
        [sys.executable, "-m", "asyncdump", "generate", "--out", str(out), "--count", "8192",
         "--size", "8", "--shard-size", "8192", "--batch-size", "4096", "--mode", "files",
         "--workers", "1"], capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == list(range(8192))


@pytest.mark.timeout(120, method="thread")
def test_close_honours_its_timeout_while_the_worker_is_stopped(tmp_path: Path) -> None:
    root = long_root(tmp_path)
    sink = AsyncImageSink(root, workers=1)
    sink.worker_modules()  # the worker is up and answering
    pid = sink.worker_pids[0]
    os.kill(pid, signal.SIGSTOP)  # it reads nothing more: every send to it would block
    try:
        future = sink.submit(tiny_images(4096))
        with pytest.raises(TimeoutError), \
                pytest.warns(RuntimeWarning, match="image.s. were not written"):
            sink.close(timeout=0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert isinstance(future.exception(timeout=0), AsyncDumpError)
    assert not psutil.pid_exists(pid)  # stopped, killed and reaped: no stray process
    assert sink.stats.written + sink.stats.failed == 4096
    assert not no_temp_files(root)
