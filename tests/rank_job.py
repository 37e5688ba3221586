"""A dataset job for the rank tests, run as a script once per rank (torchrun or RANK/WORLD_SIZE).

    python tests/rank_job.py OUT [--resume] [--fail-rank R] [--pause-rank R --pause-file F]
                                 [--bad-buffer]

Images are ``asyncdump.synthetic`` renders (16x16, seed 1), so any two runs of the same
indices write the same bytes. ``--fail-rank``: that rank's generator raises on its 3rd batch.
``--pause-rank``: that rank's generator creates ``--pause-file`` on its 3rd batch and then
waits forever (so a test can SIGKILL it mid-run, at a known point). ``--bad-buffer``: the
DatasetSink's construction fails after its process group exists; prints whether it is gone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from asyncdump import DatasetSink, synthetic, write_dataset

COUNT, SHARD_SIZE, BATCH = 240, 30, 10


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", default="tar")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--pause-rank", type=int, default=None)
    parser.add_argument("--pause-file", default=None)
    parser.add_argument("--bad-buffer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if args.bad_buffer:
        try:
            DatasetSink(args.out, count=COUNT, workers=1, max_buffer_bytes=0)
        except ValueError as exc:
            import torch.distributed as dist

            print(f"rank {rank} refused: {exc}; group left: {not dist.is_initialized()}")
            return 0
        return 1
    calls = 0

    def generate(indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
        nonlocal calls
        calls += 1
        if calls == 3 and rank == args.fail_rank:
            raise RuntimeError(f"generator of rank {rank} failed on purpose")
        if calls == 3 and rank == args.pause_rank:
            Path(args.pause_file).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        return synthetic.render(indices, seed=1, size=16, device="cpu")

    summary = write_dataset(generate, args.out, count=COUNT, batch_size=BATCH, mode=args.mode,
                            shard_size=SHARD_SIZE, workers=1, resume=args.resume,
                            job={"test": "rank_job"})
    print(f"rank {rank}: {summary.images} written, {summary.skipped} skipped, "
          f"complete {summary.complete}")
    return 0 if summary.complete and summary.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
