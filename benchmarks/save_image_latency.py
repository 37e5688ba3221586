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


CASES: dict[str, dict[str, Any]] = {
    "normalize=True, value_range=(-1, 1)": {"nrow": 8, "normalize": True, "value_range": (-1.0, 1.0)},
    "normalize=True (the batch's min/max)": {"nrow": 8, "normalize": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    batch = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for kwargs in CASES.values():
            asyncdump.save_image(batch, out / "warm.png", **kwargs).result()  # starts its sink
        times: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in CASES}
        label = ""
        for i in range(args.calls):  # interleaved: every case and both writers in every round
            for c, (case, kwargs) in enumerate(CASES.items()):
                sync_s, async_s = times[case]
                began = time.perf_counter()
                label = torchvision_save(batch, out / f"sync{c}_{i}.png", **kwargs)
                sync_s.append(time.perf_counter() - began)
                began = time.perf_counter()
                asyncdump.save_image(batch, out / f"async{c}_{i}.png", **kwargs)
                async_s.append(time.perf_counter() - began)
                time.sleep(0.05)
        asyncdump.flush()
        same = all(np.array_equal(np.asarray(Image.open(out / f"sync{c}_{i}.png")),
                                  np.asarray(Image.open(out / f"async{c}_{i}.png")))
                   for i in range(args.calls) for c in range(len(CASES)))
        for case, (sync_s, async_s) in times.items():
            ratios = [a / b for a, b in zip(sync_s, async_s, strict=True)]
            rows.append((case, sync_s, async_s, ratios))
    print(f"64x3x64x64 grid, nrow=8; {args.calls} interleaved calls per case, 50 ms apart; "
          f"synchronous: {label}")
    print("| case | synchronous (torchvision) | asyncdump.save_image | ratio, per call pair |")
    print("|---|---|---|---|")
    for case, sync_s, async_s, ratios in rows:
        print(f"| {case} | {_ms(sync_s)} | {_ms(async_s)} | "
              f"{statistics.median(ratios):.0f}x ({min(ratios):.0f}-{max(ratios):.0f}) |")
    print(f"identical pixels in all {args.calls * len(CASES)} pairs: {same}")


def _ms(times: list[float]) -> str:
    return (f"{statistics.median(times) * 1e3:.2f} ms "
            f"({min(times) * 1e3:.2f}-{max(times) * 1e3:.2f})")


if __name__ == "__main__":
    main()
