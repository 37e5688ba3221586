"""The first steps of every process the parent starts (workers, the uploader), which
``_pool.start_helper`` starts with SIGINT blocked. Standard library only: imported by them
before anything heavy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def leave_ctrl_c_to_the_parent() -> None:
    """Ignore SIGINT, then unblock it: Ctrl-C reaches the whole process group, and the parent
    decides what it stops (it never interrupts a file or an upload half-way here)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def signal_on_parent_death(signum: int, parent_pid: int) -> bool:
    """Have the kernel send ``signum`` when the parent dies (Linux's PR_SET_PDEATHSIG; it
    fires when the parent *thread* that started us exits); False if the parent is already
    gone, before that could take effect."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    return os.getppid() == parent_pid
