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
from types import FrameType

_SIGINT = int(signal.SIGINT)
_DEFAULT = signal.default_int_handler
_MAIN_THREAD = threading.main_thread().ident


class _DeferredSigint:
    """The context manager ``deferred_sigint`` returns (a plain class: it runs in every
    ``submit``, where a generator-based one cost tens of microseconds more)."""

    __slots__ = ("_received",)

    def __enter__(self) -> None:
        self._received: list[int] | None = None
        if threading.get_ident() != _MAIN_THREAD or _signal.getsignal(_SIGINT) is not _DEFAULT:
            return  # off the main thread, or the program handles SIGINT itself
        received: list[int] = []
        self._received = received

        def remember(signum: int, frame: FrameType | None) -> None:
            received.append(signum)

        _signal.signal(_SIGINT, remember)

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        received = self._received
        if received is None:
            return
        _signal.signal(_SIGINT, _DEFAULT)
        if received and exc_type is None:  # an exception from the block wins, as before
            raise KeyboardInterrupt


def deferred_sigint() -> _DeferredSigint:
    """Postpone Python's default SIGINT handling (KeyboardInterrupt) to the end of the block.

    A no-op off the main thread or when the program installed its own SIGINT handler.
    """
    return _DeferredSigint()
