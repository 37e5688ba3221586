"""``ImageWriter`` under load and faults: call order with a busy pool, scalars interleaved,
killed workers, Ctrl-C in the loop, exit without close, encoding errors, a full buffer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import POISON, install_poison_harness
from tensorboard_events import images, scalars
from torch.utils.tensorboard import SummaryWriter

from asyncdump import AsyncDumpError, BufferFullError
from asyncdump.tensorboard import ImageWriter


def stamped(step: int, count: int, side: int) -> torch.Tensor:
    """uint8 images whose first pixel encodes the step, so a mix-up shows."""
    x = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(step))
    x[0, :, 0, 0] = torch.tensor([step % 256, step // 256, 77], dtype=torch.uint8)
    return x


def step_of(pixels: np.ndarray) -> int:
    assert pixels[0, 0, 2] == 77
    return int(pixels[0, 0, 0]) + 256 * int(pixels[0, 0, 1])


@pytest.mark.timeout(300)
def test_steps_stay_in_call_order_with_a_busy_pool_and_scalars_survive(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    with ImageWriter(writer, workers=2) as tb:
        for step in range(200):
            # a big grid, then small ones: workers finish out of call order
            count, side = (64, 48) if step % 5 == 0 else (1, 4)
            tb.add_images("samples", stamped(step, count, side), global_step=step)
            writer.add_scalar("loss", 1.0 / (step + 1), step)
            if step % 3 == 0:
                tb.add_image("other", stamped(step, 1, 6)[0], global_step=step)
    writer.close()
    events = images(tmp_path)
    steps = [e.step for e in events["samples"]]
    assert steps == list(range(200))  # strictly increasing, every one once
    assert [step_of(e.pixels) for e in events["samples"]] == steps
    assert [e.step for e in events["other"]] == list(range(0, 200, 3))
    assert [s.step for s in scalars(tmp_path)["loss"]] == list(range(200))
    walltimes = [e.wall_time for e in events["samples"]]
    assert walltimes == sorted(walltimes)


@pytest.mark.timeout(300)
def test_killed_workers_lose_nothing_and_keep_order(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    with ImageWriter(writer, workers=2) as tb:
        for step in range(60):
            if step in (20, 40):  # every worker has started and answers
                while len(tb._sink.worker_modules()) < 2:
                    time.sleep(0.01)
            tb.add_images("x", stamped(step, 16, 32), global_step=step)
            if step in (20, 40):  # kill them all with this call's grid still to encode
                for pid in tb._sink.worker_pids:
                    os.kill(pid, signal.SIGKILL)
    # read after close: the collector notices a death when it next reads the socket, which
    # may be after the loop's last call (asserted inside the block, this read 2 once)
    assert tb.stats.worker_restarts == 4
    writer.close()
    events = images(tmp_path)["x"]
    assert [e.step for e in events] == list(range(60))
    assert [step_of(e.pixels) for e in events] == list(range(60))


def _run_child(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal


@pytest.mark.timeout(180)
def test_ctrl_c_in_the_loop_keeps_what_was_added_before(tmp_path: Path) -> None:
    # No `with` and no close(): a plain loop interrupted by Ctrl-C; interpreter exit flushes.
    proc = _run_child(tmp_path, """
        import sys, torch
        from torch.utils.tensorboard import SummaryWriter
        from asyncdump.tensorboard import ImageWriter
        writer = SummaryWriter(sys.argv[1])
        tb = ImageWriter(writer, workers=1)
        x = torch.rand(64, 3, 32, 32)
        step = 0
        while True:
            tb.add_images("x", x, global_step=step)
            writer.add_scalar("loss", 0.5, step)
            print("ADDED", step, flush=True)
            step += 1
    """)
    assert proc.stdout is not None
    last = -1
    for line in proc.stdout:
        last = int(line.split()[1])
        if last == 15:
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.stdout.read()
    last = max([last, *(int(line.split()[1]) for line in rest.splitlines() if line.startswith("ADDED"))])
    assert proc.wait(timeout=120) != 0
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "KeyboardInterrupt" in stderr
    steps = [e.step for e in images(tmp_path / "run")["x"]]
    assert steps == list(range(len(steps)))  # in order, none twice, none skipped
    assert len(steps) >= last + 1  # everything added before Ctrl-C is in the event file
    assert len(scalars(tmp_path / "run")["loss"]) >= last + 1


@pytest.mark.timeout(180)
def test_exit_without_close_writes_everything(tmp_path: Path) -> None:
    proc = _run_child(tmp_path, """
        import sys, torch
        from torch.utils.tensorboard import SummaryWriter
        from asyncdump.tensorboard import ImageWriter
        tb = ImageWriter(SummaryWriter(sys.argv[1]), workers=1)
        for step in range(30):
            tb.add_images("x", torch.rand(9, 3, 16, 16), global_step=step)
    """)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert [e.step for e in images(tmp_path / "run")["x"]] == list(range(30))


@pytest.mark.timeout(180)
def test_encoding_error_reaches_flush_and_the_rest_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_poison_harness(tmp_path / "harness", monkeypatch)
    writer = SummaryWriter(str(tmp_path / "run"))
    tb = ImageWriter(writer, workers=1, png_encoder="opencv")  # the harness wraps OpenCV
    tb.add_image("x", torch.zeros(3, 8, 8, dtype=torch.uint8), global_step=0)
    tb.add_image("x", torch.full((3, 8, 8), POISON, dtype=torch.uint8), global_step=1)
    tb.add_image("x", torch.zeros(3, 8, 8, dtype=torch.uint8), global_step=2)
    with pytest.raises(AsyncDumpError, match="tag 'x' step 1"):
        tb.flush()
    tb.add_image("x", torch.zeros(3, 8, 8, dtype=torch.uint8), global_step=3)
    tb.close()  # the failure was reported once, at flush
    writer.close()
    assert [e.step for e in images(tmp_path / "run")["x"]] == [0, 2, 3]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("on_full", ["drop", "raise"])
def test_memory_is_bounded_and_on_full_applies(tmp_path: Path, on_full: str) -> None:
    grid = torch.rand(16, 3, 32, 32)  # one 196 KiB float picture
    writer = SummaryWriter(str(tmp_path))
    added = refused = 0
    with ImageWriter(writer, workers=1, max_buffer_bytes=2 * grid.numel() * 4,
                     on_full=on_full) as tb:
        for step in range(40):
            try:
                tb.add_images("x", grid, global_step=step)
                added += 1
            except BufferFullError:
                refused += 1
    writer.close()
    stats = tb.stats
    assert stats.peak_buffered_bytes <= stats.max_buffer_bytes
    steps = [e.step for e in images(tmp_path)["x"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    if on_full == "drop":
        assert refused == 0 and len(steps) == 40 - stats.dropped == stats.written
    else:
        assert stats.dropped == 0 and len(steps) == added == stats.written == 40 - refused


@pytest.mark.timeout(120)
def test_close_then_writer_close_loses_nothing_and_close_is_idempotent(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    tb = ImageWriter(writer, workers=1)
    for step in range(5):
        tb.add_images("x", torch.rand(64, 3, 32, 32), global_step=step)
    tb.close()
    tb.close()
    writer.close()
    assert [e.step for e in images(tmp_path)["x"]] == list(range(5))
    assert tb.stats.written == 5
