"""File names: templates, the rank field, and keeping every path inside ``root``."""

from __future__ import annotations

import bisect
import operator
import os
import re
import string
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._fsutil import NAME_MAX_BYTES

BUILTIN_FIELDS = ("index", "step", "batch", "rank")
RECENT_PATHS = 4096  # paths remembered for the cross-batch collision check (a sliding window)
CHECKED_FOLDERS = 1024  # folders whose realpath is cached; the cache is emptied when full


def current_rank() -> int:
    """torch.distributed rank when a process group is up, else env ``RANK``, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
        except (RuntimeError, ValueError):
            pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


_PLAIN_SPEC = re.compile(r"(0?)(\d*)([dxXob]?)")  # an integer, maybe padded: never "/" or "."
_BASES = {"": 10, "d": 10, "x": 16, "X": 16, "o": 8, "b": 2}
PER_IMAGE_FIELDS = ("index", "batch")


def _after_first(spec: str) -> str:
    """The characters an integer field with this plain spec can render after its first one.

    A sign is always the first character, except behind the spaces of a width without "0"."""
    zero, width, kind = _PLAIN_SPEC.fullmatch(spec).groups()  # type: ignore[union-attr]
    chars = {"x": "0123456789abcdef", "X": "0123456789ABCDEF"}.get(kind, "0123456789")
    return chars + " -" if width and not zero else chars


def is_plain_template(template: str) -> bool:
    """True when the template's names are unique by construction and every name of a batch is
    valid once its first one is:

    - it uses ``{index}``, and only built-in fields with plain integer format specs
      (``{index:08d}``, ``{step:x}``): these pad but never truncate;
    - every two fields are separated by a literal holding a character the field before it
      cannot render after its first one (such as "_", "/", "-", "."), so a name splits back
      into its fields in one way only, and distinct indices give distinct names;
    - no "/" after ``{index}`` or ``{batch}`` (so one folder per batch).

    Such a batch needs only its first name checked at ``submit``: the others differ in digits
    alone and are distinct from every other name the template gives."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return False
    seen_per_image = False
    left: str | None = None  # what the previous field can render after its first character
    for literal, field, spec, conversion in parsed:
        if seen_per_image and "/" in literal:
            return False
        if left is not None and field is not None and all(c in left for c in literal):
            return False  # e.g. "{index}{step}": index 1, step 11 and index 11, step 1 collide
        if field is None:
            continue
        if field not in BUILTIN_FIELDS or conversion or not _PLAIN_SPEC.fullmatch(spec or ""):
            return False
        seen_per_image |= field in PER_IMAGE_FIELDS
        left = _after_first(spec or "")
    return "index" in {field for _, field, _, _ in parsed}


def _template_regex(template: str) -> tuple[re.Pattern[str], int]:
    """For a plain template: a pattern matching its names, capturing the first ``{index}``'s
    text, and that field's base. By ``is_plain_template``'s separators, a name the template
    renders matches in one way only, so the captured text is the index it was rendered from."""
    pattern, base = [], 0
    for literal, field, spec, _ in string.Formatter().parse(template):
        pattern.append(re.escape(literal))
        if field is None:
            continue
        spec = spec or ""
        rest = _after_first(spec)
        text = f"[{re.escape(rest + ' -')}][{re.escape(rest)}]*"
        if field == "index" and not base:
            pattern.append(f"(?P<index>{text})")
            base = _BASES[_PLAIN_SPEC.fullmatch(spec).group(3)]  # type: ignore[union-attr]
        else:
            pattern.append(f"(?:{text})")
    return re.compile("".join(pattern), re.DOTALL), base


def checked_step(step: Any) -> int | None:
    """``step`` as an int (``None`` stays ``None``): ``TypeError`` for anything else, so that a
    string can never reach a name (``step="/x"``)."""
    if step is None:
        return None
    if isinstance(step, bool):
        raise TypeError(f"step must be an int or None, got bool {step!r}")
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int or None, got {type(step).__name__} {step!r}") from None


