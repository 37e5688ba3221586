"""AsyncImageSink: submit images from a hot loop; worker processes encode and write them.

The path of one batch, and which object owns each piece:

    producer thread (the training loop)    AsyncImageSink: index, names, reserving buffer space
      submit(images)
        validate shape/dtype/names  ----------------> TypeError / ValueError, nothing staged
        reserve bytes in SharedBuffer -------------> block / drop / raise when full
        stage: host -> one numpy copy of raw values;  CUDA -> DeviceStager (_device.py)
        cut into Jobs, HandOver.put, return the Future (Accounting holds the promise)
    copy waiter thread (CUDA only)         CopyWaiter: waits for the copy's event, hands over
    collector thread                       Collector: workers, pending jobs, probes, restarts
    worker processes (numpy + cv2 only)    _worker.py, speaking the records of _protocol.py

Pixels never cross a pipe: jobs carry offsets into the shared buffer.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import itertools
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _defaults
from ._accounting import Accounting, failure_error
from ._buffer import SharedBuffer
from ._codecs import encode_params, get_codec
from ._collector import JOBS_PER_WORKER, MAX_JOB_IMAGES, Collector
from ._device import CopyWaiter, DeviceStager
from ._encoders import FPNG, check_png_encoder, encoder_for
from ._errors import AsyncDumpError, BufferFullError, describe_failures
from ._handover import HandOver
from ._jobs import BatchRecord, NotStaged, StagedPart
from ._naming import BUILTIN_FIELDS, Namer, PlainBatch, checked_step
from ._owner import OwningProcess
from ._protocol import GridSpec, JobSettings
from ._signals import deferred_sigint
from ._staging import Batch, Conversion, copy_into_buffer, inspect
from ._stats import SinkStats
from ._stores import (
    DEFAULT_RETRY_SECONDS,
    StoreSpec,
    checked_retry_seconds,
    checked_store_options,
    open_destination,
)

ON_FULL = ("block", "drop", "raise")
ON_ERROR = ("raise", "warn", "ignore")

_BUILTIN_FIELDS = frozenset(BUILTIN_FIELDS)  # set by asyncdump, never by a submit keyword
_serial = itertools.count()
_open_sinks: weakref.WeakSet[AsyncImageSink] = weakref.WeakSet()


class AsyncImageSink:
    """Write image batches to ``root`` from worker processes; ``submit`` returns at once.

    See docs/api.md for every argument. Extras: ``overwrite=True`` lets two images of this sink
    use the same path (by default a ``ValueError`` at submit); ``extension`` is the suffix
    added to every name (default: the format's, e.g. ``".png"``; ``".TIF"`` or ``""`` work).

    ``root`` may be an fsspec URL (``"s3://bucket/prefix"``): each file is then one PUT from
    a worker, ``storage_options`` go to the file system, transient errors are retried for
    ``retry_seconds`` per file, and Futures give URL strings (docs/object-storage.md).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        workers: int | None = None,
        format: str = "png",
        quality: int | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "{index:08d}",
        max_buffer_bytes: int | None = None,
        on_full: str = "block",
        on_error: str | Callable[[BaseException], Any] = "raise",
        fsync: bool = False,
        overwrite: bool = False,
        extension: str | None = None,
        png_encoder: str = "auto",
        storage_options: dict[str, Any] | None = None,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
    ):
        self._closed = True  # until fully started: close() has nothing to do
        self._owner = OwningProcess("AsyncImageSink")
        self.workers = _positive_int("workers", workers, _defaults.default_workers)
        codec = get_codec(format)
        self._codec = codec
        self._params = encode_params(codec, quality)
        self._png_setting = check_png_encoder(png_encoder, codec, quality)
        self._conversion = Conversion.parse(value_range, mean, std)
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, got {on_full!r}")
        if on_error not in ON_ERROR and not callable(on_error):
            raise ValueError(f"on_error must be one of {ON_ERROR} or a callable, got {on_error!r}")
        capacity = _positive_int("max_buffer_bytes", max_buffer_bytes,
                                 _defaults.default_max_buffer_bytes)
        suffix = _checked_extension(codec.extension if extension is None else extension)
        self._store: StoreSpec | None = None  # set for an object-store root (docs/object-storage.md)
        self.root: Any
        options = checked_store_options(root, storage_options)
        if options is not None:
            self._store = _open_store(root, options, overwrite, retry_seconds)
            self.root = self._store.url
        else:
            self.root = Path(os.path.abspath(os.fspath(root)))
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(f"root {self.root} is not writable")
        self.on_full = on_full
        self.on_error = on_error
        self.fsync = bool(fsync)
        self._namer = Namer(self.root, name, suffix, overwrite=overwrite)
        self._root_str = str(self.root)
        self._token = f"{os.getpid()}-{next(_serial)}"
        self._next_index = 0
        self._created = time.perf_counter()
        # Serialises submit/encode across threads: the index, the namer and the producer's
        # counters have one writer at a time. Re-entrant for an on_error callback that submits.
        self._submit_lock = threading.RLock()
        self._close_lock = threading.Lock()
        self._accounting = Accounting()
        self._device: DeviceStager | None = None  # with the copy waiter, from the first CUDA batch
        self._copy_waiter: CopyWaiter | None = None
        self._buffer = SharedBuffer(capacity)
        self._buffer.start_prefault()
        self._handover = HandOver()
        self._collector = Collector(self._buffer, self._handover, self._accounting, self.workers)
        try:
            self._collector.start()
        except BaseException:
            self._release_resources()
            raise
        self._closed = False
        _open_sinks.add(self)

    # ------------------------------------------------------------------ producer side
    def submit(
        self,
        images: Any,
        *,
        step: int | None = None,
        names: Sequence[str] | None = None,
        **fields: Any,
    ) -> concurrent.futures.Future[list[Path]]:
        """Stage ``images`` and return a Future of their paths; never encodes or writes here.

        Thread-safe: calls from several threads are staged one at a time, so every image gets
        its own index and path and each thread's batches keep their order.
        """
        self._owner.check()  # before the lock: a forked child may inherit it held
        reserved = sorted(fields.keys() & _BUILTIN_FIELDS) if fields else None
        if reserved:
            raise ValueError(f"submit() keyword(s) {reserved} name built-in template fields, which "
                             "asyncdump sets itself (index, batch, rank; step is submit's own "
                             "argument): rename the keyword")
        with self._submit_lock:
            return self._submit(images, step, names, fields)

    def encode(self, images: Any) -> concurrent.futures.Future[list[bytes]]:
        """Like ``submit``, but the workers return the encoded file bytes instead of writing.

        For writers that put images somewhere other than a file of their own (tar shards,
        object stores). Same staging, back-pressure and error rules; no names are used.
        """
        self._owner.check()
        with self._submit_lock:
            return self._submit(images, None, None, {}, encode_only=True)

    def _submit_digest(self, images: Any, names: Sequence[str] | None) -> concurrent.futures.Future[Any]:
        """For DatasetSink: ``submit(names=...)`` (or ``encode`` when ``names`` is None) whose
        workers also hash each file; the Future gives ``(sha256, nbytes)`` per written image
        (None for one a replacement of a dead worker finished) or ``(bytes, sha256)``."""
        return self._submit(images, None, names, {}, encode_only=names is None, digest=True)

    def _submit_grid(self, batch: Any, name: str, grid: GridSpec) -> concurrent.futures.Future[Any]:
        """For save_image: ``batch`` is the whole B x C x H x W batch viewed as one gray image
        ``(B*C*H, W)``; one worker tiles it into one file (``_tile``)."""
        self._owner.check()
        with self._submit_lock:
            return self._submit(batch, None, [name], {}, grid=grid)

    def _submit(self, images: Any, step: int | None, names: Sequence[str] | None,
                fields: dict[str, Any], encode_only: bool = False,
                digest: bool = False, grid: GridSpec | None = None) -> concurrent.futures.Future[Any]:
        began = time.perf_counter()
        try:
            return self._stage_batch(images, step, names, fields, encode_only, digest, grid)
        finally:  # stats.submit_seconds
            self._accounting.counters.submit_seconds += time.perf_counter() - began

    def _stage_batch(self, images: Any, step: int | None, names: Sequence[str] | None,
                     fields: dict[str, Any], encode_only: bool, digest: bool,
                     grid: GridSpec | None = None) -> concurrent.futures.Future[Any]:
        self._check_usable()
        self._deliver_failures(raise_now=True)  # before anything of this batch is staged
        batch = images if isinstance(images, Batch) else inspect(images, self._codec)
        step = checked_step(step)
        if batch.image_bytes > self._buffer.capacity_bytes:
            raise ValueError(f"one image is {batch.image_bytes} bytes, more than max_buffer_bytes="
                             f"{self._buffer.capacity_bytes}; raise max_buffer_bytes")
        encoder = encoder_for(self._png_setting, self._codec, batch.dtype, batch.channels) \
            if grid is None else encoder_for(self._png_setting, self._codec, "uint8",
                                             3 if grid.channels == 1 else grid.channels)
        rule = self._conversion.for_channels(batch.channels)  # also validates mean/std length
        if batch.rule is not None:
            rule = batch.rule
        if batch.count == 0:
            done: concurrent.futures.Future[list[Path]] = concurrent.futures.Future()
            done.set_result([])
            return done
        paths: list[str] | Callable[[], list[str]] | PlainBatch | None
        if encode_only:
            paths = functools.partial(_encoded_labels, batch.count)
        else:  # a plain template's names are rendered by the collector, off this thread
            paths = self._namer.plain_paths(batch.count, start_index=self._next_index, step=step,
                                            names=names)
            if paths is None:
                paths = self._namer.paths(batch.count, start_index=self._next_index, step=step,
                                          names=names, fields=fields)
        spec = batch.spec(encoder, rule) if grid is None else \
            batch.spec(encoder, None)._replace(grid=grid, rule=None)
        settings = JobSettings(spec, batch.image_bytes, self._codec.extension,
                               self._params, self.fsync and self._store is None, encode_only, digest,
                               None if encode_only else self._store, self._root_str,
                               self._namer.overwrite)
        record = BatchRecord(paths, batch.count, encode_only, digest)
        per_part = max(1, min(batch.count, self._buffer.capacity_bytes // batch.image_bytes,
                              self._buffer.max_images))
        staged = 0
        try:
            while staged < batch.count:
                count = min(per_part, batch.count - staged)
                nbytes = count * batch.image_bytes
                with deferred_sigint():  # reserve..hand-over is all or nothing
                    offset = self._buffer.try_reserve(nbytes, count)
                    if offset is not None:
                        try:
                            self._stage(batch, record, settings, staged, count, offset,
                                        first=staged == 0, naming=(paths, names))
                        except BaseException:
                            self._buffer.release(offset, nbytes, count)
                            raise
                        staged += count
                if offset is None:
                    # Only the first part may be dropped/refused; later parts of an over-sized
                    # batch wait for space, since the batch is already promised.
                    if self.on_full != "block" and staged == 0:
                        return self._refuse(batch.count)
                    self._accounting.counters.blocked_seconds += self._buffer.wait_for_space(
                        nbytes, check=self._check_usable, images=count)  # interruptible
        except BaseException as exc:
            if staged:  # part of the batch is promised already: the collector fails the rest
                reason = AsyncDumpError(f"not staged: submit was interrupted ({type(exc).__name__})")
                self._handover.put([NotStaged(record, range(staged, batch.count), reason)])
            raise
        return record.future

    def _stage(self, batch: Batch, record: BatchRecord, settings: JobSettings, start: int,
               count: int, offset: int, first: bool,
               naming: tuple[Any, Sequence[str] | None]) -> None:
        """Copy images ``start:start+count`` to ``offset``, cut them into jobs, hand them over
        (CUDA: once the copy is done); the first part also accepts the batch."""
        keepalive = event = None
        if batch.on_cuda:
            if self._device is None:
                self._device = DeviceStager(self._conversion)
                self._copy_waiter = CopyWaiter(self._handover.put, self._copy_failed)
            keepalive, event = self._device.stage(batch, start, start + count, self._buffer,
                                                  offset, rgb=settings.spec.encoder == FPNG)
        else:
            destination = self._buffer.view(offset, count * batch.image_bytes)
            copy_into_buffer(batch, start, start + count, destination)
        per_job = max(1, min(MAX_JOB_IMAGES, -(-count // (JOBS_PER_WORKER * self.workers))))
        part = StagedPart(record, settings, start, start + count, offset, per_job,
                          f"{self._token}-{next(_serial)}")  # the collector cuts it into jobs
        if first:
            if not settings.return_bytes:
                self._namer.record(*naming)  # a plain batch is remembered without rendering it
                self._next_index += record.count
            self._accounting.accept(record)
        if event is None:
            self._handover.put([part])
        else:
            assert self._copy_waiter is not None
            self._copy_waiter.put([part], event, keepalive)

    def _refuse(self, count: int) -> concurrent.futures.Future[list[Path]]:
        if self.on_full == "raise":
            raise BufferFullError(
                f"staging buffer full ({self._buffer.buffered_bytes} of "
                f"{self._buffer.capacity_bytes} bytes, {self._buffer.staged_images} of "
                f"{self._buffer.max_images} images in use); on_full='raise' refused "
                f"{count} image(s): use on_full='block' or 'drop', or a larger max_buffer_bytes")
        dropped: concurrent.futures.Future[list[Path]] = concurrent.futures.Future()
        dropped.cancel()
        self._next_index += count
        self._accounting.drop(count)
        return dropped

    def _copy_failed(self, exc: BaseException) -> None:
        self._collector.break_sink(AsyncDumpError(f"the device-to-host copy failed: {exc}"))

    # ------------------------------------------------------------------ caller-facing state
    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncImageSink is closed")
        broken = self._collector.broken
        if broken is not None:
            raise AsyncDumpError(f"this AsyncImageSink is broken: {broken}") from broken

    def _deliver_failures(self, raise_now: bool) -> None:
        """Surface failures the collector recorded, in the caller's thread, per ``on_error``."""
        failures = self._accounting.take_undelivered()
        if not failures:
            return
        if self.on_error == "raise":
            if raise_now:  # from submit: its own batch is refused whole, and said so
                raise failure_error(failures, "this call's batch was not accepted (nothing of it "
                                    "was staged, no index used): submit it again")
        elif self.on_error == "warn":
            warnings.warn(describe_failures(failures), RuntimeWarning, stacklevel=4)
        elif callable(self.on_error):
            for path, cause in failures:
                error = AsyncDumpError(f"failed to write {path}: {cause}", [(path, cause)])
                error.__cause__ = cause
                self.on_error(error)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted before this call is written or failed."""
        self._owner.check()
        futures = self._accounting.open_futures()
        _, not_done = concurrent.futures.wait(futures, timeout=timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} batch(es) not written after {timeout} s")
        self._deliver_failures(raise_now=False)
        failures = self._accounting.take_since_flush()
        if failures and self.on_error == "raise":
            raise failure_error(failures)
        broken = self._collector.broken
        if broken is not None and not self._closed:
            raise AsyncDumpError(f"this AsyncImageSink is broken: {broken}") from broken

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the workers and free the shared memory. Idempotent.

        A KeyboardInterrupt during the flush (a second Ctrl-C) aborts: workers are stopped
        at once and a warning says how many images were not written.
        """
        self._owner.check()
        if self._closed:
            return
        try:
            self.flush(timeout)
        except KeyboardInterrupt:
            self._shutdown(abort=KeyboardInterrupt("interrupted while flushing"))
            raise
        except BaseException:
            self._shutdown(abort=AsyncDumpError("the sink was closed before this image was written"))
            raise
        self._shutdown(abort=None)

    def _shutdown(self, abort: BaseException | None) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _open_sinks.discard(self)
        lost_before = self._accounting.counters.failed
        if self._copy_waiter is not None:
            self._copy_waiter.close()  # every finished copy is handed over first
        self._collector.stop(abort)
        self._buffer.wake_all()
        self._release_resources()
        lost = self._accounting.counters.failed - lost_before
        if abort is not None and lost:
            warnings.warn(f"asyncdump: {lost} image(s) were not written ({abort})",
                          RuntimeWarning, stacklevel=3)

    def _release_resources(self) -> None:
        self._buffer.close()
        self._handover.close()

    def __enter__(self) -> AsyncImageSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except AsyncDumpError as error:  # do not hide the exception that ended the block
            warnings.warn(f"asyncdump: while closing after {exc_type.__name__}: {error}",
                          RuntimeWarning, stacklevel=2)

    @property
    def stats(self) -> SinkStats:
        """A snapshot of the counters (see ``SinkStats``)."""
        self._owner.check()
        c = self._accounting.counters
        elapsed = time.perf_counter() - self._created
        workers = self._collector.workers
        return SinkStats(
            submitted=c.submitted, written=c.written, failed=c.failed, dropped=c.dropped,
            bytes_written=c.bytes_written, buffered_bytes=self._buffer.buffered_bytes,
            peak_buffered_bytes=self._buffer.peak_buffered_bytes,
            max_buffer_bytes=self._buffer.capacity_bytes,
            submit_seconds=c.submit_seconds, blocked_seconds=c.blocked_seconds,
            images_per_second=c.written / elapsed if elapsed > 0 else 0.0,
            workers=len(workers), worker_restarts=c.worker_restarts,
            max_restart_seconds=c.max_restart_seconds,
            worker_rss_bytes=sum(w.rss_bytes() for w in workers), elapsed_seconds=elapsed,
        )

    @property
    def max_buffer_bytes(self) -> int:
        """The staging buffer's capacity in bytes."""
        return self._buffer.capacity_bytes

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return [w.pid for w in self._collector.workers]

    def worker_modules(self, timeout: float = 10.0) -> dict[int, list[str]]:
        """Diagnostics: ``sys.modules`` of each live worker, by pid, asked from inside it."""
        self._owner.check()
        self._check_usable()
        return self._collector.probe(timeout)

    def __copy__(self) -> AsyncImageSink:
        raise TypeError("an AsyncImageSink cannot be copied or pickled: it owns worker processes "
                        "and shared memory; pass the sink object itself around")

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncImageSink:
        return self.__copy__()

    def __reduce__(self) -> Any:
        return self.__copy__()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"AsyncImageSink({str(self.root)!r}, format={self._codec.extension[1:]!r}, {state})"


def _open_store(root: Any, storage_options: dict[str, Any], overwrite: bool,
                retry_seconds: float) -> StoreSpec:
    """Load the store's plugin and check the bucket and credentials now (``StoreError``)."""
    retry_seconds = checked_retry_seconds(retry_seconds)
    store = open_destination(root, storage_options, retry_seconds=retry_seconds)
    return StoreSpec(store.url, storage_options, bool(overwrite), retry_seconds)


def _encoded_labels(count: int) -> list[str]:
    """``encode``'s stand-ins for paths, used in error messages."""
    return [f"<encoded image {i}>" for i in range(count)]


def _positive_int(name: str, value: Any, default: Callable[[], int]) -> int:
    if value is None:
        return default()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    return value


def _checked_extension(extension: Any) -> str:
    if not isinstance(extension, str) or (extension and not extension.startswith(".")) \
            or any(c in extension for c in "/\\\x00"):
        raise ValueError(f"extension must be '' or start with '.' (e.g. '.tif'), got {extension!r}")
    return extension


@atexit.register
def _close_open_sinks() -> None:
    for sink in list(_open_sinks):
        if not sink._owner.is_current():  # a forked child exiting: the parent's, not ours
            continue
        warnings.warn(f"{sink!r} was not closed; flushing it at interpreter exit",
                      RuntimeWarning, stacklevel=1)
        try:
            sink.close()
        except Exception as exc:  # at exit there is no caller left to raise to
            warnings.warn(f"asyncdump: closing at exit failed: {exc}", RuntimeWarning, stacklevel=1)
