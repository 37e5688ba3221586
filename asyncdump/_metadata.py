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
_MEMBER_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def serialise(metadata: Sequence[dict[str, Any]] | None, count: int, tar: bool) -> list[Meta]:
    """``count`` images' metadata (None: none), checked and serialised; tar: with members."""
    if metadata is None:
        return [Meta(b"{}", "null", "{}", b"")] * count
    if isinstance(metadata, dict) or len(metadata) != count:
        raise ValueError(f"metadata must be a list of {count} dicts (one per image)")
    out = []
    for meta in metadata:
        if not isinstance(meta, dict):
            raise TypeError(f"each metadata item must be a dict, got {type(meta).__name__}")
        try:
            extra = {k: v for k, v in meta.items() if k != "label"}
            label = meta.get("label")
            out.append(Meta(
                _MEMBER_JSON.encode(meta).encode() if tar
                else b"", _canonical(label), _canonical(extra),
                str(label).encode() if tar and _is_int(label) else b""))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
    return out


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
