"""No write leaves root, and no existing file is replaced unless asked (issue 19, items 8, 13).

Real workers and real files: sub-folders swapped for symlinks after first use, a string step,
two sinks on one root, files an earlier run left.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from asyncdump import AsyncDumpError, AsyncImageSink
from tests.helpers import no_temp_files

IMG = np.zeros((1, 1, 4, 4), np.uint8)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


# ------------------------------------------------------------------ item 8
@pytest.mark.timeout(60)
def test_a_subfolder_swapped_for_a_symlink_after_first_use_is_not_written_through(
        root: Path, outside: Path) -> None:
    with AsyncImageSink(root, workers=1) as sink:
        sink.submit(IMG, names=["sub/a"]).result(timeout=30)
        shutil.rmtree(root / "sub")
        os.symlink(outside, root / "sub")  # the folder both the sink and its worker know
        with pytest.raises(AsyncDumpError, match="symlink"):
            sink.submit(IMG, names=["sub/b"]).result(timeout=30)
        sink._accounting.take_since_flush()
    assert list(outside.iterdir()) == []
    assert no_temp_files(root) == []


@pytest.mark.timeout(60)
def test_a_subfolder_moved_away_after_first_use_keeps_getting_its_images(
        root: Path, outside: Path) -> None:
    """The worker writes relative to the folder it opened: renaming it and putting a symlink
    in its place does not redirect the writes."""
    with AsyncImageSink(root, workers=1) as sink:
        sink.submit(IMG, names=["sub/a"]).result(timeout=30)
        os.rename(root / "sub", root / "moved")
        os.symlink(outside, root / "sub")
        sink.submit(IMG, names=["sub/b"]).result(timeout=30)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in (root / "moved").iterdir()) == ["a.png", "b.png"]


def test_step_must_be_an_int(root: Path, outside: Path) -> None:
    """With the plain template "{index}_{step}", step="/x" once reached a symlinked root/0_."""
    root.mkdir()
    os.symlink(outside, root / "0_")
    with AsyncImageSink(root, workers=1, name="{index}_{step}") as sink:
        for bad in ["/x", "3", 2.0, True]:
            with pytest.raises(TypeError, match="step must be an int"):
                sink.submit(IMG, step=bad)
        assert sink.stats.submitted == 0
        paths = sink.submit(IMG, step=np.int64(7)).result(timeout=30)
    assert [p.name for p in paths] == ["0_7.png"]
    assert list(outside.iterdir()) == []


def test_folders_never_follow_a_symlink_below_root(tmp_path: Path, outside: Path) -> None:
    from asyncdump._fsutil import Folders

    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    os.symlink(outside, root / "link")
    folders = Folders(str(root))
    try:
        fd = folders.fd("a/b")
        os.rename(root / "a", root / "a-moved")
        os.symlink(outside, root / "a")  # swapped after it was opened
        os.close(os.open("x", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        assert (root / "a-moved" / "b" / "x").is_file()
        for folder in ["link", "link/deeper", "a/b/c"]:  # "a" is a symlink now
            with pytest.raises(OSError, match="symlink") as caught:
                Folders(str(root)).fd(folder)
            assert caught.value.errno == errno.ELOOP
        assert folders.fd("a/b") == fd  # the cached descriptor is still the moved folder
        with pytest.raises(ValueError, match="component"):
            folders.fd("a/../..")
    finally:
        folders.close()
    assert list(outside.iterdir()) == []


def test_names_through_any_symlinked_subfolder_are_refused_at_submit(root: Path) -> None:
    """Even one pointing inside root: the workers would refuse it at write time."""
    (root / "real").mkdir(parents=True)
    os.symlink(root / "real", root / "alias")
    with AsyncImageSink(root, workers=1) as sink, pytest.raises(ValueError, match="symlink"):
        sink.submit(IMG, names=["alias/a"])


# ------------------------------------------------------------------ item 13
@pytest.mark.timeout(60)
def test_two_sinks_on_one_root_do_not_overwrite_each_other(root: Path) -> None:
    white = np.full((50, 1, 4, 4), 255, np.uint8)
    with AsyncImageSink(root, workers=1) as first:
        first.submit(white).result(timeout=30)
        with AsyncImageSink(root, workers=1, on_error="ignore") as second:
            second.submit(np.zeros((50, 1, 4, 4), np.uint8))
            second.flush(timeout=30)
            assert second.stats.written == 0 and second.stats.failed == 50
    assert len(list(root.iterdir())) == 50
    assert all(p.read_bytes() == (root / "00000000.png").read_bytes() for p in root.iterdir())
    assert no_temp_files(root) == []


@pytest.mark.timeout(60)
def test_a_new_sink_never_replaces_a_file_left_in_root_unless_overwrite(root: Path) -> None:
    root.mkdir()
    (root / "00000000.png").write_bytes(b"an earlier run's image")
    with AsyncImageSink(root, workers=1) as sink:
        future = sink.submit(np.zeros((2, 1, 4, 4), np.uint8))
        with pytest.raises(AsyncDumpError, match="overwrite=False never replaces") as caught:
            future.result(timeout=30)
        assert caught.value.failures[0][0] == root / "00000000.png"
        sink._accounting.take_since_flush()  # reported above already
        assert sink.stats.written == 1 and sink.stats.failed == 1
    assert (root / "00000000.png").read_bytes() == b"an earlier run's image"
    with AsyncImageSink(root, workers=1, overwrite=True) as sink:
        sink.submit(np.zeros((1, 1, 4, 4), np.uint8)).result(timeout=30)
    assert (root / "00000000.png").read_bytes().startswith(b"\x89PNG")
    assert no_temp_files(root) == []


@pytest.mark.timeout(60)
def test_a_file_already_holding_the_same_bytes_counts_as_written(root: Path) -> None:
    """What a re-sent image meets when its worker died between the rename and the report."""
    image = np.arange(48, dtype=np.uint8).reshape(1, 3, 4, 4)
    with AsyncImageSink(root, workers=1) as sink:
        sink.submit(image).result(timeout=30)
    with AsyncImageSink(root, workers=1) as sink:
        assert sink.submit(image).result(timeout=30) == [root / "00000000.png"]
    assert no_temp_files(root) == []


def test_rename_noreplace_is_atomic_and_keeps_the_existing_file(tmp_path: Path) -> None:
    from asyncdump._fsutil import rename_noreplace

    (tmp_path / "src").write_bytes(b"new")
    (tmp_path / "dst").write_bytes(b"old")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            rename_noreplace("src", "dst", fd)
        assert (tmp_path / "dst").read_bytes() == b"old" and (tmp_path / "src").exists()
        rename_noreplace("src", "fresh", fd)
    finally:
        os.close(fd)
    assert (tmp_path / "fresh").read_bytes() == b"new" and not (tmp_path / "src").exists()
