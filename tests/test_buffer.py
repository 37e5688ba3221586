"""The shared buffer's byte accounting (first fit, partial release, coalescing)."""

import threading
import time

import numpy as np
import pytest

from asyncdump._buffer import ALIGNMENT, SharedBuffer


def test_reserve_release_coalesce() -> None:
    buf = SharedBuffer(1000)
    a = buf.try_reserve(300)
    b = buf.try_reserve(300)
    assert a == 0 and b is not None and b % ALIGNMENT == 0 and b >= 300
    assert buf.buffered_bytes == 600
    c = buf.try_reserve(500)
    assert c is None  # not enough contiguous space
    buf.release(a, 100)  # part of a reservation can go back alone
    buf.release(a + 100, 200)
    buf.release(b, 300)
    assert buf.buffered_bytes == 0
    d = buf.try_reserve(1000)  # all free extents merged back into one
    assert d == 0
    assert buf.peak_buffered_bytes == 1000
    buf.close()


def test_double_release_is_detected() -> None:
    buf = SharedBuffer(256)
    a = buf.try_reserve(64)
    assert a is not None
    buf.release(a, 64)
    with pytest.raises(RuntimeError, match="double release"):
        buf.release(a, 64)
    buf.close()


def test_blocking_reserve_wakes_on_release() -> None:
    buf = SharedBuffer(128)
    a = buf.try_reserve(128)
    assert a is not None
    threading.Timer(0.2, buf.release, args=(a, 128)).start()
    waited = buf.wait_for_space(100)
    assert waited >= 0.1 and buf.try_reserve(100) == 0
    buf.close()


def test_too_large_is_value_error() -> None:
    buf = SharedBuffer(100)
    with pytest.raises(ValueError):
        buf.wait_for_space(101)
    with pytest.raises(ValueError):
        buf.try_reserve(101)
    buf.close()


def test_views_share_memory() -> None:
    buf = SharedBuffer(4096)
    view = buf.view(64, 16)
    view[:] = np.arange(16, dtype=np.uint8)
    assert bytes(buf.view(64, 16)) == bytes(range(16))
    del view
    buf.close()
    assert buf.fd == -1


def test_blocking_reserve_can_be_abandoned() -> None:
    buf = SharedBuffer(64)
    buf.try_reserve(64)
    stop_at = time.monotonic() + 0.3

    def check() -> None:
        if time.monotonic() > stop_at:
            raise RuntimeError("closing")

    with pytest.raises(RuntimeError, match="closing"):
        buf.wait_for_space(64, check=check)
    buf.close()


def test_staged_images_are_capped_whatever_their_bytes() -> None:
    buf = SharedBuffer(1 << 20, max_images=3)
    try:
        first = buf.try_reserve(10, images=2)
        assert first is not None and buf.staged_images == 2
        assert buf.try_reserve(10, images=2) is None  # bytes are free, images are not
        assert buf.wait_for_space(10, images=1) == 0.0
        with pytest.raises(ValueError, match="at most 3"):
            buf.try_reserve(10, images=4)
        buf.release(first, 5)
        buf.release(first + 5, 5)  # per-image releases, as the collector does
        assert buf.staged_images == 0
        assert buf.try_reserve(10, images=3) is not None
    finally:
        buf.close()
