"""Object-store roots against a real S3 server (moto's, on loopback; tests/s3_server.py).

A ``scheme://`` root must reach its store or fail clearly, never become a local folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

from s3_server import S3Server, s3_fixture  # noqa: F401 (the s3 fixture)

import asyncdump
from asyncdump import AsyncDumpError, AsyncImageSink, DatasetSink
from asyncdump._stores import StoreError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, so a URL taken for a path would show up as ``s3:``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def decoded_rgb(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def test_sink_round_trip_is_pixel_exact(s3: S3Server, in_tmp: Path) -> None:
    bucket = s3.bucket()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 3, 24, 32), dtype=np.uint8)
    floats = torch.rand(3, 3, 24, 32)
    with AsyncImageSink(f"s3://{bucket}/run/", workers=2) as sink:
        first = sink.submit(images)
        second = sink.submit(floats)
        urls = first.result(60) + second.result(60)
    assert urls == [f"s3://{bucket}/run/{i:08d}.png" for i in range(9)]
    assert s3.keys(bucket) == [f"run/{i:08d}.png" for i in range(9)]
    for i in range(6):
        np.testing.assert_array_equal(decoded_rgb(s3.get(bucket, f"run/{i:08d}.png")),
                                      images[i].transpose(1, 2, 0))
    expected = (floats.clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(3):
        np.testing.assert_array_equal(decoded_rgb(s3.get(bucket, f"run/{6 + i:08d}.png")), expected[i])
    assert sink.stats.written == 9
    assert sink.stats.bytes_written == sum(
        s3.client.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in s3.keys(bucket))
    assert os.listdir(in_tmp) == []  # nothing local, no "s3:" folder


def test_storage_options_reach_the_client(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only storage_options know the server now
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    with AsyncImageSink(f"s3://{bucket}/x", workers=1, storage_options=options,
                        name="img_{index}", format="jpg") as sink:
        assert sink.submit(np.zeros((2, 1, 16, 16), np.uint8)).result(60) == [
            f"s3://{bucket}/x/img_0.jpg", f"s3://{bucket}/x/img_1.jpg"]
    assert s3.keys(bucket) == ["x/img_0.jpg", "x/img_1.jpg"]


def test_save_image_to_a_url_writes_what_a_folder_gets(s3: S3Server, in_tmp: Path) -> None:
    bucket = s3.bucket()
    grid = torch.rand(5, 3, 12, 10)
    future = asyncdump.save_image(grid, f"s3://{bucket}/samples/step3.png", nrow=3)
    local = asyncdump.save_image(grid, in_tmp / "step3.png", nrow=3)
    asyncdump.flush(60)
    assert future.result() == [f"s3://{bucket}/samples/step3.png"]
    assert s3.get(bucket, "samples/step3.png") == local.result()[0].read_bytes()
    assert sorted(os.listdir(in_tmp)) == ["step3.png"]


def test_overwrite_false_refuses_an_existing_key(s3: S3Server) -> None:
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="p/00000001.png", Body=b"precious")
    with AsyncImageSink(f"s3://{bucket}/p", workers=1, on_error="ignore") as sink:
        future = sink.submit(np.full((3, 1, 8, 8), 7, np.uint8))
        with pytest.raises(AsyncDumpError) as caught:
            future.result(60)
    message = str(caught.value)
    assert f"s3://{bucket}/p/00000001.png" in message and "PreconditionFailed" in message
    assert s3.get(bucket, "p/00000001.png") == b"precious"
    assert s3.keys(bucket) == ["p/00000000.png", "p/00000001.png", "p/00000002.png"]
    assert sink.stats.written == 2 and sink.stats.failed == 1
    # The same bytes at the key (a lost answer's retry, a replacement worker): written.
    with AsyncImageSink(f"s3://{bucket}/p", workers=1) as sink:
        sink.submit(np.full((1, 8, 8), 7, np.uint8), names=["00000000"]).result(60)
    with AsyncImageSink(f"s3://{bucket}/p", workers=1, overwrite=True) as sink:
        sink.submit(np.full((1, 8, 8), 7, np.uint8), names=["00000001"]).result(60)
    assert s3.get(bucket, "p/00000001.png") != b"precious"


def test_missing_bucket_fails_at_construction(s3: S3Server, in_tmp: Path) -> None:
    with pytest.raises(StoreError) as caught:
        AsyncImageSink("s3://no-such-bucket-here/x", workers=1)
    assert caught.value.code == "NoSuchBucket" and "s3://no-such-bucket-here/x" in str(caught.value)
    with pytest.raises(OSError, match="NoSuchBucket"):
        asyncdump.save_image(torch.rand(3, 4, 4), "s3://no-such-bucket-here/a.png")
    assert os.listdir(in_tmp) == []


def test_bad_credentials_fail_at_construction(s3: S3Server, in_tmp: Path) -> None:
    bucket = s3.bucket()
    with s3.authentication(), pytest.raises(StoreError) as caught:
        AsyncImageSink(f"s3://{bucket}/x", workers=1)
    assert caught.value.code == "InvalidAccessKeyId" and caught.value.status == 403
    assert f"s3://{bucket}/x" in str(caught.value)
    assert os.listdir(in_tmp) == []


def test_missing_plugin_names_the_pip_command(in_tmp: Path) -> None:
    pytest.importorskip("fsspec")
    if "gs" in __import__("fsspec").registry or _importable("gcsfs"):
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ImportError, match="pip install 'gcsfs'"):
        AsyncImageSink("gs://bucket/x", workers=1)
    with pytest.raises(ImportError, match=r"no fsspec implementation .* nosuchscheme://"):
        AsyncImageSink("nosuchscheme://bucket/x", workers=1)
    assert os.listdir(in_tmp) == []


def test_s3_without_s3fs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    def missing(protocol: str) -> None:
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(ImportError, match=r"pip install 'asyncdump\[s3\]'"):
        AsyncImageSink("s3://bucket/x", workers=1)


def test_tar_datasets_refuse_a_store_without_multipart_uploads(in_tmp: Path) -> None:
    # Files and tar mode on S3 are tests/test_dataset_store*.py's; tar mode needs S3's
    # multipart uploads, so another fsspec store (here fsspec's in-memory one) is refused.
    import fsspec

    with pytest.raises(ValueError, match="tar mode on an object store needs S3's multipart"):
        DatasetSink("memory://refused/ds", count=4, mode="tar")
    from asyncdump.cli import main

    assert main(["generate", "--out", "memory://refused/ds", "--count", "4", "--mode", "tar"]) != 0
    assert os.listdir(in_tmp) == [] and not fsspec.filesystem("memory").exists("/refused")


def test_storage_options_need_a_url(in_tmp: Path) -> None:
    with pytest.raises(ValueError, match="storage_options"):
        AsyncImageSink(in_tmp / "out", storage_options={"anon": True})


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
