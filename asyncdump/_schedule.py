"""Which indices a rank still has to write: its shards (shard s belongs to rank s % world)
minus the indices already durable, handed out one shard at a time."""

from __future__ import annotations

from collections.abc import Collection

from ._manifest import Layout


class Schedule:
    """This rank's pending indices; ``take`` advances past a submitted batch."""

    def __init__(self, layout: Layout, durable: Collection[int], rank: int, world: int):
        self.layout = layout
        # Resume state while writing: one bit per image, only for the shards that have durable
        # images (not a list of ints; a fresh run of any count allocates none).
        self._done: dict[int, bytearray] = {}
        mine_done = 0
        for index in durable:
            shard = layout.shard_of(index)
            bits = self._done.get(shard)
            if bits is None:
                bits = self._done[shard] = bytearray((len(layout.shard_range(shard)) + 7) // 8)
            offset = index - shard * layout.shard_size
            bits[offset >> 3] |= 1 << (offset & 7)
            mine_done += shard % world == rank
        self._shards = range(rank, layout.shards, world)  # this rank's shards
        last = layout.shards - 1  # the only shard that may be short
        self.remaining = len(self._shards) * layout.shard_size - mine_done
        if last % world == rank:
            self.remaining -= layout.shard_size - len(layout.shard_range(last))
        self._shard_cursor = -1  # position in _shards of the shard whose indices are in _todo
        self._todo: list[int] = []  # pending indices of one shard at a time
        self._pos = 0  # next of _todo to submit

    def _pending_of_shard(self) -> list[int]:
        """The not yet submitted indices of the current shard, moving on to the next shard with
        pending indices when it is used up; empty when this rank has nothing left."""
        while self._pos >= len(self._todo):
            self._shard_cursor += 1
            if self._shard_cursor >= len(self._shards):
                self._todo, self._pos = [], 0
                return self._todo
            shard = self._shards[self._shard_cursor]
            indices = self.layout.shard_range(shard)
            done = self._done.get(shard)
            if done is None:
                self._todo = list(indices)
            else:
                first = indices.start
                self._todo = [i for i in indices
                              if not done[(i - first) >> 3] >> ((i - first) & 7) & 1]
            self._pos = 0
        return self._todo

    def next_batch(self, size: int) -> list[int]:
        """Up to ``size`` next pending indices, all of one shard; empty when none are left."""
        return self._pending_of_shard()[self._pos:self._pos + size]

    def next_index(self) -> int | None:
        todo = self._pending_of_shard()
        return todo[self._pos] if todo else None

    def take(self, count: int) -> None:
        """The next ``count`` indices were submitted."""
        self._pos += count
        self.remaining -= count
