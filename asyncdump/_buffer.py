"""The staging buffer: anonymous shared memory that the producer and every worker map.

``os.memfd_create`` + ``ftruncate`` + ``mmap`` gives memory with no name: nothing appears in
/dev/shm (so Docker's 64 MB /dev/shm does not bound it) and the kernel frees it when the last
process holding the fd or a mapping exits, even after ``kill -9`` of the parent. Workers get
the fd through ``pass_fds``.

Space is handed out in byte extents by a first-fit free list. First fit keeps reusing the
lowest addresses, so the pages that staging touches stay warm instead of faulting in fresh
ones. Any sub-range of a reservation can be released on its own, which lets one image of a
batch free its bytes as soon as it is encoded.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ALIGNMENT = 64  # bytes: every region starts on a cache line (and any dtype's alignment)
PREFAULT_CHUNK_BYTES = 16 << 20
PREFAULT_AHEAD_BYTES = 64 << 20  # populated beyond the highest byte ever reserved
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not in Python 3.11's mmap module


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _anonymous_fd(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("asyncdump-buffer", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux: an unlinked temporary file has the same lifetime rules
        handle = tempfile.TemporaryFile()  # noqa: SIM115 - only its fd is kept
        fd = os.dup(handle.fileno())
        handle.close()
    os.ftruncate(fd, size)
    return fd


MAX_STAGED_IMAGES = 8192  # images reserved and not yet released, whatever their size


class SharedBuffer:
    """``capacity_bytes`` of shared memory with reserve/release accounting.

    Also counts images: at most ``max_images`` may be staged at once. Each staged image costs
    the parent about a kilobyte of bookkeeping (its job entry and paths), so for tiny images
    a byte budget alone would let that grow with the backlog to gigabytes.

    Thread-safe: the producer reserves, the collector releases.
    """

    def __init__(self, capacity_bytes: int, max_images: int = MAX_STAGED_IMAGES):
        if capacity_bytes < 1:
            raise ValueError(f"max_buffer_bytes must be >= 1, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.mapped_bytes = _round_up(self.capacity_bytes, mmap.PAGESIZE)
        self.fd = _anonymous_fd(self.mapped_bytes)
        self._mm: mmap.mmap | None = mmap.mmap(self.fd, self.mapped_bytes)
        # np.frombuffer keeps the mmap export alive: mm.close() raises instead of leaving a
        # dangling view that would segfault (see docs/design.md).
        self._array: np.ndarray | None = np.frombuffer(self._mm, dtype=np.uint8)
        self._torch_view: Any = None
        self._pinned_ptr: int | None = None
        self._starts: list[int] = [0]  # free extents, sorted by start
        self._ends: list[int] = [self.capacity_bytes]
        self._cond = threading.Condition()
        self._prefault_thread: threading.Thread | None = None
        self._prefault_stop = threading.Event()
        self._prefault_wake = threading.Event()
        self._prefault_target = 0
        self.buffered_bytes = 0
        self.peak_buffered_bytes = 0
        self.max_images = int(max_images)
        self.staged_images = 0

    def start_prefault(self) -> None:
        """Keep the pages ahead of staging faulted in, from a background thread.

        A copy into never-touched shared pages costs a page fault per 4 KiB (measured: a
        12.6 MB submit took 25-50 ms instead of 1.6 ms). The thread keeps
        ``PREFAULT_AHEAD_BYTES`` beyond the highest reserved byte populated, so memory grows
        with the backlog that actually builds up, not to ``max_buffer_bytes`` at once.
        MADV_POPULATE_WRITE allocates pages without changing their contents, so it may run
        while staging writes into them; ctypes releases the GIL for the call.
        """
        self._prefault_target = min(self.mapped_bytes, PREFAULT_AHEAD_BYTES)
        self._prefault_thread = threading.Thread(target=self._prefault, name="asyncdump-prefault",
                                                 daemon=True)
        self._prefault_thread.start()

    def _prefault(self) -> None:
        assert self._array is not None
        base = int(self._array.ctypes.data)
        try:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
            madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            madvise = None
        populated = 0
        while not self._prefault_stop.is_set():
            target = self._prefault_target
            if populated >= target:
                self._prefault_wake.wait()
                self._prefault_wake.clear()
                continue
            length = min(PREFAULT_CHUNK_BYTES, target - populated)
            if madvise is None or madvise(base + populated, length, _MADV_POPULATE_WRITE) != 0:
                # Older kernels: allocate the memfd's pages (faults stay, but become cheap).
                with contextlib.suppress(OSError):
                    os.posix_fallocate(self.fd, populated, length)
            populated += length

    # -- space -----------------------------------------------------------------------------
    def _first_fit(self, nbytes: int) -> int | None:
        """Index of the lowest free extent that holds ``nbytes`` once aligned, or None."""
        for i, (start, end) in enumerate(zip(self._starts, self._ends, strict=True)):
            if _round_up(start, ALIGNMENT) + nbytes <= end:
                return i
        return None

    def _fits(self, nbytes: int, images: int) -> bool:
        return self.staged_images + images <= self.max_images and self._first_fit(nbytes) is not None

    def _take(self, nbytes: int, images: int) -> int | None:
        if self.staged_images + images > self.max_images:
            return None
        i = self._first_fit(nbytes)
        if i is not None:
            start, end = self._starts[i], self._ends[i]
            offset = _round_up(start, ALIGNMENT)
            # Split [start, end) into [start, offset) + reserved + [offset + nbytes, end).
            del self._starts[i], self._ends[i]
            if offset + nbytes < end:
                self._starts.insert(i, offset + nbytes)
                self._ends.insert(i, end)
            if start < offset:
                self._starts.insert(i, start)
                self._ends.insert(i, offset)
            self.buffered_bytes += nbytes
            self.staged_images += images
            self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)
            ahead = offset + nbytes + PREFAULT_AHEAD_BYTES
            if ahead > self._prefault_target and self._prefault_thread is not None:
                self._prefault_target = min(self.mapped_bytes, ahead)
                self._prefault_wake.set()
            return offset
        return None

    def try_reserve(self, nbytes: int, images: int = 1) -> int | None:
        """Reserve ``nbytes`` for ``images`` images now, or return None when no extent is large
        enough or more than ``max_images`` would be staged."""
        self._check_size(nbytes, images)
        with self._cond:
            return self._take(nbytes, images)

    def _check_size(self, nbytes: int, images: int) -> None:
        if nbytes > self.capacity_bytes:
            raise ValueError(f"{nbytes} bytes can never fit a {self.capacity_bytes}-byte buffer")
        if images > self.max_images:
            raise ValueError(f"{images} images can never be staged at once (at most {self.max_images})")

    def wait_for_space(self, nbytes: int, check: Callable[[], None] | None = None,
                       images: int = 1) -> float:
        """Block until ``nbytes`` for ``images`` images would fit; returns the seconds waited.
        Reserves nothing.

        ``check`` runs on every wake-up and may raise to abandon the wait (the sink broke or
        is closing). Interruptible by Ctrl-C: it changes no state.
        """
        self._check_size(nbytes, images)
        with self._cond:
            if self._fits(nbytes, images):
                return 0.0
            began = time.perf_counter()
            while not self._fits(nbytes, images):
                if check is not None:
                    check()
                self._cond.wait(timeout=0.5)
            return time.perf_counter() - began

    def release(self, offset: int, nbytes: int, images: int = 1) -> None:
        """Give ``[offset, offset + nbytes)`` (holding ``images`` images) back; neighbours
        coalesce."""
        if nbytes <= 0:
            return
        end = offset + nbytes
        with self._cond:
            i = bisect.bisect_left(self._starts, offset)
            if (i > 0 and self._ends[i - 1] > offset) or (i < len(self._starts) and self._starts[i] < end):
                raise RuntimeError(f"double release of buffer bytes [{offset}, {end})")
            if i < len(self._starts) and self._starts[i] == end:
                end = self._ends[i]
                del self._starts[i], self._ends[i]
            if i > 0 and self._ends[i - 1] == offset:
                self._ends[i - 1] = end
            else:
                self._starts.insert(i, offset)
                self._ends.insert(i, end)
            self.buffered_bytes -= nbytes
            self.staged_images -= images
            self._cond.notify_all()

    def wake_all(self) -> None:
        """Wake blocked producers so they re-run their ``check`` (on failure or close)."""
        with self._cond:
            self._cond.notify_all()

    # -- views -----------------------------------------------------------------------------
    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """A writable uint8 numpy view of a region."""
        assert self._array is not None, "buffer is closed"
        return self._array[offset: offset + nbytes]

    def torch_view(self, offset: int, nbytes: int) -> Any:
        """A uint8 torch view of a region (shares memory; pinned once ``pin_for_cuda`` ran)."""
        if self._torch_view is None:
            import torch

            assert self._array is not None, "buffer is closed"
            self._torch_view = torch.from_numpy(self._array)
        return self._torch_view[offset: offset + nbytes]

    @property
    def is_pinned(self) -> bool:
        return self._pinned_ptr is not None

    def pin_for_cuda(self) -> None:
        """Page-lock the whole mapping once (``cudaHostRegister``) so GPU copies are async DMA."""
        if self._pinned_ptr is not None or self._array is None:
            return
        import torch

        ptr = int(self._array.ctypes.data)
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.mapped_bytes, 1)  # 1 = Portable
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of the staging buffer failed (error {int(err)})")
        self._pinned_ptr = ptr

    def close(self) -> None:
        """Unpin, unmap and close the fd. The caller has waited for every GPU copy."""
        if self._prefault_thread is not None:
            self._prefault_stop.set()
            self._prefault_wake.set()
            self._prefault_thread.join()
            self._prefault_thread = None
        if self._pinned_ptr is not None:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr)
            self._pinned_ptr = None
        self._torch_view = None
        self._array = None
        if self._mm is not None:
            # BufferError: a view is still alive somewhere; the mapping goes with it.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
