"""``asyncdump generate --generator MODULE:FUNCTION``: load the user's function, check its batches.

``FUNCTION(indices: list[int])`` returns ``images`` or ``(images, metadata)``: a ``(B, C, H, W)``
tensor or array with ``B = len(indices)``, and ``None`` or one JSON-able dict per image (the
contract of ``write_dataset``'s callable).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from ._codecs import Codec
from ._metadata import serialise
from ._staging import inspect

Generator = Callable[[list[int]], Any]


class GeneratorError(Exception):
    """The generator cannot be used; the message is one line, for the command line."""


def load(spec: str) -> Generator:
    """Import ``MODULE`` (the current folder first on ``sys.path``, as ``python -m``) and
    return its ``FUNCTION``; ``FUNCTION`` may be dotted (``Class.method``)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise GeneratorError(f"--generator must be MODULE:FUNCTION (e.g. my_model:generate), "
                             f"got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise GeneratorError(f"cannot import {module_name!r}: no module named {exc.name!r} "
                                 f"(looked in the current folder {os.getcwd()} and sys.path)") \
                from None
        raise GeneratorError(f"importing {module_name!r} failed: {_one_line(exc)}") from None
    except BaseException as exc:  # module-level code failed (SyntaxError, a model that won't load)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise GeneratorError(f"importing {module_name!r} failed: {_one_line(exc)}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise GeneratorError(f"module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise GeneratorError(f"{spec} is not callable (got {type(target).__name__})")
    return target


def split(result: Any, indices: list[int], codec: Codec,
          check: bool = True) -> tuple[Any, list[dict[str, Any]] | None]:
    """``(images, metadata)`` from what the generator returned for ``indices``.

    ``check``: also check types, shape and JSON (the first batch, before anything is written;
    later batches are checked by ``DatasetSink.submit`` itself, at no extra cost).
    """
    count = len(indices)
    expected = (f"images or (images, metadata): a (B, C, H, W) tensor or array with "
                f"B = len(indices) = {count}, and None or a list of {count} dicts")
    if isinstance(result, tuple):
        if len(result) != 2:
            raise GeneratorError(f"returned a tuple of {len(result)} items; expected {expected}")
        images, metadata = result
    else:
        images, metadata = result, None
    if not check:
        return images, metadata
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[0] != count:
        got = f"images of shape {shape}" if shape else f"a {type(images).__name__}"
        raise GeneratorError(f"returned {got}; expected {expected}")
    try:
        inspect(images, codec)
    except (TypeError, ValueError) as exc:
        raise GeneratorError(f"returned unusable images: {exc}") from None
    if metadata is not None:
        if not isinstance(metadata, (list, tuple)) or len(metadata) != count \
                or not all(isinstance(m, dict) for m in metadata):
            raise GeneratorError(f"returned metadata as {_describe(metadata)}; expected None or a "
                                 f"list of {count} dicts (one per image)")
        metadata = list(metadata)
        try:  # the check DatasetSink.submit makes on every later batch
            serialise(metadata, count, tar=False, indices=indices)
        except (TypeError, ValueError) as exc:
            raise GeneratorError(f"returned metadata that cannot be written: {exc}") from None
    return images, metadata


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {len(value)} ({', '.join(kinds) or 'empty'})"
    return f"a {type(value).__name__}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
