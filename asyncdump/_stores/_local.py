"""A POSIX folder as a destination: temp file in the same folder, then rename.

The sink's workers keep their own syscall-lean copy of this path (``_worker.py``: it is the
hot loop of every local run); this class is the same contract for everything else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class LocalFolder:
    """Put bytes at ``root/name`` atomically (rename over a hidden temp file)."""

    is_store = False

    def __init__(self, root: Any):
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.url = str(self.root)

    def prepare(self) -> None:
        """Create the folder; ``PermissionError`` when it is not writable."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"root {self.root} is not writable")

    def put(self, name: str, data: bytes | memoryview, overwrite: bool = True) -> None:
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        if not overwrite and final.exists():
            raise FileExistsError(f"{final} exists and overwrite=False")
        temp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            with open(temp, "wb") as f:
                f.write(data)
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def get(self, name: str) -> bytes:
        return (self.root / name).read_bytes()
