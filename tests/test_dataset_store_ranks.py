"""Datasets on an object store under several ranks (torchrun, 2 ranks, gloo on loopback) against
moto's S3 server: the same objects and bytes as one rank and as a folder (files and tar
mode); a rank killed with
SIGKILL mid-run, then ``--resume`` (with 2 ranks, or with 1; a killed 1-rank run resumed by
2), equals a clean run; rank 0's refusals reach every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

from s3_server import S3Server, s3_fixture  # noqa: F401 (the s3 fixture)
from test_dataset_store import RANK_VARIABLES, _kill_after_first_part, objects, tree
from test_generate_ranks import free_port

pytestmark = pytest.mark.timeout(300)

RUN_S = 150  # a run here takes seconds; a rank waiting on a dead peer would wait 30 minutes
COMMON = ["--size", "16", "--seed", "5", "--workers", "1", "--device", "cpu", "--no-progress"]


def env() -> dict[str, str]:
    """The fixture's S3 settings, no rank variables, one thread per rank."""
    return {**{k: v for k, v in os.environ.items() if k not in RANK_VARIABLES},
            "OMP_NUM_THREADS": "1"}


def torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def generate(*args: str, ranks: int = 1, cwd: Path | None = None) -> str:
    """Run ``asyncdump generate`` (under torchrun for ``ranks`` > 1); its stdout."""
    launcher = torchrun(ranks) if ranks > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "asyncdump", "generate", *args, *COMMON],
                          capture_output=True, text=True, timeout=RUN_S, env=env(), cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def counts(stdout: str) -> tuple[int, int]:
    """(images written, already there) from the summary line."""
    line = next(line for line in stdout.splitlines() if "images written" in line)
    return int(line.split(":")[1].split()[0]), int(line.split("(")[1].split()[0])


