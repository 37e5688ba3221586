"""``asyncdump generate``: a synthetic dataset (shapes on textures), files or tar shards.

Works unchanged under ``torchrun --nproc_per_node=K``: each rank renders and writes its own
shards; rank 0 merges the manifests at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

from ._codecs import CODECS
from ._encoders import PNG_ENCODERS
from ._errors import AsyncDumpError

PROG = "asyncdump generate"


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    for name in ("count", "size", "shard_size", "batch_size", "shard_bytes", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.format.lower() not in CODECS:
        return _fail(f"unknown --format {args.format!r}; choose one of {', '.join(sorted(CODECS))}")
    from . import synthetic

    if args.size > synthetic.MAX_SIZE:
        return _fail(f"--size must be at most {synthetic.MAX_SIZE}, got {args.size}")

    import torch

    from .dataset import DatasetSink

    owns_group = False
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
            owns_group = True
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device = f"cuda:{local % max(1, torch.cuda.device_count())}"
    else:
        torch.set_num_threads(1)  # the other cores encode
    batch_size = args.batch_size or synthetic.default_batch_size(args.size)
    try:
        sink = DatasetSink(
            args.out, count=args.count, format=args.format, quality=args.quality,
            mode=args.mode, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
            workers=args.workers, resume=args.resume, fsync=args.fsync,
            png_encoder=args.png_encoder,
            job={"generator": synthetic.GENERATOR_ID, "seed": args.seed, "size": args.size},
            progress=not args.no_progress and os.environ.get("RANK", "0") == "0")
    except (AsyncDumpError, ValueError, TypeError, OSError, RuntimeError, ImportError) as exc:
        if owns_group:
            torch.distributed.destroy_process_group()
        return _fail(str(exc).splitlines()[0])
    with sink:
        for indices in sink.pending(batch_size):
            images, metadata = synthetic.render(indices, seed=args.seed, size=args.size,
                                                device=device)
            sink.submit(indices, images, metadata)
    summary = sink.summary
    assert summary is not None
    if owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if sink.rank == 0:
        print(f"{PROG}: {summary.images} images written ({summary.skipped} already there), "
              f"{summary.bytes / 1e6:.1f} MB, {summary.images_per_second:.0f} images/s, "
              f"{summary.failed} failed, {summary.seconds:.1f} s, {summary.mode} mode, "
              f"{sink.world} rank(s), device {device} -> {summary.root}"
              + ("" if summary.complete else " (INCOMPLETE: rerun with --resume)"))
    return 0 if summary.failed == 0 and summary.complete else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate", help="write a synthetic dataset (shapes on textures) with a manifest",
        description="Write COUNT synthetic images (coloured shapes on textured backgrounds, "
                    "labels and boxes in the manifest) as files or tar shards. Restartable "
                    "with --resume; runs unchanged under torchrun.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--format", default="png", help="png, jpg, webp, bmp, tiff (default png)")
    parser.add_argument("--quality", type=int, default=None,
                        help="jpg/webp quality 1..100, png compression 0..9")
    parser.add_argument("--png-encoder", choices=PNG_ENCODERS, default="auto",
                        help="auto: fpng for RGB PNG (fast, ~1.1-1.2x larger files), else OpenCV; "
                             "opencv: smaller PNG files, slower (default auto)")
    parser.add_argument("--mode", choices=("files", "tar"), default="files",
                        help="one file per image in sub-folders, or tar shards (default files)")
    parser.add_argument("--seed", type=int, default=0, help="images are a function of (seed, index)")
    parser.add_argument("--workers", type=int, default=None,
                        help="encoder processes per rank (default: usable cores per rank - 1)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per tar shard, and per sub-folder in files mode (default 1000)")
    parser.add_argument("--shard-bytes", type=int, default=None,
                        help="tar mode: also split a shard into parts below this many bytes")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images rendered per batch (default: about 2 MPixel)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run: skip the indices already in the manifest")
    parser.add_argument("--fsync", action="store_true",
                        help="fsync files, shards and manifest lines (survives power loss)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
