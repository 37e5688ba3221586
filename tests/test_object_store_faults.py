"""Object-store faults through a loopback proxy (tests/fault_proxy.py) in front of moto's S3:
throttling, outages shorter and longer than the retry deadline, resets mid-body, a stalled
server. Faults are planned by request number, not by time, so the outcome does not depend on
machine speed; each test counts the images written, lost and duplicated."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

from fault_proxy import FaultProxy
from s3_server import S3Server, s3_fixture  # noqa: F401 (the s3 fixture)

from asyncdump import AsyncDumpError, AsyncImageSink, BufferFullError
from asyncdump._stores._retry import StoreError, is_transient, with_retries

pytestmark = pytest.mark.timeout(180)
IMAGE = (1, 16, 16)


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    p = FaultProxy(s3.endpoint)
    yield p
    p.close()


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *IMAGE), dtype=np.uint8)


def sink_via(proxy: FaultProxy, bucket: str, **kwargs: Any) -> AsyncImageSink:
    kwargs.setdefault("workers", 2)
    return AsyncImageSink(f"s3://{bucket}/f", format="bmp", storage_options={"endpoint_url": proxy.endpoint},
                          **kwargs)


def outcome(s3: S3Server, bucket: str, sent: np.ndarray, urls: list[str]) -> tuple[int, int, int]:
    """(written, lost, duplicated) images, reading every object back."""
    import cv2

    keys = s3.keys(bucket)
    written = 0
    for i, image in enumerate(sent):
        key = f"f/{i:08d}.bmp"
        if key in keys:
            data = np.frombuffer(s3.get(bucket, key), np.uint8)
            decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
            assert np.array_equal(decoded, image[0]), f"{key} holds other bytes"
            written += 1
    return written, len(sent) - written, len(urls) - len(set(urls)) + len(keys) - written


def test_slowdown_on_a_fifth_of_requests_loses_nothing(s3: S3Server, proxy: FaultProxy) -> None:
    bucket = s3.bucket()
    proxy.plan = lambda n, method, path: "slowdown" if n % 5 == 2 else "pass"
    sent = images(20)
    with sink_via(proxy, bucket) as sink:
        urls = sink.submit(sent).result(120)
    assert outcome(s3, bucket, sent, urls) == (20, 0, 0)
    assert proxy.counts["slowdown"] >= 4 and sink.stats.written == 20


def test_outage_shorter_than_the_deadline_loses_nothing(s3: S3Server, proxy: FaultProxy) -> None:
    bucket = s3.bucket()
    proxy.plan = lambda n, method, path: "refuse" if 1 <= n <= 8 else "pass"  # n=0: the check
    sent = images(10, seed=1)
    with sink_via(proxy, bucket, retry_seconds=60) as sink:
        urls = sink.submit(sent).result(120)
    assert proxy.counts["refuse"] == 8
    assert outcome(s3, bucket, sent, urls) == (10, 0, 0)


def test_reset_mid_body_leaves_no_partial_object(s3: S3Server, proxy: FaultProxy) -> None:
    bucket = s3.bucket()
    proxy.plan = lambda n, method, path: "reset" if method == "PUT" and n % 2 else "pass"
    sent = images(8, seed=2)
    with sink_via(proxy, bucket) as sink:
        urls = sink.submit(sent).result(120)
    assert proxy.counts["reset"] >= 4
    assert outcome(s3, bucket, sent, urls) == (8, 0, 0)


def test_outage_longer_than_the_deadline_fails_clearly_and_closes(s3: S3Server,
                                                                   proxy: FaultProxy) -> None:
    bucket = s3.bucket()
    sink = sink_via(proxy, bucket, retry_seconds=0.5, workers=1)
    proxy.plan = lambda n, method, path: "refuse"
    future = sink.submit(images(3))
    with pytest.raises(AsyncDumpError) as caught:
        future.result(120)
    message = str(caught.value)
    assert f"s3://{bucket}/f/00000000.bmp" in message and "retry_seconds" in message
    with pytest.raises(AsyncDumpError):
        sink.close(timeout=60)  # the failures since the last flush, then closed
    assert sink.stats.failed == 3 and s3.keys(bucket) == []
    with pytest.raises(RuntimeError, match="closed"):
        sink.submit(images(1))


def test_memory_stays_bounded_while_the_server_stalls(s3: S3Server, proxy: FaultProxy) -> None:
    bucket = s3.bucket()
    image_bytes = int(np.prod(IMAGE))
    sink = sink_via(proxy, bucket, workers=1, max_buffer_bytes=4 * image_bytes, on_full="raise")
    proxy.plan = lambda n, method, path: "stall" if n >= 1 else "pass"
    sent = images(50, seed=3)
    accepted = []
    for i in range(50):  # bounded: the buffer holds 4 images, so this stops early
        try:
            accepted.append(sink.submit(sent[i:i + 1]))
        except BufferFullError:
            break
    assert 1 <= len(accepted) <= 4
    assert sink.stats.peak_buffered_bytes <= 4 * image_bytes
    proxy.release()
    sink.close(timeout=120)
    urls = [url for future in accepted for url in future.result()]
    assert outcome(s3, bucket, sent[:len(accepted)], urls) == (len(accepted), 0, 0)


class _Client(Exception):
    def __init__(self, code: str, status: int):
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize(("exc", "transient"), [
    (_Client("SlowDown", 503), True), (_Client("InternalError", 500), True),
    (_Client("RequestTimeout", 400), True), (ConnectionResetError(), True), (TimeoutError(), True),
    (_Client("AccessDenied", 403), False), (_Client("NoSuchBucket", 404), False),
    (_Client("PreconditionFailed", 412), False), (FileNotFoundError(), False), (ValueError(), False),
])
def test_transient_and_permanent_errors(exc: Exception, transient: bool) -> None:
    wrapped = OSError("translated")
    wrapped.__cause__ = exc  # as the fsspec plugins raise them
    assert is_transient(wrapped) is transient


def test_permanent_errors_are_not_retried_and_transient_ones_are() -> None:
    calls, sleeps = [], []

    def permanent() -> None:
        calls.append(1)
        raise _Client("AccessDenied", 403)

    with pytest.raises(StoreError, match=r"s3://b/k: AccessDenied \(HTTP 403\)"):
        with_retries("s3://b/k", permanent, 60, sleep=sleeps.append)
    assert calls == [1] and sleeps == []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 5:
            raise _Client("SlowDown", 503)
        return "ok"

    assert with_retries("s3://b/k", flaky, 60, sleep=sleeps.append) == "ok"
    assert len(sleeps) == 3 and all(0 <= s <= 5 for s in sleeps)


def test_worker_killed_mid_upload_loses_and_duplicates_nothing(s3: S3Server, proxy: FaultProxy) -> None:
    """The killed worker's PUT still lands (the proxy holds it), and so does its replacement's:
    one gets 412, finds its own bytes at the key, and counts the image written once."""
    import os
    import signal
    import time

    bucket = s3.bucket()
    proxy.plan = lambda n, method, path: "stall" if n >= 1 else "pass"
    sent = images(3, seed=4)
    with sink_via(proxy, bucket, workers=1) as sink:
        future = sink.submit(sent)
        for _ in range(600):  # bounded: up to 60 s for the first PUT to reach the proxy
            if proxy.counts["stall"]:
                break
            time.sleep(0.1)
        assert proxy.counts["stall"] == 1
        os.kill(sink.worker_pids[0], signal.SIGKILL)
        for _ in range(600):  # the replacement's PUT of the same image reaches the proxy too
            if proxy.counts["stall"] >= 2:
                break
            time.sleep(0.1)
        proxy.release()
        urls = future.result(120)
    assert sink.stats.worker_restarts == 1 and sink.stats.written == 3
    assert outcome(s3, bucket, sent, urls) == (3, 0, 0)
