"""``asyncdump generate``: errors, determinism, and kill -9 then --resume equals a clean run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import kill_generate_when, read_rgb

from asyncdump import synthetic

ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")}


def generate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path (hidden temporaries included, if any)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("args, words", [
    (["--count", "0"], "--count must be at least 1"),
    (["--count", "-5"], "--count must be at least 1"),
    (["--count", "4", "--size", "0"], "--size must be at least 1"),
    (["--count", "4", "--format", "gif"], "unknown --format 'gif'"),
    (["--count", "4", "--format", "jpg", "--quality", "500"], "quality"),
])
def test_bad_arguments_give_one_line_and_touch_nothing(tmp_path: Path, args: list[str],
                                                       words: str) -> None:
    out = tmp_path / "out"
    result = generate("--out", str(out), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("asyncdump generate: error: ")
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_unwritable_out_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = generate("--out", str(blocker / "sub"), "--count", "4")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("asyncdump generate: error: cannot write to ")
    assert "Traceback" not in result.stderr
    assert blocker.read_text() == "not a folder"


def test_existing_dataset_is_refused_without_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert generate("--out", str(out), "--count", "20", "--size", "16").returncode == 0
    before = tree(out)
    result = generate("--out", str(out), "--count", "20", "--size", "16")
    assert result.returncode == 2
    assert "already holds a dataset" in result.stderr and "--resume" in result.stderr
    assert tree(out) == before


def test_foreign_and_corrupt_manifest_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert generate("--out", str(out), "--count", "20", "--size", "16").returncode == 0
    before = tree(out)
    other_seed = generate("--out", str(out), "--count", "20", "--size", "16", "--seed", "7",
                          "--resume")
    assert other_seed.returncode == 2 and "holds a different job" in other_seed.stderr
    assert "seed" in other_seed.stderr and "Traceback" not in other_seed.stderr
    assert tree(out) == before

    lines = (out / "manifest.jsonl").read_text().splitlines()
    lines[3] = lines[3][: len(lines[3]) // 2]  # a broken line in the middle
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    damaged = tree(out)
    corrupt = generate("--out", str(out), "--count", "20", "--size", "16", "--resume")
    assert corrupt.returncode == 2 and "corrupt manifest manifest.jsonl, line 4" in corrupt.stderr
    assert tree(out) == damaged

    (out / "dataset.json").unlink()
    foreign = generate("--out", str(out), "--count", "20", "--size", "16", "--resume")
    assert foreign.returncode == 2 and "no dataset.json" in foreign.stderr


@pytest.mark.parametrize("encoder", ["auto", "opencv"])  # auto: fpng
@pytest.mark.parametrize("mode", ["files", "tar"])
def test_same_bytes_whatever_the_worker_count(tmp_path: Path, mode: str, encoder: str) -> None:
    common = ["--count", "300", "--size", "24", "--mode", mode, "--shard-size", "128", "--seed", "3",
              "--png-encoder", encoder]
    one, two = tmp_path / "w1", tmp_path / "w2"
    first = generate("--out", str(one), "--workers", "1", "--batch-size", "50", *common)
    assert first.returncode == 0, first.stderr
    assert "300 images written" in first.stdout and "0 failed" in first.stdout
    second = generate("--out", str(two), "--workers", "2", "--batch-size", "7", *common)
    assert second.returncode == 0, second.stderr
    files = tree(one)
    assert files == tree(two)
    png = next(data for name, data in files.items() if name.endswith((".png", ".tar")))
    assert (b"fdEC" in png[:2048]) == (encoder == "auto")  # fpng's chunk: who encoded them
    entries = manifest(one)
    assert [e["index"] for e in entries] == list(range(300))
    if mode == "files":
        assert sorted(p.name for p in one.iterdir() if p.is_dir()) == ["000000", "000001", "000002"]
        assert len(list((one / "000000").iterdir())) == 128
        assert entries[5]["path"] == "000000/000000005.png"
    else:
        assert sorted(p.name for p in one.glob("*.tar")) == [
            "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
        assert entries[130]["path"] == "shard-000001.tar/000000130.png"
        with tarfile.open(one / "shard-000002.tar") as tar:
            members = tar.getmembers()
            assert [m.name for m in members[:3]] == ["000000256.png", "000000256.cls",
                                                     "000000256.json"]
            assert tar.extractfile(members[1]).read() == str(entries[256]["label"]).encode()
            assert json.loads(tar.extractfile(members[2]).read())["label"] == entries[256]["label"]
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
                (0, 0, 0, "", "", 0o644)}


def test_sizes_from_64_write_the_numpy_renderers_pixels(tmp_path: Path) -> None:
    """From 64² the CPU renderer is the numpy one (channels-last tensors): the files decode to
    exactly the rendered pixels and are the same bytes whatever the worker count."""
    common = ["--count", "24", "--size", "96", "--seed", "5", "--device", "cpu"]
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert generate("--out", str(one), "--workers", "1", "--batch-size", "10", *common).returncode == 0
    assert generate("--out", str(two), "--workers", "2", "--batch-size", "7", *common).returncode == 0
    assert tree(one) == tree(two)
    images, _ = synthetic.render(list(range(24)), seed=5, size=96)
    expected = images.permute(0, 2, 3, 1).numpy()
    entries = manifest(one)
    assert len(entries) == 24
    for entry in entries:
        assert np.array_equal(read_rgb(one / entry["path"]), expected[entry["index"]])


def _kill_when_durable(args: list[str], out: Path, lines_at_least: int) -> int:
    """SIGKILL ``generate`` once its manifest has ``lines_at_least`` lines; the lines seen."""
    manifest_path = out / "manifest.jsonl"
    seen = [0]

    def durable() -> bool:
        if manifest_path.exists():
            seen[0] = manifest_path.read_bytes().count(b"\n")
        return seen[0] >= lines_at_least

    kill_generate_when(args, ENV, durable, seconds=60, poll=0.005)
    return seen[0]


@pytest.mark.parametrize("mode", ["files", "tar"])
def test_kill_9_then_resume_equals_a_clean_run(tmp_path: Path, mode: str) -> None:
    common = ["--count", "2500", "--size", "32", "--mode", mode, "--shard-size", "250",
              "--seed", "11", "--workers", "1"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    # Small batches: lines become durable in small steps and the run lasts long enough to be
    # killed halfway on a loaded machine (the batch size does not change any byte written).
    seen = _kill_when_durable(["--out", str(killed), "--batch-size", "20", *common], killed, 300)
    assert 300 <= seen < 2500
    partial = manifest(killed)
    assert len(partial) < 2500 and len({e["index"] for e in partial}) == len(partial)
    resumed = generate("--out", str(killed), *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "already there" in resumed.stdout
    skipped = int(resumed.stdout.split("(")[1].split()[0])
    assert skipped >= len(partial) > 0

    assert generate("--out", str(clean), *common).returncode == 0
    assert tree(killed) == tree(clean)  # same files, same bytes, no temporaries, same manifest
    entries = manifest(killed)
    assert [e["index"] for e in entries] == list(range(2500))
