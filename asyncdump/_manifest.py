"""Dataset layout on disk: names, ``dataset.json``, the JSON Lines manifest, resume state.

    DIR/dataset.json              the job's parameters; a resume with other parameters is refused
    DIR/manifest.jsonl            one JSON object per durable image (sorted by index when a run ends)
    DIR/manifest.rank<r>.jsonl    under K > 1 ranks: rank r's lines until rank 0 merges them
    files mode: DIR/<shard>/<index>.<ext>         shard = index // shard_size
    tar mode:   DIR/shard-<shard>.tar (+ DIR/shard-<shard>-<part>.tar when shard_bytes splits it)

Only rank 0 (or the single process) calls the functions that change files here; every rank
may read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import DatasetError
from ._fsutil import is_temp_name, temp_name, unlink_quietly
from ._tar import TAR_BLOCK, member_bytes

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
LAYOUT_VERSION = 1
# Indices stay exact in every JSON reader (JavaScript's and others' numbers are doubles).
MAX_COUNT = 2 ** 53
_RANK_MANIFEST = re.compile(r"^manifest\.rank(\d+)\.jsonl$")


@dataclass(frozen=True)
class Layout:
    """Names of every file of a dataset with ``count`` images, from the job parameters."""

    count: int
    shard_size: int
    extension: str
    mode: str

    @property
    def index_width(self) -> int:
        return max(9, len(str(self.count - 1)))

    @property
    def shard_width(self) -> int:
        return max(6, len(str((self.count - 1) // self.shard_size)))

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.count))

    def key(self, index: int) -> str:
        """The WebDataset key of an image (its member names are ``key.<ext>``, ``key.json``)."""
        return f"{index:0{self.index_width}d}"

    def file_name(self, index: int) -> str:
        """Files mode: the name without extension, relative to the root."""
        return f"{self.shard_of(index):0{self.shard_width}d}/{self.key(index)}"

    def tar_name(self, shard: int, part: int) -> str:
        base = f"shard-{shard:0{self.shard_width}d}"
        return f"{base}.tar" if part == 0 else f"{base}-{part}.tar"


def job_record(layout: Layout, fmt: str, quality: int | None, shard_bytes: int | None,
               job: dict[str, Any], png_encoder: str = "opencv") -> dict[str, Any]:
    """What ``dataset.json`` holds: everything that decides the bytes of the output.

    ``png_encoder`` is the resolved encoder setting ("fpng" or "opencv"), not "auto": the
    same setting gives the same bytes."""
    return {"asyncdump_dataset": LAYOUT_VERSION, "count": layout.count, "format": fmt,
            "quality": quality, "mode": layout.mode, "shard_size": layout.shard_size,
            "shard_bytes": shard_bytes, "png_encoder": png_encoder, "job": job}


def dumps_line(entry: dict[str, Any]) -> str:
    """One manifest line: compact, keys sorted, so equal entries are equal bytes."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def rank_manifest(rank: int) -> str:
    return f"manifest.rank{rank}.jsonl"


def manifest_files(root: Path) -> list[Path]:
    """``manifest.jsonl`` and any per-rank manifests, the main one first."""
    found = [root / MANIFEST_FILE] if (root / MANIFEST_FILE).exists() else []
    with contextlib.suppress(FileNotFoundError):
        found += sorted(p for p in root.iterdir() if _RANK_MANIFEST.match(p.name))
    return found


def holds_dataset(root: Path) -> str | None:
    """The name of the file that makes ``root`` an existing dataset, or None."""
    if (root / DATASET_FILE).exists():
        return DATASET_FILE
    files = manifest_files(root)
    return files[0].name if files else None


def write_atomically(path: Path, text: str, fsync: bool = False) -> None:
    temp = path.with_name(temp_name(path.name, str(os.getpid())))
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        unlink_quietly(temp)
        raise


