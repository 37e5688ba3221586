"""Derived defaults: ``workers=None`` shares the usable cores among the ranks of this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncdump import AsyncImageSink, _defaults


@pytest.fixture
def cores_32(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(_defaults, "usable_cores", lambda: 32)
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_takes_cores_minus_one_up_to_the_cap(cores_32: pytest.MonkeyPatch) -> None:
    assert _defaults.default_workers() == _defaults.MAX_DEFAULT_WORKERS == 16


@pytest.mark.parametrize("env,expected", [
    ({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "16"}, 7),  # torchrun: 4 ranks here, 16 in all
    ({"WORLD_SIZE": "2"}, 15),  # a plain launch: all ranks taken to be on this machine
    ({"LOCAL_WORLD_SIZE": "64"}, 1),  # more ranks than cores: still one worker each
    ({"LOCAL_WORLD_SIZE": "nonsense", "WORLD_SIZE": "8"}, 3),
])
def test_ranks_on_this_machine_share_the_cores(cores_32: pytest.MonkeyPatch, env: dict[str, str],
                                               expected: int) -> None:
    for name, value in env.items():
        cores_32.setenv(name, value)
    assert _defaults.default_workers() == expected
    assert _defaults.default_workers(1) == 16  # an explicit count of ranks wins


@pytest.mark.timeout(60)
def test_sink_default_is_rank_aware(tmp_path: Path, cores_32: pytest.MonkeyPatch) -> None:
    cores_32.setenv("LOCAL_WORLD_SIZE", "16")  # 32 cores // 16 ranks - 1 = 1 worker per rank
    with AsyncImageSink(tmp_path) as sink:
        assert sink.workers == 1 == sink.stats.workers
