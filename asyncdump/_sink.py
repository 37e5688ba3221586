"""AsyncImageSink: submit images from a hot loop; worker processes encode and write them.

The path of one batch, and who owns each piece:

    producer thread (the training loop)          owns: reserving buffer space, index/names
      submit(images)
        validate shape/dtype/names  ----------------> TypeError / ValueError, nothing staged
        reserve bytes in SharedBuffer -------------> block / drop / raise when full
        stage: host -> one numpy copy of raw values;  CUDA -> convert on GPU, async copy, event
        append jobs to `_ready`, poke the wake-up pipe, return the Future
    event thread (only once a CUDA tensor was seen)
        event.synchronize() (blocking event: sleeps), then hands the jobs on like the producer
    collector thread                              owns: workers, pending jobs, futures, counters
        connection.wait([wake-up pipe, every worker socket])
          ready jobs   -> pending queue -> sent to the least busy worker (two jobs each at most)
          "encoded"    -> release that image's bytes (its temp file is complete)
          "written"/"failed" -> count, resolve the batch's Future when its last image is done
          EOF (a worker died) -> finish or re-send its jobs (pixels are still in the buffer),
                                  start a new worker
    worker processes (numpy + cv2 only): see _worker.py

Pixels never cross a pipe: job descriptors carry offsets into the shared buffer.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import itertools
import os
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as wait_for_ready
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _defaults
from ._buffer import SharedBuffer
from ._codecs import encode_params, get_codec
from ._encoders import FPNG, check_png_encoder, encoder_for
from ._errors import AsyncDumpError, BufferFullError, RemoteTraceback, describe_failures
from ._naming import Namer
from ._pool import WorkerProcess, start_worker, stop_workers
from ._signals import deferred_sigint
from ._staging import FLOAT_DTYPES, Batch, Conversion, DeviceStager, copy_to_host, inspect
from ._stats import Counters, SinkStats

PENDING, ENCODED, DONE = 0, 1, 2
MAX_JOB_ATTEMPTS = 3  # a job whose worker dies this often fails instead of looping
MAX_START_FAILURES = 3  # workers dying before "ready" this often in a row break the sink
JOBS_PER_WORKER = 2  # one being written, one waiting in the pipe
ON_FULL = ("block", "drop", "raise")
ON_ERROR = ("raise", "warn", "ignore")

_serial = itertools.count()
_open_sinks: weakref.WeakSet[AsyncImageSink] = weakref.WeakSet()


class _BatchRecord:
    """One submit call's promise: its Future resolves when ``remaining`` reaches 0."""

    __slots__ = ("digest", "failures", "future", "paths", "remaining", "results")

    def __init__(self, paths: list[str], encode_only: bool = False, digest: bool = False):
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()  # a caller's cancel() cannot race a result
        self.paths = paths
        self.remaining = len(paths)
        self.failures: list[tuple[Path, BaseException]] = []
        # encode_only: the file bytes; digest: (bytes, sha256) or, when written, (sha256, nbytes)
        self.results: list[Any] | None = [None] * len(paths) if encode_only or digest else None
        self.digest = digest


class _Job:
    """Consecutive images of one batch, staged at ``offset + k * image_bytes``."""

    __slots__ = ("attempts", "batch", "id", "items", "keepalive", "states", "static")

    def __init__(self, batch: _BatchRecord, items: list[tuple[int, str, str, int]],
                 static: dict[str, Any], attempts: int = 0):
        self.id = next(_job_ids)
        self.batch = batch
        self.items = items  # (index in batch, final path, temp path, buffer offset)
        self.static = static  # spec, codec, image_bytes: shared by all jobs of a batch
        self.states = dict.fromkeys((item[0] for item in items), PENDING)
        self.attempts = attempts
        self.keepalive: Any = None  # the GPU tensor a pending device-to-host copy reads

    def descriptor(self) -> dict[str, Any]:
        return {"id": self.id, "items": self.items, **self.static}


