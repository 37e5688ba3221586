"""A manifest cut short (a crash mid-write, a full disk), then resume: the result equals an
uninterrupted run, byte for byte, in both modes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from asyncdump import AsyncDumpError, DatasetSink, write_dataset
from asyncdump._manifest import Layout, prepare_root

OPTIONS = {"count": 12, "batch_size": 4, "shard_size": 5, "workers": 1}


def make(indices: list[int]) -> tuple[np.ndarray, list[dict]]:
    images = np.stack([np.random.default_rng(i).integers(0, 256, (3, 6, 5), dtype=np.uint8)
                       for i in indices])
    return images, [{"label": i % 3, "name": f"n{i}"} for i in indices]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden temporaries included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def digest(files: dict[str, bytes]) -> str:
    return hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()


@pytest.mark.parametrize("mode", ["files", "tar"])
def test_every_cut_of_the_last_manifest_line_resumes_to_a_clean_run(tmp_path: Path,
                                                                    mode: str) -> None:
    """Cut 1 byte (the newline) up to the whole last line. Resume is ``prepare_root`` (which
    decides what is durable) and then writing what is missing: every cut's state after
    ``prepare_root`` is computed, and one cut of each distinct state is resumed in full."""
    clean = tmp_path / "clean"
    write_dataset(make, clean, mode=mode, **OPTIONS)
    expected = tree(clean)
    manifest = expected["manifest.jsonl"]
    last = manifest[manifest.rstrip(b"\n").rfind(b"\n") + 1:]
    assert json.loads(last)["index"] == 11  # in tar mode: the second image of shard 2's part
    record = json.loads(expected["dataset.json"])

    def damage(cut: int, where: Path) -> Path:
        shutil.copytree(clean, where)
        with open(where / "manifest.jsonl", "r+b") as handle:
            handle.truncate(len(manifest) - cut)
        return where

    groups: dict[str, int] = {}
    for cut in range(1, len(last) + 1):
        probe = damage(cut, tmp_path / "probe")
        prepare_root(probe, Layout(12, 5, ".png", mode), record, resume=True, fsync=False)
        groups.setdefault(digest(tree(probe)), cut)
        shutil.rmtree(probe)
    # newline only, a torn line, the whole line: at most these three states
    assert 1 <= len(groups) <= 3, groups
    for cut in groups.values():
        damaged = damage(cut, tmp_path / f"cut{cut}")
        summary = write_dataset(make, damaged, mode=mode, resume=True, **OPTIONS)
        assert summary.complete and summary.failed == 0
        assert tree(damaged) == expected, f"cut {cut} bytes"


class FillingDisk:
    """``os.write`` on one fd as a disk that fills up: at most ``chunk`` bytes per call, and
    after ``room`` bytes one short write, then ENOSPC once (then the space is back)."""

    def __init__(self, fd: int, room: int, chunk: int = 1 << 30, refuse: bool = True):
        self.fd, self.room, self.chunk, self.refuse = fd, room, chunk, refuse
        self.real = os.write
        self.refused = 0

    def __call__(self, fd: int, data: bytes) -> int:
        if fd != self.fd:
            return self.real(fd, data)
        if self.refuse and self.room == 0 and not self.refused:
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        size = min(len(data), self.chunk, self.room if self.refuse and not self.refused else len(data))
        if self.refuse and not self.refused:
            self.room -= size
        return self.real(fd, bytes(data[:size]))


def write_with(root: Path, mode: str, disk: dict, monkeypatch: pytest.MonkeyPatch) -> FillingDisk:
    with DatasetSink(root, count=12, shard_size=5, workers=1, mode=mode) as sink:
        fake = FillingDisk(sink._committer._manifest_fd, **disk)
        monkeypatch.setattr(os, "write", fake)
        for batch in sink.pending(4):
            sink.submit(batch, *make(batch))
    return fake


@pytest.mark.parametrize("mode", ["files", "tar"])
def test_short_manifest_writes_are_completed(tmp_path: Path, mode: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(make, tmp_path / "clean", mode=mode, **OPTIONS)
    write_with(tmp_path / "short", mode, {"room": 0, "chunk": 37, "refuse": False}, monkeypatch)
    assert tree(tmp_path / "short") == tree(tmp_path / "clean")


@pytest.mark.parametrize("mode", ["files", "tar"])
def test_a_full_disk_stops_the_run_and_leaves_a_manifest_resume_accepts(
        tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills in the middle of a line (a short write, then ENOSPC), and the space is
    back for the next line: the manifest is cut back to its last whole line, the run stops
    with the errno, and resume finishes it into exactly a clean run's bytes."""
    write_dataset(make, tmp_path / "clean", mode=mode, **OPTIONS)
    out = tmp_path / "full"
    with pytest.raises(AsyncDumpError, match=r"cannot append to the manifest .*No space left"):
        write_with(out, mode, {"room": 1500}, monkeypatch)
    monkeypatch.undo()
    text = (out / "manifest.jsonl").read_bytes()
    assert text.endswith(b"\n") and 0 < text.count(b"\n") < 12
    assert all(json.loads(line) for line in text.splitlines())
    assert not list(out.rglob(".*"))  # no temp file left
    summary = write_dataset(make, out, mode=mode, resume=True, **OPTIONS)
    assert summary.complete and summary.failed == 0
    assert tree(out) == tree(tmp_path / "clean")


def test_a_count_beyond_memory_runs_without_a_bitmap_of_it(tmp_path: Path) -> None:
    """``count=10**13`` once needed a 1.25 TB resume bitmap (MemoryError) before any image."""
    with DatasetSink(tmp_path, count=10**13, shard_size=1000, workers=1) as sink:
        batch = next(sink.pending(4))
        sink.submit(batch, *make(batch))
        assert sink.remaining == 10**13 - 4
    assert sink.summary is not None and sink.summary.images == 4 and not sink.summary.complete
    assert json.loads((tmp_path / "manifest.jsonl").read_text().splitlines()[3])["path"] \
        == "0000000000/0000000000003.png"
