"""Datasets on an object store (files mode, one rank; tar mode: test_dataset_store_tar.py)
against moto's S3 server on loopback: the same objects and bytes as a folder run, manifest
parts, resume, kill -9, refusals (several ranks: tests/test_dataset_store_ranks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

from helpers import kill_generate_when
from s3_server import S3Server, s3_fixture  # noqa: F401 (the s3 fixture)

from asyncdump import DatasetError, DatasetSink, write_dataset
from asyncdump.cli import main

pytestmark = pytest.mark.timeout(180)

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                  "MASTER_PORT")
OPTIONS: dict[str, Any] = {"count": 23, "shard_size": 10, "workers": 1, "job": {"seed": 3}}


def make(indices: list[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Images and metadata that depend only on the index (resume-safe)."""
    images = np.stack([np.random.default_rng(i).integers(0, 256, (3, 12, 10), dtype=np.uint8)
                       for i in indices])
    return images, [{"label": i % 4, "i": i} for i in indices]


def objects(s3: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix/`` by key relative to it."""
    return {key[len(prefix) + 1:]: s3.get(bucket, key) for key in s3.keys(bucket, prefix + "/")}


def env() -> dict[str, str]:
    """The environment for a ``generate`` subprocess: the fixture's S3 settings, no ranks."""
    return {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, so a URL taken for a path would show up as ``s3:``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_store_run_equals_a_folder_run(s3: S3Server, in_tmp: Path) -> None:
    bucket = s3.bucket()
    on_store = write_dataset(make, f"s3://{bucket}/ds/", batch_size=4, **OPTIONS)
    on_disk = write_dataset(make, in_tmp / "local", batch_size=4, **OPTIONS)
    assert on_store.complete and on_store.images == 23 and on_store.failed == 0
    assert on_store.root == f"s3://{bucket}/ds" and on_store.bytes == on_disk.bytes
    stored = objects(s3, bucket, "ds")
    assert stored == tree(in_tmp / "local")  # same keys (no parts left), same bytes
    assert sorted(stored)[-2:] == ["dataset.json", "manifest.jsonl"]
    assert sorted(os.listdir(in_tmp)) == ["local"]  # nothing local for the store run


def test_manifest_parts_hold_each_committed_batch_until_close(s3: S3Server) -> None:
    bucket = s3.bucket()
    with DatasetSink(f"s3://{bucket}/p", **OPTIONS) as sink:
        for n, indices in enumerate(sink.pending(5)):
            sink.submit(indices, *make(indices))
            if n == 1:
                break
        sink._sink.flush()
        for _ in range(400):  # the committer PUTs each part after its images' acknowledgement
            if len(s3.keys(bucket, "p/manifest.parts/")) == 2:
                break
            time.sleep(0.05)
        parts = s3.keys(bucket, "p/manifest.parts/")
        assert parts == [f"p/manifest.parts/rank-00000/{n:012d}.jsonl" for n in (0, 1)]
        lines = [json.loads(line) for key in parts for line in s3.get(bucket, key).splitlines()]
        assert [e["index"] for e in lines] == list(range(10))
        listed = set(s3.keys(bucket, "p/0"))
        assert all(f"p/{e['path']}" in listed for e in lines)  # only acknowledged objects
        assert "p/dataset.json" in s3.keys(bucket, "p/") and "p/manifest.jsonl" not in listed
        for indices in sink.pending(5):
            sink.submit(indices, *make(indices))
    assert s3.keys(bucket, "p/manifest.parts/") == []
    manifest = s3.get(bucket, "p/manifest.jsonl").decode().splitlines()
    assert [json.loads(line)["index"] for line in manifest] == list(range(23))


def test_resume_reads_the_parts_a_crash_left(s3: S3Server, in_tmp: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    from asyncdump._store_dataset import StoreDataset

    real_merge = StoreDataset.merge

    def crash(self: StoreDataset) -> int:
        raise OSError("killed before close")  # as kill -9: no manifest.jsonl, parts stay

    monkeypatch.setattr(StoreDataset, "merge", crash)
    with pytest.raises(RuntimeError), DatasetSink(f"s3://{bucket}/r", **OPTIONS) as sink:
        for n, indices in enumerate(sink.pending(3)):
            sink.submit(indices, *make(indices))
            if n == 3:
                raise RuntimeError("the loop failed")  # the parts are still PUT (not Ctrl-C)
    monkeypatch.setattr(StoreDataset, "merge", real_merge)
    left = s3.keys(bucket, "r/")
    assert "r/manifest.jsonl" not in left and any("manifest.parts/" in k for k in left)
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetSink(f"s3://{bucket}/r", **OPTIONS)
    assert s3.keys(bucket, "r/") == left  # a refusal changes nothing

    calls: list[list[int]] = []

    def recording(indices: list[int]) -> Any:
        calls.append(indices)
        return make(indices)

    resumed = write_dataset(recording, f"s3://{bucket}/r", batch_size=3, resume=True, **OPTIONS)
    assert resumed.skipped == 10 and resumed.images == 13 and resumed.complete
    assert min(i for batch in calls for i in batch) == 10  # durable indices are not made again
    write_dataset(make, in_tmp / "clean", batch_size=3, **OPTIONS)
    assert objects(s3, bucket, "r") == tree(in_tmp / "clean")


def test_resume_writes_a_missing_object_again(s3: S3Server, in_tmp: Path) -> None:
    bucket = s3.bucket()
    write_dataset(make, f"s3://{bucket}/m", batch_size=4, **OPTIONS)
    before = objects(s3, bucket, "m")
    s3.client.delete_object(Bucket=bucket, Key="m/000001/000000014.png")
    again = write_dataset(make, f"s3://{bucket}/m", batch_size=4, resume=True, **OPTIONS)
    assert (again.images, again.skipped, again.complete) == (1, 22, True)
    assert objects(s3, bucket, "m") == before


def test_a_new_dataset_needs_a_missing_or_empty_prefix(s3: S3Server) -> None:
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="mine/notes.txt", Body=b"keep")
    with pytest.raises(DatasetError, match=r"is not empty \(it holds 'notes.txt'\)"):
        DatasetSink(f"s3://{bucket}/mine", **OPTIONS)
    s3.client.put_object(Bucket=bucket, Key="mine/manifest.jsonl", Body=b"")
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetSink(f"s3://{bucket}/mine", **OPTIONS)
    with pytest.raises(DatasetError, match=r"has a manifest but no dataset\.json"):
        DatasetSink(f"s3://{bucket}/mine", resume=True, **OPTIONS)
    assert s3.keys(bucket) == ["mine/manifest.jsonl", "mine/notes.txt"]
    # a sibling prefix that starts with the same letters is another prefix
    s3.client.put_object(Bucket=bucket, Key="mine-too/x", Body=b"x")
    write_dataset(make, f"s3://{bucket}/min", batch_size=8, **OPTIONS)
    assert s3.get(bucket, "mine/notes.txt") == b"keep"


def test_resume_refuses_another_job(s3: S3Server) -> None:
    bucket = s3.bucket()
    write_dataset(make, f"s3://{bucket}/j", batch_size=8, **OPTIONS)
    before = s3.keys(bucket)
    with pytest.raises(DatasetError, match="holds a different job"):
        DatasetSink(f"s3://{bucket}/j", resume=True, **dict(OPTIONS, job={"seed": 4}))
    assert s3.keys(bucket) == before


def test_storage_options_reach_the_dataset(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only storage_options know the server now
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    summary = write_dataset(make, f"s3://{bucket}/o", batch_size=8, storage_options=options,
                            **OPTIONS)
    assert summary.complete and len(s3.keys(bucket, "o/")) == 25
    assert main(["generate", "--out", f"s3://{bucket}/cli", "--count", "3", "--size", "8",
                 "--device", "cpu", "--workers", "1", "--no-progress",
                 "--storage-option", f"endpoint_url={s3.endpoint}",
                 "--storage-option", "key=testing", "--storage-option", "secret=testing"]) == 0
    assert len(s3.keys(bucket, "cli/")) == 5


def test_storage_options_retry_seconds_and_their_values_are_checked(s3: S3Server, in_tmp: Path) -> None:
    bucket = s3.bucket()
    with pytest.raises(ValueError, match="storage_options is only for object-store roots"):
        DatasetSink(in_tmp / "local", count=4, storage_options={"anon": True})
    assert main(["generate", "--out", "local", "--count", "4", "--storage-option", "a=b"]) == 2
    assert main(["generate", "--out", f"s3://{bucket}/t", "--count", "4",
                 "--storage-option", "novalue"]) == 2
    with pytest.raises(ValueError, match="retry_seconds is only for object-store roots"):
        DatasetSink(in_tmp / "local", count=4, retry_seconds=5)
    for bad in (-1, "5", True, float("nan")):
        with pytest.raises(ValueError, match="retry_seconds must be a number >= 0"):
            DatasetSink(f"s3://{bucket}/t", count=4, retry_seconds=bad)
    assert main(["generate", "--out", "local", "--count", "4", "--retry-seconds", "5"]) == 2

    assert s3.keys(bucket) == [] and os.listdir(in_tmp) == []


def test_a_generator_failing_at_once_leaves_the_prefix_as_it_was(s3: S3Server, in_tmp: Path) -> None:
    bucket = s3.bucket()
    (in_tmp / "broken_gen.py").write_text("def make(indices):\n    raise RuntimeError('no')\n")
    result = subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--no-progress",
                             "--out", f"s3://{bucket}/g", "--count", "4", "--workers", "1",
                             "--generator", "broken_gen:make"], capture_output=True, text=True,
                            timeout=120, env=env(), cwd=in_tmp)
    assert result.returncode != 0 and "no" in result.stderr
    assert s3.keys(bucket) == []


def _kill_after_first_part(args: list[str], s3: S3Server, bucket: str, prefix: str) -> None:
    """Start ``generate``, SIGKILL it once its first manifest part object exists."""
    kill_generate_when(args, env(), lambda: bool(s3.keys(bucket, f"{prefix}/manifest.parts/")),
                       seconds=150)


@pytest.mark.timeout(400)  # three generate runs; a shared 2-core machine may be slow
def test_kill_9_then_resume_equals_a_clean_run_on_a_store(s3: S3Server) -> None:
    bucket = s3.bucket()
    common = ["--count", "300", "--size", "16", "--shard-size", "40", "--seed", "5",
              "--workers", "1", "--device", "cpu"]
    _kill_after_first_part(["--out", f"s3://{bucket}/killed", "--batch-size", "4", *common],
                           s3, bucket, "killed")
    left = s3.keys(bucket, "killed/")
    images_left = [k for k in left if k.endswith(".png")]
    assert "killed/manifest.jsonl" not in left and 0 < len(images_left) < 300
    parts = [k for k in left if "/manifest.parts/" in k]
    durable = [json.loads(line) for key in parts for line in s3.get(bucket, key).splitlines()]
    assert all(f"killed/{e['path']}" in left for e in durable)  # lines only for stored objects

    resumed = subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--no-progress",
                              "--out", f"s3://{bucket}/killed", *common, "--resume"],
                             capture_output=True, text=True, timeout=150, env=env())
    assert resumed.returncode == 0, resumed.stderr
    written = int(resumed.stdout.split(":")[1].split()[0])
    skipped = int(resumed.stdout.split("(")[1].split()[0])
    assert skipped >= len(durable) > 0 and written + skipped == 300
    clean = subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--no-progress",
                            "--out", f"s3://{bucket}/clean", *common],
                           capture_output=True, text=True, timeout=150, env=env())
    assert clean.returncode == 0, clean.stderr
    killed_objects, clean_objects = objects(s3, bucket, "killed"), objects(s3, bucket, "clean")
    assert killed_objects == clean_objects  # same listing, same bytes, no parts left
    assert len(killed_objects) == 302
    manifest = [json.loads(line) for line in killed_objects["manifest.jsonl"].splitlines()]
    assert [e["index"] for e in manifest] == list(range(300))
    # images the killed run PUT but had not committed were PUT again, with the same bytes
    print(f"killed run: {len(images_left)} images stored, {len(durable)} in its manifest "
          f"parts; resume wrote {written}, skipped {skipped}; rewritten (same bytes): "
          f"{len(images_left) - skipped}; lost 0")


def test_the_prefix_is_checked_once_at_construction(s3: S3Server) -> None:
    """The DatasetSink's check of the bucket and credentials is not repeated by its sink."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(s3.endpoint)
    requests: list[str] = []
    proxy.plan = lambda n, method, path: requests.append(f"{method} {path}") or "pass"
    try:
        DatasetSink(f"s3://{s3.bucket()}/once", count=4, workers=1,
                    storage_options={"endpoint_url": proxy.endpoint}).close()
    finally:
        proxy.close()
    checks = [r for r in requests if "prefix=once&max-keys=1" in r]  # FsspecStore.check
    assert len(checks) == 1, requests