@pytest.mark.parametrize("mode", ["files", "tar"])
def test_two_ranks_equal_one_rank_and_a_folder(s3: S3Server, tmp_path: Path, mode: str) -> None:
    bucket = s3.bucket()
    common = ["--count", "200", "--shard-size", "30", "--batch-size", "8", "--mode", mode]
    two = generate("--out", f"s3://{bucket}/two", *common, ranks=2)
    assert "200 images written (0 already there)" in two and "2 rank(s)" in two
    generate("--out", f"s3://{bucket}/one", *common)
    generate("--out", str(tmp_path / "folder"), *common)
    stored = objects(s3, bucket, "two")
    assert not [k for k in stored if k.startswith("manifest.parts/")]  # merged, then deleted
    manifest = [json.loads(line) for line in stored["manifest.jsonl"].splitlines()]
    assert [e["index"] for e in manifest] == list(range(200))  # both ranks', once each
    assert stored == objects(s3, bucket, "one")  # same keys, same bytes
    assert stored == tree(tmp_path / "folder")
    assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def _kill_one_rank_after_parts(args: list[str], s3: S3Server, bucket: str, prefix: str) -> None:
    """Start a 2-rank ``generate``; once both ranks PUT a manifest part, SIGKILL rank 1 (torchrun
    then ends rank 0); every process of the job is gone when this returns."""
    launcher = subprocess.Popen([*torchrun(2), "-m", "asyncdump", "generate", *args, *COMMON],
                                env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = psutil.Process(launcher.pid)
    seen: list[psutil.Process] = []
    try:
        for _ in range(3000):  # bounded: about 150 s at most
            seen += [p for p in job.children(recursive=True) if p not in seen]
            parts = s3.keys(bucket, f"{prefix}/manifest.parts/")
            if launcher.poll() is not None or {k.split("/")[2] for k in parts} == \
                    {"rank-00000", "rank-00001"}:
                break
            time.sleep(0.05)
        rank1 = [p for p in job.children() if _rank_of(p) == "1"]  # not its workers
        assert rank1 and launcher.poll() is None, "the run finished before it could be killed"
        rank1[0].send_signal(signal.SIGKILL)
        launcher.wait(RUN_S)
    finally:
        seen += [p for p in _children(job) if p not in seen]
        for process in [*seen, job]:  # whatever is left (nothing, normally)
            try:
                process.kill()
            except psutil.Error:
                pass
        launcher.wait(30)
    assert launcher.returncode != 0  # the job failed: rank 1 was killed


def _rank_of(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("RANK") if "asyncdump" in process.cmdline() else None
    except psutil.Error:
        return None


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return list(process.children(recursive=True))
    except psutil.Error:
        return []


def _left(s3: S3Server, bucket: str, prefix: str) -> tuple[list[str], list[dict[str, object]]]:
    """The images a killed run stored, and the entries of its manifest parts."""
    keys = s3.keys(bucket, f"{prefix}/")
    parts = [k for k in keys if "/manifest.parts/" in k]
    durable = [json.loads(line) for key in parts for line in s3.get(bucket, key).splitlines()]
    assert f"{prefix}/manifest.jsonl" not in keys and durable
    assert all(f"{prefix}/{e['path']}" in keys for e in durable)  # lines only for stored objects
    return [k for k in keys if k.endswith(".png")], durable


@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_a_killed_rank_then_resume_equals_a_clean_run(s3: S3Server, resume_ranks: int) -> None:
    bucket = s3.bucket()
    common = ["--count", "300", "--shard-size", "40", "--batch-size", "4"]
    _kill_one_rank_after_parts(["--out", f"s3://{bucket}/killed", *common], s3, bucket, "killed")
    images_left, durable = _left(s3, bucket, "killed")
    assert any(int(str(e["path"]).split("/")[0]) % 2 for e in durable)  # rank 1's shards too
    assert 0 < len(images_left) < 300

    written, skipped = counts(generate("--out", f"s3://{bucket}/killed", *common, "--resume",
                                       ranks=resume_ranks))
    assert skipped >= len(durable) and written + skipped == 300
    generate("--out", f"s3://{bucket}/clean", *common)
    killed, clean = objects(s3, bucket, "killed"), objects(s3, bucket, "clean")
    assert killed == clean and len(killed) == 302  # same listing and bytes, no parts left
    indices = [json.loads(line)["index"] for line in killed["manifest.jsonl"].splitlines()]
    assert indices == list(range(300))  # none lost, none twice
    print(f"2 ranks killed: {len(images_left)} images stored, {len(durable)} in manifest parts; "
          f"resume with {resume_ranks} rank(s) wrote {written}, skipped {skipped}; lost 0, "
          f"duplicated 0, PUT again with the same bytes {len(images_left) - skipped}")


def test_one_rank_killed_then_two_ranks_resume(s3: S3Server) -> None:
    bucket = s3.bucket()
    common = ["--count", "300", "--shard-size", "40", "--batch-size", "4", *COMMON]
    _kill_after_first_part(["--out", f"s3://{bucket}/one", *common], s3, bucket, "one")
    _, durable = _left(s3, bucket, "one")
    written, skipped = counts(generate("--out", f"s3://{bucket}/one", *common[:6], "--resume",
                                       ranks=2))
    assert skipped >= len(durable) and written + skipped == 300
    generate("--out", f"s3://{bucket}/clean", *common[:6])
    assert objects(s3, bucket, "one") == objects(s3, bucket, "clean")


def test_rank_0_refusals_reach_every_rank(s3: S3Server) -> None:
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="mine/notes.txt", Body=b"keep")
    generate("--out", f"s3://{bucket}/ds", "--count", "20", "--shard-size", "5")
    before = {key: s3.get(bucket, key) for key in s3.keys(bucket)}
    for prefix, refusal in (("mine", "is not empty (it holds 'notes.txt')"),
                            ("ds", "already holds a dataset")):
        done = subprocess.run([*torchrun(2), "-m", "asyncdump", "generate", "--out",
                               f"s3://{bucket}/{prefix}", "--count", "20", *COMMON],
                              capture_output=True, text=True, timeout=RUN_S, env=env())
        assert done.returncode != 0
        # both ranks (their stderr lines may interleave: counted in the whole text)
        assert done.stderr.count(refusal) == 2, done.stderr[-3000:]
    assert {key: s3.get(bucket, key) for key in s3.keys(bucket)} == before  # nothing changed


def test_a_generator_failing_at_once_on_two_ranks_leaves_the_prefix_empty(s3: S3Server,
                                                                          tmp_path: Path) -> None:
    bucket = s3.bucket()
    (tmp_path / "broken_gen.py").write_text("def make(indices):\n    raise RuntimeError('no')\n")
    done = subprocess.run([*torchrun(2), "-m", "asyncdump", "generate", "--no-progress",
                           "--out", f"s3://{bucket}/g", "--count", "40", "--shard-size", "10",
                           "--workers", "1", "--generator", "broken_gen:make"],
                          capture_output=True, text=True, timeout=RUN_S, env=env(), cwd=tmp_path)
    assert done.returncode != 0 and "no" in done.stderr
    assert s3.keys(bucket) == []  # dataset.json, PUT by rank 0, deleted again
