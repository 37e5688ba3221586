"""Datasets on an object store in tar mode, against moto's S3 server on loopback (and through
the fault proxy of tests/fault_proxy.py): the same objects and bytes as a folder run, parts of
more than 8 MiB sent as multipart uploads, faults mid-multipart (resets, 503s, the uploader
killed), memory bounded while the store stalls, ``kill -9`` then ``--resume``, and unfinished
uploads aborted. Faults are planned by request, not by time; each test counts images written,
lost and duplicated against the folder run (several ranks: test_dataset_store_ranks.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

from fault_proxy import FaultProxy
from s3_server import S3Server, s3_fixture  # noqa: F401 (the s3 fixture)
from test_dataset_store import _kill_after_first_part, env, objects, tree

from asyncdump import DatasetSink, write_dataset
from asyncdump._committer import QUEUED_BATCHES, TARS_WAITING

pytestmark = pytest.mark.timeout(240)

# Noise does not compress: 60 images of 3x256x256 make a shard of about 11.8 MB, sent as a
# multipart upload of two parts (8 MiB and the rest); the last shard (10 images) is one PUT.
BIG: dict[str, Any] = {"count": 130, "shard_size": 60, "workers": 2, "mode": "tar",
                       "job": {"noise": 1}}


def noise(indices: list[int], side: int = 256) -> tuple[np.ndarray, list[dict[str, Any]]]:
    images = np.stack([np.random.default_rng(i).integers(0, 256, (3, side, side), dtype=np.uint8)
                       for i in indices])
    return images, [{"label": i % 3} for i in indices]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The folder run every store run must equal, key for key and byte for byte."""
    root = tmp_path_factory.mktemp("folder") / "ds"
    summary = write_dataset(noise, root, batch_size=10, **BIG)
    assert summary.complete and summary.failed == 0
    return tree(root)


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    p = FaultProxy(s3.endpoint)
    yield p
    p.close()