def check_job(root: Path, record: dict[str, Any]) -> None:
    """Refuse to resume into ``root`` unless its ``dataset.json`` describes the same job."""
    path = root / DATASET_FILE
    if not path.exists():
        raise DatasetError(f"{root} has a manifest but no {DATASET_FILE}: it was not written by "
                           "asyncdump (or was damaged); refusing to resume into it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        raise DatasetError(f"{path} is corrupt ({exc}); refusing to resume") from None
    compare_job(str(root), str(path), text, record)


def compare_job(root: str, path: str, text: str, record: dict[str, Any]) -> None:
    """Refuse (``DatasetError``) unless ``text``, the ``dataset.json`` at ``path``, describes
    the job ``record`` (shared by folders and object stores)."""
    try:
        stored = json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{path} is corrupt ({exc}); refusing to resume") from None
    if not isinstance(stored, dict) or stored.get("asyncdump_dataset") != LAYOUT_VERSION:
        raise DatasetError(f"{path} is not an asyncdump dataset description; refusing to resume")
    record = json.loads(json.dumps(record))  # tuples -> lists, as stored
    stored.setdefault("png_encoder", "opencv")  # written before the choice existed: OpenCV
    differ = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
    if differ:
        detail = ", ".join(f"{k}: stored {stored.get(k)!r}, asked {record.get(k)!r}" for k in differ)
        hint = ""
        if "png_encoder" in differ:
            hint = (f" (its images were encoded with {stored['png_encoder']!r}: pass "
                    f"png_encoder={stored['png_encoder']!r} / --png-encoder {stored['png_encoder']})")
        raise DatasetError(f"{root} holds a different job ({detail}); resume needs the same "
                           f"parameters, or use a new output folder{hint}")


def read_manifests(root: Path, count: int) -> dict[int, dict[str, Any]]:
    """Every entry of every manifest file, by index; ``DatasetError`` if one is corrupt.

    A last line without its newline that does not parse is a write cut short by a crash and
    is ignored; any other bad line, or two different entries for one index, is corruption.
    """
    entries: dict[int, dict[str, Any]] = {}
    for path in manifest_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read manifest {path}: {exc}") from None
        parse_manifest(path.name, text, count, entries)
    return entries


def parse_manifest(name: str, text: str, count: int, entries: dict[int, dict[str, Any]]) -> None:
    """Add the entries of one manifest's ``text`` (called ``name`` in errors) to ``entries``."""
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = number == len(lines)  # the text did not end with a newline
        try:
            entry = json.loads(line)
            _check_entry(entry, count)
        except (ValueError, TypeError) as exc:
            if torn:
                continue
            raise DatasetError(f"corrupt manifest {name}, line {number}: {exc}; "
                               "refusing to resume (nothing was changed)") from None
        index = entry["index"]
        old = entries.get(index)
        if old is not None and old != entry:
            raise DatasetError(f"corrupt manifest {name}, line {number}: index {index} "
                               "appears twice with different content; refusing to resume")
        entries[index] = entry


def _check_entry(entry: Any, count: int) -> None:
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    index = entry.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"index {index!r} is not an int in 0..{count - 1}")
    for key in ("path", "sha256"):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"{key!r} missing or not a string")
    path = entry["path"]
    if path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"path {path!r} is not relative to the dataset folder")


@dataclass
class ResumeState:
    """What is already durable: the entries to keep, and for tar mode the parts per shard."""

    entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    parts_done: dict[int, int] = field(default_factory=dict)  # tar: shard -> complete parts


