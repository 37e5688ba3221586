"""Scenarios 6 and 7: the two PNG encoders side by side, and ``asyncdump generate`` per encoder.

    6 encoders   per content (the bench's smooth images, the generator's shapes), per encoder:
                 encode only (one process), drain with 1 and 2 workers, mean file size; where
                 one image's time goes (conversion, encode, write + rename); and the float
                 drain against plain processes (the issue's "Done when" ratios)
    7 generate   ``asyncdump generate`` images/s per encoder (files and tar, 256² and 32²), and
                 the generating process's own CPU time per image (rendering excluded)

Every round runs every measurement (order rotated); ratios are taken per round, then the
median of the rounds is reported.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._protocol import FloatRule, ImageSpec
from .._worker import write_temp
from .measure import Stopwatch, scratch_folder, smooth_images, summarize_rounds, to_uint8

Log = Callable[[str], None]
ENCODERS = ("fpng", "opencv")
SPEC_RULE = FloatRule((0.0, 1.0), None, None)


def content(kind: str, count: int, size: int) -> np.ndarray:
    """uint8 RGB NCHW images: ``bench`` (smooth waves + grain) or ``shapes`` (the generator's)."""
    if kind == "bench":
        return to_uint8(smooth_images(count, size, seed=3))
    from .. import synthetic

    images, _ = synthetic.render(list(range(count)), seed=0, size=size)
    return np.ascontiguousarray(images.numpy())


def encode_one(hwc_rgb: np.ndarray, encoder: str) -> memoryview:
    """Encode one contiguous HWC RGB uint8 image as the worker would."""
    if encoder == "fpng":
        import fpng

        return memoryview(fpng.from_ndarray(hwc_rgb))
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(hwc_rgb[..., ::-1]))
    assert ok
    return data.data.cast("B")


def encode_only(images: np.ndarray, encoder: str) -> dict[str, float]:
    """images/s of encoding alone (layout made beforehand, untimed) and the mean file size."""
    import cv2

    if encoder == "fpng":
        ready = [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in images]
    else:
        ready = [np.ascontiguousarray(img.transpose(1, 2, 0)[..., ::-1]) for img in images]
    sizes = []
    with Stopwatch() as watch:
        for img in ready:
            if encoder == "fpng":
                import fpng

                sizes.append(len(fpng.from_ndarray(img)))
            else:
                sizes.append(int(cv2.imencode(".png", img)[1].size))
    return {"images_per_second": len(images) / watch.seconds, "mean_bytes": float(np.mean(sizes))}


def stage_times(float_images: np.ndarray, folder: Path) -> dict[str, float]:
    """Median ms per image of each step a worker takes for a float image (same code). Each
    conversion reads an image not read before (not in the cache), as in a worker; the encode
    and the write then use the result, warm, as in a worker."""
    import hashlib

    from .._convert import to_image

    c, h, w = float_images.shape[1:]
    spec = ImageSpec(c, h, w, "float32", "nchw", converted=False, rule=SPEC_RULE)
    folder = scratch_folder(folder)
    folder.mkdir(parents=True)
    steps: dict[str, list[float]] = {k: [] for k in (
        "conversion (fpng layout)", "conversion (opencv layout)", "encode fpng", "encode opencv",
        "write + rename (fpng file)", "sha256 (fpng file)")}
    raws = [np.ascontiguousarray(image).view(np.uint8).reshape(-1) for image in float_images]
    for i in range(0, len(raws) - 1, 2):
        # Each conversion reads an image not read before (as a worker does); which of the
        # two layouts goes first alternates, so neither always follows the previous write.
        for rgb_layout in ((True, False) if i % 4 == 0 else (False, True)):
            began = time.perf_counter()
            made = to_image(raws[i + rgb_layout], spec, rgb=rgb_layout)
            key = "conversion (fpng layout)" if rgb_layout else "conversion (opencv layout)"
            steps[key].append(time.perf_counter() - began)
            if rgb_layout:
                rgb = made
            else:
                bgr = made
        began = time.perf_counter()
        data = encode_one(rgb, "fpng")
        steps["encode fpng"].append(time.perf_counter() - began)
        began = time.perf_counter()
        import cv2

        cv2.imencode(".png", bgr)
        steps["encode opencv"].append(time.perf_counter() - began)
        began = time.perf_counter()
        temp, final = folder / f".{i}.tmp", folder / f"{i}.png"
        write_temp(str(temp), data, fsync=False)  # the worker's own write
        os.replace(temp, final)
        steps["write + rename (fpng file)"].append(time.perf_counter() - began)
        began = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        steps["sha256 (fpng file)"].append(time.perf_counter() - began)
    return {k: float(np.median(v)) * 1e3 for k, v in steps.items()}


