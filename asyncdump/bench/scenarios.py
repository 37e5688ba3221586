"""The scenarios (6 and 7, the PNG encoders and ``generate``, live in encoders.py). Each runs
its contenders in interleaved rounds and returns plain data (per-round values and their
median/min/max) for report.py.

    1 gpu_bound     a sleep (or, on CUDA, a real conv-net step) then save a 16x3x256x256 batch
    2 cpu_bound     a real conv-net forward+backward on the CPU, then save: writers compete for cores
    3 throughput    drain rate with 1..N workers vs one process doing cv2.imencode + write
    4 submit_cost   submit latency vs one memcpy of the same bytes
    5 memory_bound  a producer far faster than the disk, on_full="block" and "drop"
    6 encoders      fpng vs OpenCV: encode only, drain with 1 and 2 workers, file sizes
    7 generate      ``asyncdump generate`` images/s per encoder, parent CPU per image
    8 tensorboard   add_images of a 64x3x256x256 float batch per step: SummaryWriter vs
                    asyncdump.tensorboard.ImageWriter (tb_loop.py)
    9 object_store  datasets (files, tar) and scenario 1's loop on an S3 store vs plain
                    uploads of the same bytes; the parent's CPU per image (object_store.py)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _defaults
from .._defaults import MIB
from . import contenders, encoders, object_store, tb_loop
from .measure import (
    RssSampler,
    Stopwatch,
    count_files,
    latency_summary,
    scratch_folder,
    smooth_images,
    summarize_rounds,
    to_uint8,
)

Log = Callable[[str], None]


@dataclass
class Config:
    """Sizes and repetitions; ``quick()`` takes about 2.5 minutes on 2 cores, the default 12."""

    rounds: int = 5
    loop_steps: int = 50  # scenario 1
    cpu_steps: int = 20  # scenario 2
    step_ms: float = 40.0
    batch: int = 16
    size: int = 256
    throughput_images: dict[str, int] = field(default_factory=lambda: {
        "png-256": 192, "jpg-256": 192, "png-32": 2048, "png-1024": 24})
    submit_reps: int = 15
    flood_batches: int = 48
    flood_buffer_bytes: int = 32 * MIB
    contenders: list[str] = field(default_factory=contenders.default_names)
    work: Path = Path("bench_out")
    device: str = "cpu"
    # scenario 9 (object_store.py): None starts moto_server on loopback
    store_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    store_images: int = 1000  # files mode, per run
    store_tar_images: int = 3000  # tar mode, per run
    store_shard_size: int = 1000  # generate's default
    store_workers: int | None = None  # None: DatasetSink's default (usable cores - 1)

    @classmethod
    def quick(cls, **overrides: Any) -> Config:
        base = cls(rounds=3, loop_steps=12, cpu_steps=5, submit_reps=5, flood_batches=16,
                   throughput_images={"png-256": 48, "jpg-256": 48, "png-32": 512, "png-1024": 6},
                   store_images=200, store_tar_images=600, store_shard_size=200)
        for key, value in overrides.items():
            setattr(base, key, value)
        return base


# ---------------------------------------------------------------- loop scenarios (1 and 2)
def small_convnet(torch: Any, device: str) -> tuple[Any, Any, Any]:
    """A small real model: two convolutions, a pooled linear head, SGD; and its input batch."""
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 16, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = torch.randn(16, 3, 64, 64, device=device)
    return model, optimizer, inputs


def make_step(kind: str, device: str, step_ms: float) -> Callable[[int], None]:
    """The simulated training step: ``sleep`` (the CPU waits on the GPU) or ``convnet``
    (forward+backward+SGD, ending with ``loss.item()`` as logging loops do)."""
    if kind == "sleep":
        seconds = step_ms / 1000

        def sleep_step(step: int) -> None:
            time.sleep(seconds)
        return sleep_step
    import torch

    model, optimizer, inputs = small_convnet(torch, device)
    targets = torch.arange(inputs.shape[0], device=device) % 10

    def convnet_step(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        loss.item()
    return convnet_step


def loop_batches(config: Config, count: int = 4) -> list[Any]:
    """The "model outputs" saved each step, made before timing (cycled through)."""
    import torch

    return [torch.from_numpy(smooth_images(config.batch, config.size, seed=s)).to(config.device)
            for s in range(count)]


def run_loop(contender: contenders.Contender, batches: list[Any], steps: int,
             step: Callable[[int], None], folder: Path) -> dict[str, Any]:
    """One timed loop of one contender: loop time, per-call save latency, drain, RSS, images."""
    folder = scratch_folder(folder)
    contender.start(folder)
    if isinstance(contender, contenders.CopyFloor):
        contender.reserve(int(batches[0].numel() * batches[0].element_size()))
    latencies = []
    with RssSampler() as rss:
        began = time.perf_counter()
        for i in range(steps):
            step(i)
            called = time.perf_counter()
            contender.save(batches[i % len(batches)], i)
            latencies.append(time.perf_counter() - called)
        loop_seconds = time.perf_counter() - began
        with Stopwatch() as drain:
            extra = contender.finish()
    written = contender.count_written()
    return {"loop_seconds": loop_seconds, "drain_seconds": drain.seconds, "written": written,
            "expected": 0 if isinstance(contender, contenders.NoSave) else steps * batches[0].shape[0],
            "peak_rss_bytes": rss.peak_bytes,
            "baseline_rss_bytes": rss.baseline_bytes, "latencies": latencies, **extra}


def loop_rounds(config: Config, makers: Mapping[str, Callable[[], contenders.Contender]],
                batches: list[Any], steps: int, step: Callable[[int], None], prefix: str,
                log: Log) -> dict[str, list[dict[str, Any]]]:
    """Each contender (made fresh by ``makers``) runs the loop once per round, the order
    rotated per round; ``run_loop``'s results by contender."""
    names = list(makers)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(config.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            result = run_loop(makers[name](), batches, steps, step, config.work / f"{prefix}-{name}")
            rounds[name].append(result)
            log(f"  round {r + 1}/{config.rounds} {name:<22} loop {result['loop_seconds']:.3f} s, "
                f"drain {result['drain_seconds']:.3f} s, {result['written']}/{result['expected']} images")
    return rounds


def loop_scenario(config: Config, kind: str, steps: int, log: Log) -> dict[str, Any]:
    """Scenarios 1 and 2: every contender in each round (order rotated), then summaries."""
    names = list(config.contenders)
    skipped = {n: why for n in names if (why := contenders.unavailable(n))}
    runnable = [n for n in names if n not in skipped]
    for name, why in skipped.items():
        log(f"  {name}: {why}")
    step = make_step(kind, config.device, config.step_ms)
    batches = loop_batches(config)
    step(-1)  # warm-up (first conv-net call allocates)
    makers = {n: functools.partial(contenders.make, n) for n in runnable}
    rounds = loop_rounds(config, makers, batches, steps, step, kind, log)
    return {"kind": kind, "steps": steps, "step_ms": config.step_ms if kind == "sleep" else None,
            "batch_shape": [config.batch, 3, config.size, config.size], "device": config.device,
            "skipped": skipped, "contenders": _loop_summaries(rounds)}


def _loop_summaries(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    # Overhead is taken per round against that round's "none" loop, then summarised.
    floors = [r["loop_seconds"] for r in rounds.get("none", [])]
    out: dict[str, Any] = {}
    for name, results in rounds.items():
        per_round = []
        for i, result in enumerate(results):
            lat = latency_summary(result["latencies"])
            overhead = ((result["loop_seconds"] - floors[i]) / floors[i] * 100) if floors else float("nan")
            end_to_end = result["loop_seconds"] + result["drain_seconds"]  # the loop, then close()
            e2e_overhead = ((end_to_end - floors[i]) / floors[i] * 100) if floors else float("nan")
            per_round.append({**{k: v for k, v in result.items() if k != "latencies"}, **lat,
                              "overhead_pct": overhead, "end_to_end_seconds": end_to_end,
                              "e2e_overhead_pct": e2e_overhead})
        out[name] = {
            "summary": summarize_rounds(per_round, ["loop_seconds", "overhead_pct", "p50_ms", "p99_ms",
                                                    "max_ms", "drain_seconds", "peak_rss_bytes",
                                                    "end_to_end_seconds", "e2e_overhead_pct"]),
            "written": sum(r["written"] for r in results),
            "expected": sum(r["expected"] for r in results),
            "latencies_ms": [round(s * 1e3, 4) for r in results for s in r["latencies"]],
            "rounds": per_round,
        }
    return out


def scenario1(config: Config, log: Log) -> dict[str, Any]:
    """GPU-bound loop: a sleep stands for the GPU step (``--device cuda``: a real one)."""
    kind = "convnet" if config.device == "cuda" else "sleep"
    return loop_scenario(config, kind, config.loop_steps, log)


def scenario2(config: Config, log: Log) -> dict[str, Any]:
    """CPU-bound loop: a conv net trains on the CPU while the images are saved."""
    return loop_scenario(config, "convnet", config.cpu_steps, log)


# ---------------------------------------------------------------- scenario 3: throughput
THROUGHPUT_CASES = {  # name -> (format, size, batch)
    "png-256": ("png", 256, 16), "jpg-256": ("jpg", 256, 16),
    "png-32": ("png", 32, 256), "png-1024": ("png", 1024, 4),
}


def single_process_rate(images: np.ndarray, fmt: str, folder: Path) -> float:
    """Images/s of this process doing what a worker does for uint8 input: RGB CHW -> BGR HWC,
    ``cv2.imencode`` with the sink's parameters, write the file."""
    import cv2

    from .._codecs import encode_params, get_codec

    params: list[int] = []
    for flag, value in encode_params(get_codec(fmt), None):
        params += [getattr(cv2, flag), value]
    folder = scratch_folder(folder)
    folder.mkdir(parents=True)

    def one(i: int, name: str) -> None:
        bgr = np.ascontiguousarray(images[i].transpose(1, 2, 0)[..., ::-1])
        ok, data = cv2.imencode(f".{fmt}", bgr, params)
        if not ok:
            raise RuntimeError(f"cv2.imencode failed for .{fmt}")
        with open(folder / f"{name}.{fmt}", "wb") as handle:
            handle.write(data.tobytes())

    one(0, "warmup")
    with Stopwatch() as watch:
        for i in range(len(images)):
            one(i, f"{i:08d}")
    written = count_files(folder, f".{fmt}") - 1
    if written != len(images):
        raise RuntimeError(f"single-process baseline wrote {written} of {len(images)} images")
    return len(images) / watch.seconds


def sink_rate(images: np.ndarray, fmt: str, batch: int, workers: int, folder: Path,
              repeat: int = 1, warmup_passes: int | None = None,
              **sink_options: Any) -> dict[str, Any]:
    """Images/s of an AsyncImageSink with ``workers`` draining ``images`` (``repeat`` times),
    submitted as fast as possible and timed from the first submit to the end of ``flush``.

    Not timed: worker start-up and ``warmup_passes`` (default: as many as are timed) over
    ``images``. As in a long-running sink, the buffer's shared pages that the timed passes
    reach are then populated and mapped in every process; a fresh sink pays that once, see
    docs/benchmarks.md. Long runs (``--root``) amortise it and warm up with one pass."""
    from .. import AsyncImageSink

    folder = scratch_folder(folder)
    sink = AsyncImageSink(folder, workers=workers, format=fmt, name="{index:08d}", **sink_options)
    passes = repeat if warmup_passes is None else warmup_passes
    warmup = len(images) * passes
    try:
        for r in range(passes):
            for first in range(0, len(images), batch):
                stop = min(first + batch, len(images))
                sink.submit(images[first:stop], names=[f"warmup{r}-{i}" for i in range(first, stop)])
        sink.flush()
        with Stopwatch() as watch:
            for _ in range(repeat):
                for first in range(0, len(images), batch):
                    sink.submit(images[first:first + batch])
            sink.flush()
        blocked = sink.stats.blocked_seconds
    finally:
        sink.close()
    written = count_files(folder, f".{fmt}") - warmup
    total = len(images) * repeat
    return {"images_per_second": total / watch.seconds, "written": written, "expected": total,
            "blocked_seconds": blocked}


def throughput_images(case: str, count: int) -> np.ndarray:
    """uint8 RGB NCHW images for one throughput case."""
    _, size, _ = THROUGHPUT_CASES[case]
    return to_uint8(smooth_images(count, size, seed=3))


def scenario3(config: Config, log: Log, max_workers: int | None = None) -> dict[str, Any]:
    """Drain throughput with 1..N workers (N = usable cores) vs one process."""
    top = max_workers or _defaults.usable_cores()
    out: dict[str, Any] = {"workers": list(range(1, top + 1)), "cases": {}}
    images = {case: throughput_images(case, n) for case, n in config.throughput_images.items()}
    per_round: dict[str, list[dict[str, Any]]] = {case: [] for case in images}
    for r in range(config.rounds):
        for case, data in images.items():
            fmt, _, batch = THROUGHPUT_CASES[case]
            folder = config.work / f"throughput-{case}"
            row: dict[str, Any] = {"single_process": single_process_rate(data, fmt, folder)}
            for k in range(1, top + 1):
                result = sink_rate(data, fmt, batch, k, folder)
                if result["written"] != result["expected"]:
                    raise RuntimeError(f"{case} with {k} workers wrote {result['written']} "
                                       f"of {result['expected']}")
                row[f"w{k}"] = result["images_per_second"]
                row[f"eff_w{k}"] = result["images_per_second"] / (k * row["single_process"])
            per_round[case].append(row)
            log(f"  round {r + 1}/{config.rounds} {case:<9} single {row['single_process']:7.1f}/s  "
                + "  ".join(f"w{k} {row[f'w{k}']:7.1f}/s ({row[f'eff_w{k}']:.2f})"
                            for k in range(1, top + 1)))
    for case, rows in per_round.items():
        fmt, size, batch = THROUGHPUT_CASES[case]
        out["cases"][case] = {"format": fmt, "size": size, "batch": batch, "images": len(images[case]),
                              "summary": summarize_rounds(rows, rows[0].keys()), "rounds": rows}
    return out


# ---------------------------------------------------------------- scenario 4: submit cost
SUBMIT_SHAPES = {"1 MB": (1, 3, 288, 288), "12 MB": (16, 3, 256, 256), "50 MB": (16, 3, 512, 512)}


def scenario4(config: Config, log: Log) -> dict[str, Any]:
    """``submit`` of an idle sink (flushed before each call) vs ``np.copyto`` into a warm
    destination of the same bytes: the physical floor of the CPU path."""
    import torch

    from .. import AsyncImageSink

    sources = {label: torch.from_numpy(smooth_images(shape[0], shape[2], seed=5))
               for label, shape in SUBMIT_SHAPES.items()}
    folder = config.work / "submit"
    folder = scratch_folder(folder)
    per_round: dict[str, list[dict[str, float]]] = {label: [] for label in sources}
    sink = AsyncImageSink(folder, max_buffer_bytes=128 * MIB, name="{index:08d}")
    try:
        for r in range(config.rounds):
            for label, tensor in sources.items():
                array = tensor.numpy()
                destination = np.ones_like(array)
                copies, submits = [], []
                for _ in range(config.submit_reps):
                    with Stopwatch() as copy:
                        np.copyto(destination, array)
                    copies.append(copy.seconds)
                    sink.flush()
                    with Stopwatch() as submit:
                        sink.submit(tensor)
                    submits.append(submit.seconds)
                row = {"bytes": float(array.nbytes),
                       "memcpy_ms": float(np.median(copies)) * 1e3,
                       "submit_ms": float(np.median(submits)) * 1e3}
                row["ratio"] = row["submit_ms"] / row["memcpy_ms"]
                row["beyond_copy_ms"] = row["submit_ms"] - row["memcpy_ms"]
                row["memcpy_gb_s"] = array.nbytes / (row["memcpy_ms"] / 1e3) / 1e9
                per_round[label].append(row)
                log(f"  round {r + 1}/{config.rounds} {label:<6} memcpy {row['memcpy_ms']:.3f} ms, "
                    f"submit {row['submit_ms']:.3f} ms, ratio {row['ratio']:.2f}")
        sink.flush()
        stats = sink.stats
    finally:
        sink.close()
    written = count_files(folder, ".png")
    return {"reps": config.submit_reps, "written": written, "expected": stats.submitted,
            "sizes": {label: {"shape": list(SUBMIT_SHAPES[label]),
                              "summary": summarize_rounds(rows, rows[0].keys()), "rounds": rows}
                      for label, rows in per_round.items()}}


# ---------------------------------------------------------------- scenario 5: memory bound
def flood(on_full: str, batches: int, buffer_bytes: int, data: Any, folder: Path) -> dict[str, Any]:
    """Submit ``batches`` copies of ``data`` with no pause into a small buffer."""
    from .. import AsyncImageSink

    folder = scratch_folder(folder)
    sink = AsyncImageSink(folder, max_buffer_bytes=buffer_bytes, on_full=on_full, name="{index:08d}")
    try:
        sink.worker_modules()  # answered from each worker's main loop: its imports are done
        with RssSampler(interval=0.01) as rss:
            with Stopwatch() as watch:
                for _ in range(batches):
                    sink.submit(data)
            sink.flush()
        stats = sink.stats
    finally:
        sink.close()
    written = count_files(folder, ".png")
    # Shared pages may be counted once per process that maps them (see RssSampler).
    bound = rss.baseline_bytes + (1 + stats.workers) * buffer_bytes
    return {"submitted": stats.submitted, "written": stats.written, "dropped": stats.dropped,
            "failed": stats.failed, "files": written, "submit_loop_seconds": watch.seconds,
            "blocked_seconds": stats.blocked_seconds, "peak_buffered_bytes": stats.peak_buffered_bytes,
            "max_buffer_bytes": stats.max_buffer_bytes, "baseline_rss_bytes": rss.baseline_bytes,
            "peak_rss_bytes": rss.peak_bytes, "rss_bound_bytes": bound, "workers": stats.workers,
            "buffer_ok": stats.peak_buffered_bytes <= stats.max_buffer_bytes,
            "rss_ok": rss.peak_bytes <= bound,
            "accounted": stats.written + stats.dropped == stats.submitted and written == stats.written}


def scenario5(config: Config, log: Log) -> dict[str, Any]:
    """A producer far faster than the disk: bounded bytes, counted drops, no loss."""
    import torch

    data = torch.from_numpy(smooth_images(config.batch, config.size, seed=9))
    per_mode: dict[str, list[dict[str, Any]]] = {"block": [], "drop": []}
    for r in range(config.rounds):
        for mode in per_mode:
            row = flood(mode, config.flood_batches, config.flood_buffer_bytes, data,
                        config.work / f"flood-{mode}")
            per_mode[mode].append(row)
            log(f"  round {r + 1}/{config.rounds} on_full={mode:<5} written {row['written']}, dropped "
                f"{row['dropped']}, peak buffered {row['peak_buffered_bytes'] / MIB:.1f} of "
                f"{row['max_buffer_bytes'] / MIB:.0f} MiB, peak RSS {row['peak_rss_bytes'] / MIB:.0f} MiB "
                f"(bound {row['rss_bound_bytes'] / MIB:.0f})")
    numeric = ["written", "dropped", "submit_loop_seconds", "blocked_seconds", "peak_buffered_bytes",
               "peak_rss_bytes", "rss_bound_bytes"]
    return {"batches": config.flood_batches, "batch_bytes": int(data.numpy().nbytes),
            "max_buffer_bytes": config.flood_buffer_bytes,
            "modes": {mode: {"summary": summarize_rounds(rows, numeric),
                             "all_ok": all(r["buffer_ok"] and r["rss_ok"] and r["accounted"] for r in rows),
                             "rounds": rows}
                      for mode, rows in per_mode.items()}}


SCENARIOS: dict[int, tuple[str, Callable[[Config, Log], dict[str, Any]]]] = {
    1: ("scenario1_gpu_bound", scenario1),
    2: ("scenario2_cpu_bound", scenario2),
    3: ("scenario3_throughput", scenario3),
    4: ("scenario4_submit_cost", scenario4),
    5: ("scenario5_memory_bound", scenario5),
    6: ("scenario6_encoders", encoders.scenario6),
    7: ("scenario7_generate", encoders.scenario7),
    8: ("scenario8_tensorboard", tb_loop.scenario8),
    9: ("scenario9_object_store", object_store.scenario9),
}
