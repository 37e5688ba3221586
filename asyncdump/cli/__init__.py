"""``asyncdump`` command line: one sub-command per module, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines register(subparsers) -> None; the parser it adds sets func(args) -> int.
COMMAND_MODULES = [
    "asyncdump.cli.info", "asyncdump.cli.demo", "asyncdump.bench.cli", "asyncdump.cli.generate",
]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="asyncdump",
        description="Save images from PyTorch loops without waiting for encoding or disk.")
    parser.add_argument("--version", action="version", version=f"asyncdump {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("asyncdump: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
