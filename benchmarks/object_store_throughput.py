"""Files-mode uploads to S3: AsyncImageSink("s3://...") vs a plain thread pool of PUTs.

    .venv/bin/python benchmarks/object_store_throughput.py [--count 300] [--size 256] [--workers 2]

Starts moto's server (``moto_server``) as its own process on 127.0.0.1 and measures, in turn
(interleaved rounds, medians printed):
    sink      AsyncImageSink("s3://bench/...", workers=W): submit pre-rendered batches, flush
              (workers encode PNG and PUT each file; the sink was warmed by one image first)
    pool      the same files encoded beforehand (untimed), one PUT each from a thread pool of
              W threads sharing one s3fs client with the sink's settings
    serial    the same PUTs from one thread
    server    the server's own ceiling: 8 threads PUTting 1-byte objects
    folder    the sink of the first line with a local folder as root (the parent's CPU per
              image is printed for it and for the s3:// sink)
The server shares this machine's cores with the client, so the ceiling is the server's too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import cv2
import numpy as np

from asyncdump import AsyncImageSink, synthetic
from asyncdump._stores import open_destination


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                               "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):  # bounded: up to 20 s for the server to listen
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto_server did not start")


def put_all(store: Any, bucket: str, files: list[bytes], threads: int) -> float:
    prefix = uuid.uuid4().hex[:8]
    began = time.perf_counter()
    if threads == 1:
        for i, data in enumerate(files):
            store.fs.pipe_file(f"{bucket}/{prefix}/{i:08d}.png", data, mode="create")
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda item: store.fs.pipe_file(f"{bucket}/{prefix}/{item[0]:08d}.png",
                                                          item[1], mode="create"),
                          enumerate(files)))
    return len(files) / (time.perf_counter() - began)


def run_sink(root: str, batches: list[Any], workers: int, cpu: list[float]) -> float:
    """Images/s; appends the parent's CPU seconds per image (all its threads) to ``cpu``."""
    with AsyncImageSink(root, workers=workers) as sink:
        sink.submit(batches[0][:1]).result()  # workers import s3fs and connect: untimed
        began, cpu_began = time.perf_counter(), time.process_time()
        for batch in batches:
            sink.submit(batch)
        sink.flush()
        seconds = time.perf_counter() - began
        cpu.append((time.process_time() - cpu_began) / sum(len(b) for b in batches))
    return sum(len(b) for b in batches) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server, endpoint = start_server()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    try:
        store = open_destination("s3://bench", check=False)
        store.fs.mkdir("bench")
        images, _ = synthetic.render(list(range(args.count)), seed=0, size=args.size)
        batch = max(1, synthetic.default_batch_size(args.size))
        batches = [images[i:i + batch] for i in range(0, args.count, batch)]
        pixels = images.permute(0, 2, 3, 1).numpy()[..., ::-1]
        files = [cv2.imencode(".png", np.ascontiguousarray(p))[1].tobytes() for p in pixels]
        tiny = [b"x"] * args.count
        results: dict[str, list[float]] = {"sink": [], "pool": [], "serial": [], "server": [],
                                           "folder": []}
        cpu: dict[str, list[float]] = {"sink": [], "folder": []}
        for _ in range(args.rounds):
            results["sink"].append(run_sink(f"s3://bench/{uuid.uuid4().hex[:8]}", batches,
                                            args.workers, cpu["sink"]))
            with tempfile.TemporaryDirectory() as folder:
                results["folder"].append(run_sink(folder, batches, args.workers, cpu["folder"]))
            results["pool"].append(put_all(store, "bench", files, args.workers))
            results["serial"].append(put_all(store, "bench", files, 1))
            results["server"].append(put_all(store, "bench", tiny, 8))
        size_kib = statistics.mean(len(f) for f in files) / 1024
        print(f"{args.count} images {args.size}², PNG {size_kib:.0f} KiB each, W={args.workers}, "
              f"medians of {args.rounds} rounds (images/s):")
        for name, values in results.items():
            print(f"  {name:7s} {statistics.median(values):8.1f}")
        ratio = statistics.median(results["sink"]) / statistics.median(results["pool"])
        print(f"  sink / pool = {ratio:.2f}")
        for name, values in cpu.items():
            print(f"  parent CPU per image, {name}: {statistics.median(values) * 1e3:.3f} ms")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
