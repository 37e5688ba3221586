"""Bench scenario 8 (add_images: SummaryWriter vs ImageWriter), run tiny: structure, every
event read back, the table and the targets. Speed itself is for the benchmark, not tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bench import quiet, tiny

from asyncdump.bench import report, tb_loop
from asyncdump.bench.cli import _parse_scenarios


@pytest.mark.timeout(300)
def test_scenario8_runs_every_contender_and_reads_every_event_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb_loop, "SHAPE", (9, 3, 16, 16))
    result = tb_loop.scenario8(tiny(tmp_path), quiet)
    assert result["steps"] == 3 and result["batch_shape"] == [9, 3, 16, 16]
    contenders = result["contenders"]
    assert list(contenders) == list(tb_loop.CONTENDERS)
    for name in ("summary_writer", "asyncdump"):
        assert contenders[name]["written"] == contenders[name]["expected"] == 3
    assert contenders["none"]["summary"]["overhead_pct"]["median"] == 0.0
    table = report.TABLES["scenario8_tensorboard"](result)
    assert "`summary_writer`" in table and "3/3" in table
    checks = report.targets({"scenario8_tensorboard": result})
    assert [c["target"].split(":")[0] for c in checks[:3]] == ["scenario 8"] * 3
    assert checks[2]["met"] and not report.lost_images({"scenario8_tensorboard": result})


def test_cli_takes_scenario_8() -> None:
    assert _parse_scenarios("8") == [8]