def checked_name_bytes(name: str, extension: str) -> None:
    """``ValueError`` unless ``name`` (+ ``extension`` on its last component) can be a file
    name here: encodable (no lone surrogate) and every component at most ``NAME_MAX_BYTES``."""
    if name.isascii() and extension.isascii() and len(name) + len(extension) <= NAME_MAX_BYTES:
        return  # the common case: no component can be too long
    try:
        raw = os.fsencode(name) + os.fsencode(extension)
    except UnicodeEncodeError as exc:
        raise ValueError(f"name {name!r} cannot be a file name: {exc.reason} at position "
                         f"{exc.start} (a lone surrogate?)") from None
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX_BYTES:
            raise ValueError(f"name {name!r} has a component of {len(part)} bytes (with its "
                             f"extension); file systems allow at most {NAME_MAX_BYTES}")


class PlainBatch:
    """A plain-template batch: its first name checked, the others rendered when called (on
    the collector thread; it reads only what never changes)."""

    __slots__ = ("count", "namer", "rank", "start", "step")

    def __init__(self, namer: Namer, start: int, count: int, step: int | None, rank: int):
        self.namer, self.start, self.count, self.step, self.rank = namer, start, count, step, rank

    def name_at(self, index: int) -> str:
        return self.namer._render(index, self.step, index - self.start, self.rank, {})

    def __call__(self) -> list[str]:
        join = self.namer._join
        return [join(self.name_at(self.start + i)) for i in range(self.count)]


def template_fields(template: str) -> set[str]:
    """The top-level field names a ``str.format`` template refers to."""
    fields = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            fields.add(field.split(".")[0].split("[")[0])
    return fields


