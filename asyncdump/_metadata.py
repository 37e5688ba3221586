"""Per-image metadata of a dataset, serialised once at submit: the manifest's ``label`` and
``meta`` JSON, and in tar mode the ``key.json`` and ``key.cls`` members."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple


class Meta(NamedTuple):
    """One image's metadata, serialised once at submit."""

    member: bytes  # tar mode: the ``key.json`` member (the whole dict)
    label: str  # JSON of the manifest's ``label``
    extra: str  # JSON of the manifest's ``meta`` (the dict without ``label``)
    cls: bytes  # tar mode: the ``key.cls`` member (WebDataset's int label), b"" for none


# One encoder each, made once: ``json.dumps`` with options builds a new encoder per call.
_CHECK_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_MEMBER_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_SORTED_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def serialise(metadata: Sequence[dict[str, Any]] | None, count: int, tar: bool,
              indices: Sequence[int] | None = None) -> list[Meta]:
    """``count`` images' metadata (None: none), checked and serialised; tar: with members.

    Every batch is checked the same way (see ``checked``); an error names the image's index.
    """
    if metadata is None:
        return [Meta(b"{}", "null", "{}", b"")] * count
    if isinstance(metadata, dict) or len(metadata) != count:
        raise ValueError(f"metadata must be a list of {count} dicts (one per image)")
    names = indices if indices is not None else range(count)
    out = []
    for index, meta in zip(names, metadata, strict=True):
        if not isinstance(meta, dict):
            raise TypeError(f"metadata of index {index} must be a dict, got {type(meta).__name__}")
        try:
            value = checked(meta)
        except TypeError as exc:
            raise TypeError(f"metadata of index {index} is not JSON-serialisable: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"metadata of index {index} cannot be written as JSON: "
                             f"{_one_line(exc)}") from None
        label = value.get("label")
        out.append(Meta(
            _MEMBER_JSON.encode(value).encode() if tar else b"", _SORTED_JSON.encode(label),
            _SORTED_JSON.encode({k: v for k, v in value.items() if k != "label"}),
            str(label).encode() if tar and _is_int(label) else b""))
    return out


def checked(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as JSON reads it back (keys are strings), or ``TypeError`` (a value JSON
    cannot hold) / ``ValueError``: NaN or infinity (``NaN`` is not JSON), a lone surrogate
    (not UTF-8), two keys that JSON writes alike (``1`` and ``"1"``: one would be lost)."""
    try:
        text = _CHECK_JSON.encode(meta)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise  # a circular reference
        raise ValueError("NaN or infinity is not JSON (write null or a string instead)") \
            from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{text[exc.start:exc.end]!a} is a lone surrogate, not UTF-8 text") \
            from None
    result: dict[str, Any] = json.loads(text, object_pairs_hook=_unique_keys)
    return result


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"two keys are both written as {key!r} in JSON (such as 1 and '1'); "
                         "one would be lost")
    return result


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
