"""Any fsspec store as a destination: one PUT per object, retried, conditional when asked.

An object appears whole or not at all: a PUT (s3fs sends objects under 100 MB as one
``put_object``) is atomic on S3 and the stores that speak its API. ``overwrite=False`` asks
for a conditional create (``If-None-Match: *``): S3 answers 412 PreconditionFailed when the key
exists, and that is a permanent error. Other stores get fsspec's ``mode="create"``, which
many implement as "check, then write" (docs/object-storage.md says what race remains).
"""

from __future__ import annotations

import hashlib
from typing import Any

from . import join_url, missing_plugin_message
from ._retry import DEFAULT_RETRY_SECONDS, StoreError, as_store_error, error_details, with_retries

# Per-scheme defaults under the user's storage_options: our loop (``_retry``) is the one that
# retries, to the user's deadline, so the client's own retries are turned down to one attempt.
CLIENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"},
                             "connect_timeout": 5, "read_timeout": 60}},
}
CLIENT_ATTRIBUTES: dict[str, dict[str, Any]] = {"s3": {"retries": 1}}  # s3fs's own retry loop
CONDITIONAL_CREATE = frozenset({"s3", "s3a"})  # If-None-Match: * is sent and honoured
# Construction check errors that do not stop a run: write-only credentials may not list.
CHECK_TOLERATED = frozenset({"AccessDenied", "403"})


def _merged(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


class FsspecStore:
    """Objects under ``url`` in an fsspec file system."""

    is_store = True

    def __init__(self, fs: Any, url: str, scheme: str, retry_seconds: float = DEFAULT_RETRY_SECONDS):
        self.fs = fs
        self.url = url.rstrip("/")
        self.scheme = "s3" if scheme == "s3a" else scheme
        self.retry_seconds = retry_seconds

    @classmethod
    def open(cls, url: str, scheme: str, storage_options: dict[str, Any], *, check: bool = True,
             retry_seconds: float = DEFAULT_RETRY_SECONDS) -> FsspecStore:
        """Load the plugin (``ImportError`` with the pip command when it is missing)."""
        if not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        try:
            import fsspec

            fs_class = fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as exc:
            raise ImportError(missing_plugin_message(scheme, exc)) from None
        key = "s3" if scheme == "s3a" else scheme
        options = _merged(CLIENT_DEFAULTS.get(key, {}), storage_options)
        try:
            fs = fs_class(skip_instance_cache=True, **options)
        except TypeError as exc:
            raise TypeError(f"storage_options for {scheme}:// were refused: {exc}") from None
        for name, value in CLIENT_ATTRIBUTES.get(key, {}).items():
            setattr(fs, name, value)
        store = cls(fs, url, scheme, retry_seconds)
        if check:
            store.check()
        return store

    def url_for(self, name: str) -> str:
        return join_url(self.url, name)

    def check(self) -> None:
        """Fail now (``StoreError``) when the bucket is missing or the credentials are bad.

        S3: one ``ListObjectsV2`` of at most one key under the prefix. AccessDenied is let
        through (write-only credentials may not list; the first PUT will tell). Other stores
        are checked at the first write."""
        if self.scheme != "s3":
            return
        bucket, _, prefix = self.fs._strip_protocol(self.url).partition("/")
        if not bucket:
            raise ValueError(f"{self.url} names no bucket; use s3://bucket/prefix")

        def list_one() -> Any:
            return self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)

        try:
            with_retries(self.url, list_one, min(self.retry_seconds, 10.0))
        except StoreError as exc:
            if exc.code not in CHECK_TOLERATED:
                raise

    def put(self, url: str, data: bytes, overwrite: bool) -> None:
        """Store ``data`` at ``url`` (under ``self.url``) with one request, retried on
        transient errors; returns once the store acknowledged it."""
        path = self.fs._strip_protocol(url)
        mode = "overwrite" if overwrite else "create"

        def put_once() -> None:
            try:
                self.fs.pipe_file(path, data, mode=mode)
            except FileExistsError:
                # A retry after a lost answer (or a replacement worker re-sent the image)
                # finds its own object: the key holds exactly these bytes, so it is written.
                if self._holds(path, data):
                    return
                raise
        try:
            with_retries(url, put_once, self.retry_seconds)
        except StoreError:
            raise
        except Exception as exc:  # not raised by with_retries itself, but keep the contract
            raise as_store_error(url, exc) from exc

    def _holds(self, path: str, data: bytes) -> bool:
        """Whether the object at ``path`` has ``data``'s bytes (single-PUT ETag = MD5)."""
        try:
            info = self.fs.info(path, refresh=True) if self.scheme == "s3" else self.fs.info(path)
        except Exception:
            return False
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if etag:
            return etag == hashlib.md5(data, usedforsecurity=False).hexdigest()
        return False

    def get(self, url: str) -> bytes:
        return bytes(self.fs.cat_file(self.fs._strip_protocol(url)))


__all__ = ["CLIENT_DEFAULTS", "FsspecStore", "error_details"]
