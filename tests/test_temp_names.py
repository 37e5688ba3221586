"""Temporary names: one stamp, made in one place, and cleanup deletes only what carries it
(issue 19, items 9 and 10)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asyncdump._fsutil import NAME_MAX_BYTES, is_temp_name, temp_name
from asyncdump._jobs import temp_path
from asyncdump._manifest import remove_temp_files, write_atomically
from asyncdump._tar import TarPart


def test_resume_cleanup_deletes_only_asyncdump_temp_files(tmp_path: Path) -> None:
    shard = tmp_path / "000001"
    shard.mkdir()
    ours = [Path(temp_path(str(shard / "000000013.png"), "123-4-5", 2)),
            tmp_path / temp_name("shard-000002.tar", "77"),
            tmp_path / temp_name("manifest.jsonl", "99")]
    users = [tmp_path / ".notes.tmp", shard / ".scratch.tmp", shard / ".000000013.png.1-2-3.tmp",
             tmp_path / ".cache.asyncdump.tmp"]
    for path in ours + users:
        path.write_bytes(b"x")
    assert remove_temp_files(tmp_path) == len(ours)
    assert not any(p.exists() for p in ours)
    assert all(p.read_bytes() == b"x" for p in users)


def test_every_temp_file_asyncdump_makes_carries_the_stamp(tmp_path: Path) -> None:
    part = TarPart(tmp_path, "shard-000000.tar", 0)
    try:
        assert is_temp_name(part.temp.name)
    finally:
        part.discard()
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", spy)
        write_atomically(tmp_path / "dataset.json", "{}")
    assert len(seen) == 1 and is_temp_name(seen[0])
    assert is_temp_name(os.path.basename(temp_path(str(tmp_path / "a.png"), "1-2-3", 0)))


@pytest.mark.parametrize("base", ["a.png", "\u4e2d" * 80 + ".png", "x" * 251 + ".png",
                                  "\U0001f600" * 62 + ".png", os.fsdecode(b"\xff" * 200) + ".png"])
def test_temp_names_fit_in_255_bytes_whatever_the_name(base: str) -> None:
    name = temp_name(base, "4194304-12345678-12345678-65535")
    raw = os.fsencode(name)
    assert len(raw) <= NAME_MAX_BYTES and is_temp_name(name)
    assert raw.startswith(b"." + os.fsencode(base)[:8])
    if base.isprintable():  # valid UTF-8: the shortened name cuts no character in half
        name.encode("utf-8")