def unfinished_uploads(s3: S3Server, bucket: str) -> list[dict[str, Any]]:
    return list(s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def outcome(stored: dict[str, bytes], expected: dict[str, bytes]) -> tuple[int, int, int]:
    """(images written, lost, duplicated or stray objects) by the manifest and the tars."""
    manifest = [json.loads(line) for line in stored.get("manifest.jsonl", b"").splitlines()]
    written = sum(1 for e in manifest
                  if e["path"].split("/", 1)[0] in stored
                  and stored[e["path"].split("/", 1)[0]] == expected[e["path"].split("/", 1)[0]])
    lost = len([line for line in expected["manifest.jsonl"].splitlines()]) - written
    return written, lost, len(set(stored) - set(expected)) + len(manifest) - len(
        {e["index"] for e in manifest})


def uploader_pids() -> list[int]:
    """This process's uploader children that are still running (a zombie has exited)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "asyncdump._uploader" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:  # gone, or a zombie not yet reaped
            pass
    return found


def test_a_tar_store_run_equals_a_folder_run(s3: S3Server, folder_run: dict[str, bytes]) -> None:
    bucket = s3.bucket()
    summary = write_dataset(noise, f"s3://{bucket}/ds", batch_size=10, **BIG)
    assert summary.complete and summary.images == 130 and summary.failed == 0
    stored = objects(s3, bucket, "ds")
    assert stored == folder_run  # dataset.json, manifest.jsonl, three tars; no parts left
    head = s3.client.head_object(Bucket=bucket, Key="ds/shard-000000.tar")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload of two parts
    assert s3.client.head_object(Bucket=bucket, Key="ds/shard-000002.tar")["ETag"].count("-") == 0
    assert unfinished_uploads(s3, bucket) == [] and uploader_pids() == []


def test_resets_mid_multipart_and_503s_lose_nothing(s3: S3Server, proxy: FaultProxy,
                                                    folder_run: dict[str, bytes]) -> None:
    """Every third multipart request (UploadPart, Complete) is reset mid-body, and one in five
    of all the others is answered 503 SlowDown: every part is retried to completion, and no
    key ever holds a partial object."""
    bucket = s3.bucket()
    seen: list[str] = []

    def plan(n: int, method: str, path: str) -> str:
        if "uploadId=" in path:
            seen.append(path)
            return "reset" if len(seen) % 3 == 1 else "pass"
        return "slowdown" if n % 5 == 2 else "pass"

    proxy.plan = plan
    summary = write_dataset(noise, f"s3://{bucket}/ds", batch_size=10,
                            storage_options={"endpoint_url": proxy.endpoint}, **BIG)
    assert summary.complete and summary.failed == 0
    assert proxy.counts["reset"] >= 2 and proxy.counts["slowdown"] >= 2
    stored = objects(s3, bucket, "ds")
    assert outcome(stored, folder_run) == (130, 0, 0) and stored == folder_run
    assert unfinished_uploads(s3, bucket) == []


def test_an_uploader_killed_mid_upload_is_replaced(s3: S3Server, proxy: FaultProxy,
                                                   folder_run: dict[str, bytes]) -> None:
    """The first UploadPart is held by the proxy; the uploader is killed with SIGKILL while
    it waits. A new uploader sends the part again; the dead one's upload is aborted at close."""
    bucket = s3.bucket()
    stalled = threading.Event()

    def plan(n: int, method: str, path: str) -> str:
        if "partNumber=" in path and not stalled.is_set():
            stalled.set()
            return "stall"
        return "pass"

    proxy.plan = plan
    result: dict[str, Any] = {}
    run = threading.Thread(target=lambda: result.update(summary=write_dataset(
        noise, f"s3://{bucket}/ds", batch_size=10, storage_options={"endpoint_url": proxy.endpoint},
        **BIG)))
    run.start()
    try:
        assert stalled.wait(120), "no part upload reached the proxy"
        first = uploader_pids()
        assert len(first) == 1
        psutil.Process(first[0]).kill()
    finally:
        proxy.release()
        run.join(180)
    assert not run.is_alive()
    summary = result["summary"]
    assert summary.complete and summary.failed == 0
    stored = objects(s3, bucket, "ds")
    assert outcome(stored, folder_run) == (130, 0, 0) and stored == folder_run
    assert unfinished_uploads(s3, bucket) == []  # the killed uploader's, aborted at close


def test_memory_stays_bounded_while_the_store_stalls(s3: S3Server, proxy: FaultProxy) -> None:
    """Every tar PUT is held: the committer keeps at most TARS_WAITING + 1 parts, then its
    queue fills and ``submit`` blocks, so the generator is not called again. Released, the run
    completes with every image."""
    bucket = s3.bucket()
    proxy.plan = lambda n, method, path: "stall" if ".tar" in path else "pass"
    calls: list[int] = []
    batch, shard = 5, 10

    def tiny(indices: list[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        calls.append(len(indices))
        return noise(indices, side=16)

    result: dict[str, Any] = {}
    run = threading.Thread(target=lambda: result.update(summary=write_dataset(
        tiny, f"s3://{bucket}/ds", count=1000, shard_size=shard, batch_size=batch, workers=1,
        mode="tar", storage_options={"endpoint_url": proxy.endpoint})))
    run.start()
    try:
        # Parts handed over (or being written) + the committer's queue + one batch in submit
        # + one being made: the most batches the generator can have made while nothing lands.
        bound = (TARS_WAITING + 2) * (shard // batch) + QUEUED_BATCHES + 2
        previous = -1
        for _ in range(600):  # bounded: up to 60 s for the run to stop taking batches
            if len(calls) == previous and proxy.counts["stall"]:
                break
            previous = len(calls)
            run.join(0.1 if len(calls) < bound else 1.0)
        assert proxy.counts["stall"] >= 1 and len(calls) <= bound < 1000 // batch
        assert s3.keys(bucket, "ds/shard") == []
    finally:
        proxy.release()
        run.join(180)
    assert not run.is_alive()
    summary = result["summary"]
    assert summary.complete and summary.images == 1000 and summary.failed == 0
    assert len(calls) == 1000 // batch  # each batch made once


@pytest.mark.timeout(400)  # three generate runs; a shared 2-core machine may be slow
def test_kill_9_then_resume_equals_a_clean_run_and_aborts_unfinished_uploads(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "tmp"  # the run's temp folder: its spool files have no name
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))
    bucket = s3.bucket()
    common = ["--count", "240", "--size", "32", "--shard-size", "24", "--seed", "5",
              "--workers", "1", "--device", "cpu", "--mode", "tar"]
    _kill_after_first_part(["--out", f"s3://{bucket}/killed", "--batch-size", "4", *common],
                           s3, bucket, "killed")
    assert list(spool.iterdir()) == []  # killed mid-run, nothing left on the local disk
    left = s3.keys(bucket, "killed/")
    parts = [k for k in left if "/manifest.parts/" in k]
    durable = [json.loads(line) for key in parts for line in s3.get(bucket, key).splitlines()]
    assert "killed/manifest.jsonl" not in left and 0 < len(durable) < 240
    assert all(f"killed/{e['path'].split('/')[0]}" in left for e in durable)  # tars exist
    # An upload a killed uploader left (never visible, but billed): resume aborts it.
    upload = s3.client.create_multipart_upload(Bucket=bucket, Key="killed/shard-000009.tar")
    s3.client.upload_part(Bucket=bucket, Key="killed/shard-000009.tar", PartNumber=1,
                          UploadId=upload["UploadId"], Body=b"partial")
    resumed = subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--no-progress",
                              "--out", f"s3://{bucket}/killed", *common, "--resume"],
                             capture_output=True, text=True, timeout=150, env=env())
    assert resumed.returncode == 0, resumed.stderr
    assert unfinished_uploads(s3, bucket) == []
    clean = subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--no-progress",
                            "--out", f"s3://{bucket}/clean", *common],
                           capture_output=True, text=True, timeout=150, env=env())
    assert clean.returncode == 0, clean.stderr
    killed, expected = objects(s3, bucket, "killed"), objects(s3, bucket, "clean")
    assert killed == expected and len(killed) == 2 + 10  # dataset.json, manifest, 10 shards
    assert outcome(killed, expected) == (240, 0, 0)


