"""Datasets at scale: a manifest, resume, sharded folders or tar shards, many ranks.

    with DatasetSink("out", count=1_000_000, mode="tar", resume=True) as ds:
        for indices in ds.pending(batch_size=256):      # this rank's images not yet on disk
            images, metadata = my_model(indices)        # (B, C, H, W) tensor, one dict each
            ds.submit(indices, images, metadata)

The path of one batch:

    caller thread:   submit -> AsyncImageSink.submit(names=...) (files) or .encode() (tar)
                     -> (future, indices, metadata) on a bounded queue
    committer thread (one per DatasetSink; owns the manifest, the open tar part, the counts):
        files: wait for the batch's future (files renamed into place, each with the sha256 its
               worker computed from the bytes it wrote), append the batch's manifest lines
        tar:   wait for the encoded bytes and their sha256 (hashed in the worker), append
               ``key.<ext>``, ``key.cls`` (when the label is an int) and ``key.json`` members to
               the hidden ``.shard-N.tar.tmp``; when the
               shard (or a part of ``shard_bytes``) is complete: close, rename to
               ``shard-N.tar``, then append its manifest lines
    close:   flush everything, then the manifest is rewritten sorted by index (one rank), or
             after a barrier rank 0 merges the per-rank manifests.

A manifest line exists only for bytes that are complete under their final name, so a run
killed at any moment resumes by skipping the indices in the manifest. Shards go to ranks
round-robin (shard s -> rank s % world), so every tar has one writer and the output does not
depend on the number of ranks or workers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import queue
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from . import _defaults
from ._codecs import encode_params, get_codec
from ._encoders import check_png_encoder
from ._errors import AsyncDumpError
from ._fsutil import fsync_folder
from ._manifest import (
    DATASET_FILE,
    MANIFEST_FILE,
    DatasetError,
    Layout,
    check_job,
    durable_entries,
    holds_dataset,
    job_record,
    parts_done,
    rank_manifest,
    read_manifests,
    remove_temp_files,
    write_atomically,
    write_merged_manifest,
)

__all__ = ["DatasetError", "DatasetSink", "DatasetSummary", "write_dataset"]

MODES = ("files", "tar")
QUEUED_BATCHES = 32  # batches handed to the committer and not yet committed
_TAR_BLOCK = 512


class _Meta(NamedTuple):
    """One image's metadata, serialised once at submit."""

    member: bytes  # tar mode: the ``key.json`` member (the whole dict)
    label: str  # JSON of the manifest's ``label``
    extra: str  # JSON of the manifest's ``meta`` (the dict without ``label``)
    cls: bytes  # tar mode: the ``key.cls`` member (WebDataset's int label), b"" for none


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


