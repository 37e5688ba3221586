"""The exception hierarchy.

    Exception
     └── AsyncDumpError            a write failed, or the sink can no longer work
          ├── BufferFullError      submit(on_full="raise") found no buffer space
          └── DatasetError         a dataset folder cannot be used as asked
"""

from __future__ import annotations

from pathlib import Path


class AsyncDumpError(Exception):
    """Images could not be written, or the sink is broken.

    ``failures`` lists ``(path, cause)`` for every image this error reports.
    """

    def __init__(self, message: str, failures: list[tuple[Path, BaseException]] | None = None):
        super().__init__(message)
        self.failures: list[tuple[Path, BaseException]] = list(failures or [])


class BufferFullError(AsyncDumpError):
    """``submit`` with ``on_full="raise"`` found the staging buffer full."""


class DatasetError(AsyncDumpError):
    """A dataset directory that cannot be used as asked (existing, foreign or corrupt manifest)."""


class RemoteTraceback(Exception):
    """A worker's traceback, carried home as text (used as ``__cause__``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


def describe_failures(failures: list[tuple[Path, BaseException]], limit: int = 5) -> str:
    """A readable summary: how many failed, the first few paths, and the first cause."""
    if not failures:
        return "no failures"
    lines = [f"{len(failures)} image(s) failed to write:"]
    lines += [f"  {path}: {cause}" for path, cause in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    return "\n".join(lines)
