"""Uploads to an object store: ``asyncdump bench --scenarios 9`` (asyncdump/bench/object_store.py).

    .venv/bin/python benchmarks/object_store_throughput.py [--count 1000] [--workers 2] [--quick] ...

Kept for the command docs/object-storage.md quotes; the measurement now lives in the bench's
scenario 9 (files and tar mode against plain uploads of the same bytes, the server's ceilings,
the parent's CPU per image, scenario 1's loop with a store root), with its tables and JSON.
The old options map onto the bench's: ``--count`` is ``--store-images``, ``--workers`` is
``--store-workers``; ``--size``, ``--rounds`` and every other ``asyncdump bench`` option pass
through (``--store s3://bucket/prefix`` for a store of your own; without it moto_server is
started on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import sys

from asyncdump.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--count")
    parser.add_argument("--workers")
    known, rest = parser.parse_known_args()
    renamed = [*(["--store-images", known.count] if known.count else []),
               *(["--store-workers", known.workers] if known.workers else [])]
    sys.exit(main(["bench", "--scenarios", "9", *renamed, *rest]))
