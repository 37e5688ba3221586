"""Two ranks and faults: a generator that raises ends both ranks (non-zero), a SIGKILLed rank
resumes to the same bytes as an uninterrupted run, a failed construction leaves the group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_generate_ranks import ENV, free_port, tree

JOB = str(Path(__file__).with_name("rank_job.py"))
# A normal 2-rank run here takes well under 30 s; a rank left waiting on a dead peer would sit
# in gloo's 30-minute timeout. The limit tells the two apart with a wide margin.
ENDS_WITHIN_S = 150


def launch_plain(out: Path, *args: str) -> list[subprocess.Popen[str]]:
    """Two ranks started as plain processes with RANK/WORLD_SIZE (no torchrun)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, JOB, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=ENDS_WITHIN_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("a rank did not end: it waits on a dead peer") from None
        results.append((proc.returncode, out, err))
    return results


def run_torchrun(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", JOB, str(out), *args],
        capture_output=True, text=True, timeout=ENDS_WITHIN_S, env=ENV)


@pytest.mark.timeout(400)
def test_failing_generator_ends_both_plain_ranks_nonzero(tmp_path: Path) -> None:
    results = finish(launch_plain(tmp_path / "out", "--fail-rank", "1"))
    (code0, _, err0), (code1, _, err1) = results
    assert code1 != 0 and "failed on purpose" in err1
    assert code0 != 0, err0[-2000:]


@pytest.mark.timeout(400)
def test_failing_generator_ends_torchrun_nonzero(tmp_path: Path) -> None:
    done = run_torchrun(tmp_path / "out", "--fail-rank", "1")
    assert done.returncode != 0
    assert "failed on purpose" in done.stderr
    assert "complete True" not in done.stdout  # no rank reported a finished dataset


@pytest.mark.timeout(400)
def test_sigkilled_rank_resumes_to_the_uninterrupted_bytes(tmp_path: Path) -> None:
    reference, out, pause = tmp_path / "reference", tmp_path / "out", tmp_path / "paused"
    single = subprocess.run([sys.executable, JOB, str(reference)], capture_output=True,
                            text=True, timeout=ENDS_WITHIN_S, env=ENV)
    assert single.returncode == 0, single.stderr[-2000:]

    procs = launch_plain(out, "--pause-rank", "1", "--pause-file", str(pause))
    deadline = time.monotonic() + ENDS_WITHIN_S
    while not pause.exists():  # rank 1 has submitted two batches and now waits
        assert time.monotonic() < deadline and procs[1].poll() is None, procs[1].stderr
        time.sleep(0.05)
    workers = psutil.Process(procs[1].pid).children()
    os.kill(procs[1].pid, signal.SIGKILL)
    (code0, _, err0), (code1, _, _) = finish(procs)
    assert code1 == -signal.SIGKILL
    assert code0 != 0, err0[-2000:]  # rank 0 cannot finish the dataset without rank 1
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "the killed rank's workers outlived it"
    assert tree(out) != tree(reference)  # really incomplete

    results = finish(launch_plain(out, "--resume"))
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]
    assert "complete True" in results[0][1]
    assert tree(out) == tree(reference)  # same tars, same manifest, nothing left over


@pytest.mark.timeout(300)
def test_construction_failure_leaves_the_process_group(tmp_path: Path) -> None:
    results = finish(launch_plain(tmp_path / "out", "--bad-buffer"))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, err[-2000:]
        assert f"rank {rank} refused: max_buffer_bytes" in out and "group left: True" in out
