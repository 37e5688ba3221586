"""Rank coordination of a ``DatasetSink``: rank, world size and a gloo group for the few
collectives (broadcast, gather, barrier); with one process every call is a no-op."""

from __future__ import annotations

import os
import sys
from typing import Any


class Ranks:
    """Rank, world size and a gloo group for the few collectives (one rank: all no-ops)."""

    def __init__(self) -> None:
        self.rank, self.world, self.owns_group = 0, 1, False
        self._group: Any = None
        world = env_int("WORLD_SIZE", 1)
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
        self.local_world = env_int("LOCAL_WORLD_SIZE", self.world)

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


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
