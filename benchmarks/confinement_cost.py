"""What root confinement and the name checks cost: ``submit`` and a worker's per-image write.

    PYTHONPATH=. python benchmarks/confinement_cost.py submit      # this tree's submit
    PYTHONPATH=/old/tree python benchmarks/confinement_cost.py submit   # side by side
    PYTHONPATH=. python benchmarks/confinement_cost.py write       # the three ways to write

``submit``: median time of one ``submit`` of 8 RGB 32x32 uint8 images (the default template,
``names=``, and a template with a sub-folder), the median over ``--rounds`` rounds of
``--calls`` calls each; the sink is flushed between rounds, outside the timing.
``write``: median time of one small file written the way a worker does, by absolute path
(temp file + ``os.replace``, the old way) or relative to the folder's descriptor (``openat`` +
``renameat``, with ``overwrite=True``; ``renameat2(RENAME_NOREPLACE)`` with ``overwrite=False``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np


def time_submit(calls: int, rounds: int) -> None:
    from asyncdump import AsyncImageSink

    batch = np.zeros((8, 3, 32, 32), np.uint8)
    cases: dict[str, tuple[str, Callable[[AsyncImageSink, int], object]]] = {
        "default template": ("{index:08d}", lambda s, i: s.submit(batch)),
        "names=": ("{index:08d}", lambda s, i: s.submit(batch, names=[f"n{i}_{k}" for k in range(8)])),
        "{step}/{index}": ("{step}/{index:08d}", lambda s, i: s.submit(batch, step=i // 100)),
    }
    for label, (template, call) in cases.items():
        folder = tempfile.mkdtemp(prefix="asyncdump-cost-")
        medians = []
        with AsyncImageSink(folder, workers=1, name=template, max_buffer_bytes=256 << 20) as sink:
            for r in range(rounds):
                times = []
                for i in range(r * calls, (r + 1) * calls):
                    began = time.perf_counter()
                    call(sink, i)
                    times.append(time.perf_counter() - began)
                medians.append(statistics.median(times))
                sink.flush()
        shutil.rmtree(folder)
        print(f"submit, {label:17s}: {statistics.median(medians) * 1e6:6.1f} us "
              f"(round medians {min(medians) * 1e6:.1f}..{max(medians) * 1e6:.1f})")


def time_write(files: int, rounds: int) -> None:
    from asyncdump import _worker
    from asyncdump._fsutil import Folders, rename_noreplace

    data = memoryview(os.urandom(4000))
    folder = tempfile.mkdtemp(prefix="asyncdump-cost-")
    sub = os.path.join(folder, "sub")
    os.mkdir(sub)
    folders = Folders(folder)

    def by_path(i: int) -> None:
        temp, final = os.path.join(sub, f".p{i}.tmp"), os.path.join(sub, f"p{i}.png")
        _worker.write_temp(temp, data, False)
        os.replace(temp, final)

    def by_fd(i: int) -> None:
        fd = folders.fd("sub")
        _worker.write_temp(f".f{i}.tmp", data, False, fd)
        os.replace(f".f{i}.tmp", f"f{i}.png", src_dir_fd=fd, dst_dir_fd=fd)

    def by_fd_noreplace(i: int) -> None:
        fd = folders.fd("sub")
        _worker.write_temp(f".n{i}.tmp", data, False, fd)
        rename_noreplace(f".n{i}.tmp", f"n{i}.png", fd)

    ways = {"path + os.replace": by_path, "dir fd + renameat": by_fd,
            "dir fd + renameat2 NOREPLACE": by_fd_noreplace}
    results: dict[str, list[float]] = {label: [] for label in ways}
    for r in range(rounds):  # interleaved, so that the file system's state is shared fairly
        for label, way in ways.items():
            times = []
            for i in range(r * files, (r + 1) * files):
                began = time.perf_counter()
                way(i)
                times.append(time.perf_counter() - began)
            results[label].append(statistics.median(times))
    folders.close()
    shutil.rmtree(folder)
    for label, medians in results.items():
        print(f"write, {label:28s}: {statistics.median(medians) * 1e6:6.1f} us "
              f"(round medians {min(medians) * 1e6:.1f}..{max(medians) * 1e6:.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["submit", "write"])
    parser.add_argument("--calls", type=int, default=500, help="calls (or files) per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.what == "submit":
        time_submit(args.calls, args.rounds)
    else:
        time_write(args.calls, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
