"""Datasets at scale: a manifest, resume, sharded folders or tar shards, many ranks.

    with DatasetSink("out", count=1_000_000, mode="tar", resume=True) as ds:
        for indices in ds.pending(batch_size=256):      # this rank's images not yet on disk
            images, metadata = my_model(indices)        # (B, C, H, W) tensor, one dict each
            ds.submit(indices, images, metadata)

The path of one batch:

    caller thread:   submit -> AsyncImageSink.submit(names=...) (files) or .encode() (tar)
                     -> (future, indices, metadata) on a bounded queue
    committer thread (one per DatasetSink; owns the manifest, the open tar part, the counts):
               appends a batch's manifest lines once its files, or its complete tar shard,
               are in place under their final names (``_committer.py`` has the details)
    close:   flush everything, then the manifest is rewritten sorted by index (one rank), or
             after a barrier rank 0 merges the per-rank manifests.

A manifest line exists only for bytes that are complete under their final name, so a run
killed at any moment resumes by skipping the indices in the manifest. Shards go to ranks
round-robin (shard s -> rank s % world), so every tar has one writer and the output does not
depend on the number of ranks or workers.

Its parts: ``_manifest`` (names, ``dataset.json``, the manifest, resume state), ``_committer``
(the committer thread), ``_tar`` (tar parts), ``_metadata`` (per-image metadata JSON),
``_ranks`` (rank, world size, collectives), ``_schedule`` (this rank's pending indices) and
``_store_dataset`` (a root that is an object-store URL; tar parts are uploaded by
``_store_uploads``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _defaults
from ._codecs import encode_params, get_codec
from ._committer import Committer
from ._encoders import check_png_encoder
from ._errors import AsyncDumpError, DatasetError
from ._manifest import (
    MANIFEST_FILE,
    MAX_COUNT,
    Layout,
    job_record,
    parts_done,
    prepare_root,
    rank_manifest,
    read_manifests,
    write_merged_manifest,
)
from ._metadata import serialise
from ._owner import OwningProcess
from ._ranks import Ranks
from ._schedule import Schedule
from ._store_dataset import StoreDataset
from ._stores import (
    DEFAULT_RETRY_SECONDS,
    already_checked,
    checked_retry_seconds,
    checked_store_options,
)

__all__ = ["DatasetError", "DatasetSink", "DatasetSummary", "write_dataset"]

MODES = ("files", "tar")
MAX_WORKERS = 1024  # per rank: more is a typo, not a machine


@dataclass(frozen=True)
class DatasetSummary:
    """What a run did (all ranks together once the run closed normally)."""

    root: str
    mode: str
    images: int  # written by this run
    skipped: int  # already durable before this run (resume)
    failed: int
    bytes: int  # image bytes written by this run
    seconds: float
    complete: bool  # the manifest lists every index of the dataset

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class DatasetSink:
    """Write a dataset of ``count`` images with a manifest, resume and shards.

    Args:
        root: output folder (created if missing), or an object-store prefix
            (``"s3://bucket/prefix"``; tar mode needs S3; docs/object-storage.md).
        count: number of images in the whole dataset (all ranks together).
        format, quality, workers, max_buffer_bytes, fsync, png_encoder: as for
            ``AsyncImageSink``; the resolved encoder is recorded in ``dataset.json`` and a
            resume with a different one is refused (the bytes would differ).
        mode: ``"files"`` (one file per image in sub-folders of ``shard_size`` files) or
            ``"tar"`` (WebDataset-style shards of ``shard_size`` images).
        shard_bytes: tar mode: also start a new part of a shard before it would exceed this.
        resume: skip the indices already in ``root``'s manifest; without it an existing
            dataset in ``root`` is refused and left untouched.
        job: JSON-able parameters of your generator (model, seed, ...), stored in
            ``dataset.json``: a resume with other parameters is refused.
        progress: show a tqdm bar (this rank).
        storage_options: for an object-store root, passed to its fsspec file system (as
            ``AsyncImageSink``'s).
        retry_seconds: for an object-store root, how long transient errors (5xx, SlowDown,
            resets, timeouts) are retried per request before the run stops (as
            ``AsyncImageSink``'s; default 60).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        count: int,
        format: str = "png",
        quality: int | None = None,
        mode: str = "files",
        shard_size: int = 1000,
        shard_bytes: int | None = None,
        workers: int | None = None,
        resume: bool = False,
        job: dict[str, Any] | None = None,
        fsync: bool = False,
        progress: bool = False,
        max_buffer_bytes: int | None = None,
        png_encoder: str = "auto",
        storage_options: dict[str, Any] | None = None,
        retry_seconds: float | None = None,
    ):
        self._closed = True
        self._owner = OwningProcess("DatasetSink")
        _check_int("count", count)
        if count > MAX_COUNT:
            raise ValueError(f"count must be at most 2**53 = {MAX_COUNT} (indices stay exact "
                             f"in every JSON reader), got {count}")
        _check_int("shard_size", shard_size)
        if shard_bytes is not None:
            _check_int("shard_bytes", shard_bytes)
        if workers is not None:  # checked before anything is written (the sink starts later)
            _check_int("workers", workers)
            if workers > MAX_WORKERS:
                raise ValueError(f"workers must be at most {MAX_WORKERS}, got {workers}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        codec = get_codec(format)
        encode_params(codec, quality)
        self.png_encoder = check_png_encoder(png_encoder, codec, quality)
        self._storage_options = checked_store_options(root, storage_options)
        self._retry_seconds = _check_retry_seconds(retry_seconds, self._storage_options is not None)
        self.root: Any  # a Path, or the URL (str) of an object-store prefix
        self.root = root if self._storage_options is not None else Path(os.path.abspath(os.fspath(root)))
        self.mode = mode
        self.fsync = bool(fsync)
        self.layout = Layout(count, shard_size, codec.extension, mode)
        self._format = format.lower()
        self._shard_bytes = shard_bytes if mode == "tar" else None
        try:
            record = job_record(self.layout, self._format, quality, self._shard_bytes,
                                json.loads(json.dumps(job or {})), self.png_encoder)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"job must be JSON-serialisable: {exc}") from None
        self._sink: Any = None  # what construction creates, released if a later step fails
        self._committer: Committer = None  # type: ignore[assignment]  # set by _start
        self._store: StoreDataset | None = None  # an object-store root's manifest and setup
        self._bar: Any = None
        self._ranks = Ranks()
        try:
            self._start(record, resume, count, format, quality, workers, fsync, progress,
                        max_buffer_bytes)
        except BaseException:
            self._release_partial()
            raise
        self._closed = False

    def _start(self, record: dict[str, Any], resume: bool, count: int, format: str,
               quality: int | None, workers: int | None, fsync: bool, progress: bool,
               max_buffer_bytes: int | None) -> None:
        """Everything after the process group: setup, resume state, sink, committer."""
        self.rank, self.world = self._ranks.rank, self._ranks.world
        if self._storage_options is not None:
            entries = self._start_store(record, resume)
        else:
            entries = self._prepare_folder(record, resume, count)
        self.skipped = len(entries)
        last_index = max(entries, default=-1)
        next_part = parts_done(self.layout, entries.values()) if self.mode == "tar" else {}
        self._schedule = Schedule(self.layout, entries.keys(), self.rank, self.world)
        del entries
        self._shape: tuple[int, ...] | None = None
        self._depth: int | None = None  # bits per channel of the files: 8, or 16 (uint16)
        self._summary: DatasetSummary | None = None

        from ._sink import AsyncImageSink

        if workers is None:  # ranks on one machine share its cores
            workers = _defaults.default_workers(self._ranks.local_world)
        with already_checked(str(self.root)):  # a store's root: StoreDataset checked it
            self._sink = AsyncImageSink(self.root, workers=workers, format=format, quality=quality,
                                        on_error="ignore", fsync=fsync, overwrite=True,
                                        max_buffer_bytes=max_buffer_bytes,
                                        png_encoder=self.png_encoder,
                                        storage_options=self._storage_options,
                                        retry_seconds=self._retry_seconds)
        manifest = None if self._store is not None else \
            self.root / (MANIFEST_FILE if self.world == 1 else rank_manifest(self.rank))
        self._committer = Committer(
            self.root, self.layout, self.mode, self._format, self.fsync, self._shard_bytes,
            next_part, last_index, manifest, self._store)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=self._schedule.remaining, unit="img", dynamic_ncols=True, disable=None,
                             desc=f"rank {self.rank}" if self.world > 1 else "generate")
        self._started = time.perf_counter()
        self._committer.start(self._bar)

    def _prepare_folder(self, record: dict[str, Any], resume: bool,
                        count: int) -> dict[int, dict[str, Any]]:
        """Rank 0 prepares the folder (the others wait); every rank reads the manifests."""
        self._on_rank_0(lambda: prepare_root(self.root, self.layout, record, resume, self.fsync))
        return read_manifests(self.root, count)  # rank 0 left only durable entries

    def _start_store(self, record: dict[str, Any], resume: bool) -> dict[int, dict[str, Any]]:
        """An object-store prefix: rank 0 checks it and PUTs dataset.json or merges the durable
        entries (the others wait, as for a folder); every rank returns the durable entries."""
        assert self._storage_options is not None
        self._store = StoreDataset(self.root, self._storage_options, self.layout,
                                   self._retry_seconds, rank=self.rank)
        self.root = self._store.url
        store = self._store
        if self.world == 1:
            return store.prepare(record, resume)
        entries = self._on_rank_0(lambda: store.prepare(record, resume))
        return entries if self.rank == 0 else store.read_entries()

    def _on_rank_0(self, prepare: Callable[[], Any]) -> Any:
        """Run ``prepare`` on rank 0 while the others wait; a problem it raises (a
        ``DatasetError`` or an ``OSError``, ``StoreError`` included) is raised on every rank."""
        problem, result = None, None
        if self.rank == 0:
            try:
                result = prepare()
            except (DatasetError, OSError) as exc:
                problem = exc
        message = self._ranks.broadcast(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        if message is not None:
            raise DatasetError(message)
        return result

    def _release_partial(self) -> None:
        """Construction failed part-way: stop the sink, close the manifest, leave the group."""
        try:
            if self._sink is not None:
                self._sink.close()
        finally:
            if self._committer is not None:
                self._committer.release()  # the manifest (its thread never started)
            if self._bar is not None:
                self._bar.close()
            self._ranks.release()

    # ------------------------------------------------------------------ caller side
    @property
    def ranks(self) -> Ranks:
        """The ranks this sink coordinates with (``rank``, ``world``, ``barrier()``,
        ``gather()``, ``broadcast()``); for asyncdump's own commands, read-only."""
        return self._ranks

    @property
    def remaining(self) -> int:
        """Images of this rank not yet submitted."""
        return self._schedule.remaining

    def pending(self, batch_size: int) -> Iterator[list[int]]:
        """This rank's indices still to write, in batches that never span two shards.

        Submit each batch before asking for the next one.
        """
        self._owner.check()
        _check_int("batch_size", batch_size)
        schedule = self._schedule
        while True:
            batch = schedule.next_batch(batch_size)
            if not batch:
                return
            left = schedule.remaining
            yield batch
            if schedule.remaining == left:
                raise DatasetError("each batch from pending() must be submitted before the next")

    def submit(self, indices: Sequence[int], images: Any,
               metadata: Sequence[dict[str, Any]] | None = None) -> None:
        """Queue ``images`` (a ``(B, C, H, W)`` tensor or array) for ``indices``.

        ``indices`` must be the next batch of ``pending()``; ``metadata`` is one JSON-able dict
        per image (its ``"label"``, if any, becomes the manifest's ``label``).
        """
        self._owner.check()
        if self._closed:
            raise RuntimeError("this DatasetSink is closed")
        error = self._committer.error
        if error is not None:
            raise AsyncDumpError(f"the dataset writer failed: {error}") from error
        indices = list(indices)
        count = len(indices)
        if not count or indices != self._schedule.next_batch(count):
            raise ValueError(f"indices must be the next batch from pending() (next pending index "
                             f"{self._schedule.next_index()}, batches within one shard); got "
                             f"{_short(indices)}")
        shape = tuple(getattr(images, "shape", ()))
        if len(shape) != 4 or shape[0] != count:
            raise ValueError(f"images must be a (B, C, H, W) batch with B = len(indices) = {count}, "
                             f"got shape {shape or type(images).__name__}")
        # uint16 is written as 16-bit files, every other dtype as 8-bit ones
        depth = 16 if str(getattr(images, "dtype", "")).endswith("uint16") else 8
        if self._shape is not None and shape[1:] != self._shape:
            raise ValueError(f"image shape {shape[1:]} differs from earlier batches' {self._shape}: "
                             "a dataset has one image shape")
        if self._depth is not None and depth != self._depth:
            raise ValueError(f"images of dtype {images.dtype} make {depth}-bit files, earlier "
                             f"batches made {self._depth}-bit ones: a dataset has one pixel depth "
                             f"({'uint16' if self._depth == 16 else 'not uint16'} like them)")
        metas = serialise(metadata, count, tar=self.mode == "tar", indices=indices)
        future: concurrent.futures.Future[Any]
        if self.mode == "files":
            future = self._sink._submit_digest(images, [self.layout.file_name(i) for i in indices])
        else:
            future = self._sink._submit_digest(images, None)
        # Fixed only by an accepted batch: one refused (say, for its dtype) fixes nothing.
        self._shape, self._depth = shape[1:], depth
        _, channels, height, width = shape
        self._schedule.take(count)
        self._committer.put(future, indices, metas, f"[{height},{width},{channels}]")

    # ------------------------------------------------------------------ ending
    def close(self) -> DatasetSummary:
        """Write everything submitted, finish the manifest, and return the summary."""
        return self._finish(normal=True)

    def _finish(self, normal: bool, interrupted: bool = False) -> DatasetSummary:
        self._owner.check()
        if self._summary is not None:
            return self._summary
        self._closed = True
        if interrupted:  # Ctrl-C: do not wait for a slow store (a resume redoes those parts)
            self._committer.abandon_uploads()
        try:
            self._sink.close()
        finally:
            try:
                self._committer.stop()
            except KeyboardInterrupt:  # Ctrl-C while close waits for the store: stop waiting
                self._committer.abandon_uploads()
                raise
            finally:
                if self._bar is not None:
                    self._bar.close()
        seconds = time.perf_counter() - self._started
        committer = self._committer
        local = (committer.written, committer.failed, committer.bytes)
        if not normal or committer.error is not None:
            if self._store is not None and self.world == 1:  # manifest.jsonl, parts deleted
                with contextlib.suppress(OSError):  # the parts stay: resume reads them
                    self._store.merge()  # (several ranks: every part stays for resume)
                    self._store.abort_unfinished_uploads()
            elif self.world == 1:  # a clean sorted manifest even after an error
                with contextlib.suppress(OSError):  # a full disk: the appended one stays
                    write_merged_manifest(self.root, read_manifests(self.root, self.layout.count),
                                          self.fsync)
            self._summary = DatasetSummary(str(self.root), self.mode, local[0], self.skipped,
                                           local[1], local[2], seconds, False)
            self._ranks.release()
            if committer.error is not None and normal:
                raise AsyncDumpError(f"the dataset writer failed: {committer.error}") \
                    from committer.error
            return self._summary
        self._ranks.barrier()  # every rank's lines are in its manifest file (or parts)
        complete = False
        problem: str | None = None  # rank 0's merge on a store failed: every rank raises it
        if self._store is not None:  # manifest.jsonl, then the parts are deleted
            if self.rank == 0:
                try:
                    complete = self._merge_store()
                except OSError as exc:
                    problem = (f"cannot write the manifest of {self.root}: {exc}; every image "
                               "is stored and listed in its manifest parts: rerun with resume "
                               "(--resume) to write it")
        elif self.world == 1 and committer.in_order:  # already sorted, without duplicates
            complete = self.skipped + committer.written == self.layout.count
        elif self.rank == 0:
            entries = read_manifests(self.root, self.layout.count)
            write_merged_manifest(self.root, entries, self.fsync)
            complete = len(entries) == self.layout.count
        totals = self._ranks.gather(local)
        complete, problem = self._ranks.broadcast((complete, problem))
        self._summary = DatasetSummary(
            str(self.root), self.mode, sum(t[0] for t in totals), self.skipped,
            sum(t[1] for t in totals), sum(t[2] for t in totals),
            max(seconds, *self._ranks.gather(seconds)), bool(complete))
        self._ranks.release()
        if problem is not None:
            raise DatasetError(problem)
        return self._summary

    def _merge_store(self) -> bool:
        """Rank 0 once every rank stopped: abort unfinished uploads, PUT ``manifest.jsonl``
        (all ranks' lines), delete the parts; whether it lists the whole dataset."""
        assert self._store is not None
        self._store.abort_unfinished_uploads()
        merged = self._store.merge() if self.world == 1 else self._store.merge_all()
        return merged == self.layout.count

    @property
    def summary(self) -> DatasetSummary | None:
        """The summary once closed, else None."""
        return self._summary

    def __enter__(self) -> DatasetSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._finish(normal=exc_type is None,
                     interrupted=exc_type is not None and not issubclass(exc_type, Exception))


def write_dataset(
    generate: Callable[[list[int]], Any],
    root: str | os.PathLike[str],
    *,
    count: int,
    batch_size: int = 64,
    **options: Any,
) -> DatasetSummary:
    """Write ``count`` images made by ``generate(indices) -> images | (images, metadata)``.

    ``generate`` is called only for indices not yet on disk (this rank's share, resume
    skips the rest), so an expensive model never re-makes what a killed run already wrote.
    ``options`` are ``DatasetSink``'s. Returns the summary (all ranks together).
    """
    with DatasetSink(root, count=count, **options) as sink:
        for indices in sink.pending(batch_size):
            result = generate(indices)  # a tensor or array alone: images without metadata
            images, metadata = (result, None) if hasattr(result, "shape") else result
            sink.submit(indices, images, metadata)
    assert sink.summary is not None
    return sink.summary


def _check_retry_seconds(value: Any, store: bool) -> float:
    """``retry_seconds`` as a float (the default when None); only an object-store root has it."""
    if value is None:
        return DEFAULT_RETRY_SECONDS
    if not store:
        raise ValueError(f"retry_seconds is only for object-store roots (scheme://...), got {value!r}")
    return checked_retry_seconds(value)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 6 else f"[{values[0]}, ..., {values[-1]}] ({len(values)})"
