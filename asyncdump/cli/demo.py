"""``asyncdump demo`` (``make demo``): a simulated training loop saved three ways, side by side.

Each step "trains" (a sleep stands in for a GPU-bound step; with CUDA, the batch is made on the
GPU) and then saves a 16x3x256x256 float batch in [0, 1]:

    none       the loop without saving (the floor)
    cv2_sync   what people write today: .cpu(), scale, round, cv2.imwrite per image
    asyncdump  sink.submit(batch), which returns at once

Prints loop times and overheads, images written, and the sink's stats.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import psutil


def make_batch(torch: Any, step: int, batch: int, size: int, device: str) -> Any:
    """Smooth, step-dependent images (like samples of a model, not noise)."""
    axis = torch.linspace(0, 1, size, device=device)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    phase = torch.arange(batch, device=device).view(batch, 1, 1, 1) * 0.37 + step * 0.11
    freq = torch.tensor([3.0, 5.0, 7.0], device=device).view(1, 3, 1, 1)
    return 0.5 + 0.5 * torch.sin(freq * (xx + yy * 0.5) * 6.28 + phase)


def save_cv2_sync(torch: Any, cv2: Any, batch: Any, folder: Path, first_index: int) -> None:
    pixels = batch.detach().cpu().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(pixels):
        cv2.imwrite(str(folder / f"{first_index + i:08d}.png"), image[..., ::-1])


def run_loop(mode: str, steps: int, step_seconds: float, batch: int, size: int, device: str,
             out: Path) -> dict[str, Any]:
    import cv2
    import torch

    from .. import AsyncImageSink

    folder = out / mode
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sink = AsyncImageSink(folder) if mode == "asyncdump" else None
    # The "model outputs": made before timing, since the sleep stands for all of the step's
    # GPU work (a GPU-bound loop leaves the CPU idle while it waits).
    outputs = [make_batch(torch, step, batch, size, device) for step in range(4)]
    began = time.perf_counter()
    for step in range(steps):
        time.sleep(step_seconds)  # the simulated GPU-bound training step
        images = outputs[step % len(outputs)]
        if mode == "cv2_sync":
            save_cv2_sync(torch, cv2, images, folder, step * batch)
        elif sink is not None:
            sink.submit(images, step=step)
    loop_seconds = time.perf_counter() - began
    stats = None
    drain_seconds = 0.0
    worker_rss = worker_uss = 0
    if sink is not None:
        worker_rss = sink.stats.worker_rss_bytes
        worker_uss = sum(psutil.Process(pid).memory_full_info().uss for pid in sink.worker_pids)
        drained = time.perf_counter()
        sink.close()
        drain_seconds = time.perf_counter() - drained
        stats = sink.stats
    written = sum(1 for p in folder.iterdir() if p.suffix == ".png")
    return {"mode": mode, "loop_seconds": loop_seconds, "drain_seconds": drain_seconds,
            "written": written, "stats": stats, "worker_rss": worker_rss,
            "worker_uss": worker_uss}


def run(args: argparse.Namespace) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    print(f"asyncdump demo: {args.steps} steps of {args.step_ms:.0f} ms, batch "
          f"{args.batch}x3x{args.size}x{args.size} float on {device}, "
          f"{os.cpu_count()} cores, output in {out}/")
    results = [run_loop(mode, args.steps, args.step_ms / 1000, args.batch, args.size, device, out)
               for mode in ("none", "cv2_sync", "asyncdump")]
    floor = results[0]["loop_seconds"]
    print()
    print(f"{'mode':<10} {'loop s':>8} {'overhead':>9} {'drain s':>8} {'images':>7}")
    for r in results:
        overhead = (r["loop_seconds"] - floor) / floor * 100
        print(f"{r['mode']:<10} {r['loop_seconds']:8.3f} {overhead:8.1f}% "
              f"{r['drain_seconds']:8.3f} {r['written']:7d}")
    print()
    print("asyncdump stats after close:")
    for key, value in dataclasses.asdict(results[-1]["stats"]).items():
        print(f"  {key:<20} {value:.4g}" if isinstance(value, float) else f"  {key:<20} {value}")
    last = results[-1]
    print(f"  workers before close: RSS {last['worker_rss'] / 2**20:.1f} MiB, of which private "
          f"(USS) {last['worker_uss'] / 2**20:.1f} MiB; the rest is shared: the staging buffer's "
          "pages they read and shared libraries")
    expected = args.steps * args.batch
    ok = all(r["written"] == expected for r in results[1:])
    print()
    print("all images written" if ok else "MISSING IMAGES")
    return 0 if ok else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="a simulated training loop: no saving vs "
                                   "synchronous cv2.imwrite vs asyncdump")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=40.0, help="simulated step time")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", default="demo_out")
    parser.set_defaults(func=run)
