"""``asyncdump generate``: a dataset from the built-in synthetic generator (shapes on
textures) or from ``--generator MODULE:FUNCTION``, as files or tar shards.

Works unchanged under ``torchrun --nproc_per_node=K``: each rank renders and writes its own
shards; rank 0 merges the manifests at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._codecs import CODECS, get_codec
from .._encoders import PNG_ENCODERS
from .._errors import AsyncDumpError
from .._stores import is_url

PROG = "asyncdump generate"


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


BUILTIN_DEFAULTS = {"size": 64, "seed": 0, "device": "auto"}  # the built-in generator's options
USER_BATCH_SIZE = 64  # --generator's default --batch-size, as write_dataset's


@dataclass
class _Plan:
    """What one generator needs from the shared part of ``run``."""

    job: dict[str, Any]  # DatasetSink's job
    write: Callable[[Any], None]  # writes every pending index of the open sink
    source: str  # for the summary line
    owns_group: bool
    before: Any = None  # --generator: --out before the run (undone when no image was written)


def run(args: argparse.Namespace) -> int:
    for name in ("count", "size", "shard_size", "batch_size", "shard_bytes", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.format.lower() not in CODECS:
        return _fail(f"unknown --format {args.format!r}; choose one of {', '.join(sorted(CODECS))}")
    storage_options = _storage_options(args.storage_option)
    if isinstance(storage_options, str):
        return _fail(storage_options)
    if storage_options is not None and not is_url(args.out):
        return _fail(f"--storage-option is only for an object-store --out (scheme://...), "
                     f"got {args.out!r}")
    if args.retry_seconds is not None and not is_url(args.out):
        return _fail(f"--retry-seconds is only for an object-store --out (scheme://...), "
                     f"got {args.out!r}")
    plan = _user_plan(args) if args.generator is not None else _builtin_plan(args)
    if isinstance(plan, int):
        return plan
    from .._generator_feed import GeneratorFailed, undo
    from ..dataset import DatasetSink

    try:
        sink = DatasetSink(
            args.out, count=args.count, format=args.format, quality=args.quality,
            mode=args.mode, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
            workers=args.workers, resume=args.resume, fsync=args.fsync,
            png_encoder=args.png_encoder, job=plan.job, storage_options=storage_options,
            retry_seconds=args.retry_seconds,
            progress=not args.no_progress and os.environ.get("RANK", "0") == "0")
    except (AsyncDumpError, ValueError, TypeError, OSError, RuntimeError, ImportError) as exc:
        _release_ranks(plan.owns_group)
        return _fail(str(exc).splitlines()[0])
    try:
        with sink:
            plan.write(sink)
    except GeneratorFailed as exc:  # only from --generator
        if exc.first:  # no rank wrote an image: leave --out as it was
            sink.ranks.barrier()
            if sink.rank == 0 and plan.before is not None:
                undo(plan.before)
            elif sink._store is not None:  # an object-store prefix: as it was, too
                sink._store.undo()
        else:
            written = sink.summary.images if sink.summary is not None else 0
            exc.args = (f"{exc}; {written} images written{' by this rank' if sink.world > 1 else ''} "
                        "are kept in the manifest: fix it and rerun with --resume",)
        _release_ranks(plan.owns_group)
        print(f"{PROG}: error: {exc.report()}", file=sys.stderr)
        return exc.exit_code
    except AsyncDumpError as exc:  # the writer stopped (a full disk): the manifest is whole
        _release_ranks(plan.owns_group)
        return _fail(str(exc).splitlines()[0], code=1)
    _release_ranks(plan.owns_group)
    return _report(sink, plan.source)


def _builtin_plan(args: argparse.Namespace) -> _Plan | int:
    """The built-in synthetic generator: shapes on textures, on CUDA when available."""
    for name, default in BUILTIN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    from .. import synthetic

    if args.size > synthetic.MAX_SIZE:
        return _fail(f"--size must be at most {synthetic.MAX_SIZE}, got {args.size}")

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = _device_problem(device, torch)
    if problem is not None:
        return _fail(problem)
    if device == "cuda":  # one GPU per local rank; an explicit cuda:N is used as given
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device = f"cuda:{local % max(1, torch.cuda.device_count())}"
    elif device == "cpu":
        torch.set_num_threads(1)  # the other cores encode
    owns_group = _init_ranks()
    batch_size = args.batch_size or synthetic.default_batch_size(args.size)

    def write(sink: Any) -> None:
        for indices in sink.pending(batch_size):
            images, metadata = synthetic.render(indices, seed=args.seed, size=args.size,
                                                device=device)
            sink.submit(indices, images, metadata)

    return _Plan({"generator": synthetic.GENERATOR_ID, "seed": args.seed, "size": args.size},
                 write, f"device {device}", owns_group)


def _device_problem(device: str, torch: Any) -> str | None:
    """Why the built-in generator cannot render on ``device`` (None: it can)."""
    if device == "cpu":
        return None
    kind, _, number = device.partition(":")
    if kind != "cuda" or (number and not number.isdigit()):
        return f"--device must be auto, cpu, cuda or cuda:N, got {device!r}"
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None \
            else "no CUDA device is visible"
        return f"--device {device}: {why}; use --device cpu (or auto)"
    if number and int(number) >= torch.cuda.device_count():
        return (f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return None


def _user_plan(args: argparse.Namespace) -> _Plan | int:
    """``--generator MODULE:FUNCTION``: the user's function makes the images."""
    given = [f"--{name}" for name in BUILTIN_DEFAULTS if getattr(args, name) is not None]
    if given:
        return _fail(f"{', '.join(given)} belong to the built-in generator; with --generator "
                     "your function decides sizes, randomness and device (remove "
                     f"{'them' if len(given) > 1 else 'it'})")
    from .. import _generator_feed, _user_generator

    try:
        produce = _user_generator.load(args.generator)
    except _user_generator.GeneratorError as exc:
        return _fail(f"--generator {args.generator}: {exc}")

    def write(sink: Any) -> None:
        _generator_feed.feed(sink, produce, args.generator, args.batch_size or USER_BATCH_SIZE,
                             get_codec(args.format))

    # A group the module started is ours to end too: nothing runs after this command.
    owns_group = _init_ranks() or _group_started()
    return _Plan({"generator": args.generator}, write, f"generator {args.generator}", owns_group,
                 None if is_url(args.out) else _generator_feed.before(args.out))


