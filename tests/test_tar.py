"""The dataset's tar headers: byte for byte what ``tarfile`` writes, and read back by it."""

from __future__ import annotations

import io
import tarfile

import pytest

from asyncdump._tar import ustar_header


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


NAMES = ["a", "000000123.png", "000000123.cls", "0000001234567.json", "x" * 99, "x" * 100,
         "d" * 60 + "/" + "x" * 60, "é.png"]
SIZES = [0, 1, 511, 512, 36_000, 8**11 - 1]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES)
def test_header_equals_tarfiles(name: str, size: int) -> None:
    assert ustar_header(name, size) == _tarfile_header(name, size)


def test_tarfile_reads_the_members_back() -> None:
    data = b"\x89PNG fake image bytes" * 100
    stream = io.BytesIO(ustar_header("000000007.png", len(data)) + data
                        + b"\0" * (-len(data) % 512) + b"\0" * 1024)
    with tarfile.open(fileobj=stream) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.size, member.mode, member.mtime, member.uid, member.gid,
                member.uname, member.gname, member.isreg()) == (
            "000000007.png", len(data), 0o644, 0, 0, 0, "", "", True)
        extracted = tar.extractfile(member)
        assert extracted is not None and extracted.read() == data
