"""Measurement helpers: summaries over rounds, an RSS sampler over all processes, test images."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import psutil


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of one metric over rounds (the benchmark's unit of report)."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(array)), "min": float(array.min()),
            "max": float(array.max()), "n": len(values)}


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of per-call latencies, in milliseconds."""
    if not seconds:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def summarize_rounds(rounds: Iterable[dict[str, Any]], keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """For each numeric key of per-round dicts: its median/min/max over the rounds."""
    rows = list(rounds)
    return {key: summarize([float(r[key]) for r in rows]) for key in keys}


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


class RssSampler:
    """Peak resident memory of this process and all its children, sampled every ``interval``.

    RSS counts a shared page once in every process that touched it, so the staging buffer can
    appear in the parent's and in each worker's figure: a sum of RSS over-states, never hides.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._process = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def sample(self) -> int:
        """One reading now (also folded into the peak)."""
        rss = _tree_rss(self._process)
        self.peak_bytes = max(self.peak_bytes, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.baseline_bytes = self.sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def smooth_images(count: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """``(count, channels, size, size)`` float32 in [0, 1]: smooth waves plus a little noise,
    like a generative model's samples (pure noise would make PNG look slower than it is)."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    out = np.empty((count, channels, size, size), np.float32)
    for i in range(count):
        freq = rng.uniform(2.0, 8.0, (channels, 1, 1)).astype(np.float32)
        phase = np.float32(rng.uniform(0.0, 6.28))
        image = out[i]
        np.multiply(freq, xx + 0.5 * yy, out=image)
        image *= np.float32(6.28)
        image += phase
        np.sin(image, out=image)
        image *= np.float32(0.45)
        image += np.float32(0.5)
        image += rng.standard_normal((channels, size, size), dtype=np.float32) * np.float32(0.02)
        np.clip(image, 0.0, 1.0, out=image)
    return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float [0, 1] images to uint8 by the round-half-up rule (same layout)."""
    return np.floor(images * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


_SCRATCH_IDS = itertools.count()


def scratch_folder(base: Path) -> Path:
    """A folder name beside ``base`` that no earlier measurement of this run used.

    The bench keeps every file it writes until the run ends (``cli.run`` removes ``--work``):
    on ext4 without a journal, creating a file within a few minutes of deleting thousands makes
    the inode allocator check each recently deleted inode (measured here: ~1 ms per new file,
    ``recently_deleted`` in ``perf``), which would charge every contender for the bench's own
    clean-up of the previous measurement.
    """
    return base.with_name(f"{base.name}-{next(_SCRATCH_IDS)}")


def count_files(folder: Path, suffix: str) -> int:
    """Finished images under ``folder`` (hidden temporary files excluded)."""
    if not folder.exists():
        return 0
    return sum(1 for p in folder.rglob(f"*{suffix}") if not p.name.startswith("."))


class Stopwatch:
    """``with Stopwatch() as w: ...`` then ``w.seconds``."""

    seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._began
