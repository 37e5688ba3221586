"""Which PNG encoder writes an image: fpng (fast, 8-bit RGB/RGBA only) or OpenCV (everything).

    "auto"    fpng for 8-bit RGB/RGBA PNG when fpng can be imported, OpenCV otherwise
    "fpng"    the same choice, but fpng must be importable (checked at construction)
    "opencv"  always OpenCV (smaller PNG files, compression level from ``quality``)

Gray and 16-bit PNG, and every other format, always go to OpenCV: fpng writes only 24/32-bit
PNG. Both write standard PNG files that decode to the same pixels (docs/encoders.md).
This module never imports fpng in the parent beyond a one-time availability check.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from ._codecs import Codec

PNG_ENCODERS = ("auto", "fpng", "opencv")
FPNG = "fpng"
OPENCV = "opencv"
INSTALL_HINT = "pip install fpng"


@functools.lru_cache(maxsize=1)
def fpng_problem() -> str | None:
    """Why fpng cannot be used here (an import error), or None when it can."""
    try:
        importlib.import_module("fpng")
    except Exception as exc:  # ImportError, or a broken wheel failing at import
        return f"{type(exc).__name__}: {exc}"
    return None


def check_png_encoder(png_encoder: Any, codec: Codec, quality: int | None) -> str:
    """Validate ``png_encoder`` for a sink writing ``codec`` at ``quality``; return the setting
    to use per batch: ``"fpng"`` (use fpng where it can store the image) or ``"opencv"``.

    An explicit ``quality`` for PNG is OpenCV's compression level, so "auto" then picks OpenCV.
    """
    if not isinstance(png_encoder, str) or png_encoder not in PNG_ENCODERS:
        raise ValueError(f"png_encoder must be one of {PNG_ENCODERS}, got {png_encoder!r}")
    is_png = codec.extension == ".png"
    if png_encoder == FPNG:
        if not is_png:
            raise ValueError(f"png_encoder='fpng' writes PNG only, but format is "
                             f"{codec.extension[1:]!r}; use png_encoder='auto'")
        if quality is not None:
            raise ValueError("png_encoder='fpng' has no compression levels; drop quality, or use "
                             "png_encoder='opencv' with quality=0..9")
        problem = fpng_problem()
        if problem is not None:
            raise ImportError(f"png_encoder='fpng' needs the fpng package ({INSTALL_HINT}); "
                              f"importing it failed: {problem}")
        return FPNG
    if png_encoder == "auto" and is_png and quality is None and fpng_problem() is None:
        return FPNG
    return OPENCV


def encoder_for(setting: str, codec: Codec, dtype: str, channels: int) -> str:
    """The encoder for one batch: fpng only for 8-bit RGB/RGBA PNG under an fpng setting."""
    if setting == FPNG and codec.extension == ".png" and dtype != "uint16" and channels in (3, 4):
        return FPNG
    return OPENCV


def active_encoder() -> str:
    """What "auto" uses for 8-bit RGB/RGBA PNG on this machine, for ``asyncdump info``."""
    problem = fpng_problem()
    if problem is None:
        import fpng

        return f"fpng {getattr(fpng, '__version__', '?')} (8-bit RGB/RGBA PNG; OpenCV for the rest)"
    return f"OpenCV (fpng unavailable: {problem}; {INSTALL_HINT} for faster PNG)"
