"""The objects a dataset's committer makes on a store, uploaded by a process of their own, in
order: tar parts and manifest parts.

A tar part is written to an unnamed spool file (``TarPart`` without a root: it has no name,
so a killed run leaves nothing on the local disk); its descriptor goes to the uploader process
(``_uploader``), which sends it as one multipart upload. A manifest part (a few KB of lines)
goes as bytes in the message and is one PUT. The parent never runs the HTTP requests, their
signing or their checksums (2-4 ms of CPU per request through botocore): uploads cost the
uploader's CPU, as encoding costs the workers'. Answers come back in the order of ``submit``.

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
import tempfile
import threading
from collections import OrderedDict
from typing import IO, Any, NamedTuple

from ._pool import start_helper

MAX_ATTEMPTS = 3  # uploader processes a part may outlive before it fails
MAX_MESSAGE = 1 << 20  # the largest message either way
INLINE_BYTES = 64 << 10  # larger objects travel as a spool file (a datagram has a size limit)


class _Upload(NamedTuple):
    spool: IO[bytes] | None  # a spool file holding the object, or None: ``data`` is it
    data: bytes | None
    url: str
    size: int
    attempts: int
    owned: bool  # the spool is this uploader's (closed once answered), not the caller's


class StoreUploader:
    """One uploader process for a store (``StoreSpec``), started on first use."""

    def __init__(self, spec: Any):
        self._spec = spec
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._waiting: OrderedDict[int, _Upload] = OrderedDict()  # handed over, not answered
        self._next_id = 0
        self._abandoned = threading.Event()
        self._lock = threading.Lock()  # abandon (any thread) vs starting a process

    def submit(self, url: str, *, spool: IO[bytes] | None = None, size: int = 0,
               data: bytes | None = None) -> int:
        """Hand over the first ``size`` bytes of ``spool``, or ``data``, for ``url``; the
        upload's id (its answer carries it)."""
        upload_id = self._next_id
        self._next_id += 1
        owned = data is not None and len(data) > INLINE_BYTES
        if owned:
            assert data is not None
            spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed when answered)
            spool.write(data)
            spool.flush()
            data, size = None, spool.tell()
        self._waiting[upload_id] = _Upload(spool, data, url, size, 1, owned)
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
                for upload_id in list(self._waiting):
                    self._answered(upload_id)
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
            self._answered(upload_id)
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
        for upload_id in list(self._waiting):
            self._answered(upload_id)
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
    def _answered(self, upload_id: int) -> None:
        upload = self._waiting.pop(upload_id)
        if upload.owned and upload.spool is not None:
            upload.spool.close()

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
        message = pickle.dumps((upload_id, upload.url, upload.size, upload.data))
        fds = [upload.spool.fileno()] if upload.spool is not None else []
        with contextlib.suppress(OSError):  # it died: the next answers() restarts it
            self._sock.setblocking(True)
            socket.send_fds(self._sock, [message], fds)

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
                self._answered(upload_id)
            else:
                self._waiting[upload_id] = upload._replace(attempts=upload.attempts + 1)
        if self._waiting and not self._abandoned.is_set():
            self._ensure_started()
            for upload_id in self._waiting:
                self._send(upload_id)
        return failed
