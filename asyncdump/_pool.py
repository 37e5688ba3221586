"""Start, watch and stop worker processes.

Workers are plain ``python -m asyncdump._worker`` processes (``subprocess.Popen`` with
``pass_fds``), not multiprocessing children: spawn/forkserver would re-import the user's
``__main__`` (torch included, and scripts without a main guard break), and fork is unsafe once
CUDA is initialised. Each worker gets one socket (jobs in, results out) and the buffer's fd.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from ._protocol import Stop

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


@dataclass(eq=False)
class WorkerProcess:
    """One worker: its process, the parent's end of its socket, and the jobs it holds."""

    process: subprocess.Popen[bytes]
    conn: Connection
    inflight: dict[int, Any] = field(default_factory=dict)  # job id -> Job (collector-owned)
    inflight_images: int = 0
    ready: bool = False  # it imported cv2, mapped the buffer and said so
    replaces_death_at: float | None = None  # perf_counter when the worker it replaces died

    def __post_init__(self) -> None:
        # Connection.poll() builds a selector per call (~10 us); a poll object is made once.
        self._poller = select.poll()
        self._poller.register(self.conn.fileno(), select.POLLIN)

    @property
    def pid(self) -> int:
        return self.process.pid

    def has_reports(self) -> bool:
        """Whether a report (or EOF: the worker died) can be read without waiting."""
        return bool(self._poller.poll(0))

    def rss_bytes(self) -> int:
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return 0


def start_worker(buffer_fd: int, buffer_bytes: int) -> WorkerProcess:
    """Start one worker with SIGINT blocked until it has set SIGINT to ignored.

    Call from a long-lived thread: PR_SET_PDEATHSIG fires when the starting *thread* exits.
    """
    parent_end, child_end = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "asyncdump._worker", str(child_end.fileno()),
             str(buffer_fd), str(buffer_bytes), str(os.getpid())],
            pass_fds=(child_end.fileno(), buffer_fd),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child_end.close()  # only the worker holds it now: its death is EOF on parent_end
    conn = Connection(parent_end.detach())
    return WorkerProcess(process, conn)


def stop_workers(workers: list[WorkerProcess], timeout: float, close: bool = True) -> None:
    """Ask all to stop, then SIGTERM (temp files are removed), then SIGKILL; reap all.

    Each phase signals every worker before waiting for any, under one deadline per phase, so
    close takes about one worker's exit time, not the sum. With ``close=False`` their sockets
    stay open, so reports already sent can still be read.
    """
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.conn.send(Stop())
    for sig, wait in ((None, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        running = [w for w in workers if w.process.poll() is None]
        if not running:
            break
        if sig is not None:
            for worker in running:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)
        deadline = time.monotonic() + wait
        for worker in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    if close:
        for worker in workers:
            worker.conn.close()