def _storage_options(pairs: list[str] | None) -> dict[str, Any] | str | None:
    """``--storage-option KEY=VALUE`` (repeated) as a dict; a str says what is wrong.

    VALUE is a string, except ``true``/``false`` (booleans, as fsspec's ``anon`` wants)."""
    if pairs is None:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            return f"--storage-option must be KEY=VALUE, got {pair!r}"
        lowered = value.lower()
        options[key] = lowered == "true" if lowered in ("true", "false") else value
    return options


def _init_ranks() -> bool:
    """Under torchrun: start the gloo group (a long timeout: ranks may wait for slow models)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
    return True


def _group_started() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _release_ranks(owns_group: bool) -> None:
    if owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _report(sink: Any, source: str) -> int:
    """Print the summary line (rank 0); the exit code: 0 when complete without failures."""
    summary = sink.summary
    assert summary is not None
    if sink.rank == 0:
        print(f"{PROG}: {summary.images} images written ({summary.skipped} already there), "
              f"{summary.bytes / 1e6:.1f} MB, {summary.images_per_second:.0f} images/s, "
              f"{summary.failed} failed, {summary.seconds:.1f} s, {summary.mode} mode, "
              f"{sink.world} rank(s), {source} -> {summary.root}"
              + ("" if summary.complete else " (INCOMPLETE: rerun with --resume)"))
    return 0 if summary.failed == 0 and summary.complete else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate", help="write a dataset (synthetic, or from your --generator) with a manifest",
        description="Write COUNT images as files or tar shards with a manifest: synthetic ones "
                    "(coloured shapes on textured backgrounds, labels and boxes in the "
                    "manifest), or your own from --generator MODULE:FUNCTION. Restartable "
                    "with --resume; runs unchanged under torchrun.")
    parser.add_argument("--out", required=True,
                        help="output folder, or an object-store prefix (s3://bucket/prefix: "
                             "files mode, any number of ranks)")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--generator", default=None, metavar="MODULE:FUNCTION",
                        help="your generator: MODULE is imported once per rank (current folder "
                             "on sys.path), FUNCTION(indices) returns images or (images, "
                             "metadata) as write_dataset's callable; --resume calls it for "
                             "missing indices only")
    parser.add_argument("--size", type=int, default=None,
                        help="built-in generator: image side in pixels (default 64)")
    parser.add_argument("--format", default="png", help="png, jpg, jpeg, webp, bmp, tiff (default png)")
    parser.add_argument("--quality", type=int, default=None,
                        help="jpg/webp quality 1..100, png compression 0..9")
    parser.add_argument("--png-encoder", choices=PNG_ENCODERS, default="auto",
                        help="auto: fpng for RGB PNG (fast, ~1.1-1.2x larger files), else OpenCV; "
                             "opencv: smaller PNG files, slower (default auto)")
    parser.add_argument("--mode", choices=("files", "tar"), default="files",
                        help="one file per image in sub-folders, or tar shards (default files)")
    parser.add_argument("--seed", type=int, default=None,
                        help="built-in generator: images are a function of (seed, index) "
                             "(default 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="encoder processes per rank (default: usable cores per rank - 1)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per tar shard, and per sub-folder in files mode (default 1000)")
    parser.add_argument("--shard-bytes", type=int, default=None,
                        help="tar mode: also split a shard into parts below this many bytes")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch (default: about 2 MPixel; 64 with --generator)")
    parser.add_argument("--device", default=None,
                        help="built-in generator: auto (CUDA when available), cpu, cuda, "
                             "cuda:N (default auto)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run: skip the indices already in the manifest")
    parser.add_argument("--fsync", action="store_true",
                        help="fsync files, shards and manifest lines (survives power loss)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--storage-option", action="append", default=None, metavar="KEY=VALUE",
                        help="object-store --out: an option for its fsspec file system "
                             "(repeatable; e.g. endpoint_url=http://minio:9000; true/false are "
                             "booleans)")
    parser.add_argument("--retry-seconds", type=float, default=None, metavar="S",
                        help="object-store --out: retry transient errors this long per request "
                             "before the run stops (default 60)")
    parser.set_defaults(func=run)
