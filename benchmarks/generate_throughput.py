"""Throughput of dataset generation: files mode vs tar mode vs a synchronous cv2.imwrite loop.

    .venv/bin/python benchmarks/generate_throughput.py [--rounds 3] [--workers W] [--out DIR]

For 32x32 and 256x256 PNG, each round runs, in turn (interleaved, medians printed):
    files   DatasetSink(mode="files"): render with torch, write via the sink, manifest (sha256)
    tar     DatasetSink(mode="tar"): render, workers encode, shards written by the parent
    sync    render, then cv2.imwrite per image in the loop (what people write today)
    drain   the workers' limit: the same images rendered beforehand (untimed), then
            AsyncImageSink(workers=W) + submit of every batch (same names as files mode) +
            close; no rendering, no manifest
Every timed run includes starting and closing its sink, with the same worker count W (default:
what DatasetSink picks, usable cores - 1). Before each run the previous output is deleted and
``os.sync()`` flushes it, so no run pays for the previous one's writeback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import cv2
import torch

from asyncdump import AsyncImageSink, DatasetSink, _defaults, synthetic
from asyncdump._manifest import Layout

COUNTS = {32: 20000, 256: 1500}


def run_dataset(out: Path, size: int, count: int, mode: str, workers: int) -> float:
    batch = synthetic.default_batch_size(size)
    began = time.perf_counter()
    with DatasetSink(out, count=count, mode=mode, workers=workers) as sink:
        for indices in sink.pending(batch):
            sink.submit(indices, *synthetic.render(indices, seed=0, size=size))
    assert sink.summary is not None and sink.summary.images == count
    return count / (time.perf_counter() - began)


def run_sync(out: Path, size: int, count: int) -> float:
    layout = Layout(count, 1000, ".png", "files")
    batch = synthetic.default_batch_size(size)
    began = time.perf_counter()
    for start in range(0, count, batch):
        indices = list(range(start, min(start + batch, count)))
        images, _ = synthetic.render(indices, seed=0, size=size)
        pixels = images.permute(0, 2, 3, 1).numpy()
        for index, image in zip(indices, pixels, strict=True):
            path = out / (layout.file_name(index) + ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), image[..., ::-1])
    return count / (time.perf_counter() - began)


def run_drain(out: Path, size: int, count: int, workers: int) -> float:
    layout = Layout(count, 1000, ".png", "files")
    batch = synthetic.default_batch_size(size)
    batches = [list(range(s, min(s + batch, count))) for s in range(0, count, batch)]
    rendered = [synthetic.render(b, seed=0, size=size)[0] for b in batches]
    began = time.perf_counter()
    sink = AsyncImageSink(out, workers=workers, overwrite=True)
    for indices, images in zip(batches, rendered, strict=True):
        sink.submit(images, names=[layout.file_name(i) for i in indices])
    sink.close()
    return count / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None,
                        help="encoder processes for files, tar and drain (default: as DatasetSink)")
    parser.add_argument("--out", default="/tmp/asyncdump_generate_bench")
    args = parser.parse_args()
    workers = args.workers or _defaults.default_workers()
    torch.set_num_threads(1)  # as `asyncdump generate` does on the CPU: the other cores encode
    root = Path(args.out)
    results: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for size, count in COUNTS.items():
            for mode in ("files", "tar", "sync", "drain"):
                out = root / f"{size}-{mode}"
                shutil.rmtree(root, ignore_errors=True)
                out.mkdir(parents=True)
                os.sync()
                if mode in ("files", "tar"):
                    rate = run_dataset(out, size, count, mode, workers)
                elif mode == "sync":
                    rate = run_sync(out, size, count)
                else:
                    rate = run_drain(out, size, count, workers)
                results.setdefault((size, mode), []).append(rate)
    shutil.rmtree(root, ignore_errors=True)
    print(f"{workers} worker(s), {_defaults.usable_cores()} usable cores")
    print(f"| image | images | files mode | tar mode | sync cv2.imwrite | worker drain limit "
          f"| tar / files | files / drain |  ({args.rounds} rounds, median images/s)")
    print("|---|---|---|---|---|---|---|---|")
    for size, count in COUNTS.items():
        med = {mode: statistics.median(results[(size, mode)])
               for mode in ("files", "tar", "sync", "drain")}
        print(f"| {size}x{size} PNG | {count} | {med['files']:.0f} | {med['tar']:.0f} | "
              f"{med['sync']:.0f} | {med['drain']:.0f} | {med['tar'] / med['files']:.2f}x | "
              f"{med['files'] / med['drain']:.2f} |")
    print("all rounds:", {f"{s}/{m}": [round(r) for r in v] for (s, m), v in results.items()})


if __name__ == "__main__":
    main()
