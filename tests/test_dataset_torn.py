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
