"""GPU check for asyncdump (``make gpu-check``): under 5 minutes on one CUDA GPU.

    parity      CUDA path vs CPU path: the same float batch written both ways, max pixel diff <= 1
    no sync     submit returns while a long kernel queued before it (torch.cuda._sleep) still runs
    pinned      the staging buffer's tensor view reports is_pinned()
    bandwidth   device-to-host GB/s into the staging buffer vs into a plain pinned tensor
    scenario 1  the GPU-bound loop with a real conv-net step on the GPU

Prints one summary table; exits 1 if a check fails, 0 with a clear message when CUDA is absent.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SLEEP_SECONDS = 1.0


def check_parity(torch: Any, cv2: Any, root: Path) -> tuple[bool, str]:
    from asyncdump import AsyncImageSink

    gen = torch.Generator().manual_seed(0)
    batch = torch.rand(8, 3, 96, 128, generator=gen) * 1.2 - 0.1  # out-of-range values included
    batch[0, 0, 0, :64] = torch.arange(64) / 255 + 0.5 / 255  # exact half steps
    with AsyncImageSink(root / "cpu", name="{index:03d}") as sink:
        sink.submit(batch)
    with AsyncImageSink(root / "cuda", name="{index:03d}") as sink:
        sink.submit(batch.cuda())
    worst = 0
    for i in range(batch.shape[0]):
        a = cv2.imread(str(root / "cpu" / f"{i:03d}.png"), cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imread(str(root / "cuda" / f"{i:03d}.png"), cv2.IMREAD_UNCHANGED).astype(int)
        worst = max(worst, int(abs(a - b).max()))
    return worst <= 1, f"max |CUDA - CPU| = {worst} over {batch.shape[0]} images"


def sleep_cycles(torch: Any, seconds: float) -> int:
    """Clock cycles that ``torch.cuda._sleep`` needs to spin for about ``seconds``."""
    probe = 50_000_000
    torch.cuda.synchronize()
    began = time.perf_counter()
    torch.cuda._sleep(probe)
    torch.cuda.synchronize()
    return int(probe * seconds / max(time.perf_counter() - began, 1e-6))


def check_no_sync(torch: Any, root: Path) -> tuple[bool, str, bool, str]:
    from asyncdump import AsyncImageSink

    batch = torch.rand(16, 3, 256, 256, device="cuda")
    with AsyncImageSink(root / "nosync", name="{index:03d}") as sink:
        sink.submit(batch)  # first call pins the buffer and warms the kernels
        sink.flush()
        cycles = sleep_cycles(torch, SLEEP_SECONDS)
        torch.cuda._sleep(cycles)
        before = torch.cuda.Event()
        before.record()
        began = time.perf_counter()
        sink.submit(batch * 1.0)  # queued behind the sleep
        submit_seconds = time.perf_counter() - began
        still_running = not before.query()
        sink.flush()
        pinned = bool(sink._buffer.torch_view(0, 64).is_pinned())
        written = sum(1 for _ in (root / "nosync").glob("*.png"))
    ok = still_running and submit_seconds < SLEEP_SECONDS / 2 and written == 32
    return (ok, f"submit took {submit_seconds * 1e3:.1f} ms while a {SLEEP_SECONDS:.0f} s kernel was "
                f"{'still running' if still_running else 'FINISHED'}; {written}/32 images",
            pinned, f"staging buffer view is_pinned() = {pinned}")


def check_bandwidth(torch: Any, root: Path) -> tuple[bool, str]:
    from asyncdump import AsyncImageSink

    nbytes = 256 << 20
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    plain = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    with AsyncImageSink(root / "bw", max_buffer_bytes=nbytes + (1 << 20)) as sink:
        sink.submit(torch.zeros(1, 3, 8, 8, device="cuda"))  # pins the buffer
        sink.flush()
        staging = sink._buffer.torch_view(0, nbytes)
        rates: dict[str, list[float]] = {"staging buffer": [], "plain pinned": []}
        for _ in range(5):  # interleaved
            for label, destination in (("staging buffer", staging), ("plain pinned", plain)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                destination.copy_(source, non_blocking=True)
                end.record()
                end.synchronize()
                rates[label].append(nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
        del staging
    med = {label: sorted(v)[len(v) // 2] for label, v in rates.items()}
    ratio = med["staging buffer"] / med["plain pinned"]
    return ratio >= 0.8, (f"device-to-host {med['staging buffer']:.1f} GB/s into the staging buffer vs "
                          f"{med['plain pinned']:.1f} GB/s into a plain pinned tensor ({ratio:.2f}×)")


def check_scenario1(root: Path) -> tuple[bool, str]:
    from asyncdump.bench.report import loop_table
    from asyncdump.bench.scenarios import Config, loop_scenario

    config = Config(rounds=3, loop_steps=30, device="cuda", work=root / "scenario1",
                    contenders=["none", "cv2_sync", "threadpool_cv2", "asyncdump"])
    result = loop_scenario(config, "convnet", config.loop_steps, lambda line: print(line, flush=True))
    print(loop_table(result))
    ours = result["contenders"]["asyncdump"]
    overhead = ours["summary"]["overhead_pct"]["median"]
    cv2_overhead = result["contenders"]["cv2_sync"]["summary"]["overhead_pct"]["median"]
    complete = all(c["written"] == c["expected"] for c in result["contenders"].values())
    return complete, (f"asyncdump overhead {overhead:.1f} % vs cv2_sync {cv2_overhead:.1f} % "
                      f"(median of 3 rounds); all images written: {complete}")


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}); nothing was checked. "
              "Run it on a machine with a CUDA GPU.")
        return 0
    import cv2

    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    root = Path(tempfile.mkdtemp(prefix="asyncdump-gpu-check-"))
    rows: list[tuple[str, bool, str]] = []
    try:
        ok, detail = check_parity(torch, cv2, root)
        rows.append(("parity CUDA vs CPU", ok, detail))
        ok, detail, pinned, pin_detail = check_no_sync(torch, root)
        rows.append(("submit does not synchronise", ok, detail))
        rows.append(("buffer is pinned", pinned, pin_detail))
        rows.append(("device-to-host bandwidth", *check_bandwidth(torch, root)))
        rows.append(("scenario 1, conv-net step", *check_scenario1(root)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| check | pass | detail |\n|---|---|---|")
    for name, ok, detail in rows:
        print(f"| {name} | {'yes' if ok else '**NO**'} | {detail} |")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
