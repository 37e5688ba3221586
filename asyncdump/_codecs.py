"""One table: output format -> file extension, OpenCV parameters, what it can store.

The worker turns ``Codec.imencode_params`` into OpenCV flags by name, so this module (and the
parent process) never needs to import cv2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Codec:
    """What one output format accepts and how OpenCV is asked to write it."""

    extension: str
    quality_flag: str | None  # name of the cv2.IMWRITE_* flag that ``quality`` sets
    quality_range: tuple[int, int] | None
    default_quality: int | None  # None: pass no flag at all (keeps OpenCV's own default)
    dtypes: frozenset[str]
    channels: frozenset[int]
    note: str = ""


_PNG = Codec(".png", "IMWRITE_PNG_COMPRESSION", (0, 9), None,
             frozenset({"uint8", "uint16"}), frozenset({1, 3, 4}))
_JPEG = Codec(".jpg", "IMWRITE_JPEG_QUALITY", (1, 100), 95,
              frozenset({"uint8"}), frozenset({1, 3}), "JPEG has no alpha channel")
CODECS: dict[str, Codec] = {
    "png": _PNG,
    "jpg": _JPEG,
    "jpeg": replace(_JPEG, extension=".jpeg"),
    # WebP has no grayscale mode: one channel is stored as R=G=B.
    "webp": Codec(".webp", "IMWRITE_WEBP_QUALITY", (1, 100), 95,
                  frozenset({"uint8"}), frozenset({1, 3, 4})),
    "bmp": Codec(".bmp", None, None, None, frozenset({"uint8"}), frozenset({1, 3, 4})),
    "tiff": Codec(".tiff", None, None, None,
                  frozenset({"uint8", "uint16"}), frozenset({1, 3, 4})),
}


def get_codec(fmt: str) -> Codec:
    """The codec for ``fmt``, or a ``ValueError`` naming the accepted formats."""
    if not isinstance(fmt, str) or fmt.lower() not in CODECS:
        raise ValueError(f"format must be one of {sorted(CODECS)}, got {fmt!r}")
    return CODECS[fmt.lower()]


def encode_params(codec: Codec, quality: int | None) -> tuple[tuple[str, int], ...]:
    """Validated ``(flag name, value)`` pairs for ``cv2.imencode``."""
    if quality is None:
        quality = codec.default_quality
        if quality is None:
            return ()
    if codec.quality_flag is None or codec.quality_range is None:
        raise ValueError(f"format {codec.extension[1:]!r} takes no quality, got quality={quality!r}")
    if isinstance(quality, bool) or not isinstance(quality, int):
        raise TypeError(f"quality must be an int or None, got {type(quality).__name__}")
    lo, hi = codec.quality_range
    if not lo <= quality <= hi:
        raise ValueError(
            f"quality for {codec.extension[1:]!r} must be in {lo}..{hi}, got {quality}"
        )
    return ((codec.quality_flag, quality),)
