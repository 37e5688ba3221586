"""A fault-injecting HTTP proxy on loopback, between an S3 client and the test server.

One client connection carries one request (the proxy answers with ``Connection: close``), so
every request meets the proxy's current fault plan:

    "pass"      forward it to the server and its answer back
    "refuse"    close the connection at once, before reading anything (an outage)
    "reset"     read part of the body, then reset the connection (RST) mid-body
    "slowdown"  read it whole and answer 503 SlowDown, as S3 does when throttling
    "deny"      read it whole and answer 403 AccessDenied (a permanent error)
    "stall"     hold it until ``release()`` (a server that stopped answering)

``plan(n, method, path)`` picks the fault of the n-th request; counters record what happened.
Every loop is bounded: sockets time out after ``SOCKET_TIMEOUT`` seconds.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable

SOCKET_TIMEOUT = 30.0
SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")
DENIED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
          b"Content-Length: %d\r\n\r\n%s")
DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
               b"<Message>Access Denied</Message></Error>")

Plan = Callable[[int, str, str], str]


class FaultProxy:
    """Listens on 127.0.0.1 at a free port; ``endpoint`` is its URL."""

    def __init__(self, upstream: str):
        host, _, port = upstream.removeprefix("http://").partition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.plan: Plan = lambda n, method, path: "pass"
        self.counts: Counter[str] = Counter()
        self._requests = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Let stalled requests through (and every later "stall" too)."""
        self._released.set()

    def close(self) -> None:
        self._stop.set()
        self._released.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(SOCKET_TIMEOUT)
        with conn:
            try:
                head, body_start = _read_head(conn)
                if head is None:
                    return
                method, path = head.split(b" ", 2)[:2]
                with self._lock:
                    n = self._requests
                    self._requests += 1
                fault = self.plan(n, method.decode(), path.decode())
                self.counts[fault] += 1
                if fault == "refuse":
                    _reset(conn)
                    return
                length = _content_length(head)
                if b"\r\nexpect: 100-continue" in head.lower() and length > len(body_start):
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # botocore waits for it
                if fault == "reset":
                    _read_exact(conn, body_start, max(0, length // 2 - len(body_start)))
                    _reset(conn)
                    return
                body = _read_exact(conn, body_start, length - len(body_start))
                if fault == "slowdown":
                    conn.sendall(SLOWDOWN % (len(SLOWDOWN_BODY), SLOWDOWN_BODY))
                    return
                if fault == "deny":
                    conn.sendall(DENIED % (len(DENIED_BODY), DENIED_BODY))
                    return
                if fault == "stall":
                    self._released.wait(SOCKET_TIMEOUT)
                conn.sendall(self._forward(_with_close(head), body))
            except OSError:
                return

    def _forward(self, head: bytes, body: bytes) -> bytes:
        with socket.create_connection(self._upstream, timeout=SOCKET_TIMEOUT) as up:
            up.sendall(head + body)
            answer, rest = _read_head(up)
            if answer is None:
                raise OSError("the server closed without answering")
            status = int(answer.split(b" ", 2)[1])
            no_body = head.startswith(b"HEAD ") or status in (204, 304) or status < 200
            length = 0 if no_body else _content_length(answer)
            return _with_close(answer) + _read_exact(up, rest, length - len(rest))


def _read_head(conn: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return None, b""
        data += chunk
        if len(data) > 1 << 20:
            raise OSError("request head too long")
    end = data.index(b"\r\n\r\n") + 4
    return data[:end], data[end:]


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
        if name.strip().lower() == b"transfer-encoding":
            raise OSError("the fault proxy does not handle chunked request bodies")
    return 0


def _read_exact(conn: socket.socket, start: bytes, missing: int) -> bytes:
    parts = [start]
    while missing > 0:
        chunk = conn.recv(min(missing, 1 << 16))
        if not chunk:
            raise OSError("client closed mid-body")
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)


def _with_close(head: bytes) -> bytes:
    """``head`` with ``Connection: close`` (and no ``Expect``) instead of its own."""
    lines = [line for line in head[:-4].split(b"\r\n")
             if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"expect", b"keep-alive")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _reset(conn: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) instead of an orderly FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
