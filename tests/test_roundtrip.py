"""Real workers, real files, real OpenCV: what is read back equals what the rule promises."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import no_temp_files, read_rgb, torchvision_pixels

from asyncdump import AsyncImageSink


def test_float_batch_round_trip_matches_torchvision(root: Path) -> None:
    torch.manual_seed(0)
    batch = torch.rand(6, 3, 17, 23) * 1.4 - 0.2  # values outside [0, 1] too
    batch[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, float("nan"), float("inf")])
    with AsyncImageSink(root, workers=2) as sink:
        paths = sink.submit(batch).result(timeout=30)
    assert [p.name for p in paths] == [f"{i:08d}.png" for i in range(6)]
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(read_rgb(path), torchvision_pixels(batch[i]))


def test_value_range_and_mean_std(root: Path) -> None:
    torch.manual_seed(1)
    batch = torch.randn(3, 3, 16, 16)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    with AsyncImageSink(root / "ms", mean=mean, std=std) as sink:
        ms_paths = sink.submit(batch).result(timeout=30)
    with AsyncImageSink(root / "vr", value_range=(-1.0, 1.0)) as sink:
        vr_paths = sink.submit(batch).result(timeout=30)
    for i in range(3):
        np.testing.assert_array_equal(read_rgb(ms_paths[i]),
                                      torchvision_pixels(batch[i], mean=mean, std=std))
        np.testing.assert_array_equal(read_rgb(vr_paths[i]),
                                      torchvision_pixels(batch[i], value_range=(-1.0, 1.0)))


def test_uint8_written_as_is_in_rgb_order(root: Path) -> None:
    rng = np.random.default_rng(2)
    batch = rng.integers(0, 256, size=(4, 3, 9, 11), dtype=np.uint8)
    batch[0, :, 0, 0] = (255, 0, 0)  # pure red must stay red on disk
    with AsyncImageSink(root) as sink:
        paths = sink.submit(batch).result(timeout=30)
    assert tuple(cv2.imread(str(paths[0]))[0, 0]) == (0, 0, 255)  # BGR on disk = red
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(read_rgb(path), batch[i].transpose(1, 2, 0))


@pytest.mark.parametrize("fmt", ["png", "jpg", "jpeg", "webp", "bmp", "tiff"])
def test_every_format(root: Path, fmt: str) -> None:
    ramp = np.linspace(0, 255, 32).astype(np.uint8)
    smooth = np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)),
                       np.full((32, 32), 200, np.uint8)])
    batch = np.stack([smooth, smooth[::-1].copy()])  # distinct channels: a swap shows
    lossless = fmt in ("png", "bmp", "tiff")
    with AsyncImageSink(root, format=fmt) as sink:
        paths = sink.submit(batch).result(timeout=30)
    ext = ".jpeg" if fmt == "jpeg" else f".{fmt}"
    assert [p.suffix for p in paths] == [ext, ext]
    for i, path in enumerate(paths):
        back = read_rgb(path)
        assert back.shape == (32, 32, 3)
        if lossless:
            np.testing.assert_array_equal(back, batch[i].transpose(1, 2, 0))
        else:  # lossy: close, and certainly not channel-swapped
            diff = np.abs(back.astype(int) - batch[i].transpose(1, 2, 0).astype(int)).mean()
            assert diff < 6
    assert not no_temp_files(root)


def test_quality_changes_jpeg_size(root: Path) -> None:
    x = torch.linspace(0, 1, 64 * 64 * 3).view(3, 64, 64)
    sizes = {}
    for q in (10, 95):
        with AsyncImageSink(root / str(q), format="jpg", quality=q) as sink:
            sizes[q] = sink.submit(x).result(timeout=30)[0].stat().st_size
    assert sizes[10] < sizes[95]


def test_png_level_changes_size(root: Path) -> None:
    x = (torch.linspace(0, 1, 128 * 128 * 3).view(3, 128, 128) * 7) % 1
    sizes = {}
    for level in (0, 9):
        with AsyncImageSink(root / str(level), quality=level) as sink:
            sizes[level] = sink.submit(x).result(timeout=30)[0].stat().st_size
    assert sizes[9] < sizes[0]


def test_futures_resolve_in_batch_order_and_all_files_exist(root: Path) -> None:
    with AsyncImageSink(root, workers=2) as sink:
        futures = [sink.submit(np.full((5, 1, 8, 8), step, np.uint8), step=step)
                   for step in range(20)]
        results = [f.result(timeout=30) for f in futures]
    flat = [p for paths in results for p in paths]
    assert [p.name for p in flat] == [f"{i:08d}.png" for i in range(100)]
    for step, paths in enumerate(results):
        for p in paths:
            assert int(read_rgb(p)[0, 0]) == step
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in flat]


def test_caller_may_overwrite_right_after_submit(root: Path) -> None:
    x = torch.zeros(4, 3, 64, 64)
    with AsyncImageSink(root) as sink:
        future = sink.submit(x)
        x.fill_(1.0)  # reuse the memory at once, as a training loop does
        paths = future.result(timeout=30)
    for p in paths:
        assert read_rgb(p).max() == 0


def test_empty_batch_resolves_immediately(root: Path) -> None:
    with AsyncImageSink(root) as sink:
        future = sink.submit(np.zeros((0, 3, 8, 8), np.uint8))
        assert future.done() and future.result() == []
        assert sink.stats.submitted == 0


def test_encode_returns_file_bytes_without_writing(root: Path) -> None:
    rng = np.random.default_rng(4)
    batch = rng.integers(0, 256, size=(3, 3, 12, 12), dtype=np.uint8)
    with AsyncImageSink(root, name="fixed") as sink:  # no {index}: encode uses no names
        first = sink.encode(batch).result(timeout=30)
        second = sink.encode(batch).result(timeout=30)
        assert sink.stats.written == 6
    assert first == second and len(first) == 3
    for i, data in enumerate(first):
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(decoded[..., ::-1], batch[i].transpose(1, 2, 0))
    assert not any(root.iterdir())


def test_fsync_true_writes_and_syncs_file_and_folder(root: Path, tmp_path: Path) -> None:
    """With fsync=True each image costs an fsync of its file and one of its folder (strace
    counts them in the real worker process when strace is installed)."""
    import shutil
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "fsync_run.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        from asyncdump import AsyncImageSink
        with AsyncImageSink({str(root)!r}, workers=1, fsync=True) as sink:
            sink.submit(np.full((3, 3, 8, 8), 7, np.uint8), names=["a", "sub/b", "sub/c"])
    """))
    strace = shutil.which("strace")
    if strace is None:
        subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    else:
        log = tmp_path / "strace.log"
        subprocess.run([strace, "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(log),
                        sys.executable, str(script)], check=True, timeout=60)
        calls = [line for line in log.read_text().splitlines() if "fsync(" in line]
        assert len(calls) == 6, calls  # 3 files + their folders (one per image)
    for name in ("a.png", "sub/b.png", "sub/c.png"):
        assert int(read_rgb(root / name)[0, 0, 0]) == 7


def test_a_subfolder_removed_during_the_run_is_created_again(root: Path) -> None:
    """Workers create a name's folder when opening its file fails (not by a check per image),
    so a folder someone removes between batches comes back."""
    import shutil

    with AsyncImageSink(root, workers=1) as sink:
        sink.submit(np.full((1, 3, 8, 8), 5, np.uint8), names=["deep/er/a"])
        sink.flush()
        shutil.rmtree(root / "deep")
        sink.submit(np.full((1, 3, 8, 8), 9, np.uint8), names=["deep/er/b"])
    assert sorted(p.name for p in (root / "deep" / "er").iterdir()) == ["b.png"]
    assert int(read_rgb(root / "deep" / "er" / "b.png")[0, 0, 0]) == 9
