"""Tar shards as the dataset writes them: deterministic ustar headers, no record padding."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from ._fsutil import fsync_folder, unlink_quietly

TAR_BLOCK = 512


def member_bytes(size: int) -> int:
    """Bytes one member of ``size`` data bytes takes in the tar (header and padding)."""
    return TAR_BLOCK + size + (-size % TAR_BLOCK)


class TarPart:
    """One tar being written: hidden temp name, deterministic headers, renamed when complete."""

    def __init__(self, root: Path, name: str, shard: int):
        self.name, self.shard = name, shard
        self.final = root / name
        self.temp = root / f".{name}.tmp"
        self.handle = open(self.temp, "wb")  # noqa: SIM115 (closed in finish/discard)
        self.size = 0
        self.indices: list[int] = []  # of the images in it, with their manifest lines
        self.lines: list[str] = []
        self.image_bytes = 0

    def add(self, member: str, data: bytes) -> int:
        """Append one member; returns the offset of its data in the tar."""
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        self.handle.write(header)
        self.handle.write(data)
        self.handle.write(b"\0" * (-len(data) % TAR_BLOCK))
        offset = self.size + len(header)
        self.size += member_bytes(len(data))
        return offset

    def finish(self, fsync: bool) -> None:
        # Two zero blocks end the archive; no padding to a 10 KiB record, so shard_bytes is exact.
        self.handle.write(b"\0" * (2 * TAR_BLOCK))
        self.handle.flush()
        if fsync:
            os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temp, self.final)
        if fsync:
            fsync_folder(self.final.parent)

    def discard(self) -> None:
        self.handle.close()
        unlink_quietly(self.temp)
