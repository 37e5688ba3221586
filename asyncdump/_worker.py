"""A worker process: view pixels in the shared buffer, convert, encode, write atomically.

Started by the pool as ``python -m asyncdump._worker SOCKET_FD BUFFER_FD BUFFER_BYTES PARENT_PID``
(PARENT_PID tells it whether the parent died before it could ask to be told).
Imports numpy and cv2 (and fpng on first use), never torch (a test checks ``sys.modules``).
It speaks the records of ``_protocol``: runs each ``RunJob`` in order and reports every image.
The spec's encoder picks fpng (8-bit RGB/RGBA PNG, RGB order) or OpenCV (BGR order).
A job whose settings name a store (``_stores.StoreSpec``) PUTs each file there instead of
writing a local file; fsspec and its plugin are then imported, still never torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import cv2
import numpy as np

from asyncdump._child import leave_ctrl_c_to_the_parent, signal_on_parent_death
from asyncdump._convert import to_image, to_opencv_image
from asyncdump._fsutil import Folders, rename_noreplace, unlink_quietly
from asyncdump._protocol import (
    Encoded,
    EncodedBytes,
    Failed,
    JobSettings,
    Probe,
    ProbeAnswer,
    Ready,
    Report,
    RunJob,
    Stop,
    Written,
    framed,
)
from asyncdump._tile import grid_image

__all__ = ["main", "run_job", "to_opencv_image"]

_parent_gone = False


def _on_parent_death(signum: int, frame: Any) -> None:
    global _parent_gone
    _parent_gone = True  # finish what is already in the pipe, then exit (see main loop)


_temp_in_progress: tuple[str, int | None] | None = None  # (temp, dir_fd) from open to rename


def _on_sigterm(signum: int, frame: Any) -> None:
    """Remove the temp file being written and exit at once, quietly. (Raising SystemExit here
    surfaced in whatever Python code ran at that moment: in the interpreter's teardown, an
    atexit callback or a __del__, Python prints "Exception ignored ... SystemExit: 143".)"""
    if _temp_in_progress is not None:
        unlink_quietly(_temp_in_progress[0], dir_fd=_temp_in_progress[1])
    os._exit(128 + signum)


def _install_signals(parent_pid: int) -> None:
    leave_ctrl_c_to_the_parent()  # never interrupts a file: the parent decides
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGUSR1, _on_parent_death)
    if not signal_on_parent_death(signal.SIGUSR1, parent_pid):
        _on_parent_death(signal.SIGUSR1, None)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed: blocks up to it come from the heap
_TRIM_THRESHOLD_BYTES = 256 << 20


def _keep_freed_memory() -> None:
    """Let glibc reuse freed memory instead of returning it to the kernel after every image.

    Each image allocates a few arrays of 0.1-1 MB (planes, the interleaved image, the encoded
    file). By default glibc grows and trims its heap around them (strace: ~0.6 brk per image
    at 256² float), and every growth is fresh pages to fault in and zero. Kept, the worker's
    memory stays at its largest image's working set. No-op where this is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def _open_new(temp: str, dir_fd: int | None) -> int:
    # O_NOFOLLOW: a symlink planted at the temp name is refused, never written through.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    if dir_fd is not None:  # the folder is open already (Folders created it)
        return os.open(temp, flags, 0o666, dir_fd=dir_fd)
    try:
        return os.open(temp, flags, 0o666)
    except FileNotFoundError:  # the folder is created on first use (or again, if removed)
        os.makedirs(os.path.dirname(temp), exist_ok=True)
        return os.open(temp, flags, 0o666)


def write_temp(temp: str, data: memoryview, fsync: bool, dir_fd: int | None = None) -> None:
    """Write ``data`` to ``temp`` (created, or truncated; relative to ``dir_fd`` when given),
    fsynced if asked; no partial file is left on failure. The bench's plain processes call it
    too, to do exactly this work."""
    # os.open/os.write: Python's open() adds an fstat, an isatty ioctl and an lseek per file.
    global _temp_in_progress
    _temp_in_progress = (temp, dir_fd)  # before it exists: SIGTERM removes it (run_job clears)
    try:
        fd = _open_new(temp, dir_fd)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        unlink_quietly(temp, dir_fd=dir_fd)
        raise


_folders: dict[str, Folders] = {}  # by root: its folders, each opened once (no symlinks below it)


def _folder_of(root: str, final: str) -> tuple[Folders, str, str]:
    """(the root's Folders, the folder of ``final`` relative to root, the file name)."""
    folders = _folders.get(root)
    if folders is None:
        folders = _folders[root] = Folders(root)
    if not final.startswith(root + os.sep):
        raise ValueError(f"{final} is not below the sink's root {root}")
    folder, _, base = final[len(root) + 1:].rpartition("/")
    return folders, folder, base


