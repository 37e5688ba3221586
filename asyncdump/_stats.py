"""``SinkStats``: a frozen snapshot of what a sink has done."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SinkStats:
    """Counts are images unless the name says bytes or seconds.

    ``written + failed + dropped == submitted`` once everything submitted has finished.
    """

    submitted: int
    written: int
    failed: int
    dropped: int
    bytes_written: int  # size of the files on disk
    buffered_bytes: int  # staged pixels not yet encoded
    peak_buffered_bytes: int  # never above max_buffer_bytes
    max_buffer_bytes: int
    submit_seconds: float  # total caller time inside submit
    blocked_seconds: float  # the part of submit_seconds spent waiting for buffer space
    images_per_second: float  # written / elapsed_seconds
    workers: int
    worker_restarts: int
    max_restart_seconds: float  # longest from a worker's death to its replacement being ready
    worker_rss_bytes: int  # resident memory of all workers now (psutil)
    elapsed_seconds: float  # since the sink was created


@dataclass
class Counters:
    """The live counters behind ``SinkStats``. Each field has one writer at a time."""

    # written by producers (submit/encode, under the sink's submit lock)
    submitted: int = 0
    dropped: int = 0
    submit_seconds: float = 0.0
    blocked_seconds: float = 0.0
    # written by the collector
    written: int = 0
    failed: int = 0
    bytes_written: int = 0
    worker_restarts: int = 0
    max_restart_seconds: float = 0.0
