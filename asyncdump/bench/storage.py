"""``asyncdump bench --root DIR``: how fast this machine and this storage take images.

Measures, in interleaved rounds, the sustained images/s of a sink with 1..N workers writing
into DIR, and the single-process encode+write rate there; recommends the worker count past
which one more worker adds less than ``GAIN_NEEDED``.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

from .. import _defaults
from .measure import smooth_images, summarize, to_uint8
from .scenarios import Log, single_process_rate, sink_rate

GAIN_NEEDED = 1.10  # one more worker must add at least 10% to count as still scaling
DISTINCT_IMAGES = 32  # the images are cycled: enough to defeat any caching by content


def recommend(rates: dict[int, float]) -> tuple[int, str]:
    """The worker count past which the rate stops scaling, and a sentence saying why."""
    counts = sorted(rates)
    for k, nxt in itertools.pairwise(counts):
        if rates[nxt] < GAIN_NEEDED * rates[k]:
            return k, (f"workers={k}: {nxt} workers gave {rates[nxt]:.0f} images/s vs "
                       f"{rates[k]:.0f} (less than {GAIN_NEEDED - 1:.0%} more)")
    top = counts[-1]
    return top, (f"workers={top}: still scaling at {top} workers ({rates[top]:.0f} images/s); "
                 "this machine has no more usable cores to try")


def storage_bench(root: Path, size: int, fmt: str, rounds: int, seconds: float,
                  max_workers: int | None, log: Log) -> dict[str, Any]:
    """Sustained rates into ``root`` for ``size``x``size`` RGB images in ``fmt``."""
    top = max_workers or _defaults.usable_cores()
    scratch = Path(root) / f".asyncdump-bench-{os.getpid()}"
    folder = scratch / "run"  # each run writes beside it (scratch_folder), all removed at the end
    images = to_uint8(smooth_images(DISTINCT_IMAGES, size, seed=11))
    batch = 16
    try:
        single = single_process_rate(images, fmt, folder)
        # Enough images that the fastest expected run lasts about ``seconds``.
        repeat = max(1, round(single * top * seconds / len(images)))
        log(f"  single process: {single:.0f} images/s; each run writes {repeat * len(images)} images")
        singles: list[float] = [single]
        per_workers: dict[int, list[float]] = {k: [] for k in range(1, top + 1)}
        for r in range(rounds):
            if r:
                singles.append(single_process_rate(images, fmt, folder))
            for k in per_workers:
                result = sink_rate(images, fmt, batch, k, folder, repeat=repeat, warmup_passes=1)
                if result["written"] != result["expected"]:
                    raise RuntimeError(f"{k} workers wrote {result['written']} of {result['expected']}")
                per_workers[k].append(result["images_per_second"])
            log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{k} workers {rates[-1]:.0f}/s" for k, rates in per_workers.items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {k: summarize(v)["median"] for k, v in per_workers.items()}
    workers, why = recommend(medians)
    return {"root": str(root), "size": size, "format": fmt, "images_per_run": repeat * len(images),
            "single_process": summarize(singles),
            "workers": {str(k): summarize(v) for k, v in per_workers.items()},
            "recommended_workers": workers, "why": why}
