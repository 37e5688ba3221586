"""``asyncdump generate`` under adversarial input: a full disk, arguments that cannot work, an
``--out`` holding someone else's files, a torn manifest line (issue 19)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")}


def generate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path (hidden temporaries included, if any)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("asyncdump generate: error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    return result.stderr


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["files", "tar"])
def test_a_full_disk_is_one_line_and_resume_finishes_it(tmp_path: Path, mode: str) -> None:
    """A real full disk (a 192 KiB tmpfs): exit 1 with one line, a manifest of whole lines;
    with room again, --resume gives exactly a clean run's files."""
    common = ["--count", "120", "--size", "16", "--mode", mode, "--shard-size", "20",
              "--workers", "1", "--batch-size", "10"]
    assert generate("--out", str(tmp_path / "clean"), *common).returncode == 0
    with small_tmpfs(tmp_path / "disk", "192k") as disk:
        out = disk / "out"
        full = generate("--out", str(out), *common)
        assert full.returncode == 1, full.stderr
        assert "Traceback" not in full.stderr
        text = (out / "manifest.jsonl").read_bytes()
        assert text.endswith(b"\n") or not text
        assert all(json.loads(line) for line in text.splitlines())
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = generate("--out", str(out), *common, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert tree(out) == tree(tmp_path / "clean")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("args, words", [
    pytest.param(["--device", "cuda"], "--device cuda: ",
                 marks=pytest.mark.skipif(_cuda(), reason="CUDA is available here")),
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--count", "99999999999999999999"], "count must be at most 2**53"),
    (["--workers", "99999999999999999999"], "workers must be at most 1024"),
])
def test_argument_errors_are_one_line_and_write_nothing(tmp_path: Path, args: list[str],
                                                        words: str) -> None:
    out = tmp_path / "out"
    command = ["--out", str(out), "--size", "8"] + ([] if "--count" in args else ["--count", "4"])
    stderr = one_line_error(generate(*command, *args), 2)
    assert words in stderr
    assert not out.exists()  # not even dataset.json: the corrected command is not refused


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_an_out_holding_files_of_someone_else_is_refused(tmp_path: Path, resume: list[str]) -> None:
    out = tmp_path / "photos"
    (out / "000000").mkdir(parents=True)
    (out / "000000" / "000000003.png").write_bytes(b"my holiday picture")
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    stderr = one_line_error(generate("--out", str(out), "--count", "8", "--size", "8", *resume), 2)
    assert "is not empty" in stderr and "holds no asyncdump dataset" in stderr
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == ["000000", "notes.txt"]
    (out / "empty").mkdir()  # an empty folder is fine
    assert generate("--out", str(out / "empty"), "--count", "8", "--size", "8").returncode == 0


# Metadata that passes the first batch's check, then goes bad at index 12 (KIND says how).
BAD_LATER = '''
import math, os
import numpy as np

BAD = {"surrogate": {"caption": "caf\\udce9"}, "same_key": {1: "one", "1": "also one"},
       "same_nested_key": {"scores": {1: 0.5, "1": 0.5}}, "nan": {"score": math.nan},
       "inf": {"box": [0, math.inf]}}

def make(indices):
    images = np.stack([np.full((3, 8, 8), i, np.uint8) for i in indices])
    meta = [{"label": i % 3} for i in indices]
    if 12 in indices:
        meta[indices.index(12)] = BAD[os.environ["KIND"]]
    return images, meta
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, mode, words", [
    ("surrogate", "files", "'\\udce9' is a lone surrogate"),
    ("same_key", "files", "two keys are both written as '1'"),
    ("same_nested_key", "tar", "two keys are both written as '1'"),
    ("nan", "files", "NaN or infinity is not JSON"),
    ("inf", "tar", "NaN or infinity is not JSON"),
])
def test_bad_metadata_in_a_later_batch_is_one_line_exit_2_and_keeps_what_is_durable(
        tmp_path: Path, kind: str, mode: str, words: str) -> None:
    (tmp_path / "badgen.py").write_text(BAD_LATER)
    result = subprocess.run(
        [sys.executable, "-m", "asyncdump", "generate", "--no-progress", "--out", "out",
         "--count", "20", "--batch-size", "5", "--shard-size", "5", "--mode", mode,
         "--workers", "1", "--generator", "badgen:make"],
        capture_output=True, text=True, timeout=60, env=dict(ENV, KIND=kind), cwd=tmp_path)
    stderr = one_line_error(result, 2)
    assert "indices 10..14 that cannot be written: metadata of index 12" in stderr
    assert words in stderr and "10 images written are kept in the manifest" in stderr
    out = tmp_path / "out"
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(10))
    images = sorted(p.name for p in out.rglob("*") if p.suffix in (".png", ".tar"))
    assert images == sorted(e["path"].rsplit("/", 1)[-1] if mode == "files"
                            else e["path"].split("/")[0] for e in entries[::1 if mode == "files" else 5])
    assert not list(out.rglob(".*"))  # no orphan images, no temp file
