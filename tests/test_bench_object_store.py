"""Scenario 9 of the bench (an object store) on tiny sizes against moto's S3 server on
loopback: the report's structure, every image and object written, the server the bench
starts is stopped, a given store's prefix is left empty, credentials never printed.
No speed is asserted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

from s3_server import S3Server, s3_fixture  # noqa: F401 (the s3 fixture)

from asyncdump.bench import object_store
from asyncdump.cli import main

pytestmark = pytest.mark.timeout(150)
REPO = Path(__file__).resolve().parent.parent
TINY = ["--steps", "2", "--step-ms", "1", "--batch", "2", "--size", "32", "--store-images", "12",
        "--store-tar-images", "12", "--store-shard-size", "5", "--no-chart"]


def bench(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    json_path = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "asyncdump", "bench", *options, *TINY,
                           "--json", str(json_path), "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=140, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(json_path.read_text())


def check_parts(result: dict[str, Any], rounds: int) -> None:
    """Every writer ran once per round; every dataset image and every plain object is there."""
    files = result["files"]
    assert set(files["writers"]) == {"store", "folder", "pool", "ceiling", "bare"} or \
        set(files["writers"]) == {"store", "folder", "pool", "ceiling"}
    for writer in files["writers"].values():
        assert len(writer["rounds"]) == rounds
        assert writer["summary"]["images_per_second"]["n"] == rounds
    assert files["written"] == files["expected"] == 2 * rounds * 12
    assert files["objects"] == files["objects_expected"] == (len(files["writers"]) - 2) * rounds * 12
    for row in files["writers"]["store"]["rounds"]:
        assert row["written"] == row["expected"] == 12 and row["same_as_folder"]
    assert len(files["ratios"]["rounds"]) == rounds
    tar = result["tar"]
    assert set(tar["writers"]) == {"store", "folder", "plain", "multipart"}
    assert tar["written"] == tar["expected"] == 2 * rounds * 12
    assert tar["objects"] == tar["objects_expected"] == 2 * rounds * tar["shards"] == 2 * rounds * 3
    for row in tar["writers"]["store"]["rounds"]:
        assert row["written"] == row["expected"] == 12 and row["same_as_folder"]
    for part in (files, tar):
        for row in part["writers"]["store"]["rounds"]:
            assert row["parent_startup_cpu_s"] > 0 and row["workers_cpu_ms"] > 0
    loop = result["loop"]["contenders"]
    assert set(loop) == {"none", "asyncdump_folder", "asyncdump_store"}
    assert loop["asyncdump_store"]["written"] == loop["asyncdump_store"]["expected"] == rounds * 2 * 2
    assert loop["asyncdump_folder"]["written"] == rounds * 2 * 2
    assert result["loop"]["store_minus_folder_points"]["n"] == rounds


def test_scenario_starts_moto_measures_everything_and_stops_it(tmp_path: Path) -> None:
    done, document = bench(tmp_path, "--scenarios", "9", "--rounds", "2")
    result = document["scenarios"]["scenario9_object_store"]
    assert result["server"].startswith("moto_server")
    check_parts(result, rounds=2)
    assert "files bare" in done.stderr  # the bench's own server takes bare HTTP PUTs
    for heading in ("**Files mode**", "**Tar mode**", "| writer | images/s |",
                    "**The parent's CPU per image**", "store root − folder root, loop overhead",
                    "| `asyncdump_store` |"):
        assert heading in done.stdout
    targets = [t["target"] for t in document["targets"]]
    assert sum(t.startswith("scenario 9:") for t in targets) >= 4
    assert next(t for t in document["targets"] if t["target"].startswith("zero images lost"))["met"]
    pid = int(re.search(r"moto_server \(pid (\d+)\)", done.stderr).group(1))  # type: ignore[union-attr]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "w").exists()


def test_root_url_measures_that_store_and_leaves_its_prefix_empty(
        tmp_path: Path, s3: S3Server) -> None:
    bucket = s3.bucket()
    done, document = bench(tmp_path, "--root", f"s3://{bucket}/mine", "--rounds", "1",
                           "--storage-option", "key=testing", "--storage-option", "secret=testing")
    result = document["scenarios"]["scenario9_object_store"]
    assert result["server"] == "given" and result["store"].startswith(f"s3://{bucket}/mine/asyncdump-bench-")
    check_parts(result, rounds=1)
    assert "bare" not in result["files"]["writers"]  # a given store's requests must be signed
    assert list(document["scenarios"]) == ["scenario9_object_store"]
    assert s3.keys(bucket) == []  # everything it wrote is removed
    assert "--storage-option 'key=***' --storage-option 'secret=***'" in document["command"]
    assert document["config"]["storage_options"] == {"key": "***", "secret": "***"}
    assert "secret=testing" not in done.stdout + done.stderr


def test_store_options_are_checked_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--store", "/tmp/not-a-url"]) == 2
    assert "--store takes an object-store URL" in capsys.readouterr().err
    assert main(["bench", "--storage-option", "endpoint_url=http://x"]) == 2
    assert "--storage-option is for the store" in capsys.readouterr().err
    assert main(["bench", "--store", "s3://b/p", "--storage-option", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["bench", "--store", "s3://b/p", "--store-images", "0"]) == 2
    assert "--store-images must be at least 1" in capsys.readouterr().err


def test_redact_hides_credentials_only() -> None:
    options = {"endpoint_url": "http://h:9000", "key": "k", "secret": "s", "anon": False,
               "client_kwargs": {"region_name": "eu", "aws_session_token": "t"}}
    assert object_store.redact(options) == {
        "endpoint_url": "http://h:9000", "key": "***", "secret": "***", "anon": False,
        "client_kwargs": {"region_name": "eu", "aws_session_token": "***"}}
