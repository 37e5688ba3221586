"""``asyncdump info``: versions, CUDA, cores, memory, and the defaults derived from them."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .. import _defaults
from .._encoders import active_encoder

# pyproject.toml's runtime dependencies, by their distribution names
DEPENDENCIES = ("torch", "numpy", "opencv-python-headless", "fpng", "psutil", "tqdm")


def collect() -> dict[str, Any]:
    """Everything ``asyncdump info`` prints, as a dict."""
    import cv2
    import numpy
    import torch

    from .. import __version__

    cuda = torch.cuda.is_available()
    return {
        "asyncdump": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
        "png encoder (auto)": active_encoder(),
        "installed": installed_versions(),
        "cuda available": cuda,
        "cuda devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda else [],
        "usable cores": _defaults.usable_cores(),
        "available memory (MiB)": _defaults.available_memory_bytes() >> 20,
        "default workers": _defaults.default_workers(),
        "default max_buffer_bytes (MiB)": _defaults.default_max_buffer_bytes() >> 20,
    }


def installed_versions() -> str:
    """``name version`` of every direct dependency, as pip sees them (a bug report's set)."""
    found = []
    for name in DEPENDENCIES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def run(args: argparse.Namespace) -> int:
    info = collect()
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("info", help="versions, CUDA, cores, memory and derived defaults")
    parser.set_defaults(func=run)
