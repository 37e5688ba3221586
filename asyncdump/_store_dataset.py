"""A dataset on an object store (files or tar mode, any number of ranks): its manifest
without append.

    PREFIX/dataset.json                            the job's parameters, PUT first (as in a folder)
    PREFIX/<shard>/<index>.<ext>                   files mode: one PUT per image, by the workers
    PREFIX/shard-<shard>[-<part>].tar              tar mode: one multipart upload per part, by
                                                   the uploader process (``_store_uploads``)
    PREFIX/manifest.parts/rank-<r>/<seq>.jsonl     one object per committed batch of rank r
    PREFIX/manifest.jsonl                          merged, sorted by index: PUT at resume and close

A store cannot append, so the committer PUTs each batch's manifest lines as one small object
once the store acknowledged every image they list. Resume reads ``manifest.jsonl`` and every
part, keeps the entries whose objects are listed with their size, and PUTs them as the new
``manifest.jsonl``; close does the same with this run's lines (kept in memory, about 250 bytes
per image, so nothing is read back), then deletes the parts. A run killed between the PUT and
the deletes leaves parts whose lines ``manifest.jsonl`` already holds: equal lines, no harm.

Under several ranks, as in a folder: rank 0 alone runs ``prepare`` (the others wait for its
verdict), then every other rank reads ``manifest.jsonl`` and any parts (``read_entries``);
each rank PUTs its parts under ``rank-<r>``; after the closing barrier rank 0 reads the other
ranks' parts and merges them all (``merge_all``).

Tar parts are multipart uploads: an upload whose process was killed stays unfinished (never
visible, but billed) until rank 0 aborts every unfinished upload under the prefix at resume
and at a normal close (S3 only; tar mode needs S3's multipart API).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ._errors import DatasetError
from ._manifest import (
    DATASET_FILE,
    MANIFEST_FILE,
    Layout,
    compare_job,
    dumps_line,
    durable_tar_entries,
    parse_manifest,
)
from ._stores import DEFAULT_RETRY_SECONDS, StoreSpec, open_destination
from ._stores._multipart import abort_uploads
from ._stores._retry import with_retries

PARTS = "manifest.parts"
_PART = re.compile(r"^manifest\.parts/rank-(\d+)/(\d+)\.jsonl$")
DELETE_BATCH = 1000  # keys per bulk delete (S3's DeleteObjects limit)


def part_name(rank: int, seq: int) -> str:
    """The key (under the prefix) of ``rank``'s manifest part number ``seq``."""
    return f"{PARTS}/rank-{rank:05d}/{seq:012d}.jsonl"


