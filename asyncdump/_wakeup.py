"""Wake the collector thread without handing it the GIL in the middle of ``submit``.

``os.write`` releases the GIL around the syscall. The collector, asleep in ``select`` on the
wake-up pipe, wakes at once and takes the GIL, and the producer then waits for it to finish
its round (measured: ~1.5 ms of a 16-image ``submit`` on 2 cores). A libc ``write`` called
through ``ctypes.PyDLL`` keeps the GIL: the collector wakes but runs only when the producer
next releases the GIL (its next blocking call, or the interpreter's switch interval), which in
a training loop is the step itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable


def _make_write() -> Callable[[int, bytes], object]:
    try:
        libc_write = ctypes.PyDLL(None).write  # PyDLL: the call keeps the GIL
        libc_write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        libc_write.restype = ctypes.c_ssize_t
    except (OSError, AttributeError):  # no libc symbol table here: the GIL-releasing write
        return os.write
    return lambda fd, data: libc_write(fd, data, len(data))


_write = _make_write()


def poke(fd: int) -> None:
    """Write one byte to the non-blocking pipe ``fd`` (a full pipe already wakes the reader)."""
    with contextlib.suppress(BlockingIOError, OSError):
        _write(fd, b"\0")
