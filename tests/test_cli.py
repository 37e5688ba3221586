"""The command line: --help, info, and the demo on tiny sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncdump", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("info", "demo", "bench", "generate"):
        assert command in out.stdout
        assert run(command, "--help").returncode == 0


def test_info_prints_the_derived_defaults() -> None:
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert "default workers" in out.stdout and "default max_buffer_bytes (MiB)" in out.stdout
    assert "usable cores" in out.stdout and "cuda available" in out.stdout
    from importlib.metadata import version
    for name in ("numpy", "opencv-python-headless", "psutil", "tqdm"):  # a bug report's versions
        assert f"{name} {version(name)}" in out.stdout


def test_demo_writes_every_image(tmp_path: Path) -> None:
    out = run("demo", "--steps", "3", "--batch", "4", "--size", "32", "--step-ms", "5",
              "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    assert "all images written" in out.stdout
    for mode in ("cv2_sync", "asyncdump"):
        assert len(list((tmp_path / "demo" / mode).glob("*.png"))) == 12
    assert "workers before close: RSS" in out.stdout