class _Ranks:
    """Rank, world size and a gloo group for the few collectives (one rank: all no-ops)."""

    def __init__(self) -> None:
        self.rank, self.world, self.owns_group = 0, 1, False
        self._group: Any = None
        world = _env_int("WORLD_SIZE", 1)
        loaded = sys.modules.get("torch.distributed")
        initialized = loaded is not None and loaded.is_available() and loaded.is_initialized()
        if world <= 1 and not initialized:
            self.local_world = 1
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
            self.owns_group = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world > 1 and dist.get_backend() != "gloo":  # object collectives on the CPU
            self._group = dist.new_group(backend="gloo")
        self.local_world = _env_int("LOCAL_WORLD_SIZE", self.world)

    def broadcast(self, value: Any) -> Any:
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self._group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def release(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


class DatasetSink:
    """Write a dataset of ``count`` images with a manifest, resume and shards.

    Args:
        root: output folder (created if missing).
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
    ):
        self._closed = True
        _check_int("count", count)
        _check_int("shard_size", shard_size)
        if shard_bytes is not None:
            _check_int("shard_bytes", shard_bytes)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        codec = get_codec(format)
        encode_params(codec, quality)
        self.png_encoder = check_png_encoder(png_encoder, codec, quality)
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.mode = mode
        self.fsync = bool(fsync)
        self.layout = Layout(count, shard_size, codec.extension, mode)
        self._format = format.lower()
        self._format_json = json.dumps(self._format, ensure_ascii=False)
        self._shard_bytes = shard_bytes if mode == "tar" else None
        try:
            record = job_record(self.layout, self._format, quality, self._shard_bytes,
                                json.loads(json.dumps(job or {})), self.png_encoder)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"job must be JSON-serialisable: {exc}") from None
        self._sink: Any = None  # what construction creates, released if a later step fails
        self._manifest_fd = -1
        self._bar: Any = None
        self._ranks = _Ranks()
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

        problem = None
        if self.rank == 0:
            try:
                self._prepare(record, resume)
            except (DatasetError, OSError) as exc:
                problem = exc
        message = self._ranks.broadcast(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        if message is not None:
            raise DatasetError(message)

        entries = read_manifests(self.root, count)  # rank 0 left only durable entries
        self.skipped = len(entries)
        # While lines are appended in increasing index order after the existing ones, the
        # manifest stays sorted and a one-rank close need not rewrite it.
        self._last_index = max(entries, default=-1)
        self._in_order = True
        self._next_part = parts_done(self.layout, entries.values()) if self.mode == "tar" else {}
        # Resume state while writing: one bit per image of the dataset (not a list of ints).
        self._done = bytearray((count + 7) // 8)
        for index in entries:
            self._done[index >> 3] |= 1 << (index & 7)
        self._shards = range(self.rank, self.layout.shards, self.world)  # this rank's shards
        mine_done = sum(1 for i in entries if self.layout.shard_of(i) % self.world == self.rank)
        del entries
        self._remaining = sum(len(self.layout.shard_range(s)) for s in self._shards) - mine_done
        self._shard_cursor = -1  # position in _shards of the shard whose indices are in _todo
        self._todo: list[int] = []  # pending indices of one shard at a time
        self._pos = 0  # next of _todo to submit
        self._shape: tuple[int, ...] | None = None
        self._manifest_path = self.root / (MANIFEST_FILE if self.world == 1
                                           else rank_manifest(self.rank))
        self._written = self._failed = self._bytes = 0
        self._error: BaseException | None = None
        self._tar: _TarPart | None = None
        self._failed_shards: set[int] = set()
        self._summary: DatasetSummary | None = None

        from ._sink import AsyncImageSink

        if workers is None:  # ranks on one machine share its cores
            per_rank = _defaults.usable_cores() // max(1, self._ranks.local_world)
            workers = max(1, min(per_rank - 1, _defaults.MAX_DEFAULT_WORKERS))
        self._sink = AsyncImageSink(self.root, workers=workers, format=format, quality=quality,
                                    on_error="ignore", fsync=fsync, overwrite=True,
                                    max_buffer_bytes=max_buffer_bytes, png_encoder=self.png_encoder)
        self._manifest_fd = os.open(self._manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                    0o644)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=self._remaining, unit="img", dynamic_ncols=True, disable=None,
                             desc=f"rank {self.rank}" if self.world > 1 else "generate")
        self._queue: queue.Queue[tuple[concurrent.futures.Future[Any], list[int], list[_Meta],
                                       str] | None] = queue.Queue(QUEUED_BATCHES)
        self._started = time.perf_counter()
        self._committer = threading.Thread(target=self._commit_main, name="asyncdump-dataset",
                                           daemon=True)
        self._committer.start()

    def _release_partial(self) -> None:
        """Construction failed part-way: stop the sink, close the manifest, leave the group."""
        try:
            if self._sink is not None:
                self._sink.close()
        finally:
            if self._manifest_fd >= 0:
                os.close(self._manifest_fd)
                self._manifest_fd = -1
            if self._bar is not None:
                self._bar.close()
            self._ranks.release()

    # ------------------------------------------------------------------ setup (rank 0)
    def _prepare(self, record: dict[str, Any], resume: bool) -> None:
        existing = holds_dataset(self.root) if self.root.is_dir() else None
        if existing is not None and not resume:
            raise DatasetError(f"{self.root} already holds a dataset ({existing}); pass resume "
                               "(--resume) to continue it, or choose another output folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if existing is None:
                write_atomically(self.root / DATASET_FILE,
                                 json.dumps(record, indent=2, sort_keys=True) + "\n", self.fsync)
                return
        except OSError as exc:
            raise DatasetError(f"cannot write to {self.root}: {exc.strerror or exc}") from None
        check_job(self.root, record)
        entries = read_manifests(self.root, self.layout.count)
        remove_temp_files(self.root)
        write_merged_manifest(self.root, durable_entries(self.root, self.layout, entries),
                              self.fsync)

    # ------------------------------------------------------------------ caller side
    @property
    def remaining(self) -> int:
        """Images of this rank not yet submitted."""
        return self._remaining

    def _pending_of_shard(self) -> list[int]:
        """The not yet submitted indices of the current shard, moving on to the next shard with
        pending indices when it is used up; empty when this rank has nothing left."""
        while self._pos >= len(self._todo):
            self._shard_cursor += 1
            if self._shard_cursor >= len(self._shards):
                self._todo, self._pos = [], 0
                return self._todo
            done = self._done
            self._todo = [i for i in self.layout.shard_range(self._shards[self._shard_cursor])
                          if not done[i >> 3] >> (i & 7) & 1]
            self._pos = 0
        return self._todo

    def pending(self, batch_size: int) -> Iterator[list[int]]:
        """This rank's indices still to write, in batches that never span two shards.

        Submit each batch before asking for the next one.
        """
        _check_int("batch_size", batch_size)
        while True:
            todo = self._pending_of_shard()
            if not todo:
                return
            left = self._remaining
            yield todo[self._pos:self._pos + batch_size]
            if self._remaining == left:
                raise DatasetError("each batch from pending() must be submitted before the next")

    def submit(self, indices: Sequence[int], images: Any,
               metadata: Sequence[dict[str, Any]] | None = None) -> None:
        """Queue ``images`` (a ``(B, C, H, W)`` tensor or array) for ``indices``.

        ``indices`` must be the next batch of ``pending()``; ``metadata`` is one JSON-able dict
        per image (its ``"label"``, if any, becomes the manifest's ``label``).
        """
        if self._closed:
            raise RuntimeError("this DatasetSink is closed")
        if self._error is not None:
            raise AsyncDumpError(f"the dataset writer failed: {self._error}") from self._error
        indices = list(indices)
        count = len(indices)
        todo = self._pending_of_shard()
        expected = todo[self._pos:self._pos + count]
        if not count or indices != expected:
            first = todo[self._pos] if todo else None
            raise ValueError(f"indices must be the next batch from pending() (next pending index "
                             f"{first}, batches within one shard); got {_short(indices)}")
        shape = tuple(getattr(images, "shape", ()))
        if len(shape) != 4 or shape[0] != count:
            raise ValueError(f"images must be a (B, C, H, W) batch with B = len(indices) = {count}, "
                             f"got shape {shape or type(images).__name__}")
        if self._shape is None:
            self._shape = shape[1:]
        elif shape[1:] != self._shape:
            raise ValueError(f"image shape {shape[1:]} differs from earlier batches' {self._shape}: "
                             "a dataset has one image shape")
        metas = self._metadata(metadata, count)
        future: concurrent.futures.Future[Any]
        if self.mode == "files":
            future = self._sink._submit_digest(images, [self.layout.file_name(i) for i in indices])
        else:
            future = self._sink._submit_digest(images, None)
        _, channels, height, width = shape
        self._pos += count
        self._remaining -= count
        self._queue.put((future, indices, metas, f"[{height},{width},{channels}]"))

    def _metadata(self, metadata: Sequence[dict[str, Any]] | None, count: int) -> list[_Meta]:
        if metadata is None:
            return [_Meta(b"{}", "null", "{}", b"")] * count
        if isinstance(metadata, dict) or len(metadata) != count:
            raise ValueError(f"metadata must be a list of {count} dicts (one per image)")
        tar = self.mode == "tar"
        out = []
        for meta in metadata:
            if not isinstance(meta, dict):
                raise TypeError(f"each metadata item must be a dict, got {type(meta).__name__}")
            try:
                extra = {k: v for k, v in meta.items() if k != "label"}
                label = meta.get("label")
                out.append(_Meta(
                    _MEMBER_JSON.encode(meta).encode() if tar
                    else b"", _canonical(label), _canonical(extra),
                    str(label).encode() if tar and _is_int(label) else b""))
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
        return out

    # ------------------------------------------------------------------ committer thread
    def _commit_main(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            future, indices, metas, shape = item
            try:
                result = future.result()
                failed: set[Path] = set()
            except AsyncDumpError as exc:
                result, failed = None, {Path(p) for p, _ in exc.failures}
            except BaseException:  # cancelled or broken sink: the whole batch is lost
                result, failed = None, set()
            if self._error is not None:
                self._failed += len(indices)
                continue
            try:
                if self.mode == "files":
                    self._commit_files(indices, metas, shape, result, failed)
                else:
                    self._commit_tar(indices, metas, shape, result)
            except BaseException as exc:
                self._error = exc
                self._abort_part()
            if self._bar is not None:
                self._bar.update(len(indices))
        self._abort_part()  # a part still open here is incomplete (the run stopped early)

    def _line(self, index: int, path: str, sha256: str, size: int, meta: _Meta, shape: str,
              offset: str = "") -> str:
        """``dumps_line`` of the entry, formatted directly (a test pins the equality)."""
        return (f'{{"bytes":{size},"format":{self._format_json},"index":{index},'
                f'"label":{meta.label},"meta":{meta.extra},{offset}"path":"{path}",'
                f'"sha256":"{sha256}","shape":{shape}}}\n')

    def _append(self, indices: list[int], lines: list[str]) -> None:
        self._in_order &= indices[0] > self._last_index  # each batch/part is in index order
        self._last_index = indices[-1]
        os.write(self._manifest_fd, "".join(lines).encode())
        if self.fsync:
            os.fsync(self._manifest_fd)

    def _commit_files(self, indices: list[int], metas: list[_Meta], shape: str,
                      result: list[tuple[str, int] | None] | None, failed: set[Path]) -> None:
        done, lines = [], []
        prefix = str(self.root) + os.sep
        for k, (index, meta) in enumerate(zip(indices, metas, strict=True)):
            name = self.layout.file_name(index) + self.layout.extension
            if result is None and (not failed or Path(prefix + name) in failed):
                self._failed += 1
                continue
            digest = result[k] if result is not None else None
            if digest is None:  # a batch with failures, or a file a dead worker left: read it
                data = _read_file(prefix + name)
                digest = (hashlib.sha256(data).hexdigest(), len(data))
            done.append(index)
            lines.append(self._line(index, name, *digest, meta, shape))
            self._bytes += digest[1]
        if lines:
            self._append(done, lines)
            self._written += len(lines)

    def _commit_tar(self, indices: list[int], metas: list[_Meta], shape: str,
                    result: list[tuple[bytes, str]] | None) -> None:
        shard = self.layout.shard_of(indices[0])
        if result is None or shard in self._failed_shards:
            self._failed += len(indices) + (len(self._tar.lines) if self._tar else 0)
            self._abort_part()
            self._failed_shards.add(shard)
            return
        for index, (data, sha256), meta in zip(indices, result, metas, strict=True):
            needed = _member_bytes(len(data)) + _member_bytes(len(meta.member)) \
                + (_member_bytes(len(meta.cls)) if meta.cls else 0)
            if self._tar is not None and self._shard_bytes is not None and self._tar.lines \
                    and self._tar.size + needed + 2 * _TAR_BLOCK > self._shard_bytes:
                self._close_part()
            if self._tar is None:
                part = self._next_part.get(shard, 0)
                self._tar = _TarPart(self.root, self.layout.tar_name(shard, part), shard)
            key = self.layout.key(index)
            offset = self._tar.add(key + self.layout.extension, data)
            if meta.cls:  # WebDataset's convention: .to_tuple("png", "cls") finds the label
                self._tar.add(key + ".cls", meta.cls)
            self._tar.add(key + ".json", meta.member)
            self._tar.indices.append(index)
            self._tar.lines.append(self._line(index, f"{self._tar.name}/{key}{self.layout.extension}",
                                              sha256, len(data), meta, shape, f'"offset":{offset},'))
            self._tar.image_bytes += len(data)
            if index == self.layout.shard_range(shard).stop - 1:  # the shard's last image
                self._close_part()

    def _close_part(self) -> None:
        part = self._tar
        assert part is not None
        self._tar = None
        part.finish(self.fsync)
        self._next_part[part.shard] = self._next_part.get(part.shard, 0) + 1
        self._append(part.indices, part.lines)
        self._written += len(part.lines)
        self._bytes += part.image_bytes

    def _abort_part(self) -> None:
        if self._tar is not None:
            self._failed += len(self._tar.lines)
            self._tar.discard()
            self._tar = None

    # ------------------------------------------------------------------ ending
    def close(self) -> DatasetSummary:
        """Write everything submitted, finish the manifest, and return the summary."""
        return self._finish(normal=True)

    def _finish(self, normal: bool) -> DatasetSummary:
        if self._summary is not None:
            return self._summary
        self._closed = True
        try:
            self._sink.close()
        finally:
            self._queue.put(None)
            self._committer.join()
            os.close(self._manifest_fd)
            if self._bar is not None:
                self._bar.close()
        seconds = time.perf_counter() - self._started
        local = (self._written, self._failed, self._bytes)
        if not normal or self._error is not None:
            if self.world == 1:  # a clean sorted manifest even after an error
                write_merged_manifest(self.root, read_manifests(self.root, self.layout.count),
                                      self.fsync)
            self._summary = DatasetSummary(str(self.root), self.mode, local[0], self.skipped,
                                           local[1], local[2], seconds, False)
            self._ranks.release()
            if self._error is not None and normal:
                raise AsyncDumpError(f"the dataset writer failed: {self._error}") from self._error
            return self._summary
        self._ranks.barrier()  # every rank's lines are in its manifest file
        complete = False
        if self.world == 1 and self._in_order:  # already sorted, without duplicates
            complete = self.skipped + self._written == self.layout.count
        elif self.rank == 0:
            entries = read_manifests(self.root, self.layout.count)
            write_merged_manifest(self.root, entries, self.fsync)
            complete = len(entries) == self.layout.count
        totals = self._ranks.gather(local)
        complete = bool(self._ranks.broadcast(complete))
        self._summary = DatasetSummary(
            str(self.root), self.mode, sum(t[0] for t in totals), self.skipped,
            sum(t[1] for t in totals), sum(t[2] for t in totals),
            max(seconds, *self._ranks.gather(seconds)), complete)
        self._ranks.release()
        return self._summary

    @property
    def summary(self) -> DatasetSummary | None:
        """The summary once closed, else None."""
        return self._summary

    def __enter__(self) -> DatasetSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._finish(normal=exc_type is None)


class _TarPart:
    """One tar being written: hidden temp name, deterministic headers, renamed when complete."""

    def __init__(self, root: Path, name: str, shard: int):
        self.name, self.shard = name, shard
        self.final = root / name
        self.temp = root / f".{name}.tmp"
        self.handle = open(self.temp, "wb")  # noqa: SIM115 (closed in finish/discard)
        self.size = 0
        self.indices: list[int] = []  # of the images in it, with their manifest lines
        self.lines: list[str] = []
        self.image_bytes = 0

    def add(self, member: str, data: bytes) -> int:
        """Append one member; returns the offset of its data in the tar."""
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        self.handle.write(header)
        self.handle.write(data)
        self.handle.write(b"\0" * (-len(data) % _TAR_BLOCK))
        offset = self.size + len(header)
        self.size += _member_bytes(len(data))
        return offset

    def finish(self, fsync: bool) -> None:
        # Two zero blocks end the archive; no padding to a 10 KiB record, so shard_bytes is exact.
        self.handle.write(b"\0" * (2 * _TAR_BLOCK))
        self.handle.flush()
        if fsync:
            os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temp, self.final)
        if fsync:
            fsync_folder(self.final.parent)

    def discard(self) -> None:
        self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.temp)


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


# One encoder each, made once: ``json.dumps`` with options builds a new encoder per call.
_MEMBER_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _canonical(value: Any) -> str:
    """JSON text exactly as ``dumps_line`` writes it after a JSON round trip (the round trip
    turns non-string keys into strings, which can change their order)."""
    text = _COMPACT_JSON.encode(value)
    if "{" in text:
        text = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 1 << 20)]
        while chunks[-1]:
            chunks.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 2 else b"".join(chunks)


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + size + (-size % _TAR_BLOCK)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 6 else f"[{values[0]}, ..., {values[-1]}] ({len(values)})"
