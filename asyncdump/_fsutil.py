"""File-system helpers shared by the worker (numpy + cv2 only) and the parent."""

from __future__ import annotations

import os


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``folder`` durable (fsync of the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` if it exists; errors are ignored (used on cleanup paths)."""
    try:
        os.unlink(path)
    except OSError:
        pass
