"""Feed a ``DatasetSink`` from the user's ``--generator`` function.

    every rank: first batch -> call + check -> gather every rank's verdict
        any rank failed: no image submitted; rank 0 removes what the sink created -> exit 2
                         (exit 1 when a function raised, with its traceback)
        all fine:        submit it, then call + check + submit each further pending batch
                         (``DatasetSink.submit`` checks images and metadata as the first
                         batch was checked); a failure there stops this rank (exit 2, or 1
                         when the function raised): what was written stays in the manifest
                         and ``--resume`` calls the function for the rest only
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._codecs import Codec
from ._fsutil import unlink_quietly
from ._manifest import DATASET_FILE, MANIFEST_FILE, holds_dataset, manifest_files
from ._user_generator import Generator, GeneratorError, split


class GeneratorFailed(Exception):
    """The function raised (``__cause__``) or returned something unusable, after the first batch
    or on it. ``first`` says no image was submitted by any rank."""

    def __init__(self, message: str, first: bool, raised: bool):
        super().__init__(message)
        self.first, self.raised = first, raised

    @property
    def exit_code(self) -> int:
        """1 when the function raised; 2 when what it returned cannot be written (on any batch)."""
        return 1 if self.raised else 2

    def report(self) -> str:
        """The one-line message, then the function's traceback when it raised."""
        cause = self.__cause__
        if not self.raised or cause is None:
            return str(self)
        return str(self) + "\n" + "".join(traceback.format_exception(cause)).rstrip()


def feed(sink: Any, produce: Generator, spec: str, batch_size: int, codec: Codec) -> None:
    """Write every pending index of this rank with ``produce``; raise ``GeneratorFailed``."""
    batches = sink.pending(batch_size)
    first = next(batches, None)
    problem: GeneratorFailed | None = None
    if first is not None:
        try:
            images, metadata = _make(produce, spec, first, codec, first=True)
        except GeneratorFailed as exc:
            problem = exc
    verdicts = sink.ranks.gather(None if problem is None else problem.raised)
    failed = [(rank, raised) for rank, raised in enumerate(verdicts) if raised is not None]
    if failed:
        if problem is not None:
            raise problem
        rank = failed[0][0]
        raise GeneratorFailed(f"rank {rank}'s {spec} failed on its first batch (see its message)",
                              first=True, raised=any(raised for _, raised in failed))
    if first is None:
        return
    _submit(sink, spec, first, images, metadata)
    for indices in batches:
        images, metadata = _make(produce, spec, indices, codec, first=False)
        _submit(sink, spec, indices, images, metadata)


def _submit(sink: Any, spec: str, indices: list[int], images: Any, metadata: Any) -> None:
    try:
        sink.submit(indices, images, metadata)
    except (TypeError, ValueError) as exc:
        raise GeneratorFailed(f"{spec} returned a batch for indices {_span(indices)} that "
                              f"cannot be written: {exc}", first=False, raised=False) from None


def _make(produce: Generator, spec: str, indices: list[int], codec: Codec,
          first: bool) -> tuple[Any, list[dict[str, Any]] | None]:
    try:
        result = produce(list(indices))
    except Exception as exc:
        text = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        raise GeneratorFailed(f"{spec} raised on indices {_span(indices)}: {detail}",
                              first=first, raised=True) from exc
    try:
        return split(result, indices, codec, check=first)
    except GeneratorError as exc:
        what = "its first batch" if first else f"indices {_span(indices)}"
        raise GeneratorFailed(f"{spec} {exc} (for {what})", first=first, raised=False) from None


def _span(indices: list[int]) -> str:
    return f"{indices[0]}" if len(indices) == 1 else f"{indices[0]}..{indices[-1]}"


@dataclass(frozen=True)
class Before:
    """What ``root`` was before the sink opened it: enough to undo a run that wrote no image."""

    root: Path
    had_dataset: bool
    created: Path | None  # the outermost folder the run creates (None: root existed)


def before(root: str) -> Before:
    path = Path(root).absolute()
    created = None
    probe = path
    while not probe.exists() and probe != probe.parent:
        created, probe = probe, probe.parent
    had = path.is_dir() and holds_dataset(path) is not None
    return Before(path, had, created)


def undo(state: Before) -> None:
    """Rank 0, every rank's sink closed, no image written: leave ``root`` as it was."""
    for manifest in manifest_files(state.root):
        if not state.had_dataset or (manifest.name != MANIFEST_FILE and not manifest.stat().st_size):
            unlink_quietly(manifest)
    if state.had_dataset:
        return
    unlink_quietly(state.root / DATASET_FILE)
    if state.created is None:
        return
    folder = state.root
    while True:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
        if folder == state.created or folder == folder.parent:
            break
        folder = folder.parent
