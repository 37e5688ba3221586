"""Scenario 8: a loop that calls ``add_images`` with a 64x3x256x256 float batch every step,
``SummaryWriter`` against ``asyncdump.tensorboard.ImageWriter``, in the same run, with the
loop that logs nothing (``none``) and one copy of the batch (``copy_floor``) as floors.

Per contender and round: the time inside each call (p50/max), the loop's overhead against
that round's ``none`` loop, the drain (``close``) and the image events read back.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import contenders
from .measure import Stopwatch, latency_summary, scratch_folder, smooth_images, summarize_rounds

Log = Callable[[str], None]
SHAPE = (64, 3, 256, 256)
TAG = "samples"
CONTENDERS = ("none", "copy_floor", "summary_writer", "asyncdump")
TARGET_CALL_RATIO = 20.0
TARGET_POINTS_OVER_COPY = 2.0


def steps_for(loop_steps: int) -> int:
    """A SummaryWriter call takes about a second here: an eighth of scenario 1's steps."""
    return max(3, loop_steps // 8)


class SummaryWriterContender(contenders.Contender):
    """``SummaryWriter.add_images``: grid, conversion and PIL PNG in the caller's thread."""

    name = "summary_writer"

    def start(self, folder: Path) -> None:
        super().start(folder)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.warm_up()

    def warm_up(self) -> None:
        self.writer.add_images("warmup", smooth_images(2, 16, seed=1))

    def save(self, batch: Any, step: int) -> None:
        self.writer.add_images(TAG, batch, global_step=step)

    def finish(self) -> dict[str, Any]:
        self.writer.close()
        return {}


class ImageWriterContender(SummaryWriterContender):
    """``asyncdump.tensorboard.ImageWriter(writer).add_images``; started before the loop."""

    name = "asyncdump"
    asynchronous = True

    def __init__(self, fmt: str = "png", warmup_batch: Any = None, warmup_calls: int = 1):
        super().__init__(fmt)
        self.warmup_batch = warmup_batch
        self.warmup_calls = warmup_calls

    def warm_up(self) -> None:
        from ..tensorboard import ImageWriter

        self.images = ImageWriter(self.writer)
        for _ in range(self.warmup_calls):  # the buffer pages the timed calls reach are warm
            self.images.add_images("warmup", self.warmup_batch)
        self.images.flush()

    def save(self, batch: Any, step: int) -> None:
        self.images.add_images(TAG, batch, global_step=step)

    def finish(self) -> dict[str, Any]:
        self.images.close()
        stats = self.images.stats
        self.writer.close()
        return {"workers": stats.workers, "blocked_seconds": stats.blocked_seconds,
                "peak_buffered_bytes": stats.peak_buffered_bytes,
                "max_buffer_bytes": stats.max_buffer_bytes}


def count_events(folder: Path) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0})
    accumulator.Reload()
    return len(accumulator.Images(TAG)) if TAG in accumulator.Tags()["images"] else 0


def make(name: str, batch: Any, steps: int) -> contenders.Contender:
    if name == "summary_writer":
        return SummaryWriterContender()
    if name == "asyncdump":
        return ImageWriterContender(warmup_batch=batch, warmup_calls=steps)
    return contenders.make(name)


def run_once(contender: contenders.Contender, batches: list[Any], steps: int,
             step: Callable[[int], None], folder: Path) -> dict[str, Any]:
    folder = scratch_folder(folder)
    contender.start(folder)
    if isinstance(contender, contenders.CopyFloor):
        contender.reserve(int(batches[0].numel() * batches[0].element_size()))
    latencies = []
    began = time.perf_counter()
    for i in range(steps):
        step(i)
        called = time.perf_counter()
        contender.save(batches[i % len(batches)], i)
        latencies.append(time.perf_counter() - called)
    loop_seconds = time.perf_counter() - began
    with Stopwatch() as drain:
        extra = contender.finish()
    logs = isinstance(contender, SummaryWriterContender)
    return {"loop_seconds": loop_seconds, "drain_seconds": drain.seconds,
            "written": count_events(folder) if logs else 0, "expected": steps if logs else 0,
            "latencies": latencies, **extra}