# The fast contenders drain 160 float images in about 0.1 s: three passes make each timing
# long enough that a scheduler hiccup is not a third of it (0.45-0.84 across rounds with one).
DRAIN_REPEAT = 3
_FORKED: dict[str, np.ndarray] = {}  # images the pool's processes inherit (never pickled)


def _plain_opencv(name: str, start: int, stop: int, folder: str, repeat: int) -> int:
    """One plain process: float -> uint8 (round half up), BGR HWC, ``cv2.imencode``, write."""
    import cv2

    cv2.setNumThreads(1)
    for r in range(repeat):
        for i, image in enumerate(_FORKED[name][start:stop]):
            u8 = np.floor(image * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
            ok, data = cv2.imencode(".png", np.ascontiguousarray(u8.transpose(1, 2, 0)[..., ::-1]))
            if not ok:
                raise RuntimeError("cv2.imencode('.png') failed")
            with open(os.path.join(folder, f"{r}-{i:06d}.png"), "wb") as handle:
                handle.write(data.tobytes())
    return (stop - start) * repeat


def _plain_sink_work(name: str, start: int, stop: int, folder: str, repeat: int) -> int:
    """One plain process doing the sink's own work: its conversion, fpng, write + rename."""
    from .._convert import to_image

    images = _FORKED[name][start:stop]
    c, h, w = images.shape[1:]
    spec = ImageSpec(c, h, w, "float32", "nchw", converted=False, rule=SPEC_RULE)
    for r in range(repeat):
        for i, image in enumerate(images):
            rgb = to_image(np.ascontiguousarray(image).view(np.uint8).reshape(-1), spec, rgb=True)
            data = encode_one(rgb, "fpng")
            temp = os.path.join(folder, f".{r}-{i:06d}.tmp")
            write_temp(temp, data, fsync=False)  # the worker's own write
            os.replace(temp, os.path.join(folder, f"{r}-{i:06d}.png"))
    return len(images) * repeat


def plain_processes_rate(pool: concurrent.futures.ProcessPoolExecutor, processes: int,
                         job: Callable[[str, int, int, str, int], int], name: str,
                         folder: Path, repeat: int = 1) -> float:
    """images/s of ``processes`` plain processes each doing ``job`` ``repeat`` times on its
    share of the images ``_FORKED[name]`` (inherited at fork: only indices cross the pipe)."""
    folder = scratch_folder(folder)
    count = len(_FORKED[name])
    bounds = np.linspace(0, count, processes + 1).astype(int)
    folders = [folder / str(k) for k in range(processes)]
    for f in folders:
        f.mkdir(parents=True)
    with Stopwatch() as watch:
        done = sum(f.result() for f in [
            pool.submit(job, name, int(bounds[k]), int(bounds[k + 1]), str(folders[k]), repeat)
            for k in range(processes)])
    assert done == count * repeat
    return count * repeat / watch.seconds


def scenario6(config: Any, log: Log) -> dict[str, Any]:
    """The encoders side by side, where the time goes, and the float drain vs plain processes."""
    from .scenarios import sink_rate

    quick = config.rounds <= 3 and config.throughput_images.get("png-256", 192) < 100
    count = 48 if quick else 160
    size = 256
    images = {kind: content(kind, count, size) for kind in ("bench", "shapes")}
    floats = smooth_images(count, size, seed=4)
    work = config.work / "encoders"
    rows: dict[str, list[dict[str, float]]] = {kind: [] for kind in images}
    drains: list[dict[str, float]] = []
    stages: list[dict[str, float]] = []
    _FORKED["floats"] = floats  # before the pool forks (spawn would re-create nothing: Linux only)
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        list(pool.map(abs, [1, 2]))  # start both processes before timing
        for r in range(config.rounds):
            for kind, data in images.items():
                row: dict[str, float] = {}
                for encoder in (ENCODERS if r % 2 == 0 else ENCODERS[::-1]):
                    one = encode_only(data, encoder)
                    row[f"encode_{encoder}"] = one["images_per_second"]
                    row[f"bytes_{encoder}"] = one["mean_bytes"]
                    for k in (1, 2):
                        row[f"w{k}_{encoder}"] = sink_rate(
                            data, "png", 16, k, work / f"{kind}-{encoder}-{k}",
                            png_encoder=encoder)["images_per_second"]
                row["encode_ratio"] = row["encode_fpng"] / row["encode_opencv"]
                row["size_ratio"] = row["bytes_fpng"] / row["bytes_opencv"]
                for k in (1, 2):
                    row[f"w{k}_ratio"] = row[f"w{k}_fpng"] / row[f"w{k}_opencv"]
                rows[kind].append(row)
                log(f"  round {r + 1}/{config.rounds} {kind:<6} encode fpng {row['encode_fpng']:.0f}/s "
                    f"opencv {row['encode_opencv']:.0f}/s; w1 {row['w1_fpng']:.0f} vs "
                    f"{row['w1_opencv']:.0f}/s; w2 {row['w2_fpng']:.0f} vs {row['w2_opencv']:.0f}/s; "
                    f"size x{row['size_ratio']:.2f}")
            drain: dict[str, float] = {}
            drain["plain_opencv"] = plain_processes_rate(pool, 1, _plain_opencv, "floats", work / "plain")
            drain["sink_w1"] = sink_rate(floats, "png", 16, 1, work / "float-w1",
                                         repeat=DRAIN_REPEAT)["images_per_second"]
            drain["plain_sink_work_x2"] = plain_processes_rate(
                pool, 2, _plain_sink_work, "floats", work / "plain2", repeat=DRAIN_REPEAT)
            drain["sink_w2"] = sink_rate(floats, "png", 16, 2, work / "float-w2",
                                         repeat=DRAIN_REPEAT)["images_per_second"]
            drain["w1_vs_plain_opencv"] = drain["sink_w1"] / drain["plain_opencv"]
            drain["w2_vs_two_plain"] = drain["sink_w2"] / drain["plain_sink_work_x2"]
            drains.append(drain)
            log(f"  round {r + 1}/{config.rounds} float drain: w1 {drain['sink_w1']:.0f}/s = "
                f"{drain['w1_vs_plain_opencv']:.2f}x plain OpenCV; w2 {drain['sink_w2']:.0f}/s = "
                f"{drain['w2_vs_two_plain']:.2f} of two plain processes")
            stages.append(stage_times(floats[:32], work / "stages"))
    return {"size": size, "images": count,
            "contents": {kind: {"summary": summarize_rounds(r_, r_[0].keys()), "rounds": r_}
                         for kind, r_ in rows.items()},
            "float_drain": {"summary": summarize_rounds(drains, drains[0].keys()), "rounds": drains},
            "stages_ms": {"summary": summarize_rounds(stages, stages[0].keys()), "rounds": stages}}


# ---------------------------------------------------------------- scenario 7: generate
GENERATE_CASES = {"256 files": (256, "files"), "256 tar": (256, "tar"), "32 tar": (32, "tar"),
                  "32 files": (32, "files")}
_RATE = re.compile(r"([\d.]+) images/s")


def generate_rate(out: Path, count: int, size: int, mode: str, encoder: str) -> float:
    """images/s that ``asyncdump generate`` prints (default workers, CPU rendering)."""
    out = scratch_folder(out)
    result = subprocess.run(
        [sys.executable, "-m", "asyncdump", "generate", "--out", str(out), "--count", str(count),
         "--size", str(size), "--mode", mode, "--png-encoder", encoder, "--no-progress",
         "--device", "cpu"], capture_output=True, text=True, timeout=600)
    match = _RATE.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"asyncdump generate failed: {result.stderr[-2000:]}")
    return float(match.group(1))


