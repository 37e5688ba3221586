"""Fixtures shared by the tests (helper functions live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_report_header() -> str:
    """The versions under test, at the top of every run (a bug report needs nothing else)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "numpy", "opencv-python-headless", "fpng", "psutil", "tqdm"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"asyncdump under Python {platform.python_version()}: " + ", ".join(found)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture(params=["fpng", "opencv"])
def both_png_encoders(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per PNG encoder: the default of ``AsyncImageSink(png_encoder=...)`` in
    this process becomes each encoder in turn (sinks started in child processes keep "auto")."""
    from asyncdump import AsyncImageSink

    defaults = AsyncImageSink.__init__.__kwdefaults__
    assert defaults is not None and "png_encoder" in defaults
    monkeypatch.setitem(defaults, "png_encoder", request.param)
    return str(request.param)