def _write_temp_below(folders: Folders, folder: str, temp: str, data: memoryview,
                      fsync: bool) -> int:
    """Write the temp file relative to its folder's descriptor; returns that descriptor."""
    dir_fd = folders.fd(folder)
    try:
        write_temp(temp, data, fsync, dir_fd)
    except FileNotFoundError:  # the folder (or root) was removed since it was opened
        folders.forget("")  # open (or create) every folder again, from the root
        dir_fd = folders.fd(folder)
        write_temp(temp, data, fsync, dir_fd)
    return dir_fd


def _rename_into_place(settings: JobSettings, dir_fd: int, temp: str, base: str,
                       data: memoryview, final: str) -> None:
    try:
        if settings.overwrite:
            os.replace(temp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            _place_new(temp, base, dir_fd, data, final)
    except BaseException:
        unlink_quietly(temp, dir_fd=dir_fd)
        raise
    if settings.fsync:
        os.fsync(dir_fd)


def _place_new(temp: str, base: str, dir_fd: int, data: memoryview, final: str) -> None:
    """Rename without replacing: an existing file is an error, unless it already holds these
    very bytes (this image, written by a worker that died before reporting it)."""
    try:
        rename_noreplace(temp, base, dir_fd)
    except FileExistsError:
        if not _holds(base, dir_fd, data):
            raise FileExistsError(errno.EEXIST, "a file is already there; overwrite=False never "
                                  "replaces an existing file (pass overwrite=True to allow it)",
                                  final) from None
        unlink_quietly(temp, dir_fd=dir_fd)


def _holds(name: str, dir_fd: int, data: memoryview) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != len(data):
            return False
        return os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)


def _report(conn: Connection, message: Report) -> None:
    # OSError: the parent is gone; keep writing what we were given, with nobody to tell.
    with contextlib.suppress(OSError):
        conn.send(message)


def _encode(img: np.ndarray, settings: JobSettings, params: list[int]) -> Any:
    """The encoded file as a buffer (``bytes`` from fpng, a uint8 array from OpenCV)."""
    if settings.spec.encoder == "fpng":
        data = _fpng().from_ndarray(img)
        if not data:
            raise RuntimeError(f"fpng returned no bytes for a {img.dtype} image of shape {img.shape}")
        return data
    ok, encoded = cv2.imencode(settings.extension, img, params)
    if not ok:
        raise RuntimeError(f"cv2.imencode({settings.extension!r}) returned False")
    return encoded


_fpng_module: Any = None


def _fpng() -> Any:
    global _fpng_module
    if _fpng_module is None:  # imported on first use: workers of OpenCV-only sinks never load it
        import fpng

        _fpng_module = fpng
    return _fpng_module


_stores_open: dict[Any, Any] = {}


def _store(spec: Any) -> Any:
    """The worker's client for a store (``_stores.StoreSpec``), opened once per spec."""
    key = (spec.url, repr(sorted(spec.storage_options.items())), spec.retry_seconds)
    store = _stores_open.get(key)
    if store is None:
        from asyncdump._stores import open_store  # fsspec loads only in workers that upload

        store = _stores_open[key] = open_store(spec)
    return store


def _as_bytes(encoded: memoryview) -> bytes:
    return encoded.obj if isinstance(encoded.obj, bytes) else encoded.tobytes()


def run_job(conn: Connection, buffer: np.ndarray, job: RunJob) -> None:
    """Encode and write every image of one job, reporting each step home."""
    global _temp_in_progress
    settings = job.settings
    params: list[int] = []
    for flag, value in settings.params:
        params += [int(getattr(cv2, flag)), int(value)]
    nbytes = settings.image_bytes
    rgb = settings.spec.encoder == "fpng"
    store = None  # the job's store client, looked up at its first image
    for i, final, temp, offset in job.items:
        try:
            raw = buffer[offset: offset + nbytes]
            grid = settings.spec.grid
            img = to_image(raw, settings.spec, rgb=rgb) if grid is None else grid_image(raw, grid, rgb)
            encoded = memoryview(_encode(img, settings, params)).cast("B")
            sha = hashlib.sha256(encoded).hexdigest() if settings.sha256 else None
            if settings.return_bytes:
                _report(conn, EncodedBytes(job.job_id, i, encoded.tobytes(), sha))
                continue
            if settings.store is not None:  # an object store: one PUT, acknowledged
                store = store or _store(settings.store)
                _uploads.start(conn, job.job_id, i, store, settings.store.overwrite, final,
                               _as_bytes(encoded), sha)
                continue
            # Relative to the folder's descriptor: no symlink swapped in below root redirects it.
            folders, folder, base = _folder_of(settings.root, final)
            temp_base = temp.rpartition(os.sep)[2]
            dir_fd = _write_temp_below(folders, folder, temp_base, encoded, settings.fsync)
            if settings.fsync:  # the pixels may be reused before the slow fsyncs are done
                _report(conn, Encoded(job.job_id, i))
            _rename_into_place(settings, dir_fd, temp_base, base, encoded, final)
            _report(conn, Written(job.job_id, i, encoded.nbytes, sha))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            _report(conn, _failed(job.job_id, i, exc))
        finally:
            _temp_in_progress = None  # renamed into place, or removed
    _uploads.finish()  # the job's last PUT is answered before the next job starts


