"""What ``asyncdump generate --generator`` costs over calling ``write_dataset`` directly.

    .venv/bin/python benchmarks/generator_overhead.py [--rounds 3] [--small 2000] [--large 10000]

Both run the same cheap generator (pre-made 32x32 images, one dict of metadata each) as a
fresh process, timed from launch to exit, with the same options (tar mode, batch 64, workers
W). Rounds interleave the two; medians are printed. The per-image cost is the slope between
the two counts, so a fixed start-up difference (argparse, the import) does not count per image.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GENERATOR = '''
import numpy as np
POOL = np.random.default_rng(0).integers(0, 256, (256, 3, 32, 32), dtype=np.uint8)
def make(indices):
    return POOL[[i % 256 for i in indices]], [{"label": i % 10} for i in indices]
'''


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="asyncdump-overhead-"))
    (work / "overhead_gen.py").write_text(GENERATOR)
    options = ["--mode", "tar", "--batch-size", "64", "--workers", str(args.workers)]
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for count in (args.small, args.large):
                cli = [sys.executable, "-m", "asyncdump", "generate", "--no-progress",
                       "--out", "cli", "--count", str(count), "--generator", "overhead_gen:make",
                       *options]
                api = [sys.executable, "-c",
                       "import overhead_gen; from asyncdump import write_dataset; "
                       f"write_dataset(overhead_gen.make, 'api', count={count}, batch_size=64, "
                       f"mode='tar', workers={args.workers}, job={{'generator': 'overhead_gen:make'}})"]
                for name, command in (("cli", cli), ("api", api)):
                    shutil.rmtree(work / name, ignore_errors=True)
                    times.setdefault((name, count), []).append(timed(command, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {key: statistics.median(value) for key, value in times.items()}
    for count in (args.small, args.large):
        cli, api = median[("cli", count)], median[("api", count)]
        print(f"{count:>7} images: generate --generator {cli:6.2f} s, write_dataset {api:6.2f} s, "
              f"difference {cli - api:+.3f} s ({(cli - api) / count * 1e6:+.1f} us/image)")
    slope = ((median[("cli", args.large)] - median[("api", args.large)])
             - (median[("cli", args.small)] - median[("api", args.small)])) / (args.large - args.small)
    print(f"per-image cost of --generator over write_dataset (slope): {slope * 1e6:+.2f} us/image; "
          f"medians of {args.rounds} rounds, workers {args.workers}")
    print(f"checking the first batch before anything is written (once per run): "
          f"{check_cost() * 1e6:.2f} us/image of that batch")


def check_cost(batch: int = 64, repeats: int = 2000) -> float:
    """Seconds per image of ``_user_generator.split`` on a batch like the generator's."""
    import numpy as np

    from asyncdump._codecs import get_codec
    from asyncdump._user_generator import split

    images = np.zeros((batch, 3, 32, 32), np.uint8)
    indices = list(range(batch))
    result = (images, [{"label": i % 10} for i in indices])
    codec = get_codec("png")
    start = time.perf_counter()
    for _ in range(repeats):
        split(result, indices, codec)
    return (time.perf_counter() - start) / (repeats * batch)


if __name__ == "__main__":
    main()
