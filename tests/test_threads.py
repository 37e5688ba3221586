"""Many producer threads on one sink (and on save_image): every image once, right pixels,
exact counts, each thread's batches in its own order."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import no_temp_files, read_rgb

import asyncdump
from asyncdump import AsyncImageSink

THREADS, BATCHES, PER_BATCH, SIDE = 8, 40, 4, 8


@pytest.fixture(autouse=True)
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every microsecond instead of every 5 ms, so that an unguarded
    read-modify-write in submit is interleaved often (the races are then seen every run)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def tagged_batch(thread: int, seq: int) -> np.ndarray:
    """(PER_BATCH, 3, SIDE, SIDE) uint8 whose channels say (thread, batch, image)."""
    out = np.empty((PER_BATCH, 3, SIDE, SIDE), np.uint8)
    for k in range(PER_BATCH):
        out[k, 0], out[k, 1], out[k, 2] = thread * 31 + 1, seq * 6, k * 60 + 3
    return out


def run_threads(work: Callable[[int], None]) -> None:
    """Start THREADS threads on ``work(thread)`` at the same moment; re-raise their errors."""
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def body(thread: int) -> None:
        try:
            start.wait()
            work(thread)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_eight_threads_submit_every_image_once(root: Path) -> None:
    results: dict[int, list[list[Path]]] = {t: [] for t in range(THREADS)}
    with AsyncImageSink(root, workers=2) as sink:
        futures: dict[int, list] = {t: [] for t in range(THREADS)}

        def work(thread: int) -> None:
            for seq in range(BATCHES):
                futures[thread].append(sink.submit(tagged_batch(thread, seq)))

        run_threads(work)
        for thread in range(THREADS):
            results[thread] = [f.result(timeout=60) for f in futures[thread]]
    total = THREADS * BATCHES * PER_BATCH
    stats = sink.stats
    assert (stats.submitted, stats.written, stats.failed, stats.dropped) == (total, total, 0, 0)
    files = sorted(root.iterdir())
    assert [p.name for p in files] == [f"{i:08d}.png" for i in range(total)]
    assert not no_temp_files(root)
    for thread, batches in results.items():
        indices = [int(p.stem) for paths in batches for p in paths]
        assert indices == sorted(indices), f"thread {thread}'s batches out of order"
        for seq, paths in enumerate(batches):
            expected = tagged_batch(thread, seq)
            for k, path in enumerate(paths):
                np.testing.assert_array_equal(read_rgb(path), expected[k].transpose(1, 2, 0))


def test_eight_threads_encode_and_submit_mixed(root: Path) -> None:
    encoded: dict[int, list] = {t: [] for t in range(THREADS)}
    written: dict[int, list] = {t: [] for t in range(THREADS)}
    with AsyncImageSink(root, workers=2, name="{tag}_{step:03d}_{batch}") as sink:

        def work(thread: int) -> None:
            for seq in range(BATCHES // 2):
                encoded[thread].append(sink.encode(tagged_batch(thread, seq)))
                written[thread].append(sink.submit(tagged_batch(thread, seq), step=seq,
                                                   tag=f"t{thread}"))

        run_threads(work)
        for thread in range(THREADS):
            for seq, future in enumerate(encoded[thread]):
                blobs = future.result(timeout=60)
                expected = tagged_batch(thread, seq)
                for k, blob in enumerate(blobs):
                    image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
                    np.testing.assert_array_equal(image[..., ::-1], expected[k].transpose(1, 2, 0))
            for seq, future in enumerate(written[thread]):
                paths = future.result(timeout=60)
                assert [p.name for p in paths] == [f"t{thread}_{seq:03d}_{k}.png"
                                                   for k in range(PER_BATCH)]
    half = THREADS * BATCHES // 2 * PER_BATCH
    stats = sink.stats
    assert (stats.submitted, stats.written, stats.failed) == (2 * half, 2 * half, 0)
    assert len(list(root.iterdir())) == half


def test_eight_threads_save_image(tmp_path: Path) -> None:
    def work(thread: int) -> None:
        for seq in range(BATCHES):
            image = torch.from_numpy(tagged_batch(thread, seq)[:1])  # one image: the grid itself
            asyncdump.save_image(image, tmp_path / f"t{thread}" / f"{seq:03d}.png")

    for thread in range(THREADS):
        (tmp_path / f"t{thread}").mkdir()
    run_threads(work)
    asyncdump.flush(timeout=120)
    for thread in range(THREADS):
        files = sorted((tmp_path / f"t{thread}").iterdir())
        assert [p.name for p in files] == [f"{seq:03d}.png" for seq in range(BATCHES)]
        for seq, path in enumerate(files):
            np.testing.assert_array_equal(read_rgb(path),
                                          tagged_batch(thread, seq)[0].transpose(1, 2, 0))
