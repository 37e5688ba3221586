"""The committer thread of a ``DatasetSink``: it owns the manifest file, the open tar part and
the counts (see ``asyncdump.dataset`` for the path of one batch).

    files: wait for the batch's future (files renamed into place, each with the sha256 its
           worker computed from the bytes it wrote), append the batch's manifest lines
           (on an object store: hand them to the uploader process as one manifest part,
           ``_store_uploads``; they count as written once the store acknowledged it)
    tar:   wait for the encoded bytes and their sha256 (hashed in the worker), append
           ``key.<ext>``, ``key.cls`` (when the label is an int) and ``key.json`` members to
           the hidden ``.shard-N.tar.tmp``; when the shard (or a part of ``shard_bytes``) is
           complete: close, rename to ``shard-N.tar``, then append its manifest lines
           (on an object store: the part is written to an unnamed spool file and uploaded
           by the uploader process; its manifest part follows once the store acknowledged
           it, and at most ``TARS_WAITING`` tar parts wait for that)
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ._errors import AsyncDumpError, DatasetError
from ._manifest import Layout
from ._metadata import Meta
from ._store_uploads import StoreUploader
from ._tar import TAR_BLOCK, TarPart, member_bytes

if TYPE_CHECKING:
    from ._store_dataset import StoreDataset

QUEUED_BATCHES = 32  # batches handed to the committer and not yet committed
TARS_WAITING = 2  # tar parts on a store handed to the uploader and not yet acknowledged
OBJECTS_WAITING = 64  # all objects (tar and manifest parts) handed over, not yet acknowledged

_Batch = tuple[concurrent.futures.Future[Any], list[int], list[Meta], str]


class _Handed(NamedTuple):
    """An object handed to the uploader: what its acknowledgement commits."""

    tar: TarPart | None  # a tar part (its manifest part follows), or None: a manifest part
    name: str  # the object's name under the prefix
    indices: list[int]
    lines: list[str]
    image_bytes: int


class Committer:
    """Commits the batches ``put`` in order on its own thread; ``stop`` drains and ends it."""

    def __init__(self, root: Any, layout: Layout, mode: str, format: str, fsync: bool,
                 shard_bytes: int | None, next_part: dict[int, int], last_index: int,
                 manifest_path: Path | None, store: StoreDataset | None = None):
        self.root, self.layout, self.mode, self.fsync = root, layout, mode, fsync
        self._store = store  # an object store's dataset: parts instead of an appended file
        self._prefix = store.url + "/" if store is not None else str(root) + os.sep
        self._format_json = json.dumps(format, ensure_ascii=False)
        self._shard_bytes = shard_bytes
        self._next_part = next_part  # tar mode: the next part number of each shard
        # While lines are appended in increasing index order after the existing ones, the
        # manifest stays sorted and a one-rank close need not rewrite it.
        self.last_index = last_index
        self.in_order = True
        self.written = self.failed = self.bytes = 0
        self.error: BaseException | None = None
        self._tar: TarPart | None = None
        self._uploader = StoreUploader(store.spec) if store is not None else None
        self._handed: dict[int, _Handed] = {}  # upload id -> its object, oldest first
        self._tars_handed = 0
        self._failed_shards: set[int] = set()
        self._bar: Any = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[_Batch | None] = queue.Queue(QUEUED_BATCHES)
        self._manifest_path = manifest_path
        self._manifest_fd = self._manifest_size = -1
        if manifest_path is not None:
            self._manifest_fd = os.open(manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._manifest_size = os.fstat(self._manifest_fd).st_size  # ends with a whole line

    def start(self, bar: Any) -> None:
        """Start the thread; ``bar`` (a tqdm bar or None) advances per committed batch."""
        self._bar = bar
        self._thread = threading.Thread(target=self._main, name="asyncdump-dataset", daemon=True)
        self._thread.start()

    def put(self, future: concurrent.futures.Future[Any], indices: list[int], metas: list[Meta],
            shape: str) -> None:
        self._queue.put((future, indices, metas, shape))

    def stop(self) -> None:
        """Commit everything put so far, end the thread and close the manifest."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
        self.release()

    def abandon_uploads(self) -> None:
        """Any thread (Ctrl-C): stop uploading to the store now; the tar and manifest parts not
        yet acknowledged fail (a resume writes their images again)."""
        if self._uploader is not None:
            self._uploader.abandon()

    def release(self) -> None:
        """Close the manifest and the uploader (also when the thread never started)."""
        if self._uploader is not None:
            for handed in self._handed.values():
                if handed.tar is not None:
                    handed.tar.discard()
            self._handed.clear()
            self._uploader.close()
        if self._manifest_fd >= 0:
            os.close(self._manifest_fd)
            self._manifest_fd = -1

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            future, indices, metas, shape = item
            try:
                result = future.result()
                failed: set[Path] = set()
            except AsyncDumpError as exc:
                result, failed = None, {self._failed_key(p) for p, _ in exc.failures}
            except BaseException:  # cancelled or broken sink: the whole batch is lost
                result, failed = None, set()
            if self._handed:
                self._settle_uploads(block=False)
            if self.error is not None:
                self.failed += len(indices)
                continue
            try:
                if self.mode == "files":
                    self._commit_files(indices, metas, shape, result, failed)
                else:
                    self._commit_tar(indices, metas, shape, result)
            except BaseException as exc:
                self.error = exc
                self._abort_part()
            if self._bar is not None:
                self._bar.update(len(indices))
        self._abort_part()  # a part still open here is incomplete (the run stopped early)
        while self._handed:  # every object handed to the uploader is answered
            self._settle_uploads(block=True)

    def _failed_key(self, path: Any) -> Any:
        """A failed image's path as ``_commit_files`` looks it up (a URL stays a str)."""
        return str(path) if self._store is not None else Path(path)

    def _line(self, index: int, path: str, sha256: str, size: int, meta: Meta, shape: str,
              offset: str = "") -> str:
        """``dumps_line`` of the entry, formatted directly (a test pins the equality)."""
        return (f'{{"bytes":{size},"format":{self._format_json},"index":{index},'
                f'"label":{meta.label},"meta":{meta.extra},{offset}"path":"{path}",'
                f'"sha256":"{sha256}","shape":{shape}}}\n')

    def _append(self, indices: list[int], lines: list[str], image_bytes: int) -> None:
        """Make a committed batch's lines durable, whole or not at all (a failure stops the
        run), and count its images as written: an append to the manifest file, or on an
        object store one manifest part handed to the uploader (counted when acknowledged)."""
        self.in_order &= indices[0] > self.last_index  # each batch/part is in index order
        self.last_index = indices[-1]
        if self._uploader is not None:
            assert self._store is not None
            self._hand_over(_Handed(None, self._store.next_part(), indices, lines, image_bytes),
                            data="".join(lines).encode())
            return
        try:
            self._append_to_file("".join(lines).encode())
        except BaseException:
            self.failed += len(lines)
            raise
        self.written += len(lines)
        self.bytes += image_bytes

    def _hand_over(self, handed: _Handed, **what: Any) -> None:
        """Give an object to the uploader; wait while too many are unanswered (a slow store:
        the committer's queue fills and ``submit`` blocks)."""
        assert self._uploader is not None and self._store is not None
        self._handed[self._uploader.submit(self._store.store.url_for(handed.name), **what)] = handed
        self._tars_handed += handed.tar is not None
        while self._tars_handed > TARS_WAITING or len(self._handed) > OBJECTS_WAITING:
            self._settle_uploads(block=True)

    def _append_to_file(self, data: bytes) -> None:
        """Append whole lines: a failed write (a full disk) is cut back to the last complete
        line, so the manifest stays one that resume accepts."""
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked (a disk filling up)
                view = view[os.write(self._manifest_fd, view):]
            if self.fsync:
                os.fsync(self._manifest_fd)
        except OSError as exc:
            kept = "kept"
            try:
                os.ftruncate(self._manifest_fd, self._manifest_size)
            except OSError:  # resume ignores a torn last line; nothing is appended after it
                kept = "kept, with a torn last line that resume ignores"
            raise DatasetError(
                f"cannot append to the manifest {self._manifest_path}: {exc.strerror or exc}; "
                f"stopped, the images it lists are {kept}: make room and rerun with resume "
                "(--resume)") from exc
        self._manifest_size += len(data)

    def _commit_files(self, indices: list[int], metas: list[Meta], shape: str,
                      result: list[tuple[str, int] | None] | None, failed: set[Path]) -> None:
        done, lines = [], []
        image_bytes = 0
        prefix = self._prefix
        for k, (index, meta) in enumerate(zip(indices, metas, strict=True)):
            name = self.layout.file_name(index) + self.layout.extension
            if result is None and (not failed or self._failed_key(prefix + name) in failed):
                self.failed += 1
                continue
            digest = result[k] if result is not None else None
            if digest is None:  # a batch with failures, or a file a dead worker left: read it
                data = _read_file(prefix + name) if self._store is None else self._store.read(name)
                digest = (hashlib.sha256(data).hexdigest(), len(data))
            done.append(index)
            lines.append(self._line(index, name, *digest, meta, shape))
            image_bytes += digest[1]
        if lines:
            self._append(done, lines, image_bytes)

    def _commit_tar(self, indices: list[int], metas: list[Meta], shape: str,
                    result: list[tuple[bytes, str]] | None) -> None:
        shard = self.layout.shard_of(indices[0])
        if result is None or shard in self._failed_shards:
            self.failed += len(indices)
            self._abort_part()  # counts the open part's images as failed
            self._failed_shards.add(shard)
            return
        for index, (data, sha256), meta in zip(indices, result, metas, strict=True):
            needed = member_bytes(len(data)) + member_bytes(len(meta.member)) \
                + (member_bytes(len(meta.cls)) if meta.cls else 0)
            if self._tar is not None and self._shard_bytes is not None and self._tar.lines \
                    and self._tar.size + needed + 2 * TAR_BLOCK > self._shard_bytes:
                self._close_part()
            if self._tar is None:
                part = self._next_part.get(shard, 0)
                self._tar = TarPart(None if self._uploader is not None else self.root,
                                    self.layout.tar_name(shard, part), shard)
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
        try:
            part.finish(self.fsync)
        except BaseException:  # a full disk: the part is incomplete, its images lost
            self.failed += len(part.lines)
            part.discard()
            raise
        self._next_part[part.shard] = self._next_part.get(part.shard, 0) + 1
        if self._uploader is not None:  # its lines follow once the store has the tar
            self._hand_over(_Handed(part, part.name, part.indices, part.lines, part.image_bytes),
                            spool=part.handle, size=part.size)
            return
        self._append(part.indices, part.lines, part.image_bytes)

    def _settle_uploads(self, block: bool) -> None:
        """Act on the uploader's answers, in order: an acknowledged tar part hands over its
        manifest part; an acknowledged manifest part counts its images as written. A failed
        upload stops the run (as a full disk does) and its images count as failed."""
        assert self._uploader is not None and self._store is not None
        for upload_id, error in self._uploader.answers(block):
            handed = self._handed.pop(upload_id)
            if handed.tar is not None:
                self._tars_handed -= 1
                handed.tar.discard()  # the spool file: its bytes are on the store, or lost
            if error is not None or self.error is not None:
                self.failed += len(handed.lines)
                if error is not None and self.error is None:
                    what = "tar part" if handed.tar is not None else "manifest part"
                    url = self._store.store.url_for(handed.name)
                    detail = error if error.startswith(url) else f"{url}: {error}"
                    self.error = DatasetError(
                        f"cannot upload the {what} {detail}; "
                        "stopped, the images the manifest lists are kept: rerun with resume "
                        "(--resume)")
            elif handed.tar is not None:
                self._append(handed.indices, handed.lines, handed.image_bytes)
            else:
                self._store.part_stored(handed.name, handed.indices, handed.lines)
                self.written += len(handed.lines)
                self.bytes += handed.image_bytes

    def _abort_part(self) -> None:
        if self._tar is not None:
            self.failed += len(self._tar.lines)
            self._tar.discard()
            self._tar = None


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 1 << 20)]
        while chunks[-1]:
            chunks.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 2 else b"".join(chunks)
