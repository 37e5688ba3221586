"""What the producer hands the collector: jobs cut from a staged batch, or images not staged.

A ``BatchRecord`` is one ``submit`` call's promise; its Future resolves when its last image is
written or failed. A ``Job`` is a run of consecutive images of one batch, staged at
``offset + k * image_bytes``, sent to one worker as a ``RunJob``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
from pathlib import Path
from typing import Any, NamedTuple

from ._protocol import Item, JobSettings, RunJob

PENDING, ENCODED, DONE = 0, 1, 2  # an image's state in its job

_job_ids = itertools.count()


def next_id() -> int:
    """A process-wide unique id for a job or a probe."""
    return next(_job_ids)


class BatchRecord:
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


class Job:
    """Consecutive images of one batch and each one's state (collector-owned once handed over)."""

    __slots__ = ("attempts", "batch", "id", "items", "settings", "states")

    def __init__(self, batch: BatchRecord, items: list[Item], settings: JobSettings,
                 attempts: int = 0):
        self.id = next_id()
        self.batch = batch
        self.items = items
        self.settings = settings
        self.states = dict.fromkeys((item.position for item in items), PENDING)
        self.attempts = attempts  # times a worker died on this job's first unfinished image

    def order(self) -> RunJob:
        return RunJob(self.id, self.items, self.settings)

    def offset_of(self, index: int) -> int:
        """Where image ``index`` of the batch is staged (a job's images are consecutive)."""
        first = self.items[0]
        return first.offset + (index - first.position) * self.settings.image_bytes


class NotStaged(NamedTuple):
    """Images of a promised batch that never reached the buffer (submit was interrupted in a
    later part of an over-sized batch). The collector fails them like any other image."""

    batch: BatchRecord
    indices: range
    reason: BaseException


def cut_into_jobs(batch: BatchRecord, settings: JobSettings, start: int, count: int,
                  offset: int, per_job: int, stamp: str) -> list[Job]:
    """Images ``start:start+count`` of ``batch``, staged from ``offset``, as jobs of
    ``per_job`` images, each with its own temp file name (``stamp`` makes them unique)."""
    jobs = []
    for first in range(start, start + count, per_job):
        items = [Item(i, batch.paths[i], temp_path(batch.paths[i], stamp, i),
                      offset + (i - start) * settings.image_bytes)
                 for i in range(first, min(first + per_job, start + count))]
        jobs.append(Job(batch, items, settings))
    return jobs


def temp_path(final: str, stamp: str, index: int) -> str:
    """A hidden name in the target folder, unique per staged image."""
    folder, _, base = final.rpartition(os.sep)
    return f"{folder}{os.sep}.{base[:160]}.{stamp}-{index}.tmp"