class _Uploads:
    """A worker's PUTs to a store, one in flight on a thread of its own, so that the next
    image is encoded while the last one uploads (the concurrency per worker stays one PUT).
    Reports are sent from the main thread only. The pixels stay in the buffer until the PUT
    is answered: a worker killed mid-PUT is replaced and its images are encoded again.

    ``Written`` reports go home in groups of ``REPORT_EVERY`` (and at the end of each job),
    written together, so that the collector wakes once per group: a store's answers come
    one at a time, and a wake-up per image cost the parent about 0.08 ms of CPU each."""

    REPORT_EVERY = 8

    def __init__(self) -> None:
        self._pool: Any = None
        self._inflight: Any = None  # (future, job id, position, nbytes, sha256)
        self._conn: Connection | None = None
        self._reports: list[Report] = []  # answered, not yet sent home

    def start(self, conn: Connection, job_id: int, position: int, store: Any, overwrite: bool,
              url: str, data: bytes, sha: str | None) -> None:
        self._wait()  # at most one PUT in flight
        if self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(1, "asyncdump-put")
        self._conn = conn
        future = self._pool.submit(store.put, url, data, overwrite)
        self._inflight = (future, job_id, position, len(data), sha)
        if len(self._reports) >= self.REPORT_EVERY:
            self._send_reports()

    def finish(self) -> None:
        """Wait for the PUT in flight (if any) and send every report home."""
        self._wait()
        self._send_reports()

    def _wait(self) -> None:
        if self._inflight is None:
            return
        future, job_id, position, nbytes, sha = self._inflight
        self._inflight = None
        try:
            future.result()
        except BaseException as exc:
            self._reports.append(_failed(job_id, position, exc))
        else:
            self._reports.append(Written(job_id, position, nbytes, sha))

    def _send_reports(self) -> None:
        if not self._reports or self._conn is None:
            return
        frames = framed(self._reports)
        self._reports = []
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            view = memoryview(frames)
            while view:
                view = view[os.write(self._conn.fileno(), view):]


_uploads = _Uploads()


def _failed(job_id: int, position: int, exc: BaseException) -> Failed:
    """The ``Failed`` report of an image whose encoding or writing raised ``exc``."""
    return Failed(job_id, position, exc.errno if isinstance(exc, OSError) else None,
                  _failure_text(exc), "".join(traceback.format_exception(exc)))


def _failure_text(exc: BaseException) -> str:
    """The message of a ``Failed`` report. The parent rebuilds an OSError with an errno as
    ``OSError(errno, text)``, whose str() says "[Errno N]" and picks the subclass itself."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return str(exc).removeprefix(f"[Errno {exc.errno}] ")
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    sock_fd, buffer_fd, buffer_bytes, parent_pid = (int(a) for a in argv[1:5])
    _install_signals(parent_pid)
    _keep_freed_memory()
    cv2.setNumThreads(1)
    mapping = mmap.mmap(buffer_fd, buffer_bytes, prot=mmap.PROT_READ)
    buffer = np.frombuffer(mapping, dtype=np.uint8)
    conn = Connection(sock_fd)
    _report(conn, Ready(os.getpid()))
    while True:
        if _parent_gone and not conn.poll(0):
            return 0
        if not conn.poll(1.0):
            continue
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return 0
        match message:
            case RunJob():
                run_job(conn, buffer, message)
            case Probe(probe_id):  # diagnostics: what this process has imported
                _report(conn, ProbeAnswer(probe_id, os.getpid(), sorted(sys.modules)))
            case Stop():
                return 0


if __name__ == "__main__":
    code = main(sys.argv)
    # Every file is closed and reported: skip the interpreter's teardown (about 0.1-0.2 s with
    # cv2 and numpy loaded), so that close() is quick.
    os._exit(code)
