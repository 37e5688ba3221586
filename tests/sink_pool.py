"""Sinks shared by a test module, one per configuration: starting workers for every test
would dominate the run time. Default names ({index}) never collide."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asyncdump import AsyncImageSink


class Sinks:
    """``sinks(**kwargs)`` returns this module's open sink for those arguments (one worker)."""

    def __init__(self, root: Path):
        self.root = root
        self.open: dict[str, AsyncImageSink] = {}

    def __call__(self, **kwargs: Any) -> AsyncImageSink:
        key = repr(sorted(kwargs.items()))
        if key not in self.open:
            self.open[key] = AsyncImageSink(self.root / str(len(self.open)), workers=1, **kwargs)
        return self.open[key]


def shared_sinks(root: Path) -> Iterator[Sinks]:
    """Body of a module-scoped fixture: yields the pool, then closes every sink in it."""
    shared = Sinks(root)
    yield shared
    for sink in shared.open.values():
        sink.close()