class Namer:
    """Turns (template or explicit names, fields) into absolute paths under ``root``.

    Raises ``ValueError`` for names that escape ``root``, cannot be file names, or collide
    (unless ``overwrite``). Memory is bounded whatever the run length. A collision is detected
    when two images of one batch share a path, or when a path equals one of the last
    ``RECENT_PATHS`` paths this sink accepted, however each was named (template or
    ``names=``). A path reused after more than ``RECENT_PATHS`` later images is not detected.
    A plain template's names are unique by construction (``is_plain_template``): its batches
    are remembered as index ranges, not paths, and only ``names=`` are compared with them.
    Not thread-safe: the sink calls it under its submit lock (``PlainBatch`` reads only what
    never changes, so any thread may call it).
    """

    def __init__(self, root: Path | str, template: str, extension: str, overwrite: bool = False):
        """``root``: a folder, or an object-store URL (a ``str``: no folders to resolve)."""
        if not isinstance(template, str) or not template:
            raise ValueError(f"name must be a non-empty str.format template, got {template!r}")
        try:
            self._fields = template_fields(template)
        except ValueError as exc:
            raise ValueError(f"name template {template!r} is not a valid format string: {exc}") from None
        self.root = root
        self._root_str = str(root)
        self._real_root = os.path.realpath(root) if isinstance(root, Path) else None
        self.template = template
        self.extension = extension
        self.overwrite = overwrite
        self._plain = is_plain_template(template)
        self._per_image_fields = sum(f in PER_IMAGE_FIELDS for _, f, _, _ in
                                     string.Formatter().parse(template)) if self._plain else 0
        self._recent: deque[str] = deque()  # accepted paths, oldest first
        self._recent_set: set[str] = set()  # the same paths, for O(1) lookups
        self._checked_dirs: set[str] = set()
        # Plain template only: its recent batches (by first index) and the names= paths that
        # it would render at some index (index -> paths), checked when it gets there.
        self._regex: re.Pattern[str] | None = None
        self._base = 10
        if self._plain:
            self._regex, self._base = _template_regex(template)
        self._plain_starts: list[int] = []
        self._plain_batches: list[PlainBatch] = []
        self._claims: dict[int, set[str]] = {}
        self._claim_of: dict[str, int] = {}

    def paths(
        self,
        count: int,
        *,
        start_index: int,
        step: int | None,
        names: Sequence[str] | None,
        fields: Mapping[str, Any],
    ) -> list[str]:
        """Absolute paths (str) for ``count`` images, or ``ValueError``.

        Collision bookkeeping happens only in ``record``, once the batch is accepted.
        """
        if names is not None:
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise TypeError(f"names must be a list of str (one per image), got {type(names).__name__}")
            if len(names) != count:
                raise ValueError(f"names has {len(names)} entries but the batch has {count} images")
            raw = list(names)
        else:
            rank = current_rank() if "rank" in self._fields else 0
            raw = [self._render(start_index + i, step, i, rank, fields) for i in range(count)]
        paths = [self._checked_path(name) for name in raw]
        if not self.overwrite:
            if len(set(paths)) != len(paths):
                dup = next(p for p in paths if paths.count(p) > 1)
                raise ValueError(f"two images of this batch would be written to {dup}; make names "
                                 "unique (e.g. add {batch} or {index}) or pass overwrite=True")
            if self.tracks(names):
                clash = next((p for p in paths if p in self._recent_set), None)
                if clash is None and names is not None and self._plain_batches:
                    clash = next((p for p, n in zip(paths, raw, strict=True) if self._templated(n)), None)
                if clash is not None:
                    raise _already(clash)
        return paths

    def plain_paths(self, count: int, *, start_index: int, step: int | None,
                    names: Sequence[str] | None) -> PlainBatch | None:
        """For a plain template (``is_plain_template``) and no ``names``: check the first
        name now (``ValueError`` as ``paths``) and return a ``PlainBatch`` that renders all
        ``count`` paths, equal to ``paths``' (the collector thread calls it). Else None."""
        if not self._plain or names is not None or count < 1:
            return None
        rank = current_rank() if "rank" in self._fields else 0
        batch = PlainBatch(self, start_index, count, step, rank)
        first = batch.name_at(start_index)
        self._checked_path(first)
        if count > 1 and 4 * (len(first) + len(self.extension)) + 64 * self._per_image_fields \
                > NAME_MAX_BYTES:
            # the last name is the longest (indices only grow); only long names need it checked
            checked_name_bytes(batch.name_at(start_index + count - 1), self.extension)
        if self._claims and not self.overwrite:
            self._check_claims(batch)
        return batch

    def record(self, paths: list[str] | PlainBatch, names: Sequence[str] | None) -> None:
        """Remember an accepted batch (within the window of the last ``RECENT_PATHS``
        images) so that a later batch cannot silently overwrite it."""
        if isinstance(paths, PlainBatch):
            if not self.overwrite:
                self._remember_plain(paths)
            return
        if not self.tracks(names):
            return
        recent, recent_set = self._recent, self._recent_set
        for path in paths[-RECENT_PATHS:]:
            recent.append(path)
            recent_set.add(path)
        if self._plain and names is not None:  # names= the template may render later
            for path, name in zip(paths[-RECENT_PATHS:], list(names)[-RECENT_PATHS:], strict=True):
                index = self._index_in(name)
                if index is not None:
                    self._claims.setdefault(index, set()).add(path)
                    self._claim_of[path] = index
        while len(recent) > RECENT_PATHS:
            old = recent.popleft()
            recent_set.discard(old)
            if self._claim_of:
                self._drop_claim(old)

    def tracks(self, names: Sequence[str] | None) -> bool:
        """Whether ``record`` keeps this batch's paths (callers skip rendering them if not):
        explicit names, or a template that is not plain, unless ``overwrite``."""
        return not self.overwrite and (names is not None or not self._plain)

    # ------------------------------------------------------------ plain templates vs names=
    def _index_in(self, name: str) -> int | None:
        """The index at which the template renders ``name``, if any (maybe not in the window)."""
        assert self._regex is not None
        match = self._regex.fullmatch(name)
        if match is None:
            return None
        try:
            return int(match.group("index"), self._base)
        except ValueError:
            return None

    def _templated(self, name: str) -> bool:
        """Whether a recent plain batch was given ``name``."""
        index = self._index_in(name)
        if index is None:
            return False
        at = bisect.bisect_right(self._plain_starts, index) - 1
        if at < 0:
            return False
        batch = self._plain_batches[at]
        return index < batch.start + batch.count and batch.name_at(index) == name

    def _check_claims(self, batch: PlainBatch) -> None:
        end = batch.start + batch.count
        if len(self._claims) < batch.count:
            hits = sorted(i for i in self._claims if batch.start <= i < end)
        else:
            hits = [i for i in range(batch.start, end) if i in self._claims]
        for index in hits:
            path = self._join(batch.name_at(index))
            if path in self._claims[index]:
                raise _already(path)

    def _remember_plain(self, batch: PlainBatch) -> None:
        starts, batches = self._plain_starts, self._plain_batches
        starts.append(batch.start)
        batches.append(batch)
        horizon = batch.start + batch.count - RECENT_PATHS
        old = 0
        while old < len(batches) and batches[old].start + batches[old].count <= horizon:
            old += 1
        if old:
            del starts[:old], batches[:old]
        for index in [i for i in self._claims if i < batch.start + batch.count]:
            for path in self._claims.pop(index):  # rendered past them: they cannot clash now
                self._claim_of.pop(path, None)

    def _drop_claim(self, path: str) -> None:
        index = self._claim_of.pop(path, None)
        if index is not None:
            paths = self._claims.get(index)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del self._claims[index]

    # ------------------------------------------------------------ rendering and checking
    def _render(self, index: int, step: int | None, batch: int, rank: int,
                fields: Mapping[str, Any]) -> str:
        if step is None and "step" in self._fields:
            raise ValueError(f"name template {self.template!r} uses {{step}} but submit got step=None")
        values = dict(fields)
        values.update(index=index, step=step, batch=batch, rank=rank)
        try:
            return self.template.format(**values)
        except KeyError as exc:
            if exc.args and exc.args[0] in self._fields and exc.args[0] not in values:
                raise ValueError(
                    f"name template {self.template!r} uses field {exc.args[0]!r} that submit did not "
                    f"get; available: {', '.join(BUILTIN_FIELDS)} and keyword fields passed to submit "
                    f"(got {sorted(fields) or 'none'})"
                ) from None
            error: Exception = exc
        except Exception as exc:  # a field's own __format__/__str__ may raise anything
            error = exc
        raise ValueError(f"name template {self.template!r} failed to format "
                         f"{_failing_field(self.template, values)}: {type(error).__name__}: {error}; "
                         "each field needs a value that str.format renders with its spec "
                         "(such as a str or an int)") from None

    def _join(self, name: str) -> str:
        """The path of a checked name (what ``_checked_path`` returns for it)."""
        if "/" in name:
            return os.path.join(self._root_str, name + self.extension)
        return f"{self._root_str}{os.sep}{name}{self.extension}"

    def _checked_path(self, name: object) -> str:
        if isinstance(name, str) and name and "/" not in name and "\\" not in name \
                and "\x00" not in name and name not in (".", ".."):
            checked_name_bytes(name, self.extension)
            return self._join(name)  # in root itself: checked
        if not isinstance(name, str) or not name:
            raise ValueError(f"each name must be a non-empty string, got {name!r}")
        if "\x00" in name or "\\" in name:
            raise ValueError(f"name {name!r} contains a NUL or backslash")
        if name.startswith("/") or os.path.isabs(name):
            raise ValueError(f"name {name!r} is absolute; names are relative to root {self.root}")
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"name {name!r} would resolve outside root or has empty/'.'/'..' "
                             "components; use plain relative names such as 'epoch3/img_0001'")
        checked_name_bytes(name, self.extension)
        path = self._join(name)
        folder = os.path.dirname(path)
        if self._real_root is not None and folder not in self._checked_dirs:
            # An early, clear error: the workers never follow a symlink below root anyway
            # (``_fsutil.Folders``), so a folder swapped for one later is refused then too.
            real = os.path.realpath(folder)
            if real != self._real_root and not real.startswith(self._real_root + os.sep):
                raise ValueError(f"name {name!r} resolves outside root {self.root} "
                                 f"(through a symlink to {real})")
            if real != os.path.join(self._real_root, os.path.dirname(name)):
                raise ValueError(f"name {name!r} goes through a symlinked sub-folder of root "
                                 f"(to {real}); asyncdump writes only to real folders below root")
            if len(self._checked_dirs) >= CHECKED_FOLDERS:  # e.g. one folder per image
                self._checked_dirs.clear()
            self._checked_dirs.add(folder)
        return path


def _failing_field(template: str, values: Mapping[str, Any]) -> str:
    """``"field {name}"`` for the first field of ``template`` that cannot be formatted alone."""
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        text = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        try:
            text.format(**values)
        except Exception:
            return f"field {text}"
    return "it"


def _already(path: str) -> ValueError:
    return ValueError(f"{path} was already submitted to this sink; make names unique "
                      "(e.g. add {index}) or pass overwrite=True")
