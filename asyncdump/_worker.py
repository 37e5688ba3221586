"""A worker process: view pixels in the shared buffer, convert, encode, write atomically.

Started by the pool as ``python -m asyncdump._worker SOCKET_FD BUFFER_FD BUFFER_BYTES``.
Imports numpy and cv2 only, never torch (a test checks ``sys.modules``).

Once started: ("ready", pid, 0). Per image, the messages home are:
    ("encoded", job, i)                  the complete temp file is on disk: pixels may be reused
    ("written", job, i, nbytes)          renamed to its final name (and fsynced if asked)
    ("failed", job, i, errno, message, traceback)
or, for encode-only jobs (``sink.encode``), just
    ("bytes", job, i, encoded_file_bytes)
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import cv2
import numpy as np

from asyncdump._fsutil import fsync_folder

_PR_SET_PDEATHSIG = 1
_parent_gone = False


def _on_parent_death(signum: int, frame: Any) -> None:
    global _parent_gone
    _parent_gone = True  # finish what is already in the pipe, then exit (see main loop)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that remove temp files


def _install_signals(parent_pid: int) -> None:
    # The pool starts us with SIGINT blocked; ignore it before unblocking so that Ctrl-C,
    # which reaches the whole process group, never interrupts a file (the parent decides).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGUSR1, _on_parent_death)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        _on_parent_death(signal.SIGUSR1, None)


_BGR_ORDER = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}


def _to_bgr(dst: np.ndarray, src_hwc: np.ndarray) -> None:
    """Copy an RGB(A)/gray HWC view into ``dst`` in OpenCV's BGR(A) order (casting as needed)."""
    channels = src_hwc.shape[2]
    if channels == 1:
        dst[...] = src_hwc
        return
    dst[..., :3] = src_hwc[..., 2::-1]
    if channels == 4:
        dst[..., 3] = src_hwc[..., 3]


def to_opencv_image(raw: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Turn one image's raw bytes from the buffer into what ``cv2.imencode`` takes."""
    channels, height, width = spec["chw"]
    dtype = spec["dtype"]
    if spec["converted"]:  # staged on the GPU: already uint8/uint16 HWC in BGR order
        img = raw.view(dtype).reshape(height, width, channels)
        return img[..., 0] if channels == 1 else img
    storage = "uint16" if dtype == "bfloat16" else dtype
    values = raw.view(storage)
    if spec["layout"] == "nchw":
        hwc = values.reshape(channels, height, width).transpose(1, 2, 0)
    else:
        hwc = values.reshape(height, width, channels)

    if dtype in ("uint8", "uint16", "bool"):
        out = np.empty((height, width, channels), np.uint16 if dtype == "uint16" else np.uint8)
        _to_bgr(out, hwc.view(np.uint8) if dtype == "bool" else hwc)
        if dtype == "bool":
            np.multiply(out, 255, out=out)
        return out[..., 0] if channels == 1 else out

    if dtype == "bfloat16":  # bf16 is the top half of a float32
        hwc = (hwc.astype(np.uint32) << 16).view(np.float32)
    y = np.empty((height, width, channels), np.float32)
    _to_bgr(y, hwc)
    conv = spec["conversion"]
    order = _BGR_ORDER[channels]
    if conv["std"] is not None:
        y *= np.asarray(conv["std"], np.float32)[order]
        y += np.asarray(conv["mean"], np.float32)[order]
    lo, hi = conv["value_range"]
    if (lo, hi) != (0.0, 1.0):  # for (0, 1) the clamp and scale below are exact no-ops
        np.clip(y, lo, hi, out=y)
        y -= np.float32(lo)
        y /= np.float32(max(hi - lo, 1e-5))  # in double first, as torchvision computes it
    y *= np.float32(255.0)
    y += np.float32(0.5)
    np.fmax(y, np.float32(0.0), out=y)  # fmax/fmin clamp to 0..255 and turn NaN into 0
    np.fmin(y, np.float32(255.0), out=y)
    out = y.astype(np.uint8)  # truncation of a value >= 0: round half up overall
    return out[..., 0] if channels == 1 else out


def _write_temp(temp: str, data: np.ndarray, fsync: bool) -> None:
    os.makedirs(os.path.dirname(temp), exist_ok=True)
    try:
        with open(temp, "wb") as handle:
            handle.write(data.data)  # imencode returns one contiguous uint8 array
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        _unlink_quietly(temp)
        raise


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _report(conn: Connection, message: tuple[Any, ...]) -> None:
    # OSError: the parent is gone; keep writing what we were given, with nobody to tell.
    with contextlib.suppress(OSError):
        conn.send(message)


def run_job(conn: Connection, buffer: np.ndarray, job: dict[str, Any]) -> None:
    """Encode and write every image of one job, reporting each step home."""
    job_id = job["id"]
    params: list[int] = []
    for flag, value in job["params"]:
        params += [int(getattr(cv2, flag)), int(value)]
    nbytes = job["image_bytes"]
    for i, final, temp, offset in job["items"]:
        try:
            img = to_opencv_image(buffer[offset: offset + nbytes], job["spec"])
            ok, encoded = cv2.imencode(job["ext"], img, params)
            if not ok:
                raise RuntimeError(f"cv2.imencode({job['ext']!r}) returned False")
            if job["return_bytes"]:
                _report(conn, ("bytes", job_id, i, encoded.tobytes()))
                continue
            _write_temp(temp, encoded, job["fsync"])
            _report(conn, ("encoded", job_id, i))
            try:
                os.replace(temp, final)
            except BaseException:
                _unlink_quietly(temp)
                raise
            if job["fsync"]:
                fsync_folder(os.path.dirname(final))
            _report(conn, ("written", job_id, i, int(encoded.size)))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            err = exc.errno if isinstance(exc, OSError) else None
            _report(conn, ("failed", job_id, i, err, f"{type(exc).__name__}: {exc}",
                           traceback.format_exc()))


def main(argv: list[str]) -> int:
    sock_fd, buffer_fd, buffer_bytes, parent_pid = (int(a) for a in argv[1:5])
    _install_signals(parent_pid)
    cv2.setNumThreads(1)
    mapping = mmap.mmap(buffer_fd, buffer_bytes, prot=mmap.PROT_READ)
    buffer = np.frombuffer(mapping, dtype=np.uint8)
    conn = Connection(sock_fd)
    _report(conn, ("ready", os.getpid(), 0))
    while True:
        if _parent_gone and not conn.poll(0):
            return 0
        if not conn.poll(1.0):
            continue
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return 0
        if message[0] == "stop":
            return 0
        if message[0] == "job":
            run_job(conn, buffer, message[1])
        elif message[0] == "probe":  # diagnostics: what this process has imported
            _report(conn, ("probe", message[1], os.getpid(), sorted(sys.modules)))


if __name__ == "__main__":
    code = main(sys.argv)
    # Every file is closed and reported: skip the interpreter's teardown (about 0.1-0.2 s with
    # cv2 and numpy loaded), so that close() is quick.
    os._exit(code)