class StoreDataset:
    """The store side of a ``DatasetSink`` whose root is a URL: setup, parts, merge."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, layout: Layout,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS, rank: int = 0):
        self.store = open_destination(url, storage_options, retry_seconds=retry_seconds)
        self.url: str = self.store.url
        if layout.mode == "tar" and self.store.scheme != "s3":
            raise ValueError(f"{url}: tar mode on an object store needs S3's multipart uploads "
                             "(s3:// and the stores that speak its API); files mode works with "
                             "any fsspec store")
        # What the uploader process opens (tar mode): the same store, parts may be replaced.
        self.spec = StoreSpec(self.url, dict(storage_options or {}), True, retry_seconds)
        self.layout = layout
        self._fs = self.store.fs
        self._base = self._fs._strip_protocol(self.url).rstrip("/")
        self._lines: dict[int, str] = {}  # every durable line, by index
        self._parts: list[str] = []  # part keys to delete once manifest.jsonl holds their lines
        self._next_seq = 0
        self.rank = rank  # parts go under rank-<rank>; only rank 0 keeps lines and merges
        self.created = False  # this run wrote dataset.json

    # ------------------------------------------------------------------ requests
    def _retry(self, name: str, operation: Any) -> Any:
        return with_retries(self.store.url_for(name), operation, self.store.retry_seconds)

    def _path(self, name: str) -> str:
        return f"{self._base}/{name}"

    def put(self, name: str, data: bytes, overwrite: bool = True) -> None:
        self.store.put(self.store.url_for(name), data, overwrite)

    def read(self, name: str) -> bytes:
        """An object's bytes (a file a replaced worker finished: its digest is computed here)."""
        return bytes(self._retry(name, lambda: self._fs.cat_file(self._path(name))))

    def listing(self, under: str = "") -> dict[str, int]:
        """Every object under the prefix (or its folder ``under``): key relative to the
        prefix -> size."""
        top = self._path(under) if under else self._base

        def find() -> Any:
            self._fs.invalidate_cache(top)
            return self._fs.find(top, detail=True)
        found = self._retry(under, find)
        start = len(self._base) + 1
        return {path[start:]: int(info.get("size") or 0) for path, info in found.items()
                if path.startswith(top + "/")}

    def _delete(self, names: list[str]) -> None:
        for i in range(0, len(names), DELETE_BATCH):
            chunk = [self._path(n) for n in names[i:i + DELETE_BATCH]]
            self._retry(names[i], lambda chunk=chunk: self._fs.rm(chunk))

    # ------------------------------------------------------------------ a run
    def prepare(self, record: dict[str, Any], resume: bool) -> dict[int, dict[str, Any]]:
        """Start a new dataset in a missing or empty prefix (PUT ``dataset.json``), or with
        ``resume`` check the stored job and return the durable entries."""
        listing = self.listing()
        existing = _dataset_marker(listing)
        if existing is not None and not resume:
            raise DatasetError(f"{self.url} already holds a dataset ({existing}); pass resume "
                               "(--resume) to continue it, or choose another prefix")
        if existing is None:
            if listing:
                raise DatasetError(
                    f"{self.url} is not empty (it holds {min(listing)!r}) and holds no asyncdump "
                    "dataset; a new dataset starts only in a missing or empty prefix, so that no "
                    "object of yours is replaced: choose another prefix")
            self.put(DATASET_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(),
                     overwrite=False)  # a conditional create: two new runs cannot both start
            self.created = True
            return {}
        if DATASET_FILE not in listing:
            raise DatasetError(f"{self.url} has a manifest but no {DATASET_FILE}: it was not "
                               "written by asyncdump (or was damaged); refusing to resume into it")
        compare_job(self.url, self.store.url_for(DATASET_FILE), _text(self, DATASET_FILE), record)
        entries: dict[int, dict[str, Any]] = {}
        parts = sorted(name for name in listing if _PART.match(name))
        for name in ([MANIFEST_FILE] if MANIFEST_FILE in listing else []) + parts:
            parse_manifest(name, _text(self, name), self.layout.count, entries)
        if self.layout.mode == "tar":
            durable = durable_tar_entries(self.layout, entries, listing.get)
            abort_uploads(self._fs, self.url, self.store.retry_seconds)  # a killed run's unfinished uploads
        else:
            durable = {i: e for i, e in entries.items() if _durable(e, listing)}
        self._next_seq = _next_seq(parts, self.rank)
        self._lines = {i: dumps_line(durable[i]) for i in sorted(durable)}
        self._parts = parts
        self.merge()  # as a folder's resume: manifest.jsonl lists exactly the durable images
        return durable

    def read_entries(self) -> dict[int, dict[str, Any]]:
        """Another rank, after rank 0's ``prepare``: the entries of ``manifest.jsonl`` and of
        any parts (rank 0 left only durable ones)."""
        parts = sorted(name for name in self.listing(PARTS) if _PART.match(name))
        self._next_seq = _next_seq(parts, self.rank)
        entries: dict[int, dict[str, Any]] = {}
        if self._retry(MANIFEST_FILE, lambda: self._fs.exists(self._path(MANIFEST_FILE))):
            parse_manifest(MANIFEST_FILE, _text(self, MANIFEST_FILE), self.layout.count, entries)
        for name in parts:
            parse_manifest(name, _text(self, name), self.layout.count, entries)
        return entries

    def next_part(self) -> str:
        """The key (under the prefix) of this rank's next manifest part."""
        name = part_name(self.rank, self._next_seq)
        self._next_seq += 1
        return name

    def part_stored(self, name: str, indices: list[int], lines: list[str]) -> None:
        """The store acknowledged part ``name`` holding ``lines`` (the committer PUTs it,
        through the uploader process): rank 0 keeps them for the merge."""
        if self.rank == 0:  # the others' lines are read back from their parts by rank 0
            self._parts.append(name)
            self._lines.update(zip(indices, lines, strict=True))

    def merge_all(self) -> int:
        """Rank 0 after the closing barrier: add the lines of every part it did not PUT itself
        (the other ranks'), then ``merge``; the number of images ``manifest.jsonl`` lists."""
        mine = set(self._parts)
        entries: dict[int, dict[str, Any]] = {}
        for name in sorted(self.listing(PARTS)):
            if _PART.match(name) and name not in mine:
                parse_manifest(name, _text(self, name), self.layout.count, entries)
                self._parts.append(name)
        self._lines.update((i, dumps_line(entries[i])) for i in entries)
        return self.merge()

    def merge(self) -> int:
        """PUT ``manifest.jsonl`` (every durable line, sorted), then delete the parts; the
        number of images it lists."""
        text = "".join(self._lines[i] for i in sorted(self._lines))
        self.put(MANIFEST_FILE, text.encode())
        self._delete(self._parts)
        self._parts = []
        return len(self._lines)

    def abort_unfinished_uploads(self) -> int:
        """Rank 0 once every rank stopped uploading (tar mode): abort the multipart uploads a
        killed uploader left; how many."""
        if self.layout.mode != "tar":
            return 0
        return abort_uploads(self._fs, self.url, self.store.retry_seconds)

    def undo(self) -> None:
        """No image was written: delete what this run created (a new dataset only)."""
        if self.created:
            self._delete([MANIFEST_FILE, *self._parts, DATASET_FILE])
            self._parts = []


def _next_seq(parts: list[str], rank: int) -> int:
    """The first unused part number of ``rank`` among the part keys ``parts``."""
    seqs = [int(m.group(2)) for m in map(_PART.match, parts) if m and int(m.group(1)) == rank]
    return max(seqs, default=-1) + 1


def _dataset_marker(listing: dict[str, int]) -> str | None:
    """The object that makes the prefix an existing dataset, or None."""
    for name in (DATASET_FILE, MANIFEST_FILE):
        if name in listing:
            return name
    return next((name for name in sorted(listing) if _PART.match(name)), None)


def _durable(entry: dict[str, Any], listing: dict[str, int]) -> bool:
    """Whether the entry's object is listed, with the size the entry records."""
    size = listing.get(entry["path"])
    expected = entry.get("bytes")
    return size is not None and (not isinstance(expected, int) or size == expected)


def _text(dataset: StoreDataset, name: str) -> str:
    try:
        return dataset.read(name).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{dataset.store.url_for(name)} is corrupt ({exc}); refusing to "
                           "resume") from None
