"""``asyncdump generate`` under torchrun (2 ranks, gloo, CPU) equals a 1-rank run, byte for byte."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")}
ENV["OMP_NUM_THREADS"] = "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["files", "tar"])
def test_two_ranks_equal_one_rank(tmp_path: Path, mode: str) -> None:
    common = ["--count", "200", "--size", "32", "--mode", mode, "--shard-size", "30",
              "--workers", "1", "--seed", "5", "--no-progress"]
    two, one = tmp_path / "two", tmp_path / "one"
    ranks = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}",
         "-m", "asyncdump", "generate", "--out", str(two), *common],
        capture_output=True, text=True, timeout=90, env=ENV)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "200 images written" in ranks.stdout and "2 rank(s)" in ranks.stdout
    single = subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--out", str(one),
                             *common], capture_output=True, text=True, timeout=60, env=ENV)
    assert single.returncode == 0, single.stderr

    lines = (two / "manifest.jsonl").read_text().splitlines()
    indices = [json.loads(line)["index"] for line in lines]
    assert indices == list(range(200))  # the union is the requested count, no duplicates
    assert not list(two.glob("manifest.rank*.jsonl"))  # merged by rank 0
    assert tree(two) == tree(one)  # same files, same pixels, same manifest
