"""Caller's time per call: asyncdump.save_image vs torchvision's synchronous save_image.

torchvision's save_image is make_grid + mul(255).add_(0.5).clamp_(0, 255) + PIL save, all in
the caller. Where torchvision is importable it is timed itself; otherwise the same steps are
timed with asyncdump.grid.make_grid (torchvision's algorithm op for op) and PIL. Calls are
interleaved, 50 ms apart (a loop that saves samples every step); medians of ``--calls``.

    python benchmarks/save_image_latency.py [--calls 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import asyncdump
from asyncdump.grid import make_grid


def torchvision_save(tensor: Any, fp: Path, **kwargs: Any) -> str:
    try:
        from torchvision.utils import save_image
    except ImportError:
        grid = make_grid(tensor, **kwargs)
        ndarr = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)
        Image.fromarray(ndarr.numpy()).save(fp)
        return "make_grid (torchvision's algorithm) + PIL save"
    save_image(tensor, fp, **kwargs)
    return "torchvision.utils.save_image"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    kwargs: dict[str, Any] = {"nrow": 8, "normalize": True, "value_range": (-1.0, 1.0)}
    batch = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        asyncdump.save_image(batch, out / "warm.png", **kwargs).result()  # starts its sink
        sync_s, async_s = [], []
        label = ""
        for i in range(args.calls):
            began = time.perf_counter()
            label = torchvision_save(batch, out / f"sync{i}.png", **kwargs)
            sync_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            asyncdump.save_image(batch, out / f"async{i}.png", **kwargs)
            async_s.append(time.perf_counter() - began)
            time.sleep(0.05)
        asyncdump.flush()
        same = all(np.array_equal(np.asarray(Image.open(out / f"sync{i}.png")),
                                  np.asarray(Image.open(out / f"async{i}.png")))
                   for i in range(args.calls))
    print(f"64x3x64x64 grid, nrow=8, normalize=True, value_range=(-1, 1); {args.calls} calls")
    print("| save call | caller's time per call, median (min-max) |")
    print("|---|---|")
    for name, times in ((label, sync_s), ("asyncdump.save_image (returns; a worker writes)", async_s)):
        print(f"| {name} | {statistics.median(times) * 1e3:.1f} ms "
              f"({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}) |")
    print(f"identical pixels in all {args.calls} pairs: {same}")


if __name__ == "__main__":
    main()
