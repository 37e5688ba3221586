"""File names: templates, the rank field, and keeping every path inside ``root``."""

from __future__ import annotations

import os
import re
import string
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


_PLAIN_SPEC = re.compile(r"0?\d*[dxXob]?")  # an integer, maybe zero-padded: never "/" or "."


def is_plain_template(template: str) -> bool:
    """True when every name of a batch is valid once its first one is: the template uses
    ``{index}``, only built-in fields with plain integer format specs (``{index:08d}``), and
    no "/" after ``{index}`` or ``{batch}`` (so one folder per batch). Such a batch needs only
    its first name checked at ``submit``: the others differ in digits alone and are distinct."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return False
    seen_per_image = False
    for literal, field, spec, conversion in parsed:
        if seen_per_image and "/" in literal:
            return False
        if field is None:
            continue
        if field not in BUILTIN_FIELDS or conversion or not _PLAIN_SPEC.fullmatch(spec or ""):
            return False
        seen_per_image |= field in ("index", "batch")
    return "index" in {field for _, field, _, _ in parsed}


def template_fields(template: str) -> set[str]:
    """The top-level field names a ``str.format`` template refers to."""
    fields = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            fields.add(field.split(".")[0].split("[")[0])
    return fields


class Namer:
    """Turns (template or explicit names, fields) into absolute paths under ``root``.

    Raises ``ValueError`` for names that escape ``root`` or collide (unless ``overwrite``).
    Memory is bounded whatever the run length. A collision is detected when two images of one
    batch share a path, or when a path equals one of the last ``RECENT_PATHS`` paths this sink
    accepted. A path reused after more than ``RECENT_PATHS`` later images is not detected.
    Templates with ``{index}`` need no window: the running index makes paths unique.
    Not thread-safe: the sink calls it under its submit lock (``plain_paths``' render
    function reads only what never changes, so any thread may call it).
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
        self._unique_by_index = "index" in self._fields
        self._plain = is_plain_template(template)
        self._recent: deque[str] = deque()  # accepted paths, oldest first
        self._recent_set: set[str] = set()  # the same paths, for O(1) lookups
        self._checked_dirs: set[str] = set()

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
                if clash is not None:
                    raise ValueError(f"{clash} was already submitted to this sink; make names "
                                     "unique (e.g. add {index}) or pass overwrite=True")
        return paths

    def plain_paths(self, count: int, *, start_index: int, step: int | None,
                    names: Sequence[str] | None) -> Callable[[], list[str]] | None:
        """For a plain template (``is_plain_template``) and no ``names``: check the first
        name now (``ValueError`` as ``paths``) and return a function that renders all
        ``count`` paths, equal to ``paths``' (the collector thread calls it). Else None."""
        if not self._plain or names is not None or count < 1:
            return None
        rank = current_rank() if "rank" in self._fields else 0
        self._checked_path(self._render(start_index, step, 0, rank, {}))

        def render() -> list[str]:  # the names _render gives, which the check above vouches for
            return [self._join(self._render(start_index + i, step, i, rank, {}))
                    for i in range(count)]
        return render

    def record(self, paths: list[str], names: Sequence[str] | None) -> None:
        """Remember accepted paths (the last ``RECENT_PATHS``) so a later batch cannot
        silently overwrite them."""
        if not self.tracks(names):
            return
        recent, recent_set = self._recent, self._recent_set
        for path in paths[-RECENT_PATHS:]:
            recent.append(path)
            recent_set.add(path)
        while len(recent) > RECENT_PATHS:
            recent_set.discard(recent.popleft())

    def tracks(self, names: Sequence[str] | None) -> bool:
        """Whether ``record`` keeps this batch's paths (callers skip rendering them if not):
        explicit names, or a template without ``{index}``, unless ``overwrite``."""
        return not self.overwrite and (names is not None or not self._unique_by_index)

    def _render(self, index: int, step: int | None, batch: int, rank: int,
                fields: Mapping[str, Any]) -> str:
        if step is None and "step" in self._fields:
            raise ValueError(f"name template {self.template!r} uses {{step}} but submit got step=None")
        values = dict(fields)
        values.update(index=index, step=step, batch=batch, rank=rank)
        try:
            return self.template.format(**values)
        except KeyError as exc:
            raise ValueError(
                f"name template {self.template!r} uses field {exc.args[0]!r} that submit did not get; "
                f"available: {', '.join(BUILTIN_FIELDS)} and keyword fields passed to submit "
                f"(got {sorted(fields) or 'none'})"
            ) from None
        except (ValueError, IndexError, AttributeError, TypeError) as exc:
            raise ValueError(f"name template {self.template!r} failed to format: {exc}") from None

    def _join(self, name: str) -> str:
        """The path of a checked name (what ``_checked_path`` returns for it)."""
        if "/" in name:
            return os.path.join(self._root_str, name + self.extension)
        return f"{self._root_str}{os.sep}{name}{self.extension}"

    def _checked_path(self, name: object) -> str:
        if isinstance(name, str) and name and "/" not in name and "\\" not in name \
                and "\x00" not in name and name not in (".", ".."):
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
        path = self._join(name)
        folder = os.path.dirname(path)
        if self._real_root is not None and folder not in self._checked_dirs:
            real = os.path.realpath(folder)
            if real != self._real_root and not real.startswith(self._real_root + os.sep):
                raise ValueError(f"name {name!r} resolves outside root {self.root} "
                                 f"(through a symlink to {real})")
            if len(self._checked_dirs) >= CHECKED_FOLDERS:  # e.g. one folder per image
                self._checked_dirs.clear()
            self._checked_dirs.add(folder)
        return path
