"""``asyncdump generate --generator MODULE:FUNCTION``, run as real subprocesses.

The generator module is written into the test's folder, which is the subprocess's current
folder: it must be importable from there, as with ``python -m``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from asyncdump import write_dataset

ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "PYTHONPATH")}
ENV["OMP_NUM_THREADS"] = "1"

# Pixels and metadata are a function of the index. CALLS logs every call, IMPORTS every import
# (with the rank), FAIL_AT makes the call that reaches that index raise, INIT_GROUP makes the
# import start the process group.
GENERATOR = '''
import os
import numpy as np

with open(os.environ["IMPORTS"], "a") as log:
    log.write(os.environ.get("RANK", "0") + "\\n")
if os.environ.get("INIT_GROUP"):  # a module that starts the process group itself
    import torch.distributed as dist
    dist.init_process_group("gloo")

def make(indices):
    with open(os.environ["CALLS"], "a") as log:
        log.write(" ".join(map(str, indices)) + "\\n")
    fail_at = int(os.environ.get("FAIL_AT", "-1"))
    if fail_at in indices:
        raise RuntimeError(f"the model broke at index {fail_at}\\nsecond line of the message")
    images = np.stack([np.random.default_rng(i).integers(0, 256, (3, 12, 16), dtype=np.uint8)
                       for i in indices])
    return images, [{"label": i % 4, "prompt": f"p{i}"} for i in indices]

def images_only(indices):
    return make(indices)[0]

def a_list(indices):
    return [1, 2, 3]

def short_batch(indices):
    return make(indices)[0][:-1]

def two_channels(indices):
    return make(indices)[0][:, :2]

def short_metadata(indices):
    images, meta = make(indices)
    return images, meta[:-1]

def three_items(indices):
    images, meta = make(indices)
    return images, meta, None

def drifting(indices):
    images, meta = make(indices)
    return (images if indices[0] < 10 else images[:, :, :6]), meta

def list_later(indices):
    return make(indices) if indices[0] < 10 else [1, 2]

NOT_A_FUNCTION = 42
'''


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "mygen.py").write_text(GENERATOR)
    (tmp_path / "broken_at_import.py").write_text("raise OSError('weights.pt not found')\n")
    (tmp_path / "syntax_error.py").write_text("def make(indices) return\n")
    return tmp_path


def generate(work: Path, *args: str, fail_at: int | None = None, launcher: list[str] | None = None,
             timeout: float = 60, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = dict(ENV, CALLS=str(work / "calls.log"), IMPORTS=str(work / "imports.log"), **env_vars)
    if fail_at is not None:
        env["FAIL_AT"] = str(fail_at)
    command = [*(launcher or [sys.executable]), "-m", "asyncdump", "generate", "--no-progress",
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=work)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def calls(work: Path) -> list[int]:
    """Every index passed to the function, in call order."""
    log = work / "calls.log"
    return [int(i) for line in log.read_text().splitlines() for i in line.split()] \
        if log.exists() else []


def load_mygen(work: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("CALLS", str(work / "direct_calls.log"))
    monkeypatch.setenv("IMPORTS", str(work / "direct_imports.log"))
    monkeypatch.syspath_prepend(str(work))
    sys.modules.pop("mygen", None)
    import mygen  # type: ignore[import-not-found]

    return mygen


@pytest.mark.parametrize("options", [
    ["--mode", "files", "--shard-size", "8", "--format", "png"],
    ["--mode", "tar", "--shard-size", "8", "--shard-bytes", "2048", "--format", "jpg",
     "--quality", "90", "--workers", "2"],
])
def test_same_dataset_as_write_dataset(work: Path, options: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI with --generator writes exactly what write_dataset writes with that function."""
    result = generate(work, "--out", "cli", "--count", "30", "--batch-size", "5",
                      "--generator", "mygen:make", *options)
    assert result.returncode == 0, result.stderr
    assert "30 images written (0 already there)" in result.stdout
    assert "generator mygen:make" in result.stdout
    assert (work / "imports.log").read_text() == "0\n"  # imported once
    assert sorted(calls(work)) == list(range(30))  # each index made once

    mygen = load_mygen(work, monkeypatch)
    named = dict(zip(options[::2], options[1::2], strict=True))
    shard_bytes = named.get("--shard-bytes")
    write_dataset(mygen.make, work / "api", count=30, batch_size=5, mode=named["--mode"],
                  shard_size=8, format=named["--format"],
                  quality=int(named["--quality"]) if "--quality" in named else None,
                  shard_bytes=int(shard_bytes) if shard_bytes else None, workers=1,
                  job={"generator": "mygen:make"})
    assert tree(work / "cli") == tree(work / "api")
    entries = [json.loads(line) for line in (work / "cli" / "manifest.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(30))
    assert entries[7]["meta"] == {"prompt": "p7"} and entries[7]["label"] == 3


def test_images_without_metadata(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = generate(work, "--out", "out", "--count", "6", "--generator", "mygen:images_only",
                      "--workers", "1", "--mode", "tar")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in (work / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(e["index"], e["label"], e["meta"]) for e in entries] == [(i, None, {}) for i in range(6)]
    mygen = load_mygen(work, monkeypatch)  # write_dataset takes the same images-only function
    write_dataset(mygen.images_only, work / "api", count=6, workers=1, mode="tar",
                  job={"generator": "mygen:images_only"})
    assert tree(work / "out") == tree(work / "api")


@pytest.mark.parametrize("spec, extra, words", [
    ("nomodule:make", [], "cannot import 'nomodule': no module named 'nomodule'"),
    ("mygen:missing", [], "module 'mygen' has no 'missing'"),
    ("mygen:NOT_A_FUNCTION", [], "mygen:NOT_A_FUNCTION is not callable (got int)"),
    ("mygen", [], "must be MODULE:FUNCTION"),
    ("broken_at_import:make", [], "importing 'broken_at_import' failed: OSError: weights.pt"),
    ("syntax_error:make", [], "importing 'syntax_error' failed: SyntaxError"),
    ("mygen:a_list", [], "returned a list; expected images or (images, metadata)"),
    ("mygen:short_batch", [], "returned images of shape (3, 3, 12, 16)"),
    ("mygen:two_channels", [], "returned unusable images"),
    ("mygen:short_metadata", [],
     "returned metadata as a list of 3 (dict); expected None or a list of 4 dicts"),
    ("mygen:three_items", [], "returned a tuple of 3 items"),
    ("mygen:make", ["--size", "32"], "--size belong to the built-in generator"),
    ("mygen:make", ["--seed", "1", "--device", "cpu"], "--seed, --device belong to the built-in"),
])
def test_unusable_generator_is_one_line_exit_2_and_writes_nothing(
        work: Path, spec: str, extra: list[str], words: str) -> None:
    result = generate(work, "--out", "out/sub", "--count", "10", "--batch-size", "4",
                      "--generator", spec, *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("asyncdump generate: error: ")
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (work / "out").exists()  # not even the parent folder --out would have created


def test_bad_first_batch_leaves_an_existing_folder_and_dataset_as_they_were(work: Path) -> None:
    (work / "empty").mkdir()
    result = generate(work, "--out", "empty", "--count", "10", "--generator", "mygen:a_list")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert list((work / "empty").iterdir()) == []

    assert generate(work, "--out", "part", "--count", "10", "--batch-size", "4", "--mode", "tar",
                    "--shard-size", "4", "--generator", "mygen:make", fail_at=8).returncode == 1
    before = tree(work / "part")
    result = generate(work, "--out", "part", "--count", "10", "--mode", "tar", "--shard-size", "4",
                      "--generator", "mygen:make", "--resume", fail_at=8)
    assert result.returncode == 1  # raised again on its first batch: nothing written
    assert tree(work / "part") == before


def test_exception_later_keeps_the_manifest_and_resume_finishes(work: Path) -> None:
    common = ["--count", "40", "--batch-size", "5", "--shard-size", "10", "--mode", "tar",
              "--generator", "mygen:make", "--workers", "1"]
    failed = generate(work, "--out", "out", *common, fail_at=23)
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert lines[0] == ("asyncdump generate: error: mygen:make raised on indices 20..24: "
                        "RuntimeError: the model broke at index 23; 20 images written are kept "
                        "in the manifest: fix it and rerun with --resume")
    assert lines[1] == "Traceback (most recent call last):"
    assert 'mygen.py", line' in failed.stderr and lines[-1] == "second line of the message"
    manifest = (work / "out" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in manifest] == list(range(20))
    assert not list((work / "out").glob(".*"))  # the unfinished shard's temp file is gone
    assert calls(work) == list(range(25))

    (work / "calls.log").unlink()
    resumed = generate(work, "--out", "out", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "20 images written (20 already there)" in resumed.stdout
    assert calls(work) == list(range(20, 40))  # called only for the missing indices

    assert generate(work, "--out", "clean", *common).returncode == 0
    assert tree(work / "out") == tree(work / "clean")


@pytest.mark.parametrize("spec, words", [
    ("mygen:drifting", "returned a batch for indices 10..14 that cannot be written: image shape "
                       "(3, 6, 16) differs from earlier batches' (3, 12, 16)"),
    ("mygen:list_later", "returned a batch for indices 10..14 that cannot be written: images must "
                         "be a (B, C, H, W) batch"),
])
def test_unusable_batch_later_is_one_line_exit_2_and_keeps_the_manifest(
        work: Path, spec: str, words: str) -> None:
    result = generate(work, "--out", "out", "--count", "20", "--batch-size", "5",
                      "--generator", spec, "--workers", "1")
    assert result.returncode == 2  # what it returned cannot be written, as on a first batch
    assert result.stderr.startswith(f"asyncdump generate: error: {spec} {words}")
    assert "10 images written are kept in the manifest" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    manifest = (work / "out" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in manifest] == list(range(10))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_ranks_under_torchrun_fail_resume_and_equal_one_rank(work: Path) -> None:
    common = ["--count", "50", "--batch-size", "4", "--shard-size", "6", "--mode", "tar",
              "--generator", "mygen:make", "--workers", "1"]

    def torchrun(*args: str, fail_at: int | None = None,
                 **env_vars: str) -> subprocess.CompletedProcess[str]:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
        return generate(work, *args, fail_at=fail_at, launcher=launcher, timeout=90, **env_vars)

    failed = torchrun("--out", "two", *common, fail_at=30)  # shard 5: rank 1's
    assert failed.returncode != 0
    assert "mygen:make raised on indices 30..33: RuntimeError: the model broke" in failed.stderr
    assert sorted((work / "imports.log").read_text().split()) == ["0", "1"]  # once per rank
    kept = {json.loads(line)["index"] for path in (work / "two").glob("manifest*.jsonl")
            for line in path.read_text().splitlines()}
    assert set(range(6, 12)) | set(range(18, 24)) <= kept  # rank 1's shards 1 and 3, done before

    (work / "calls.log").unlink()
    resumed = torchrun("--out", "two", *common, "--resume", INIT_GROUP="1")  # the module's group
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{50 - len(kept)} images written ({len(kept)} already there)" in resumed.stdout
    assert sorted(calls(work)) == sorted(set(range(50)) - kept)  # only the missing indices
    assert not list((work / "two").glob("manifest.rank*.jsonl"))  # merged by rank 0
    assert generate(work, "--out", "one", *common).returncode == 0
    assert tree(work / "two") == tree(work / "one")


def test_the_documented_conv_generator_example(tmp_path: Path) -> None:
    """docs/integrations.md's example: examples/conv_generator.py, run from its folder."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    env = dict(ENV, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [sys.executable, "-m", "asyncdump", "generate", "--generator", "conv_generator:generate",
         "--out", str(tmp_path / "out"), "--count", "24", "--mode", "tar", "--shard-size", "10",
         "--no-progress"], capture_output=True, text=True, timeout=60, env=env, cwd=examples)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(e["index"], e["label"], e["shape"]) for e in entries] == [
        (i, i % 10, [64, 64, 3]) for i in range(24)]
    assert len({e["sha256"] for e in entries}) == 24  # every image differs