def durable_entries(root: Path, layout: Layout,
                    entries: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Keep entries whose bytes are on disk; in tar mode only whole shards' complete prefixes."""
    if layout.mode == "files":
        return {i: e for i, e in entries.items() if (root / e["path"]).is_file()}

    def size_of(tar: str) -> int | None:
        try:
            return (root / tar).stat().st_size
        except OSError:
            return None
    # A part's lines are appended after it is renamed, so only the last part of a shard can
    # have fewer lines than images (a torn or lost last line, or a full disk).
    return durable_tar_entries(layout, entries, size_of,
                               lambda tar, last: _lists_every_image(root / tar, last))


def durable_tar_entries(layout: Layout, entries: dict[int, dict[str, Any]],
                        size_of: Callable[[str], int | None],
                        lists_every_image: Callable[[str, dict[str, Any]], bool] | None = None,
                        ) -> dict[int, dict[str, Any]]:
    """Tar mode: keep each shard's entries when they are a prefix of the shard and every tar
    they name (``size_of``: its size, None if missing) holds their bytes. When the last part
    may list fewer images than it holds (``lists_every_image(tar, its last entry)`` says
    False), its entries are dropped: its images are written again into the same part name."""
    kept: dict[int, dict[str, Any]] = {}
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for index, entry in entries.items():
        by_shard.setdefault(layout.shard_of(index), []).append(entry)
    for shard, items in by_shard.items():
        items.sort(key=lambda e: e["index"])
        first = layout.shard_range(shard).start
        prefix = [e["index"] for e in items] == list(range(first, first + len(items)))
        sizes = {tar: size_of(tar) for tar in {_tar_of(e) for e in items}}
        intact = all(sizes[_tar_of(e)] is not None and
                     int(e.get("offset", 0)) + int(e.get("bytes", 0)) <= (sizes[_tar_of(e)] or 0)
                     for e in items)
        if not (prefix and intact):  # the whole shard is written again (same bytes)
            continue
        last = _tar_of(items[-1])
        if lists_every_image is not None and not lists_every_image(last, items[-1]):
            items = [e for e in items if _tar_of(e) != last]
        kept.update((e["index"], e) for e in items)
    return kept


def _tar_of(entry: dict[str, Any]) -> str:
    """The tar part a tar-mode entry's image is in (its path is ``<tar>/<member>``)."""
    return str(entry["path"]).split("/", 1)[0]


def _lists_every_image(tar: Path, last: dict[str, Any]) -> bool:
    """Whether ``last`` (a manifest entry) is the last image of its tar part: after its member
    come only its own members (``key.cls``, ``key.json``) and the archive's end."""
    key = last["path"].split("/", 1)[1].rpartition(".")[0] + "."
    offset, size = last.get("offset"), last.get("bytes")
    if not (isinstance(offset, int) and isinstance(size, int)):
        return False
    position = offset + size + (-size % TAR_BLOCK)
    try:
        with open(tar, "rb") as handle:
            while True:
                handle.seek(position)
                block = handle.read(TAR_BLOCK)
                if block == bytes(TAR_BLOCK):
                    return True
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                if not info.name.startswith(key):
                    return False  # another image the manifest does not list
                position += member_bytes(info.size)
    except (OSError, tarfile.TarError):
        return False


def parts_done(layout: Layout, entries: Iterable[dict[str, Any]]) -> dict[int, int]:
    """Tar mode: how many complete parts each shard already has."""
    tars: dict[int, set[str]] = {}
    for entry in entries:
        tars.setdefault(layout.shard_of(entry["index"]), set()).add(entry["path"].split("/", 1)[0])
    return {shard: len(names) for shard, names in tars.items()}


def remove_temp_files(root: Path) -> int:
    """Delete the temporary files a killed run left (top level and shard folders): only names
    asyncdump makes (``is_temp_name``), never a user's own hidden ``.*.tmp`` files."""
    removed = 0
    folders = [root] + [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    for folder in folders:
        for path in folder.iterdir():
            if is_temp_name(path.name) and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
    return removed


def write_merged_manifest(root: Path, entries: dict[int, dict[str, Any]], fsync: bool) -> None:
    """Replace ``manifest.jsonl`` with ``entries`` sorted by index, then drop rank manifests."""
    text = "".join(dumps_line(entries[i]) for i in sorted(entries))
    write_atomically(root / MANIFEST_FILE, text, fsync)
    for path in manifest_files(root):
        if path.name != MANIFEST_FILE:
            unlink_quietly(path)


def _refuse_foreign_files(root: Path) -> None:
    """A new dataset starts only in a missing or empty folder: its names (``000000/...``,
    ``shard-000000.tar``) could replace files someone else put there."""
    if not root.is_dir():
        return
    try:
        with os.scandir(root) as entries:
            found = next(entries, None)
    except OSError as exc:
        raise DatasetError(f"cannot read {root}: {exc.strerror or exc}") from None
    if found is not None:
        raise DatasetError(f"{root} is not empty (it holds {found.name!r}) and holds no asyncdump "
                           "dataset; a new dataset starts only in a new or empty folder, so that "
                           "no file of yours is replaced: choose another output folder")


def prepare_root(root: Path, layout: Layout, record: dict[str, Any], resume: bool,
                 fsync: bool) -> None:
    """Rank 0 at the start of a run: refuse an existing dataset without ``resume``; else write
    ``dataset.json`` (new dataset) or check the job and keep only durable manifest entries."""
    existing = holds_dataset(root) if root.is_dir() else None
    if existing is not None and not resume:
        raise DatasetError(f"{root} already holds a dataset ({existing}); pass resume "
                           "(--resume) to continue it, or choose another output folder")
    if existing is None:
        _refuse_foreign_files(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if existing is None:
            write_atomically(root / DATASET_FILE,
                             json.dumps(record, indent=2, sort_keys=True) + "\n", fsync)
            return
    except OSError as exc:
        raise DatasetError(f"cannot write to {root}: {exc.strerror or exc}") from None
    check_job(root, record)
    entries = read_manifests(root, layout.count)
    remove_temp_files(root)
    write_merged_manifest(root, durable_entries(root, layout, entries), fsync)
