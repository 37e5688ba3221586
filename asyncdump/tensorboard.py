"""``ImageWriter``: ``SummaryWriter.add_image(s)`` whose conversion and PNG encoding never wait.

    from torch.utils.tensorboard import SummaryWriter
    from asyncdump.tensorboard import ImageWriter
    images = ImageWriter(SummaryWriter("runs/exp"))
    images.add_images("samples", fake, global_step=step)   # returns once the pixels are staged

The path of one call, and who owns what:

    caller      add_image(s): check as SummaryWriter does, stamp step and walltime,
                sink.encode (host: one copy that lays out TensorBoard's grid in shared memory;
                CUDA: the uint8 picture made on the device), queue (future, event) in call order
    workers     SummaryWriter's pixel rule (float * 255, clip, truncate), PNG encode, bytes home
    event thread  takes the queue in call order, waits for each PNG, writes its Summary through
                ``writer._get_file_writer()`` with the call's step and walltime

One queue in call order means a tag's steps reach the event file in the order of the calls,
whichever worker finishes first. Needs ``pip install 'asyncdump[tensorboard]'``;
``import asyncdump`` does not import this module or tensorboard.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import queue
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any

try:
    from tensorboard.compat.proto.summary_pb2 import Summary
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("asyncdump.tensorboard needs the tensorboard package: "
                      "pip install 'asyncdump[tensorboard]'") from exc

from ._errors import AsyncDumpError
from ._sink import AsyncImageSink
from ._stats import SinkStats
from ._tb_layout import device_picture, host_batch

__all__ = ["ImageWriter"]

# The sink's options that make sense for TensorBoard images (PNG, SummaryWriter's pixel rule).
SINK_OPTIONS = ("workers", "max_buffer_bytes", "on_full", "on_error", "quality", "png_encoder")

_open_writers: weakref.WeakSet[ImageWriter] = weakref.WeakSet()


@dataclass(frozen=True)
class _Pending:
    """One call, waiting for its PNG."""

    future: concurrent.futures.Future[list[bytes]]
    tag: str
    step: int | None
    walltime: float
    shape: tuple[int, int, int]  # channels, height, width of the picture


class ImageWriter:
    """``add_image``/``add_images`` of a ``SummaryWriter``, encoded by a worker pool.

    Args:
        writer: the ``torch.utils.tensorboard.SummaryWriter`` whose event file receives the
            images (through its own file writer; it stays yours to close, after this).
        sink_options: ``AsyncImageSink`` options: ``workers``, ``max_buffer_bytes``,
            ``on_full``, ``on_error``, ``quality`` (PNG compression 0..9), ``png_encoder``.
    """

    def __init__(self, writer: Any, **sink_options: Any):
        self._closed = True  # until fully started
        if not callable(getattr(writer, "_get_file_writer", None)):
            raise TypeError(f"writer must be a torch.utils.tensorboard.SummaryWriter, "
                            f"got {type(writer).__name__}")
        unknown = sorted(set(sink_options) - set(SINK_OPTIONS))
        if unknown:
            raise TypeError(f"unknown or unsupported sink option(s) {', '.join(unknown)}; "
                            f"accepted: {', '.join(SINK_OPTIONS)} (TensorBoard images are PNGs "
                            "with SummaryWriter's own pixel rule)")
        self.writer = writer
        # The sink never writes a file (encode only); its root must merely exist.
        self._sink = AsyncImageSink(writer.get_logdir(), format="png", **sink_options)
        self._order = threading.Lock()  # staging and queueing happen together: call order
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._queued = 0  # written under _order (and _done); read by flush
        self._handled = 0  # written by the event thread only
        self._failures: list[tuple[str, int | None, BaseException]] = []
        self._thread = threading.Thread(target=self._write_events, name="asyncdump-tensorboard",
                                        daemon=True)  # close() and atexit end it
        self._thread.start()
        self._closed = False
        _open_writers.add(self)

    # ------------------------------------------------------------------ SummaryWriter's calls
    def add_image(self, tag: str, img_tensor: Any, global_step: int | None = None,
                  walltime: float | None = None, dataformats: str = "CHW") -> None:
        """``SummaryWriter.add_image``: same arguments and picture; returns once staged."""
        self._add(tag, img_tensor, global_step, walltime, dataformats)

    def add_images(self, tag: str, img_tensor: Any, global_step: int | None = None,
                   walltime: float | None = None, dataformats: str = "NCHW") -> None:
        """``SummaryWriter.add_images``: same arguments and grid (8 columns, no padding, black
        fill); returns once staged."""
        self._add(tag, img_tensor, global_step, walltime, dataformats)

    def _add(self, tag: Any, images: Any, global_step: Any, walltime: Any, dataformats: Any) -> None:
        stamp = time.time() if walltime is None else _number("walltime", walltime, float)
        if self._closed:
            raise RuntimeError("this ImageWriter is closed")
        if not isinstance(tag, str):
            raise TypeError(f"tag must be a str, got {type(tag).__name__}")
        step = None if global_step is None else _number("global_step", global_step, int)
        batch, layout = host_batch(images, dataformats)
        staged = batch if batch is not None else device_picture(images, layout)
        with self._order:
            future = self._sink.encode(staged)
            if future.cancelled():  # on_full="drop": counted in stats.dropped, no event
                return
            self._queue.put(_Pending(future, tag, step, stamp, layout.shape))
            with self._done:  # after the put: a Ctrl-C between them cannot make flush wait forever
                self._queued += 1

    # ------------------------------------------------------------------ the event thread
    def _write_events(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write_event(item)
            except BaseException as exc:  # recorded for flush/close
                with self._done:
                    self._failures.append((item.tag, item.step, exc))
            with self._done:
                self._handled += 1
                self._done.notify_all()

    def _write_event(self, item: _Pending) -> None:
        png = item.future.result()[0]
        channels, height, width = item.shape
        image = Summary.Image(height=height, width=width, colorspace=channels,
                              encoded_image_string=png)
        summary = Summary(value=[Summary.Value(tag=item.tag, image=image)])
        self.writer._get_file_writer().add_summary(summary, item.step, item.walltime)

    # ------------------------------------------------------------------ flush, close
    def flush(self, timeout: float | None = None) -> None:
        """Write every image added before this call into the event file, and flush the writer.

        Raises ``AsyncDumpError`` for images that could not be encoded since the last flush
        (with ``on_error="raise"``, the default), ``TimeoutError`` on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            target = self._queued
        sink_error = None
        try:
            self._sink.flush(timeout)
        except AsyncDumpError as exc:
            sink_error = exc
        with self._done:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._done.wait_for(lambda: self._handled >= target, timeout=left):
                raise TimeoutError(f"{target - self._handled} TensorBoard image(s) not written "
                                   f"after {timeout} s")
            failures, self._failures = self._failures, []
        self.writer.flush()
        if failures and self._sink.on_error == "raise":
            lines = [f"  tag {tag!r} step {step}: {cause}" for tag, step, cause in failures[:5]]
            more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
            raise AsyncDumpError(f"{len(failures)} TensorBoard image(s) were not written:\n"
                                 + "\n".join(lines) + more) from failures[0][2]
        if sink_error is not None and self._sink.on_error == "raise":
            raise sink_error

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the workers. Idempotent. The ``SummaryWriter`` stays open."""
        if self._closed:
            return
        self._closed = True
        _open_writers.discard(self)
        try:
            self.flush(timeout)
        finally:
            self._queue.put(None)
            self._sink.close()  # resolves every future left (after an interrupted flush)
            self._thread.join()
            self.writer.flush()

    def __enter__(self) -> ImageWriter:
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
        """The worker pool's counters (``SinkStats``); one image per call."""
        return self._sink.stats

    def __repr__(self) -> str:
        return f"ImageWriter({self.writer.get_logdir()!r}, {'closed' if self._closed else 'open'})"


def _number(name: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


@atexit.register  # registered after the sink's own: runs first, while the sinks still work
def _close_at_exit() -> None:
    for writer in list(_open_writers):
        try:
            writer.close()
        except Exception as exc:  # at exit there is no caller left to raise to
            warnings.warn(f"asyncdump: closing an ImageWriter at exit failed: {exc}",
                          RuntimeWarning, stacklevel=1)