_job_ids = itertools.count()


class AsyncImageSink:
    """Write image batches to ``root`` from worker processes; ``submit`` returns at once.

    See docs/api.md for every argument. Extras: ``overwrite=True`` lets two images of this sink
    use the same path (by default a ``ValueError`` at submit); ``extension`` is the suffix
    added to every name (default: the format's, e.g. ``".png"``; ``".TIF"`` or ``""`` work).
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
    ):
        self._closed = True  # until fully started: close()/__del__ have nothing to do
        if workers is None:
            workers = _defaults.default_workers()
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1 or None, got {workers!r}")
        codec = get_codec(format)
        self._params = encode_params(codec, quality)
        self._extension = codec.extension
        self._codec = codec
        self._png_setting = check_png_encoder(png_encoder, codec, quality)
        self._conversion = _conversion(value_range, mean, std)
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, got {on_full!r}")
        if on_error not in ON_ERROR and not callable(on_error):
            raise ValueError(f"on_error must be one of {ON_ERROR} or a callable, got {on_error!r}")
        if max_buffer_bytes is None:
            max_buffer_bytes = _defaults.default_max_buffer_bytes()
        if isinstance(max_buffer_bytes, bool) or not isinstance(max_buffer_bytes, int) \
                or max_buffer_bytes < 1:
            raise ValueError(f"max_buffer_bytes must be an int >= 1 or None, got {max_buffer_bytes!r}")
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"root {self.root} is not writable")

        self.on_full = on_full
        self.on_error = on_error
        self.fsync = bool(fsync)
        self.workers = workers
        if extension is None:
            extension = codec.extension
        if not isinstance(extension, str) or (extension and not extension.startswith(".")) \
                or any(c in extension for c in "/\\\x00"):
            raise ValueError(f"extension must be '' or start with '.' (e.g. '.tif'), got {extension!r}")
        self._namer = Namer(self.root, name, extension, overwrite=overwrite)
        self._token = f"{os.getpid()}-{next(_serial)}"
        self._next_index = 0
        self._counters = Counters()
        self._created = time.perf_counter()
        self._lock = threading.Lock()  # guards _unfinished and the failure lists
        # Serialises submit/encode across threads: the index, the namer and the producer's
        # counters have one writer at a time. Re-entrant for an on_error callback that submits.
        self._submit_lock = threading.RLock()
        self._unfinished: set[_BatchRecord] = set()
        self._undelivered: list[tuple[Path, BaseException]] = []
        self._since_flush: list[tuple[Path, BaseException]] = []
        self._broken: BaseException | None = None
        self._stop = threading.Event()
        self._abort_reason: BaseException | None = None
        self._ready: deque[_Job] = deque()  # producer/event thread -> collector
        self._poke_needed = True  # the collector may be asleep: a hand-over must wake it
        self._pending: deque[_Job] = deque()  # collector only
        self._workers: list[WorkerProcess] = []  # collector only (read for stats)
        self._start_failures = 0  # consecutive workers that died before saying "ready"
        self._restart_seconds: list[float] = []  # death noticed -> replacement "ready"
        self._device_stager = DeviceStager(self._conversion)
        self._conversions: dict[int, dict[str, Any]] = {}  # channels -> worker parameters
        self._events: queue.Queue[tuple[list[_Job], Any] | None] | None = None
        self._probe_requests: deque[concurrent.futures.Future[dict[int, list[str]]]] = deque()
        self._probes: dict[int, tuple[concurrent.futures.Future[dict[int, list[str]]],
                                      dict[int, list[str]], int]] = {}
        self._event_thread: threading.Thread | None = None

        self._buffer = SharedBuffer(max_buffer_bytes)
        self._buffer.start_prefault()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._collector = threading.Thread(target=self._collector_main, name="asyncdump-collector",
                                           daemon=True)
        self._collector.start()
        self._started.wait()
        if self._start_error is not None:
            self._collector.join()
            self._release_resources()
            raise AsyncDumpError(f"could not start asyncdump workers: {self._start_error}") \
                from self._start_error
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
        began = time.perf_counter()
        with self._submit_lock:
            try:
                return self._submit(images, step, names, fields)
            finally:
                self._counters.submit_seconds += time.perf_counter() - began

    def encode(self, images: Any) -> concurrent.futures.Future[list[bytes]]:
        """Like ``submit``, but the workers return the encoded file bytes instead of writing.

        For writers that put images somewhere other than a file of their own (tar shards,
        object stores). Same staging, back-pressure and error rules; no names are used.
        """
        began = time.perf_counter()
        with self._submit_lock:
            try:
                return self._submit(images, None, None, {}, encode_only=True)
            finally:
                self._counters.submit_seconds += time.perf_counter() - began

    def _submit_digest(self, images: Any, names: Sequence[str] | None) -> concurrent.futures.Future[Any]:
        """For DatasetSink: ``submit(names=...)`` (or ``encode`` when ``names`` is None) whose
        workers also hash each file; the Future gives ``(sha256, nbytes)`` per written image
        (None for one a replacement of a dead worker finished) or ``(bytes, sha256)``."""
        began = time.perf_counter()
        try:
            return self._submit(images, None, names, {}, encode_only=names is None, digest=True)
        finally:
            self._counters.submit_seconds += time.perf_counter() - began

    def _submit(self, images: Any, step: int | None, names: Sequence[str] | None,
                fields: dict[str, Any], encode_only: bool = False,
                digest: bool = False) -> concurrent.futures.Future[Any]:
        """``digest``: workers also hash each file (sha256); the Future then gives
        ``(bytes, sha256)`` per image (``encode_only``) or ``(sha256, nbytes)`` (for DatasetSink)."""
        self._check_usable()
        self._deliver_failures(raise_now=True)
        batch = inspect(images, self._codec)
        if batch.image_bytes > self._buffer.capacity_bytes:
            raise ValueError(f"one image is {batch.image_bytes} bytes, more than max_buffer_bytes="
                             f"{self._buffer.capacity_bytes}; raise max_buffer_bytes")
        spec = batch.spec
        spec["encoder"] = encoder_for(self._png_setting, self._codec, batch.dtype, batch.channels)
        conversion = self._conversion_for(batch.channels)  # also validates mean/std length
        if not batch.on_cuda and batch.dtype in FLOAT_DTYPES:
            spec["conversion"] = conversion
        if batch.count == 0:
            done: concurrent.futures.Future[list[Path]] = concurrent.futures.Future()
            done.set_result([])
            return done
        if encode_only:
            paths = [f"<encoded image {i}>" for i in range(batch.count)]
        else:
            paths = self._namer.paths(batch.count, start_index=self._next_index, step=step,
                                      names=names, fields=fields)
        static = {"spec": spec, "image_bytes": batch.image_bytes, "ext": self._extension,
                  "params": self._params, "fsync": self.fsync, "return_bytes": encode_only, "sha256": digest}
        record = _BatchRecord(paths, encode_only, digest)
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
                            jobs, event = self._stage(batch, record, static, staged, count, offset)
                        except BaseException:
                            self._buffer.release(offset, nbytes, count)
                            raise
                        if staged == 0:
                            self._accept(record, names, encode_only)
                        if event is None:
                            self._hand_over(jobs)
                        else:
                            assert self._events is not None
                            self._events.put((jobs, event))
                        staged += count
                if offset is None:
                    # Only the first part may be dropped/refused; later parts of an over-sized
                    # batch wait for space, since the batch is already promised.
                    if self.on_full != "block" and staged == 0:
                        return self._refuse(batch.count)
                    self._counters.blocked_seconds += self._buffer.wait_for_space(
                        nbytes, check=self._check_usable, images=count)  # interruptible
        except BaseException as exc:
            if staged:  # part of the batch is promised already: account for the rest
                self._fail_unstaged(record, staged, exc)
            raise
        return record.future

    def _conversion_for(self, channels: int) -> dict[str, Any]:
        """The rule's parameters for ``channels``, built once per channel count."""
        if channels not in self._conversions:
            self._conversions[channels] = self._conversion.for_channels(channels)
        return self._conversions[channels]

    def _accept(self, record: _BatchRecord, names: Sequence[str] | None, encode_only: bool) -> None:
        if not encode_only:
            self._namer.record(record.paths, names)
            self._next_index += len(record.paths)
        self._counters.submitted += len(record.paths)
        with self._lock:
            self._unfinished.add(record)

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
        self._counters.submitted += count
        self._counters.dropped += count
        return dropped

    def _stage(self, batch: Batch, record: _BatchRecord, static: dict[str, Any], start: int,
               count: int, offset: int) -> tuple[list[_Job], Any]:
        """Copy images ``start:start+count`` to ``offset`` and cut them into jobs.

        Returns the jobs and, for CUDA input, the event that completes the copy.
        """
        nbytes = count * batch.image_bytes
        if batch.on_cuda:
            self._ensure_event_thread()
            converted = self._device_stager.to_uint8_hwc(
                batch, start, start + count, rgb=static["spec"]["encoder"] == FPNG)
            self._pin_once(converted.device)
            destination = self._buffer.torch_view(offset, nbytes)
            destination.view(converted.dtype).view(converted.shape).copy_(converted,
                                                                          non_blocking=True)
            import torch

            event = torch.cuda.Event(blocking=True)
            event.record(torch.cuda.current_stream(converted.device))
        else:
            event = None
            copy_to_host(batch, start, start + count, self._buffer.view(offset, nbytes))
        jobs = []
        per_job = max(1, -(-count // (JOBS_PER_WORKER * self.workers)))
        stamp = f"{self._token}-{next(_serial)}"
        for first in range(start, start + count, per_job):
            items = [
                (i, record.paths[i], _temp_path(record.paths[i], stamp, i),
                 offset + (i - start) * batch.image_bytes)
                for i in range(first, min(first + per_job, start + count))
            ]
            jobs.append(_Job(record, items, static))
        if batch.on_cuda:
            jobs[0].keepalive = converted
        return jobs, event

    def _hand_over(self, jobs: list[_Job]) -> None:
        self._ready.extend(jobs)
        # Poke only a collector that may be asleep: each write lets it take the GIL while we
        # are in the syscall, which cost submit up to milliseconds when done every time.
        if self._poke_needed:
            self._poke_needed = False
            self._poke()

    def _fail_unstaged(self, record: _BatchRecord, staged: int, exc: BaseException) -> None:
        """Images of a batch that never reached the buffer (interrupt in a later part)."""
        reason = AsyncDumpError(f"not staged: submit was interrupted ({type(exc).__name__})")
        # The collector resolves them like any other image, so counters have one writer.
        self._hand_over([_Job(record, [(i, record.paths[i], "", -1)], {"failed": reason})
                         for i in range(staged, len(record.paths))])

    def _pin_once(self, device: Any) -> None:
        if self._buffer.is_pinned:
            return
        import torch

        with torch.cuda.device(device):
            try:
                self._buffer.pin_for_cuda()
            except RuntimeError as exc:
                warnings.warn(f"{exc}; GPU copies into the buffer will be synchronous",
                              RuntimeWarning, stacklevel=4)

    def _ensure_event_thread(self) -> None:
        if self._event_thread is None:
            self._events = queue.Queue()
            self._event_thread = threading.Thread(target=self._event_main,
                                                  name="asyncdump-events", daemon=True)
            self._event_thread.start()

    def _event_main(self) -> None:
        assert self._events is not None
        while True:
            item = self._events.get()
            if item is None:
                return
            jobs, event = item
            try:
                event.synchronize()  # a blocking event: this thread sleeps, the GIL is released
            except BaseException as exc:  # a CUDA error: nothing staged after it can be trusted
                self._break(AsyncDumpError(f"the device-to-host copy failed: {exc}"))
            jobs[0].keepalive = None
            self._hand_over(jobs)  # on a broken sink the collector fails them

    # ------------------------------------------------------------------ caller-facing state
    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncImageSink is closed")
        if self._broken is not None:
            raise AsyncDumpError(f"this AsyncImageSink is broken: {self._broken}") from self._broken

    def _deliver_failures(self, raise_now: bool) -> None:
        """Surface failures the collector recorded, in the caller's thread, per ``on_error``."""
        if not self._undelivered:
            return
        with self._lock:
            failures, self._undelivered = self._undelivered, []
        if self.on_error == "raise":
            if raise_now:
                raise _failure_error(failures)
        elif self.on_error == "warn":
            warnings.warn(describe_failures(failures), RuntimeWarning, stacklevel=4)
        elif callable(self.on_error):
            for path, cause in failures:
                error = AsyncDumpError(f"failed to write {path}: {cause}", [(path, cause)])
                error.__cause__ = cause
                self.on_error(error)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted before this call is written or failed."""
        with self._lock:
            futures = [record.future for record in self._unfinished]
        _, not_done = concurrent.futures.wait(futures, timeout=timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} batch(es) not written after {timeout} s")
        self._deliver_failures(raise_now=False)
        with self._lock:
            failures, self._since_flush = self._since_flush, []
        if failures and self.on_error == "raise":
            raise _failure_error(failures)
        if self._broken is not None and not self._closed:
            raise AsyncDumpError(f"this AsyncImageSink is broken: {self._broken}") from self._broken

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the workers and free the shared memory. Idempotent.

        A KeyboardInterrupt during the flush (a second Ctrl-C) aborts: workers are stopped
        at once and a warning says how many images were not written.
        """
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
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_sinks.discard(self)
        lost_before = self._counters.failed
        self._abort_reason = abort
        if self._events is not None:
            self._events.put(None)
            assert self._event_thread is not None
            self._event_thread.join()
        self._stop.set()
        self._poke()
        self._collector.join()
        self._buffer.wake_all()
        self._release_resources()
        if abort is not None:
            lost = self._counters.failed - lost_before
            if lost:
                warnings.warn(f"asyncdump: {lost} image(s) were not written ({abort})",
                              RuntimeWarning, stacklevel=3)

    def _release_resources(self) -> None:
        self._buffer.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

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
        c = self._counters
        elapsed = time.perf_counter() - self._created
        workers = list(self._workers)
        return SinkStats(
            submitted=c.submitted, written=c.written, failed=c.failed, dropped=c.dropped,
            bytes_written=c.bytes_written, buffered_bytes=self._buffer.buffered_bytes,
            peak_buffered_bytes=self._buffer.peak_buffered_bytes,
            max_buffer_bytes=self._buffer.capacity_bytes,
            submit_seconds=c.submit_seconds, blocked_seconds=c.blocked_seconds,
            images_per_second=c.written / elapsed if elapsed > 0 else 0.0,
            workers=len(workers), worker_restarts=c.worker_restarts,
            worker_rss_bytes=sum(w.rss_bytes() for w in workers), elapsed_seconds=elapsed,
        )

    @property
    def max_buffer_bytes(self) -> int:
        """The staging buffer's capacity in bytes."""
        return self._buffer.capacity_bytes

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring and tests)."""
        return [w.pid for w in list(self._workers)]

    def worker_modules(self, timeout: float = 10.0) -> dict[int, list[str]]:
        """Diagnostics: ``sys.modules`` of each live worker, by pid, asked from inside it."""
        self._check_usable()
        request: concurrent.futures.Future[dict[int, list[str]]] = concurrent.futures.Future()
        self._probe_requests.append(request)
        self._poke()
        return request.result(timeout)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"AsyncImageSink({str(self.root)!r}, format={self._extension[1:]!r}, {state})"

    # ------------------------------------------------------------------ collector thread
    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _collector_main(self) -> None:
        try:
            for _ in range(self.workers):
                self._workers.append(start_worker(self._buffer.fd, self._buffer.mapped_bytes))
        except BaseException as exc:
            self._start_error = exc
            stop_workers(self._workers, timeout=2.0)
            self._workers.clear()
            self._started.set()
            return
        self._started.set()
        try:
            try:
                self._collect()
            except BaseException as exc:  # a bug or a fatal fault: fail loudly, never hang
                if self._broken is not None:
                    raise
                self._break(exc)
                self._collect()  # broken mode: fail whatever still arrives, until close
        finally:
            abort = self._abort_reason or self._broken
            if abort is None:
                stop_workers(self._workers, timeout=10.0)
            else:
                stop_workers(self._workers, timeout=0.0, close=False)
                for worker in self._workers:  # count what they wrote before they stopped
                    self._read_last_reports(worker)
                self._fail_everything(abort)

    def _collect(self) -> None:
        while True:
            by_conn = {w.conn: w for w in self._workers}
            # From here on producers must poke; anything they queued before is seen right now.
            self._poke_needed = True
            timeout = 0 if self._ready else None
            readable = wait_for_ready([self._wake_r, *by_conn], timeout)
            self._poke_needed = False  # awake: new jobs are picked up without a poke
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 65536)
            self._take_ready()  # new work first: its send releases the GIL to the producer
            for conn in readable:
                if conn != self._wake_r:
                    self._drain(by_conn[conn])  # type: ignore[index]
            self._take_ready()
            while self._probe_requests:
                self._send_probe(self._probe_requests.popleft())
            if self._broken is not None:  # no more writing: stop workers, fail what is left
                stop_workers(self._workers, timeout=0.0, close=False)
                for worker in self._workers:
                    self._read_last_reports(worker)
                self._fail_everything(self._broken)
                self._workers.clear()
            if self._stop.is_set():
                if self._abort_reason is not None or self._broken is not None:
                    return
                if not self._pending and not self._ready and not any(
                        w.inflight for w in self._workers):
                    return

    def _take_ready(self) -> None:
        while self._ready:
            self._pending.append(self._ready.popleft())
        if self._broken is None:
            self._dispatch()

    def _drain(self, worker: WorkerProcess) -> None:
        """Handle every report a live worker has sent; EOF means it died."""
        if worker not in self._workers:
            return  # died earlier in this round
        if not self._handle_reports(worker):
            self._on_worker_death(worker)

    def _handle_reports(self, worker: WorkerProcess) -> bool:
        """Handle what is readable now; False once the worker's socket is at EOF."""
        while True:
            try:
                if not worker.conn.poll():
                    return True
                message = worker.conn.recv()
            except (EOFError, OSError):
                return False
            self._handle(worker, message)

    def _read_last_reports(self, worker: WorkerProcess) -> None:
        """Handle what a stopped worker sent before it exited, then close its socket."""
        self._handle_reports(worker)
        worker.conn.close()

    def _send_probe(self, request: concurrent.futures.Future[dict[int, list[str]]]) -> None:
        if not self._workers:
            request.set_result({})
            return
        probe_id = next(_job_ids)
        self._probes[probe_id] = (request, {}, len(self._workers))
        for worker in self._workers:
            worker.conn.send(("probe", probe_id))

    def _handle(self, worker: WorkerProcess, message: tuple[Any, ...]) -> None:
        kind, job_id, index = message[0], message[1], message[2]
        if kind == "ready":
            worker.ready = True
            self._start_failures = 0
            if worker.replaces_death_at is not None:
                self._restart_seconds.append(time.perf_counter() - worker.replaces_death_at)
            return
        if kind == "probe":
            request, answers, expected = self._probes[job_id]
            answers[index] = message[3]
            if len(answers) == expected:
                del self._probes[job_id]
                request.set_result(answers)
            return
        job = worker.inflight.get(job_id)
        if job is None:
            return
        if kind == "encoded":
            self._release_image(job, index)
            job.states[index] = ENCODED
            return
        if kind == "written":
            if job.batch.results is not None:
                job.batch.results[index] = (message[4], message[3])
            self._finish_image(job, index, nbytes=message[3])
        elif kind == "bytes":
            assert job.batch.results is not None
            job.batch.results[index] = (message[3], message[4]) if job.batch.digest else message[3]
            self._finish_image(job, index, nbytes=len(message[3]))
        else:
            _, _, _, err, text, remote = message
            cause: BaseException = OSError(err, text) if err is not None else RuntimeError(text)
            cause.__cause__ = RemoteTraceback(remote)
            self._finish_image(job, index, error=cause)
        if all(state == DONE for state in job.states.values()):
            del worker.inflight[job_id]
            worker.inflight_images -= len(job.items)

    def _release_image(self, job: _Job, index: int) -> None:
        if job.states[index] == PENDING:
            offset = next(item[3] for item in job.items if item[0] == index)
            if offset >= 0:
                self._buffer.release(offset, job.static["image_bytes"])

    def _finish_image(self, job: _Job, index: int, nbytes: int = 0,
                      error: BaseException | None = None) -> None:
        self._release_image(job, index)
        job.states[index] = DONE
        record = job.batch
        if error is None:
            self._counters.written += 1
            self._counters.bytes_written += nbytes
        else:
            self._counters.failed += 1
            failure = (Path(record.paths[index]), error)
            record.failures.append(failure)
            with self._lock:
                self._undelivered.append(failure)
                self._since_flush.append(failure)
        record.remaining -= 1
        if record.remaining == 0:
            with self._lock:
                self._unfinished.discard(record)
            if record.failures:
                record.future.set_exception(_failure_error(record.failures))
            elif record.results is not None:
                record.future.set_result(record.results)
            else:
                record.future.set_result([Path(p) for p in record.paths])

    def _dispatch(self) -> None:
        while self._pending and self._workers:
            job = self._pending[0]
            if "failed" in job.static:  # images that never reached the buffer
                self._pending.popleft()
                for index, *_ in job.items:
                    self._finish_image(job, index, error=job.static["failed"])
                continue
            worker = min(self._workers, key=lambda w: w.inflight_images)
            if len(worker.inflight) >= JOBS_PER_WORKER:
                return
            try:
                worker.conn.send(("job", job.descriptor()))
            except OSError:
                return  # the worker is dying: its EOF is handled next round
            self._pending.popleft()
            worker.inflight[job.id] = job
            worker.inflight_images += len(job.items)

    def _on_worker_death(self, worker: WorkerProcess) -> None:
        """Finish what the dead worker had encoded, re-queue the rest, start a replacement."""
        noticed = time.perf_counter()
        worker.conn.close()
        exit_code = worker.process.wait()
        self._workers.remove(worker)
        if not worker.ready:  # died while starting: its jobs never began
            self._start_failures += 1
            self._pending.extendleft(reversed(list(worker.inflight.values())))
            if self._start_failures >= MAX_START_FAILURES:
                raise AsyncDumpError(f"{self._start_failures} workers in a row died while starting "
                                     f"(last exit code {exit_code}); see their stderr")
        else:  # a worker runs its jobs in order: only the first had started
            for position, job in enumerate(worker.inflight.values()):
                self._recover(job, exit_code, in_progress=position == 0)
        if self._stop.is_set() and self._abort_reason is not None:
            return
        try:
            replacement = start_worker(self._buffer.fd, self._buffer.mapped_bytes)
        except Exception as exc:
            if not self._workers:
                raise AsyncDumpError(f"a worker died (exit code {exit_code}) and no new one "
                                     f"could be started: {exc}") from exc
            return
        replacement.replaces_death_at = noticed
        self._workers.append(replacement)
        self._counters.worker_restarts += 1

    def _recover(self, job: _Job, exit_code: int, in_progress: bool) -> None:
        """Settle a dead worker's job: finish encoded images, re-queue the others.

        Only the image the worker was on when it died is charged an attempt, so images
        queued behind a poison image are never failed for it.
        """
        again = []
        charged = not in_progress
        for item in job.items:
            index, final, temp, _ = item
            state = job.states[index]
            if state == DONE:
                continue
            if state == ENCODED:  # the temp file was complete: finish the rename ourselves
                try:
                    if os.path.exists(temp):
                        os.replace(temp, final)
                    self._finish_image(job, index, nbytes=os.path.getsize(final))
                except OSError as exc:
                    self._finish_image(job, index, error=exc)
                continue
            _unlink_quietly(temp)
            attempts = job.attempts if charged else job.attempts + 1
            charged = True
            if attempts >= MAX_JOB_ATTEMPTS:
                self._finish_image(job, index, error=AsyncDumpError(
                    f"a worker died {attempts} times (last exit code {exit_code}) "
                    "while writing this image; giving up on it"))
            else:  # one job per image from now on: a poison image then fails alone
                again.append(_Job(job.batch, [item], job.static, attempts=attempts))
        self._pending.extendleft(reversed(again))

    def _break(self, reason: BaseException) -> None:
        self._broken = reason
        self._buffer.wake_all()
        self._poke()

    def _fail_everything(self, reason: BaseException) -> None:
        """Resolve every job not yet written with ``reason`` (abort or broken sink)."""
        while self._ready:
            self._pending.append(self._ready.popleft())
        jobs = list(self._pending) + [job for w in self._workers for job in w.inflight.values()]
        self._pending.clear()
        for worker in self._workers:
            worker.inflight.clear()
            worker.inflight_images = 0
        for job in jobs:
            for index, state in list(job.states.items()):
                if state != DONE:
                    self._finish_image(job, index, error=reason)


def _temp_path(final: str, stamp: str, index: int) -> str:
    """A hidden name in the target folder, unique per staged image."""
    folder, _, base = final.rpartition(os.sep)
    return f"{folder}{os.sep}.{base[:160]}.{stamp}-{index}.tmp"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _failure_error(failures: list[tuple[Path, BaseException]]) -> AsyncDumpError:
    error = AsyncDumpError(describe_failures(failures), failures)
    error.__cause__ = failures[0][1]
    return error


def _conversion(value_range: Any, mean: Any, std: Any) -> Conversion:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be a pair of numbers (lo, hi), got {value_range!r}") \
            from None
    if not lo < hi:
        raise ValueError(f"value_range must have lo < hi, got {value_range!r}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (as for transforms.Normalize) or neither")
    if mean is None:
        return Conversion((lo, hi), None, None)
    try:
        mean_t = tuple(float(v) for v in mean)
        std_t = tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be sequences of numbers, got {mean!r}, {std!r}") \
            from None
    if not mean_t or len(mean_t) != len(std_t):
        raise ValueError(f"mean and std must have the same length (1 or one per channel), "
                         f"got {len(mean_t)} and {len(std_t)}")
    return Conversion((lo, hi), mean_t, std_t)


@atexit.register
def _close_open_sinks() -> None:
    for sink in list(_open_sinks):
        warnings.warn(f"{sink!r} was not closed; flushing it at interpreter exit",
                      RuntimeWarning, stacklevel=1)
        try:
            sink.close()
        except Exception as exc:  # at exit there is no caller left to raise to
            warnings.warn(f"asyncdump: closing at exit failed: {exc}", RuntimeWarning, stacklevel=1)
