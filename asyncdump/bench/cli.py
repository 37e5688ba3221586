"""``asyncdump bench`` (``make bench``): the side-by-side benchmark, or ``--root DIR`` for the
user's own storage. Markdown goes to stdout, progress to stderr, JSON and a chart to ``--out``."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("benchmarks") / "results"


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    from ..cli.info import collect

    facts = collect()
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle
                          if line.startswith("model name")), model)
    except OSError:
        pass
    facts["cpu"] = model
    facts["platform"] = platform.platform()
    return facts


def _parse_scenarios(text: str) -> list[int]:
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        chosen = []
    if not chosen or any(n not in range(1, 10) for n in chosen):
        raise argparse.ArgumentTypeError(f"--scenarios takes numbers 1..9 separated by commas, got {text!r}")
    return chosen


DEFAULT_SCENARIOS = [1, 2, 3, 4, 5, 6, 7, 8]  # 9 (an object store) only when asked for


# What a run writes into --work, all kept until it ends (measured: full 20.9 GiB, quick 1.9 GiB).
SCRATCH_GIB = {False: 22, True: 3}


def warn_if_short_of_space(work: Path, quick: bool) -> None:
    """Say so before starting when ``work``'s file system has less free space than a run of
    all seven scenarios writes (the bench keeps every file until it ends)."""
    probe = work.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    need = SCRATCH_GIB[quick]
    if free < need:
        _log(f"warning: {free:.1f} GiB free under {work}, and a{' quick' if quick else ''} run of "
             f"all scenarios writes about {need} GiB there (kept until it ends); pass --work on "
             "a larger disk or fewer --scenarios")


def _config(args: argparse.Namespace) -> Any:
    from .scenarios import Config

    config = Config.quick() if args.quick else Config()
    config.work = Path(args.work)
    config.device = args.device
    for option, attribute in (("rounds", "rounds"), ("steps", "loop_steps"), ("cpu_steps", "cpu_steps"),
                              ("step_ms", "step_ms"), ("batch", "batch"), ("size", "size")):
        value = getattr(args, option)
        if value is not None:
            setattr(config, attribute, value)
    if args.contenders:
        config.contenders = args.contenders.split(",")
    if args.throughput_images is not None:
        config.throughput_images = dict.fromkeys(config.throughput_images, args.throughput_images)
    for option in ("store_images", "store_tar_images", "store_shard_size", "store_workers"):
        value = getattr(args, option)
        if value is not None:
            setattr(config, option, value)
    config.store_url = args.store
    config.storage_options = args.storage_options
    return config


def _store_arguments(args: argparse.Namespace) -> str | None:
    """Scenario 9's options: ``--root URL`` means ``--store URL``, and a store alone runs
    scenario 9 only; the ``--storage-option`` pairs as a dict. A str says what is wrong."""
    from .._stores import is_url
    from ..cli.generate import _storage_options

    if args.root is not None and is_url(args.root):
        if args.store is not None:
            return "give the store once: --root URL or --store URL"
        args.store, args.root = args.root, None
    if args.store is not None and not is_url(args.store):
        return f"--store takes an object-store URL (s3://bucket/prefix), got {args.store!r}"
    options = _storage_options(args.storage_option)
    if isinstance(options, str):
        return options
    if options is not None and args.store is None:
        return "--storage-option is for the store given by --store URL (or --root URL)"
    args.storage_options = options or {}
    if args.store is not None:
        if args.scenarios is DEFAULT_SCENARIOS:
            args.scenarios = [9]
        elif 9 not in args.scenarios:
            args.scenarios = [*args.scenarios, 9]
    for option in ("store_images", "store_tar_images", "store_shard_size", "store_workers"):
        value = getattr(args, option)
        if value is not None and value < 1:
            return f"--{option.replace('_', '-')} must be at least 1, got {value}"
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    problem = _store_arguments(args)
    if problem is not None:
        print(f"asyncdump bench: error: {problem}", file=sys.stderr)
        return 2
    command = command_line(args)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.root is not None:
        return run_storage(args, command)
    from . import report
    from .scenarios import SCENARIOS

    config = _config(args)
    facts = machine()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else Path(args.out) / f"{stamp}.json"
    chart_path = Path(args.chart) if args.chart else json_path.with_suffix(".png")
    print(f"# asyncdump bench{' --quick' if args.quick else ''}\n")
    print(f"`{command}` on {facts['usable cores']} usable cores ({facts['cpu']}), "
          f"device {config.device}, torch {facts['torch']}, OpenCV {facts['opencv']}, "
          f"{config.rounds} interleaved rounds; cells are median (min–max).\n")
    results: dict[str, Any] = {}
    warn_if_short_of_space(config.work, args.quick)
    began = time.perf_counter()
    try:
        for number in args.scenarios:
            key, function = SCENARIOS[number]
            _log(f"{key} ...")
            scenario_config = config if number != 2 else dataclasses.replace(config, device="cpu")
            with_time = time.perf_counter()
            results[key] = function(scenario_config, _log)
            results[key]["seconds"] = time.perf_counter() - with_time
            print(f"## {key}\n\n{report.TABLES[key](results[key])}\n", flush=True)
    finally:  # every measurement kept its files until now (see measure.scratch_folder)
        written = sum(p.stat().st_size for p in config.work.rglob("*") if p.is_file())
        _log(f"removing {config.work} ({written / 2**30:.1f} GiB of benchmark output)")
        shutil.rmtree(config.work, ignore_errors=True)
    checks = report.targets(results)
    print(f"## targets\n\n{report.targets_table(checks)}\n")
    from .object_store import redact

    settings = dataclasses.asdict(config)
    settings["storage_options"] = redact(settings["storage_options"])
    document = {"schema": 1, "command": command, "quick": args.quick, "machine": facts,
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
                "started": stamp, "seconds": time.perf_counter() - began,
                "scenarios": results, "targets": checks}
    report.write_json(document, json_path)
    print(f"JSON: {json_path}")
    if args.no_chart:
        print("chart: not drawn (--no-chart)")
    else:
        why_not = report.chart(results, chart_path)
        print(f"chart: {chart_path}" if why_not is None else why_not)
    print(f"total time: {time.perf_counter() - began:.0f} s")
    return 1 if report.lost_images(results) else 0


def run_storage(args: argparse.Namespace, command: str) -> int:
    """``--root DIR``: sustained images/s into DIR and a worker-count recommendation."""
    from .storage import storage_bench

    size = args.size or 256
    rounds = args.rounds or 3
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    print(f"# {command}\n\n{size}×{size} RGB {args.format.upper()}, "
          f"{rounds} interleaved rounds, about {seconds:g} s per run; cells are median (min–max).\n")
    result = storage_bench(Path(args.root), size, args.format, rounds, seconds, args.max_workers, _log)
    from .report import _range, _table

    rows = [["1 process (encode + write)", _range(result["single_process"], "{:.0f}")]]
    rows += [[f"asyncdump, {k} worker{'s' if k != '1' else ''}", _range(s, "{:.0f}")]
             for k, s in result["workers"].items()]
    print(_table(["writer", "images/s"], rows))
    print(f"\nrecommendation: AsyncImageSink(..., {result['why']})")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark asyncdump against the usual ways of saving images "
                      "(or, with --root, measure your own storage)",
        description="Runs the eight scenarios of the asyncdump benchmark (interleaved rounds, "
                    "medians with min–max): a Markdown report on stdout, JSON and a chart under --out. "
                    "Scenario 9 (an object store) runs when asked for: --scenarios 9, --store URL "
                    "or --root s3://...")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and rounds (about 2.5 min on 2 cores)")
    parser.add_argument("--scenarios", type=_parse_scenarios, default=DEFAULT_SCENARIOS,
                        help="which scenarios, e.g. 1,3 (default: 1..8; 9 is the object store)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--steps", type=int, help="loop steps in scenario 1")
    parser.add_argument("--cpu-steps", type=int, help="loop steps in scenario 2")
    parser.add_argument("--step-ms", type=float, help="simulated GPU step in scenario 1 (default 40)")
    parser.add_argument("--batch", type=int, help="images per batch in scenarios 1, 2, 5 (default 16)")
    parser.add_argument("--size", type=int, help="image side in scenarios 1, 2, 5 and --root (default 256)")
    parser.add_argument("--throughput-images", type=int, help="images per case in scenario 3")
    parser.add_argument("--contenders", help="comma-separated subset for scenarios 1 and 2")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the loop's batches live (auto: cuda when available)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for JSON and chart")
    parser.add_argument("--json", help="JSON path (default OUT/<timestamp>.json)")
    parser.add_argument("--chart", help="chart path (default next to the JSON, .png)")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--work", default="bench_out", help="scratch folder for the images written")
    storage = parser.add_argument_group("your storage (--root)")
    storage.add_argument("--root", help="measure sustained images/s into this folder instead "
                                        "(an s3://... URL: scenario 9 on that store, as --store)")
    storage.add_argument("--format", default="png", help="image format for --root (default png)")
    storage.add_argument("--seconds", type=float, help="length of each run (default 4, quick 1)")
    storage.add_argument("--max-workers", type=int, help="try 1..this many workers (default: usable cores)")
    store = parser.add_argument_group("object store (scenario 9)")
    store.add_argument("--store", metavar="URL",
                       help="s3://bucket/prefix to measure (the bucket must exist; endpoint and "
                            "credentials from the AWS environment or --storage-option; everything "
                            "is written under a new prefix, removed at the end). Default: start "
                            "moto_server on 127.0.0.1 and stop it after")
    store.add_argument("--storage-option", action="append", default=None, metavar="KEY=VALUE",
                       help="passed to the fsspec file system, as generate's (repeatable)")
    store.add_argument("--store-images", type=int,
                       help="files-mode images per run (default 1000, quick 200)")
    store.add_argument("--store-tar-images", type=int,
                       help="tar-mode images per run (default 3000, quick 600)")
    store.add_argument("--store-shard-size", type=int, help="tar shard size (default 1000, quick 200)")
    store.add_argument("--store-workers", type=int,
                       help="the datasets' workers and the plain pool's threads "
                            "(default: DatasetSink's, usable cores - 1)")
    parser.set_defaults(func=run, bench_parser=parser, storage_options={})


def command_line(args: argparse.Namespace) -> str:
    """The ``asyncdump bench`` command that reproduces ``args`` (options off their default)."""
    words = ["asyncdump", "bench"]
    for action in args.bench_parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        if isinstance(action, argparse._AppendAction):  # repeated; credentials never printed
            from .object_store import redact

            for pair in value or ():
                key, _, item = pair.partition("=")
                words += [action.option_strings[-1], f"{key}={redact({key: item})[key]}"]
            continue
        words.append(action.option_strings[-1])
        if action.nargs != 0:
            words.append(",".join(map(str, value)) if isinstance(value, list) else str(value))
    return shlex.join(words)