def scenario8(config: Any, log: Log) -> dict[str, Any]:
    """The loop with each contender in each round (order rotated), then summaries."""
    import torch

    from .scenarios import make_step

    steps = steps_for(config.loop_steps)
    step = make_step("sleep", "cpu", config.step_ms)
    batches = [torch.from_numpy(smooth_images(SHAPE[0], SHAPE[2], seed=s)) for s in range(2)]
    names = list(CONTENDERS)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(config.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            result = run_once(make(name, batches[0], steps), batches, steps, step,
                              config.work / f"tensorboard-{name}")
            rounds[name].append(result)
            log(f"  round {r + 1}/{config.rounds} {name:<15} loop {result['loop_seconds']:.3f} s, "
                f"call p50 {statistics.median(result['latencies']) * 1e3:.2f} ms, drain "
                f"{result['drain_seconds']:.3f} s, {result['written']}/{result['expected']} events")
    out: dict[str, Any] = {}
    for name, results in rounds.items():
        per_round = []
        for i, result in enumerate(results):
            floor = rounds["none"][i]["loop_seconds"]
            per_round.append({**{k: v for k, v in result.items() if k != "latencies"},
                              **latency_summary(result["latencies"]),
                              "overhead_pct": (result["loop_seconds"] - floor) / floor * 100})
        out[name] = {"summary": summarize_rounds(per_round, ["loop_seconds", "overhead_pct", "p50_ms",
                                                             "max_ms", "drain_seconds"]),
                     "written": sum(r["written"] for r in results),
                     "expected": sum(r["expected"] for r in results), "rounds": per_round}
    return {"steps": steps, "step_ms": config.step_ms, "batch_shape": list(SHAPE),
            "contenders": out}


def table(result: dict[str, Any]) -> str:
    from .report import _range, _table

    rows = []
    for name, c in result["contenders"].items():
        s = c["summary"]
        rows.append([f"`{name}`", _range(s["p50_ms"], "{:.2f}"), _range(s["max_ms"], "{:.2f}"),
                     _range(s["overhead_pct"], "{:.1f}") + " %", _range(s["drain_seconds"], "{:.2f}"),
                     f"{c['written']}/{c['expected']}" if c["expected"] else "–"])
    return _table(["contender", "call p50 ms", "call max ms", "loop overhead vs none", "drain s",
                   "image events"], rows)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round: SummaryWriter's call p50 over asyncdump's, and asyncdump's loop overhead
    minus copy_floor's; the medians over rounds against the issue's targets."""
    c = result["contenders"]
    ours, theirs, floor = (c[n]["rounds"] for n in ("asyncdump", "summary_writer", "copy_floor"))
    ratio = statistics.median(t["p50_ms"] / o["p50_ms"] for t, o in zip(theirs, ours, strict=True))
    points = statistics.median(o["overhead_pct"] - f["overhead_pct"]
                               for o, f in zip(ours, floor, strict=True))
    lost = [n for n, v in c.items() if v["written"] != v["expected"]]
    return [
        {"target": f"scenario 8: add_images call ≥ {TARGET_CALL_RATIO:g}× shorter than SummaryWriter's",
         "measured": f"{ratio:.0f}×", "met": ratio >= TARGET_CALL_RATIO},
        {"target": f"scenario 8: loop overhead ≤ copy_floor's + {TARGET_POINTS_OVER_COPY:g} points",
         "measured": f"{points:+.2f} points", "met": points <= TARGET_POINTS_OVER_COPY},
        {"target": "scenario 8: every image event written",
         "measured": "all" if not lost else "lost: " + ", ".join(lost), "met": not lost},
    ]
