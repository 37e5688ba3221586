"""Shared by the ``scenarioN_*.py`` scripts: run one scenario through ``asyncdump bench``."""

import sys

from asyncdump.cli import main


def run(number: int) -> None:
    """``asyncdump bench --scenarios NUMBER`` plus this script's own arguments (e.g. --quick)."""
    sys.exit(main(["bench", "--scenarios", str(number), *sys.argv[1:]]))
