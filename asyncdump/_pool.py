"""Start, watch and stop worker processes.

Workers are plain ``python -m asyncdump._worker`` processes (``subprocess.Popen`` with
``pass_fds``), not multiprocessing children: spawn/forkserver would re-import the user's
``__main__`` (torch included, and scripts without a main guard break), and fork is unsafe once
CUDA is initialised. Each worker gets one socket (jobs in, results out) and the buffer's fd.

The parent never blocks on a send: a worker may itself be blocked sending reports, which only
the collector reads, so a blocking send of a large job deadlocks both. Messages go to a
per-worker outbox, framed as ``Connection`` frames them, and leave with ``MSG_DONTWAIT`` as the
socket accepts them; the collector waits for the socket to be writable while an outbox holds
bytes.
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

from ._protocol import Stop, framed

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


@dataclass(eq=False)
class WorkerProcess:
    """One worker: its process, the parent's end of its socket, and the jobs it holds."""

    process: subprocess.Popen[bytes]
    conn: Connection  # reports in (blocking reads, only when poll says readable)
    sock: socket.socket  # the same socket, for sends that never wait
    inflight: dict[int, Any] = field(default_factory=dict)  # job id -> Job (collector-owned)
    inflight_images: int = 0
    ready: bool = False  # it imported cv2, mapped the buffer and said so
    replaces_death_at: float | None = None  # perf_counter when the worker it replaces died
    outbox: bytearray = field(default_factory=bytearray)  # framed messages not yet sent

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

    def post(self, message: Any) -> None:
        """Queue ``message`` for the worker and send what the socket takes now, never waiting.

        Raises OSError if the worker is gone (its EOF is then handled by the collector)."""
        self.outbox += framed([message])
        self.send_pending()

    def send_pending(self) -> bool:
        """Send as much of the outbox as the socket accepts without waiting; True once empty."""
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            del self.outbox[:sent]
        return True

    def close(self) -> None:
        """Close the parent's end of the socket (both handles)."""
        self.conn.close()
        self.sock.close()

    def rss_bytes(self) -> int:
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return 0


def start_helper(module: str, args: list[str], pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """Start ``python -m module *args PARENT_PID`` with SIGINT blocked until it has set SIGINT
    to ignored (the parent decides what Ctrl-C stops).

    Call from a long-lived thread: PR_SET_PDEATHSIG fires when the starting *thread* exits.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return subprocess.Popen([sys.executable, "-m", module, *args, str(os.getpid())],
                                pass_fds=pass_fds, stdin=subprocess.DEVNULL, env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def start_worker(buffer_fd: int, buffer_bytes: int) -> WorkerProcess:
    """Start one worker (``start_helper``): its socket and the buffer's fd are passed."""
    parent_end, child_end = socket.socketpair()
    try:
        process = start_helper("asyncdump._worker",
                               [str(child_end.fileno()), str(buffer_fd), str(buffer_bytes)],
                               (child_end.fileno(), buffer_fd))
    finally:
        child_end.close()  # only the worker holds it now: its death is EOF on parent_end
    conn = Connection(os.dup(parent_end.fileno()))
    return WorkerProcess(process, conn, parent_end)


def stop_workers(workers: list[WorkerProcess], timeout: float, close: bool = True) -> None:
    """Ask all to stop, then SIGTERM (temp files are removed), then SIGKILL; reap all.

    Each phase signals every worker before waiting for any, under one deadline per phase, so
    close takes about one worker's exit time, not the sum. With ``close=False`` their sockets
    stay open, so reports already sent can still be read.
    """
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.post(Stop())  # if its outbox cannot drain, the signals below stop it
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
            worker.close()
