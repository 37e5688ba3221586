"""Shared test helpers: read images back as RGB, torchvision's pixel rule computed with torch,
the temporary files a run left, and a ``generate`` run killed mid-way. Fixtures and hooks stay
in conftest.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as HWC (or HW) in RGB(A) order, dtype as stored."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"cv2 could not read {path}"
    if image.ndim == 3:
        order = [2, 1, 0] if image.shape[2] == 3 else [2, 1, 0, 3]
        image = image[..., order]
    return image


def torchvision_pixels(
    x: torch.Tensor,
    value_range: tuple[float, float] = (0.0, 1.0),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Pixels torchvision.utils.save_image writes for one (C, H, W) float32 image.

    Exactly its operations: make_grid's norm_ip (clamp_, sub_, div_ by max(hi - lo, 1e-5)),
    then save_image's mul(255).add_(0.5).clamp_(0, 255) and the uint8 cast. NaN -> 0 (docs/api.md):
    set from the input's own NaN mask, so this reference relies on no clamp's NaN semantics.
    """
    y = x.detach().to(torch.float32).clone()
    nan = torch.isnan(y)
    if mean is not None and std is not None:
        c = y.shape[0]
        y = y * torch.tensor(std, dtype=torch.float32).view(c, 1, 1) + torch.tensor(
            mean, dtype=torch.float32).view(c, 1, 1)
    lo, hi = value_range
    y.clamp_(min=lo, max=hi)
    y.sub_(lo).div_(max(hi - lo, 1e-5))
    y = y.mul(255).add_(0.5).clamp_(0, 255)
    y[nan] = 0.0
    out = y.permute(1, 2, 0).to(torch.uint8).numpy()
    return out[..., 0] if out.shape[2] == 1 else out


def no_temp_files(root: Path) -> list[Path]:
    """Hidden temporary files left anywhere under root (should be none)."""
    return [p for p in root.rglob(".*") if p.name.endswith(".tmp")]


# Loaded by every worker started after install_poison_harness (PYTHONPATH): cv2.imencode kills
# its own process, as a crashing codec would, when it is handed an image whose every value is
# POISON. The trigger is the pixels themselves, so the outcome depends on nothing but the input.
POISON = 13
POISON_HARNESS = f"""
import os, signal
import cv2

_imencode = cv2.imencode


def _crashing_imencode(ext, img, *args, **kwargs):
    if img.size and (img == {POISON}).all():
        os.kill(os.getpid(), signal.SIGKILL)
    return _imencode(ext, img, *args, **kwargs)


cv2.imencode = _crashing_imencode
"""


def install_poison_harness(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started from now on die in OpenCV's encoder on an all-POISON image (use
    ``png_encoder="opencv"``: the harness wraps OpenCV, not fpng)."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(POISON_HARNESS)
    monkeypatch.setenv("PYTHONPATH", str(folder))


def kill_generate_when(args: Sequence[str], env: dict[str, str], ready: Callable[[], bool],
                       seconds: float, poll: float = 0.05) -> None:
    """Start ``asyncdump generate --no-progress *args``; SIGKILL it as soon as ``ready()`` says
    so (checked every ``poll`` s, for at most ``seconds``); fail if it finished first."""
    process = subprocess.Popen([sys.executable, "-m", "asyncdump", "generate", "--no-progress",
                                *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and process.poll() is None and not ready():
            time.sleep(poll)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
