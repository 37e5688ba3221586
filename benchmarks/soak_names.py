"""Soak: many tiny images through one sink with a template without ``{index}``; parent RSS.

    python benchmarks/soak_names.py --images 1000000            # the issue 9 soak (tmpfs)
    python benchmarks/soak_names.py --images 100000 --json      # what the test suite runs

The name is ``"{step:07d}_{batch:04d}_"`` plus 150 characters: the template that used to keep
every issued path (about 740 bytes per image). Written files are deleted every
``--clean-every`` images so that tmpfs stays small; the sink never learns of it. Prints the
parent's RSS after ``--warmup`` images and at the end (after ``close``), and their difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from asyncdump import AsyncImageSink

TEMPLATE = "{step:07d}_{batch:04d}_" + "n" * 150


def _default_root() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # tmpfs on Linux
    return tempfile.mkdtemp(prefix="asyncdump-soak-", dir=base)


def _clean(root: Path) -> None:
    with os.scandir(root) as entries:
        for entry in entries:
            if not entry.name.startswith("."):  # never a worker's temp file
                os.unlink(entry.path)


def soak(root: Path, images: int, batch: int, warmup: int, workers: int, side: int,
         clean_every: int) -> dict[str, Any]:
    """Write ``images`` images of ``side`` x ``side``; returns the measurements."""
    me = psutil.Process()
    pixels = np.arange(batch * 3 * side * side, dtype=np.uint8).reshape(batch, 3, side, side)
    rss_warm = None
    samples: list[tuple[int, float]] = []  # (images submitted, RSS MiB) at each clean-up
    started = time.perf_counter()
    submitted = 0
    with AsyncImageSink(root, name=TEMPLATE, workers=workers, format="png",
                        max_buffer_bytes=4 << 20) as sink:
        step = 0
        while submitted < images:
            count = min(batch, images - submitted)
            sink.submit(pixels[:count], step=step)
            step += 1
            submitted += count
            if rss_warm is None and submitted >= warmup:
                sink.flush()
                rss_warm = me.memory_info().rss
            if submitted % clean_every < count:
                sink.flush()
                _clean(root)
                samples.append((submitted, me.memory_info().rss / 2**20))
    rss_end = me.memory_info().rss
    stats = sink.stats
    _clean(root)
    assert rss_warm is not None
    return {"images": submitted, "samples": samples, "written": stats.written, "failed": stats.failed,
            "warmup_images": warmup, "rss_warm_mib": rss_warm / 2**20,
            "rss_end_mib": rss_end / 2**20, "growth_mib": (rss_end - rss_warm) / 2**20,
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--side", type=int, default=2, help="image side in pixels (default 2)")
    parser.add_argument("--clean-every", type=int, default=50_000)
    parser.add_argument("--root", default=None, help="output folder (default: a new tmpfs folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else Path(_default_root())
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = soak(root, args.images, args.batch, args.warmup, args.workers, args.side,
                      args.clean_every)
    finally:
        if not args.root:
            _clean(root)
            root.rmdir()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['written']} of {result['images']} images written in "
              f"{result['seconds']:.0f} s; parent RSS {result['rss_warm_mib']:.1f} MiB after "
              f"{args.warmup} images, {result['rss_end_mib']:.1f} MiB at the end: "
              f"{result['growth_mib']:+.1f} MiB")
        print("RSS (MiB) by images: " + ", ".join(f"{n}: {mib:.1f}" for n, mib in result["samples"]))
    return 0 if result["written"] == result["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
