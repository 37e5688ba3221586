"""Which process owns a sink: a forked child gets a copy of the object, not its threads.

The copy still maps the parent's staging buffer, so a child's ``submit`` would write over
images the parent has staged, and its futures would never resolve. Every public use checks the
owner first and refuses in a child, before taking any lock a parent thread may have held at
the fork.
"""

from __future__ import annotations

import os


class OwningProcess:
    """Remembers the creating process; ``check`` raises in any other one (a forked child)."""

    __slots__ = ("pid", "what")

    def __init__(self, what: str):
        self.pid = os.getpid()
        self.what = what

    def is_current(self) -> bool:
        return os.getpid() == self.pid

    def check(self) -> None:
        if os.getpid() != self.pid:
            raise RuntimeError(
                f"this {self.what} was created in process {self.pid} and cannot be used in a "
                f"forked child (pid {os.getpid()}): the child shares the parent's staging buffer "
                "but not its threads. Create a new one in the child (for a DataLoader, in "
                "worker_init_fn), or return the images to the parent and submit them there")
