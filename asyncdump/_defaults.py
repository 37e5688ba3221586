"""Derived defaults, computed in one place and printed by ``asyncdump info``."""

from __future__ import annotations

import os

import psutil

MIB = 1 << 20
MIN_BUFFER_BYTES = 32 * MIB
MAX_DEFAULT_BUFFER_BYTES = 512 * MIB
BUFFER_FRACTION_OF_AVAILABLE = 0.10
MAX_DEFAULT_WORKERS = 16


def usable_cores() -> int:
    """Cores this process may run on (affinity / cgroup cpusets), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def local_ranks() -> int:
    """Processes of this job sharing this machine's cores: ``LOCAL_WORLD_SIZE`` (torchrun sets
    it), else ``WORLD_SIZE`` (a plain launch, taken to be on one machine), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        try:
            value = int(os.environ.get(name, ""))
        except ValueError:
            continue
        if value >= 1:
            return value
    return 1


def default_workers(ranks_on_this_machine: int | None = None) -> int:
    """One core stays with each training loop: the rank's share of the usable cores - 1,
    at least 1 and at most MAX_DEFAULT_WORKERS. None: ``local_ranks()``."""
    ranks = local_ranks() if ranks_on_this_machine is None else ranks_on_this_machine
    per_rank = usable_cores() // max(1, ranks)
    return max(1, min(per_rank - 1, MAX_DEFAULT_WORKERS))


def available_memory_bytes() -> int:
    return int(psutil.virtual_memory().available)


def default_max_buffer_bytes() -> int:
    """10% of available memory, within [32 MiB, 512 MiB].

    The buffer is anonymous shared memory (memfd): it is not limited by the size of /dev/shm,
    and its pages are only touched as far as staging actually reaches.
    """
    share = int(available_memory_bytes() * BUFFER_FRACTION_OF_AVAILABLE)
    return max(MIN_BUFFER_BYTES, min(MAX_DEFAULT_BUFFER_BYTES, share))
