"""Hold back Ctrl-C while shared state is half-updated.

Python raises KeyboardInterrupt between any two bytecodes of the main thread, including in
the middle of the buffer's free-list update or between staging a batch and handing it to the
collector. ``deferred_sigint`` postpones it to the end of such a section, then raises it.
Waiting for buffer space stays outside, so a blocked ``submit`` is still interruptible.
"""

from __future__ import annotations

import _signal  # the C module: signal's wrappers convert to enums, ~1 us per call here
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_SIGINT = int(signal.SIGINT)


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Postpone Python's default SIGINT handling (KeyboardInterrupt) to the end of the block.

    A no-op off the main thread or when the program installed its own SIGINT handler.
    """
    if threading.current_thread() is not threading.main_thread() \
            or _signal.getsignal(_SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    _signal.signal(_SIGINT, remember)
    try:
        yield
    finally:
        _signal.signal(_SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
