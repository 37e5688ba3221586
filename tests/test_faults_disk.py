"""The disk refuses: the error reaches the caller, no temp files, existing files untouched."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import no_temp_files

from asyncdump import AsyncDumpError, AsyncImageSink

pytestmark = pytest.mark.usefixtures("both_png_encoders")  # each fault, each encoder

NOISE = np.random.default_rng(0).integers(0, 256, (6, 3, 64, 64), dtype=np.uint8)  # ~12 KB PNGs


def test_injected_write_fault_efbig(root: Path) -> None:
    """RLIMIT_FSIZE on the worker (set from outside, through the kernel): writes past
    2 KB fail with EFBIG, as a full disk fails with ENOSPC."""
    root.mkdir()
    precious = root / "00000000.png"
    precious.write_bytes(b"an older file that must survive a failed write")
    sink = AsyncImageSink(root, workers=1)
    psutil.Process(sink.worker_pids[0]).rlimit(psutil.RLIMIT_FSIZE, (2048, 2048))
    future = sink.submit(NOISE)
    with pytest.raises(AsyncDumpError) as info:
        future.result(timeout=30)
    assert len(info.value.failures) == 6
    cause = info.value.failures[0][1]
    assert isinstance(cause, OSError) and cause.errno == errno.EFBIG
    assert precious.read_bytes() == b"an older file that must survive a failed write"
    assert not no_temp_files(root)
    with pytest.raises(AsyncDumpError, match="6 image"):
        sink.flush()
    tiny = sink.submit(np.zeros((3, 8, 8), np.uint8)).result(timeout=30)  # fits: still usable
    sink.close()
    assert tiny[0].exists()
    assert sink.stats.failed == 6 and sink.stats.written == 1


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_enospc(tiny_tmpfs: Path) -> None:
    precious = tiny_tmpfs / "keep.png"
    precious.write_bytes(b"x" * 1000)
    big = np.random.default_rng(1).integers(0, 256, (40, 3, 128, 128), dtype=np.uint8)  # ~50 KB each
    with pytest.raises(AsyncDumpError) as info, \
            AsyncImageSink(tiny_tmpfs, workers=1, name="{index:04d}") as sink:
        sink.submit(big)
        sink.submit(big, names=[f"keep_{i}" for i in range(39)] + ["keep"])
        sink.flush(timeout=60)
    failures = info.value.failures
    assert failures and all(isinstance(c, OSError) and c.errno == errno.ENOSPC for _, c in failures)
    assert "No space left" in str(info.value)
    assert precious.read_bytes() == b"x" * 1000  # the failed write to keep.png left it alone
    assert not no_temp_files(tiny_tmpfs)
    stats = sink.stats
    assert stats.written + stats.failed == 80 and stats.failed == len(failures)
    on_disk = [p for p in tiny_tmpfs.iterdir() if p.name != "keep.png"]
    assert len(on_disk) == stats.written  # every file that exists was reported written


def test_path_component_is_a_file(root: Path) -> None:
    root.mkdir()
    (root / "a").write_text("not a folder")
    with AsyncImageSink(root, on_error="ignore") as sink:
        future = sink.submit(NOISE[:1], names=["a/b"])
        with pytest.raises(AsyncDumpError) as info:
            future.result(timeout=30)
    cause = info.value.failures[0][1]
    assert isinstance(cause, OSError) and cause.errno in (errno.ENOTDIR, errno.EEXIST)
    assert cause.__cause__ is not None and "Traceback" in str(cause.__cause__)  # worker's traceback


def test_read_only_folder(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for a read-only bind mount (root ignores permission bits)")
    root = tmp_path / "root"
    target = root / "ro"
    target.mkdir(parents=True)
    (target / "old.png").write_bytes(b"old")
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(target), str(target)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        with pytest.raises(PermissionError):  # a read-only root is refused at construction
            AsyncImageSink(target)
        with AsyncImageSink(root, on_error="ignore") as sink:
            future = sink.submit(NOISE[:2], names=["ro/old", "fine"])
            with pytest.raises(AsyncDumpError) as info:
                future.result(timeout=30)
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)
    [(path, cause)] = info.value.failures
    assert path == target / "old.png" and isinstance(cause, OSError) and cause.errno == errno.EROFS
    assert (target / "old.png").read_bytes() == b"old"
    assert (root / "fine.png").exists()
