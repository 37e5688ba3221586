"""The hand-over from producers (and the CUDA copy waiter) to the collector thread.

A queue of ready jobs plus a wake-up pipe the collector waits on beside the workers' sockets.
Producers write to the pipe only when the collector may be asleep: each write lets the
collector take the GIL while the producer is in the syscall, which cost ``submit`` up to
milliseconds when done every time. Like CPython's ``_ThreadWakeup``, a closed flag under a lock
keeps a late wake-up from writing to a closed (and perhaps reused) file descriptor.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import threading
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any


class HandOver:
    """Producers ``put`` jobs; the collector ``wait``s, then ``take``s them."""

    def __init__(self) -> None:
        self._ready: deque[Any] = deque()
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._reader, False)
        os.set_blocking(self._writer, False)
        self._lock = threading.Lock()
        self._closed = False
        self._may_sleep = True  # the collector may be asleep: a hand-over must wake it
        # One poll object for the collector's whole life (multiprocessing.connection.wait
        # builds and fills a selector per call, a tenth of the collector's time per image).
        self._poll = select.poll()
        self._poll.register(self._reader, select.POLLIN)
        self._polled: dict[int, Connection] = {}
        self._writing: set[int] = set()  # polled for POLLOUT too

    def put(self, items: Iterable[Any]) -> None:
        """Queue jobs (or NotStaged records) for the collector."""
        self._ready.extend(items)
        if self._may_sleep:
            self._may_sleep = False
            self.wake()

    def wake(self) -> None:
        """Wake the collector (to stop, answer a probe, or see a broken sink)."""
        with self._lock:
            if not self._closed:
                _write_keeping_the_gil(self._writer)

    def wait(self, conns: Sequence[Connection], sending: Collection[Connection] = ()) -> list[Connection]:
        """Collector: sleep until a worker socket is readable, one in ``sending`` (with bytes
        waiting to go out) is writable, or something is handed over.

        Returns the readable sockets; it does not sleep while jobs are ready.
        """
        by_fd = {conn.fileno(): conn for conn in conns}
        writing = {conn.fileno() for conn in sending}
        if by_fd.keys() != self._polled.keys() or writing != self._writing:
            for fd in self._polled.keys() - by_fd.keys():  # a worker died
                self._poll.unregister(fd)
            for fd in by_fd:  # register() of a registered fd modifies its mask
                self._poll.register(fd, select.POLLIN | (select.POLLOUT if fd in writing else 0))
            self._polled, self._writing = by_fd, writing
        # From here on producers must wake us; anything queued before is seen right now.
        self._may_sleep = True
        events = self._poll.poll(0 if self._ready else None)
        self._may_sleep = False  # awake: new jobs are picked up without a wake-up
        readable = []
        for fd, event in events:  # POLLIN, or POLLHUP/POLLERR: reading then reports EOF
            if fd == self._reader:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._reader, 65536)
            elif event != select.POLLOUT:  # POLLOUT alone only woke us to send
                readable.append(by_fd[fd])
        return readable

    def take(self) -> list[Any]:
        """Collector: everything handed over so far, in order."""
        items = []
        while self._ready:
            items.append(self._ready.popleft())
        return items

    def __bool__(self) -> bool:
        return bool(self._ready)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._reader, self._writer):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _libc_write() -> Any:
    try:
        write = ctypes.PyDLL(None).write  # PyDLL: the call keeps the GIL
    except (OSError, AttributeError):
        return None
    write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    write.restype = ctypes.c_ssize_t
    return write


_LIBC_WRITE = _libc_write()


def _write_keeping_the_gil(fd: int) -> None:
    """Write one byte to the wake-up pipe without releasing the GIL.

    ``os.write`` releases it, and the collector, woken by that very byte, takes it during the
    syscall; the producer then waits for the GIL until the collector blocks again (its whole
    dispatch, often a millisecond or more). Kept, the collector runs when the producer next
    releases the GIL (its next blocking call, or the interpreter's switch interval).
    """
    if _LIBC_WRITE is not None:
        _LIBC_WRITE(fd, b"\0", 1)  # a full pipe (EAGAIN) is fine: the collector wakes anyway
        return
    with contextlib.suppress(BlockingIOError, OSError):
        os.write(fd, b"\0")