def parent_cpu(out: Path, count: int, size: int, mode: str) -> dict[str, float]:
    """This process runs what ``generate`` runs (default encoder) and measures its own CPU:
    seconds per image in total, in rendering, and the rest (submit, committer, collector)."""
    import torch

    from .. import synthetic
    from ..dataset import DatasetSink

    torch.set_num_threads(1)
    out = scratch_folder(out)
    render_cpu = 0.0
    began = time.process_time()
    with DatasetSink(out, count=count, mode=mode, job={"size": size}) as sink:
        for indices in sink.pending(synthetic.default_batch_size(size)):
            before = time.thread_time()
            images, metadata = synthetic.render(indices, seed=0, size=size)
            render_cpu += time.thread_time() - before
            sink.submit(indices, images, metadata)
    total = time.process_time() - began
    return {"parent_cpu_ms": total / count * 1e3, "render_cpu_ms": render_cpu / count * 1e3,
            "parent_cpu_beyond_render_ms": (total - render_cpu) / count * 1e3}


def scenario7(config: Any, log: Log) -> dict[str, Any]:
    """``asyncdump generate`` per encoder, rounds interleaved; the parent's CPU per image."""
    quick = config.rounds <= 3 and config.throughput_images.get("png-256", 192) < 100
    # Long enough that worker start-up (~0.3 s) is a small part of a run: at 1,500 images it
    # was a quarter of the fpng run at 256² and compressed the ratio from 2.35 to 1.68.
    counts = {256: 300 if quick else 6000, 32: 4000 if quick else 40000}
    work = config.work / "generate"
    per_case: dict[str, list[dict[str, float]]] = {case: [] for case in GENERATE_CASES}
    cpu: dict[str, list[dict[str, float]]] = {"256 files": [], "256 tar": []}
    for r in range(config.rounds):
        for case, (size, mode) in GENERATE_CASES.items():
            row = {}
            for encoder in (ENCODERS if r % 2 == 0 else ENCODERS[::-1]):
                row[encoder] = generate_rate(work / "out", counts[size], size, mode, encoder)
            row["ratio"] = row["fpng"] / row["opencv"]
            per_case[case].append(row)
            log(f"  round {r + 1}/{config.rounds} generate {case:<9} fpng {row['fpng']:.0f}/s, "
                f"opencv {row['opencv']:.0f}/s, x{row['ratio']:.2f}")
        for case in cpu:
            size, mode = GENERATE_CASES[case]
            cpu[case].append(parent_cpu(work / "cpu", counts[size], size, mode))
            log(f"  round {r + 1}/{config.rounds} parent CPU {case}: "
                f"{cpu[case][-1]['parent_cpu_beyond_render_ms']:.3f} ms/image beyond rendering")
    return {"counts": {str(k): v for k, v in counts.items()},
            "cases": {case: {"summary": summarize_rounds(rows, rows[0].keys()), "rounds": rows}
                      for case, rows in per_case.items()},
            "parent_cpu": {case: {"summary": summarize_rounds(rows, rows[0].keys()), "rounds": rows}
                           for case, rows in cpu.items()}}
