"""Destinations: one place owns "put these bytes at this name, atomically".

    root "out/samples"            -> LocalFolder  (the worker's own temp file + rename path)
    root "s3://bucket/samples"    -> FsspecStore  (any fsspec URL: one PUT per object)

The choice is made once, from the root, by ``open_destination``; a sink, ``save_image`` and
the worker ask the destination, not the URL. A URL whose fsspec plugin is not installed fails
here, at construction, with the pip command that installs it. Imported by the worker process:
nothing heavy at import (fsspec and its plugins load on first use), never torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ._local import LocalFolder
from ._retry import DEFAULT_RETRY_SECONDS, StoreError

__all__ = [
    "DEFAULT_RETRY_SECONDS",
    "LocalFolder",
    "StoreError",
    "StoreSpec",
    "already_checked",
    "checked_retry_seconds",
    "checked_store_options",
    "is_url",
    "join_url",
    "open_destination",
    "open_store",
    "result_path",
    "url_scheme",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

# scheme -> (module fsspec needs, what to pip install). fsspec's own registry knows more
# (its known_implementations); this table only names our extra for the tested one.
PLUGINS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "asyncdump[s3]"),
    "s3a": ("s3fs", "asyncdump[s3]"),
    "gs": ("gcsfs", "gcsfs"),
    "gcs": ("gcsfs", "gcsfs"),
    "az": ("adlfs", "adlfs"),
    "abfs": ("adlfs", "adlfs"),
    "abfss": ("adlfs", "adlfs"),
}


def url_scheme(root: Any) -> str | None:
    """The scheme of a ``scheme://...`` root ("s3"), None for a local path."""
    if isinstance(root, bytes):
        root = os.fsdecode(root)
    if not isinstance(root, str):  # PathLike: pathlib collapses "//", so never a URL
        return None
    match = _SCHEME.match(root)
    if match is None or match.group(1).lower() == "file":
        return None
    return match.group(1).lower()


def is_url(root: Any) -> bool:
    """True for a root that names an object store (``scheme://``; ``file://`` is local)."""
    return url_scheme(root) is not None


def join_url(root: str, name: str) -> str:
    """``root`` + "/" + ``name`` with exactly one slash between them."""
    return f"{root.rstrip('/')}/{name.lstrip('/')}"


class StoreSpec(NamedTuple):
    """What a worker needs to open the same store the parent checked (picklable)."""

    url: str  # the root URL, e.g. "s3://bucket/prefix"
    storage_options: dict[str, Any]
    overwrite: bool  # False: conditional create (If-None-Match: *) where the store has it
    retry_seconds: float  # transient errors are retried for this long per object


def checked_store_options(root: Any, storage_options: Any) -> dict[str, Any] | None:
    """For an object-store root, a copy of its storage options (``{}`` when None); None for a
    local root. ``ValueError`` for storage options with a local root, ``TypeError`` for
    options that are not a dict: a URL never becomes a local folder, and options are never
    silently ignored."""
    if not is_url(root):
        if storage_options is not None:
            raise ValueError("storage_options is only for object-store roots (scheme://...), "
                             f"got a local root {os.fspath(root)!r}")
        return None
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")
    return dict(storage_options or {})


def checked_retry_seconds(value: Any) -> float:
    """``retry_seconds`` as a float; ``ValueError`` unless it is a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"retry_seconds must be a number >= 0, got {value!r}")
    return float(value)


_checked_url: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "asyncdump_checked_url", default=None)


@contextlib.contextmanager
def already_checked(url: str) -> Iterator[None]:
    """Within the block, ``open_destination`` does not check ``url`` again: a caller that
    just checked it (a ``DatasetSink`` starting its ``AsyncImageSink``) saves the client's
    set-up and a request (about 0.2-0.3 s of CPU through botocore)."""
    token = _checked_url.set(url.rstrip("/"))
    try:
        yield
    finally:
        _checked_url.reset(token)


def open_destination(root: Any, storage_options: dict[str, Any] | None = None,
                     *, check: bool = True, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> Any:
    """The destination for ``root``: a ``LocalFolder`` or an ``FsspecStore``.

    ``check``: for a store, verify at once that the bucket exists and the credentials are
    accepted (``StoreError``), as a folder is checked for being writable (skipped inside
    ``already_checked`` for that URL)."""
    scheme = url_scheme(root)
    if scheme is None:
        if file_url := _file_url_path(root):
            root = file_url
        if storage_options:
            raise ValueError("storage_options is only for object-store roots (scheme://...), "
                             f"got a local root {os.fspath(root)!r}")
        return LocalFolder(root)
    from ._fsspec import FsspecStore  # fsspec is an optional extra

    check = check and _checked_url.get() != str(root).rstrip("/")
    return FsspecStore.open(root, scheme, storage_options or {}, check=check,
                            retry_seconds=retry_seconds)


def open_store(spec: StoreSpec) -> Any:
    """A worker's client for the store the parent opened and checked."""
    from ._fsspec import FsspecStore

    scheme = url_scheme(spec.url)
    assert scheme is not None
    return FsspecStore.open(spec.url, scheme, spec.storage_options, check=False,
                            retry_seconds=spec.retry_seconds)


def result_path(path: str) -> Any:
    """What a Future gives for a written file: a ``Path``, or the URL (``str``) of an object
    (``pathlib`` would fold its "//")."""
    return path if is_url(path) else Path(path)


def _file_url_path(root: Any) -> str | None:
    if isinstance(root, str) and root.lower().startswith("file://"):
        return root[len("file://"):]
    return None


def missing_plugin_message(scheme: str, exc: BaseException) -> str:
    module, package = PLUGINS.get(scheme, (None, None))
    if package is None:
        return (f"no fsspec implementation is installed for {scheme}:// URLs ({exc}); "
                f"install the fsspec plugin for {scheme}://")
    return f"{scheme}:// URLs need {module} ({exc}); install it with: pip install '{package}'"
