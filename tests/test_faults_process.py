"""Ctrl-C, parent death, interpreter exit without close, and readers racing the writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from helpers import no_temp_files

from asyncdump import AsyncImageSink


def _as_from_a_terminal() -> None:
    # A shell's background job inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt. A user's script at a terminal has the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    """Run a child script in its own process group (Ctrl-C reaches the group), with Ctrl-C's
    default disposition whatever the test runner inherited."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_from_a_terminal)


def read_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise AssertionError(f"child ended without {prefix!r}: {proc.stderr.read() if proc.stderr else ''}")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


def test_ctrl_c_flushes_everything_submitted(tmp_path: Path) -> None:
    proc = start_script(tmp_path, """
        import json, sys
        import numpy as np
        from asyncdump import AsyncImageSink
        rng = np.random.default_rng(0)
        batch = rng.integers(0, 256, (8, 3, 64, 64), dtype=np.uint8)
        try:
            # a small buffer: submit spends most of its time blocked, where Ctrl-C lands
            with AsyncImageSink(sys.argv[1], workers=1, max_buffer_bytes=3 * batch.nbytes) as sink:
                print("PIDS", json.dumps(sink.worker_pids), flush=True)
                while True:
                    sink.submit(batch)
        except KeyboardInterrupt:
            s = sink.stats
            print("STATS", json.dumps([s.submitted, s.written, s.failed, s.buffered_bytes]),
                  flush=True)
    """)
    pids = json.loads(read_line(proc, "PIDS "))
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGINT)
    submitted, written, failed, buffered = json.loads(read_line(proc, "STATS "))
    assert proc.wait(timeout=60) == 0
    assert submitted > 0 and written == submitted and failed == 0 and buffered == 0
    out = tmp_path / "out"
    assert len(list(out.iterdir())) == submitted  # nothing hidden, nothing missing
    assert not no_temp_files(out)
    assert not wait_gone(pids, 5)


def test_second_ctrl_c_aborts_the_final_flush_quickly(tmp_path: Path) -> None:
    proc = start_script(tmp_path, """
        import json, sys, time
        import numpy as np
        from asyncdump import AsyncImageSink
        rng = np.random.default_rng(0)
        slow = rng.integers(0, 256, (8, 3, 512, 512), dtype=np.uint8)  # level 9: slow to encode
        with AsyncImageSink(sys.argv[1], workers=1, quality=9) as sink:
            for _ in range(25):
                sink.submit(slow)
            print("PIDS", json.dumps(sink.worker_pids), flush=True)
            time.sleep(60)
    """)
    pids = json.loads(read_line(proc, "PIDS "))
    os.killpg(proc.pid, signal.SIGINT)  # first: unwinds into the flush in __exit__
    time.sleep(1.0)
    assert proc.poll() is None, "the flush of 200 slow images cannot be over yet"
    second = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # second: abort
    proc.wait(timeout=30)
    took = time.monotonic() - second
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert "image(s) were not written" in stderr, stderr
    assert "KeyboardInterrupt" in stderr
    assert took < 5, f"abort took {took:.1f} s"
    assert not wait_gone(pids, 5)
    out = tmp_path / "out"
    assert not no_temp_files(out)
    written = len(list(out.iterdir()))
    lost = int(stderr.split("asyncdump: ")[1].split(" image(s)")[0])
    assert 0 < written < 200 and lost > 0
    # Every image is either on disk or counted lost; the one the worker was renaming when it
    # was stopped may be both (docs/guarantees.md, "What remains possible").
    assert 200 <= written + lost <= 200 + 1


def test_parent_killed_workers_exit_and_memory_is_freed(tmp_path: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    proc = start_script(tmp_path, """
        import json, sys, time
        import numpy as np
        from asyncdump import AsyncImageSink
        sink = AsyncImageSink(sys.argv[1], workers=2)
        batch = np.random.default_rng(0).integers(0, 256, (16, 3, 256, 256), dtype=np.uint8)
        for _ in range(10):
            sink.submit(batch)
        print("PIDS", json.dumps(sink.worker_pids), flush=True)
        time.sleep(60)
    """)
    pids = json.loads(read_line(proc, "PIDS "))
    proc.kill()  # SIGKILL: no atexit, no close
    proc.wait(timeout=10)
    assert not wait_gone(pids, 10), "workers outlived their parent"
    assert set(os.listdir("/dev/shm")) == shm_before
    out = tmp_path / "out"
    assert not no_temp_files(out)  # what the workers had started, they finished
    for path in out.iterdir():
        assert cv2.imread(str(path)) is not None


def test_unclosed_sink_is_flushed_at_exit_with_a_warning(tmp_path: Path) -> None:
    proc = start_script(tmp_path, """
        import sys
        import numpy as np
        from asyncdump import AsyncImageSink
        sink = AsyncImageSink(sys.argv[1], workers=1)
        for _ in range(10):
            sink.submit(np.zeros((5, 3, 128, 128), np.uint8))
        print("SUBMITTED", flush=True)
    """)
    proc.wait(timeout=60)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    assert "was not closed; flushing it at interpreter exit" in stderr
    assert len(list((tmp_path / "out").iterdir())) == 50


@pytest.mark.usefixtures("both_png_encoders")
def test_readers_never_see_partial_files(root: Path) -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (20, 3, 256, 256), dtype=np.uint8)
    done = threading.Event()
    problems: list[str] = []
    decoded: set[str] = set()

    def reader() -> None:
        while not done.is_set():
            for entry in os.scandir(root) if root.exists() else []:
                if entry.name.startswith("."):
                    continue  # hidden temp files are the writer's business
                image = cv2.imread(entry.path, cv2.IMREAD_UNCHANGED)
                if image is None or image.shape != (256, 256, 3):
                    problems.append(entry.name)
                decoded.add(entry.name)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with AsyncImageSink(root, workers=1) as sink:
            # After each batch, wait until the reader has opened a new file while the worker
            # writes the next ones: the race happens by events, whatever this machine's speed.
            for _ in range(200):
                seen = len(decoded)
                sink.submit(batch)
                deadline = time.monotonic() + 60
                while len(decoded) == seen and time.monotonic() < deadline:
                    time.sleep(0.001)
                if len(decoded) > 50:
                    break
    finally:
        done.set()
        thread.join()
    assert not problems
    assert len(decoded) > 50, "the reader never got to race the writer"


def test_soak_memory_and_fds_stay_flat(root: Path) -> None:
    batch = np.random.default_rng(0).integers(0, 256, (100, 3, 8, 8), dtype=np.uint8)
    me = psutil.Process()
    samples = {}
    with AsyncImageSink(root, workers=1) as sink:
        worker = psutil.Process(sink.worker_pids[0])
        for i in range(1, 201):
            sink.submit(batch)
            if i in (50, 200):
                sink.flush()
                samples[i] = (me.memory_info().rss, worker.memory_info().rss,
                              me.num_fds(), worker.num_fds())
        stats = sink.stats
    assert stats.written == 20_000 and stats.worker_restarts == 0
    (rss5, wrss5, fds5, wfds5), (rss20, wrss20, fds20, wfds20) = samples[50], samples[200]
    print(f"\nsoak 5k->20k: parent RSS {(rss20 - rss5) / 2**20:+.2f} MiB, worker RSS "
          f"{(wrss20 - wrss5) / 2**20:+.2f} MiB, fds {fds5}->{fds20} / {wfds5}->{wfds20}")
    assert fds20 == fds5 and wfds20 == wfds5
    assert rss20 - rss5 < 16 * 2**20
    assert wrss20 - wrss5 < 8 * 2**20
