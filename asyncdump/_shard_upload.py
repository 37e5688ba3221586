"""Tar parts of a dataset on an object store: uploaded by a process of their own, in order.

The committer writes each tar part to an unnamed spool file (``TarPart.spooled``: it has no
name, so a killed run leaves nothing on the local disk) and hands its descriptor to the
uploader process (``_uploader``), which sends it as one multipart upload; the part's manifest
lines are PUT only once the store acknowledged the upload. The parent never runs the HTTP
requests, their signing or their checksums: uploads cost the uploader's CPU, as encoding costs
the workers'.

If the uploader dies, a new one is started and every part not yet acknowledged is sent again
(the same bytes under the same key), up to ``MAX_ATTEMPTS`` times per part. ``abandon`` (any
thread; Ctrl-C) kills it: the parts waiting fail, and a resume writes their images again.
Only the committer thread calls the other methods.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import subprocess
import threading
from collections import OrderedDict
from typing import IO, Any, NamedTuple

from ._pool import start_helper

MAX_ATTEMPTS = 3  # uploader processes a part may outlive before it fails
MAX_MESSAGE = 1 << 20


class _Upload(NamedTuple):
    spool: IO[bytes]
    url: str
    size: int
    attempts: int


class ShardUploader:
    """One uploader process for a store (``StoreSpec``), started on first use."""

    def __init__(self, spec: Any):
        self._spec = spec
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._waiting: OrderedDict[int, _Upload] = OrderedDict()  # handed over, not answered
        self._next_id = 0
        self._abandoned = threading.Event()
        self._lock = threading.Lock()  # abandon (any thread) vs starting a process

    @property
    def waiting(self) -> int:
        """Parts handed over and not yet answered."""
        return len(self._waiting)

    def submit(self, spool: IO[bytes], url: str, size: int) -> int:
        """Hand over the first ``size`` bytes of ``spool`` for ``url``; its upload id."""
        upload_id = self._next_id
        self._next_id += 1
        self._waiting[upload_id] = _Upload(spool, url, size, 1)
        if not self._abandoned.is_set():
            self._ensure_started()
            self._send(upload_id)
        return upload_id

    def answers(self, block: bool) -> list[tuple[int, str | None]]:
        """Answers received so far as (upload id, None or the error), oldest first; with
        ``block``, wait for at least one while parts are waiting."""
        done: list[tuple[int, str | None]] = []
        while self._waiting:
            if self._abandoned.is_set():
                done += [(i, "the upload was stopped (interrupted)") for i in self._waiting]
                self._waiting.clear()
                break
            sock = self._sock
            assert sock is not None
            sock.setblocking(block and not done)
            try:
                message = sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                break
            except OSError:
                message = b""  # ECONNRESET: it died
            if not message:
                done += self._restart()
                continue
            upload_id, error = pickle.loads(message)
            self._waiting.pop(upload_id)
            done.append((upload_id, error))
        return done

    def abandon(self) -> None:
        """Stop uploading now (any thread): the process is killed, waiting parts fail."""
        with self._lock:
            self._abandoned.set()
            if self._process is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()

    def close(self) -> None:
        """End the process (after the committer settled every part) and reap it."""
        if self._sock is not None:
            self._sock.close()  # EOF: it exits
            self._sock = None
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    # ------------------------------------------------------------------ internals
    def _ensure_started(self) -> None:
        if self._process is not None:
            return
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with self._lock:
            if self._abandoned.is_set():
                parent_end.close()
                child_end.close()
                return
            try:
                self._process = start_helper("asyncdump._uploader", [str(child_end.fileno())],
                                             (child_end.fileno(),))
            finally:
                child_end.close()  # only the uploader holds it now: its death is EOF here
        self._sock = parent_end
        parent_end.sendall(pickle.dumps(self._spec))

    def _send(self, upload_id: int) -> None:
        upload = self._waiting[upload_id]
        if self._sock is None:  # abandoned before it started
            return
        message = pickle.dumps((upload_id, upload.url, upload.size))
        with contextlib.suppress(OSError):  # it died: the next answers() restarts it
            self._sock.setblocking(True)
            socket.send_fds(self._sock, [message], [upload.spool.fileno()])

    def _restart(self) -> list[tuple[int, str | None]]:
        """The uploader died: reap it, fail the parts out of attempts, resend the others."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            code = self._process.wait()
            self._process = None
        else:
            code = None
        failed: list[tuple[int, str | None]] = []
        for upload_id, upload in list(self._waiting.items()):
            if self._abandoned.is_set() or upload.attempts >= MAX_ATTEMPTS:
                failed.append((upload_id, f"the uploader process died {upload.attempts} time(s) "
                                          f"while uploading {upload.url} (last exit code {code})"))
                del self._waiting[upload_id]
            else:
                self._waiting[upload_id] = upload._replace(attempts=upload.attempts + 1)
        if self._waiting and not self._abandoned.is_set():
            self._ensure_started()
            for upload_id in self._waiting:
                self._send(upload_id)
        return failed
