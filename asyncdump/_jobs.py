"""What the producer hands the collector: jobs cut from a staged batch, or images not staged.

A ``BatchRecord`` is one ``submit`` call's promise; its Future resolves when its last image is
written or failed. A ``Job`` is a run of consecutive images of one batch, staged at
``offset + k * image_bytes``, sent to one worker as a ``RunJob``.

``submit`` hands over a ``StagedPart`` and the collector thread cuts it into jobs, and, for a
batch named by a plain template, renders its paths (``Namer.plain_paths``): that per-image
Python then runs while the training loop computes, not inside ``submit``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ._fsutil import temp_name
from ._protocol import Item, JobSettings, RunJob

PENDING, ENCODED, DONE = 0, 1, 2  # an image's state in its job

_job_ids = itertools.count()


def next_id() -> int:
    """A process-wide unique id for a job or a probe."""
    return next(_job_ids)


class BatchRecord:
    """One submit call's promise: its Future resolves when ``remaining`` reaches 0."""

    __slots__ = ("_paths", "_render", "count", "digest", "failures", "future", "remaining",
                 "results")

    def __init__(self, paths: list[str] | Callable[[], list[str]], count: int,
                 encode_only: bool = False, digest: bool = False):
        """``paths``: the batch's paths, or a function that renders them when first needed
        (it must not fail: ``Namer.plain_paths`` checks the batch before it returns one)."""
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()  # a caller's cancel() cannot race a result
        self._paths: list[str] | None = paths if isinstance(paths, list) else None
        self._render: Callable[[], list[str]] | None = None if isinstance(paths, list) else paths
        self.count = count
        self.remaining = count
        self.failures: list[tuple[Path, BaseException]] = []
        # encode_only: the file bytes; digest: (bytes, sha256) or, when written, (sha256, nbytes)
        self.results: list[Any] | None = [None] * count if encode_only or digest else None
        self.digest = digest

    @property
    def paths(self) -> list[str]:
        """The batch's paths (str), one per image; rendered on first use when deferred.

        Idempotent, so two threads racing to render it get equal lists."""
        if self._paths is None:
            assert self._render is not None
            self._paths = self._render()
        return self._paths


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


class StagedPart(NamedTuple):
    """Images ``start:stop`` of a batch, copied to ``offset`` and not yet cut into jobs of
    ``per_job`` images (the collector cuts them; ``stamp`` makes temp names unique)."""

    batch: BatchRecord
    settings: JobSettings
    start: int
    stop: int
    offset: int
    per_job: int
    stamp: str

    def jobs(self) -> list[Job]:
        """The part as jobs of ``per_job`` consecutive images, each image with its own temp
        file name."""
        paths, image_bytes = self.batch.paths, self.settings.image_bytes
        jobs = []
        for first in range(self.start, self.stop, self.per_job):
            items = [Item(i, paths[i], temp_path(paths[i], self.stamp, i),
                          self.offset + (i - self.start) * image_bytes)
                     for i in range(first, min(first + self.per_job, self.stop))]
            jobs.append(Job(self.batch, items, self.settings))
        return jobs


def temp_path(final: str, stamp: str, index: int) -> str:
    """A hidden name in the target folder, unique per staged image, made by ``temp_name`` (so
    that cleanup recognises it, and at most 255 bytes whatever the length of ``final``)."""
    folder, _, base = final.rpartition(os.sep)
    return f"{folder}{os.sep}{temp_name(base, f'{stamp}-{index}')}"