def test_a_refused_final_manifest_is_one_line_and_resume_writes_it(
        s3: S3Server, proxy: FaultProxy, capsys: pytest.CaptureFixture[str]) -> None:
    """The store refuses the PUT of manifest.jsonl at close (403): ``generate`` says so in one
    line and exits 1; the parts stay, and ``--resume`` writes the manifest without re-making
    any image."""
    from asyncdump.cli import main

    bucket = s3.bucket()
    proxy.plan = lambda n, method, path: \
        "deny" if method == "PUT" and path.split("?")[0].endswith("/manifest.jsonl") else "pass"
    common = ["--out", f"s3://{bucket}/ds", "--count", "40", "--size", "16", "--shard-size", "10",
              "--workers", "1", "--device", "cpu", "--mode", "tar", "--no-progress"]
    assert main(["generate", *common, "--storage-option", f"endpoint_url={proxy.endpoint}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the manifest" in err
    assert "AccessDenied" in err and "--resume" in err and proxy.counts["deny"] == 1
    left = s3.keys(bucket, "ds/")
    assert "ds/manifest.jsonl" not in left and len([k for k in left if "manifest.parts" in k]) == 4
    assert main(["generate", *common, "--resume"]) == 0
    assert "0 images written (40 already there)" in capsys.readouterr().out
    stored = objects(s3, bucket, "ds")
    assert sorted(stored) == ["dataset.json", "manifest.jsonl", *[f"shard-00000{i}.tar" for i in range(4)]]
    assert len(stored["manifest.jsonl"].splitlines()) == 40


def test_an_outage_shorter_than_the_deadline_loses_nothing(s3: S3Server, proxy: FaultProxy,
                                                           folder_run: dict[str, bytes]) -> None:
    """Thirty requests in a row, from the first UploadPart on, are refused (connections closed
    at once): every request is retried until the store answers again."""
    bucket = s3.bucket()
    outage: list[int] = []

    def plan(n: int, method: str, path: str) -> str:
        if "partNumber=" in path or outage:
            outage.append(n)
            return "refuse" if len(outage) <= 30 else "pass"
        return "pass"

    proxy.plan = plan
    summary = write_dataset(noise, f"s3://{bucket}/ds", batch_size=10,
                            storage_options={"endpoint_url": proxy.endpoint}, **BIG)
    assert summary.complete and summary.failed == 0 and proxy.counts["refuse"] == 30
    stored = objects(s3, bucket, "ds")
    assert outcome(stored, folder_run) == (130, 0, 0) and stored == folder_run


def test_ctrl_c_while_an_upload_hangs_stops_at_once(s3: S3Server, proxy: FaultProxy) -> None:
    """Every tar PUT is held by the proxy; SIGINT makes ``generate`` exit (130) while the
    upload is still held: it does not wait for the store. Nothing is left running, and a
    resume completes the dataset."""
    import signal

    bucket = s3.bucket()
    proxy.plan = lambda n, method, path: "stall" if ".tar" in path else "pass"
    proxy.stall_seconds = 150  # longer than this test waits for the exit
    # Many more images than the committer's queue holds: the loop is blocked in submit, not
    # yet closing, when SIGINT comes.
    common = ["--out", f"s3://{bucket}/ds", "--count", "2000", "--size", "16", "--shard-size",
              "10", "--batch-size", "4", "--workers", "1", "--device", "cpu", "--mode", "tar",
              "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "asyncdump", "generate", *common,
                                "--storage-option", f"endpoint_url={proxy.endpoint}"],
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    job = psutil.Process(process.pid)
    try:
        for _ in range(1200):  # bounded: up to 120 s for the first held upload
            if proxy.holding or process.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert proxy.holding and process.poll() is None
        children = job.children(recursive=True)
        assert any("asyncdump._uploader" in " ".join(c.cmdline()) for c in children)
        process.send_signal(signal.SIGINT)
        for _ in range(1000):  # bounded: 100 s, while the proxy holds the upload for 150 s
            if process.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert process.poll() == 130 and proxy.holding, "generate waited for the held upload"
        assert "interrupted" in process.communicate(timeout=30)[1].decode()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []  # workers and uploader ended with it
    finally:
        proxy.release()
        if process.poll() is None:
            process.kill()
        process.wait(30)
    done = subprocess.run([sys.executable, "-m", "asyncdump", "generate", *common, "--resume"],
                          capture_output=True, text=True, timeout=150, env=env())
    assert done.returncode == 0, done.stderr
    assert len(objects(s3, bucket, "ds")) == 2 + 200
    assert unfinished_uploads(s3, bucket) == []


def test_an_outage_longer_than_the_deadline_stops_the_run_with_one_line(
        s3: S3Server, proxy: FaultProxy) -> None:
    """From the first UploadPart on, every connection is refused; with ``--retry-seconds 1``
    ``generate`` stops at once with one line naming the tar part, and exits 1 (no hang). When
    the store is back, ``--resume`` completes the dataset and aborts the failed upload."""
    bucket = s3.bucket()
    down = threading.Event()

    def plan(n: int, method: str, path: str) -> str:
        if "partNumber=" in path:
            down.set()
        return "refuse" if down.is_set() else "pass"

    proxy.plan = plan
    # 256² shapes, about 44 KB each: a shard of 200 is sent as a multipart upload
    common = ["--out", f"s3://{bucket}/ds", "--count", "400", "--size", "256", "--shard-size",
              "200", "--workers", "1", "--device", "cpu", "--mode", "tar", "--no-progress",
              "--storage-option", f"endpoint_url={proxy.endpoint}"]
    failed = subprocess.run([sys.executable, "-m", "asyncdump", "generate", *common,
                             "--retry-seconds", "1"],
                            capture_output=True, text=True, timeout=150, env=env())
    assert failed.returncode == 1 and down.is_set()
    error = failed.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert f"cannot upload the tar part s3://{bucket}/ds/shard-00000" in error
    assert "still failing after" in error and "--resume" in error
    assert uploader_pids() == []
    down.clear()
    proxy.plan = lambda n, method, path: "pass"
    done = subprocess.run([sys.executable, "-m", "asyncdump", "generate", *common, "--resume"],
                          capture_output=True, text=True, timeout=150, env=env())
    assert done.returncode == 0, done.stderr
    assert "400 images written (0 already there)" in done.stdout
    assert sorted(objects(s3, bucket, "ds")) == ["dataset.json", "manifest.jsonl",
                                                 "shard-000000.tar", "shard-000001.tar"]
    assert unfinished_uploads(s3, bucket) == []


def test_ctrl_c_while_close_waits_for_a_held_upload_stops_the_uploader(
        s3: S3Server, proxy: FaultProxy) -> None:
    """Every image is submitted; ``close`` waits for a tar upload the proxy holds. Ctrl-C
    (SIGINT to this process) interrupts it, and the uploader is stopped at once instead of
    waiting for the store."""
    import os
    import signal

    bucket = s3.bucket()
    proxy.plan = lambda n, method, path: "stall" if ".tar" in path else "pass"
    proxy.stall_seconds = 150  # longer than this test waits
    sink = DatasetSink(f"s3://{bucket}/ds", count=20, shard_size=10, workers=1, mode="tar",
                       storage_options={"endpoint_url": proxy.endpoint})
    for indices in sink.pending(5):
        sink.submit(indices, *noise(indices, side=16))

    def interrupt_when_held() -> None:
        for _ in range(1200):  # bounded: up to 120 s for the upload to be held
            if proxy.holding:
                break
            threading.Event().wait(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_held, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sink.close()
        for _ in range(300):  # bounded: 30 s, while the proxy holds the upload for 150 s
            if not uploader_pids():
                break
            threading.Event().wait(0.1)
        assert uploader_pids() == [] and proxy.holding
    finally:
        proxy.release()
