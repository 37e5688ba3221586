"""What producers and the collector both touch: open batches, counters and failures.

Producers (``submit``, under the sink's submit lock) accept batches and count drops; the
collector resolves images. The lock guards the open batches and the failure lists, which the
caller's thread reads (``flush``, ``on_error``); each counter has one writer at a time.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

from ._errors import AsyncDumpError, describe_failures
from ._jobs import BatchRecord
from ._stats import Counters
from ._stores import result_path

Failure = tuple[Path, BaseException]


class Accounting:
    """Open batches, counters, and the failures not yet shown to the caller."""

    def __init__(self) -> None:
        self.counters = Counters()
        self._lock = threading.Lock()
        self._open: set[BatchRecord] = set()
        self._undelivered: list[Failure] = []  # for the next submit/flush, per on_error
        self._since_flush: list[Failure] = []  # for the next flush to raise

    # ----------------------------------------------------------------- producer side
    def accept(self, batch: BatchRecord) -> None:
        self.counters.submitted += batch.count
        with self._lock:
            self._open.add(batch)

    def drop(self, count: int) -> None:
        self.counters.submitted += count
        self.counters.dropped += count

    # ----------------------------------------------------------------- collector side
    def image_written(self, batch: BatchRecord, nbytes: int) -> None:
        self.counters.written += 1
        self.counters.bytes_written += nbytes
        self._image_done(batch)

    def image_failed(self, batch: BatchRecord, index: int, error: BaseException) -> None:
        self.counters.failed += 1
        failure = (result_path(batch.paths[index]), error)
        batch.failures.append(failure)
        with self._lock:
            self._undelivered.append(failure)
            self._since_flush.append(failure)
        self._image_done(batch)

    def _image_done(self, batch: BatchRecord) -> None:
        batch.remaining -= 1
        if batch.remaining:
            return
        with self._lock:
            self._open.discard(batch)
        if batch.failures:
            batch.future.set_exception(failure_error(batch.failures))
        elif batch.results is not None:
            batch.future.set_result(batch.results)
        else:
            batch.future.set_result([result_path(p) for p in batch.paths])

    # ----------------------------------------------------------------- caller side
    def open_futures(self) -> list[concurrent.futures.Future[Any]]:
        """The Futures of every batch not yet resolved, now."""
        with self._lock:
            return [batch.future for batch in self._open]

    def take_undelivered(self) -> list[Failure]:
        if not self._undelivered:  # the common case, without the lock
            return []
        with self._lock:
            failures, self._undelivered = self._undelivered, []
        return failures

    def take_since_flush(self) -> list[Failure]:
        with self._lock:
            failures, self._since_flush = self._since_flush, []
        return failures


def failure_error(failures: list[Failure], note: str = "") -> AsyncDumpError:
    """One error for several failed images, caused by the first one's cause; ``note`` is
    appended to the message."""
    message = describe_failures(failures)
    error = AsyncDumpError(f"{message}; {note}" if note else message, failures)
    error.__cause__ = failures[0][1]
    return error
