"""The benchmark code on tiny sizes: every contender and scenario writes what it promises,
the report, JSON and CLI work, and gpu_check exits cleanly without CUDA. No speed is asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from asyncdump.bench import contenders, report, scenarios
from asyncdump.bench.measure import RssSampler, smooth_images, summarize
from asyncdump.bench.storage import recommend
from asyncdump.cli import main

REPO = Path(__file__).resolve().parent.parent


def tiny(tmp_path: Path, **overrides: object) -> scenarios.Config:
    config = scenarios.Config(rounds=1, loop_steps=2, cpu_steps=1, step_ms=1.0, batch=2, size=32,
                              submit_reps=1, flood_batches=20, flood_buffer_bytes=3 * 4 * 3 * 64 * 64 * 4,
                              throughput_images={"png-32": 8, "jpg-256": 4}, work=tmp_path / "work")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def quiet(line: str) -> None:
    pass


@pytest.mark.parametrize("name", contenders.default_names())
def test_each_contender_writes_every_image(name: str, tmp_path: Path) -> None:
    if contenders.unavailable(name):
        pytest.skip(contenders.unavailable(name))
    batches = [torch.from_numpy(smooth_images(3, 24, seed=s)) for s in range(2)]
    folder = tmp_path / name
    contender = contenders.make(name)
    contender.start(folder)
    for step in range(3):
        contender.save(batches[step % 2], step)
    contender.finish()
    files = sorted(folder.glob("*.png"))
    assert len(files) == (0 if name in ("none", "copy_floor") else 9)
    if files:  # the last step's first image, read back, is the batch's image
        image = cv2.imread(str(folder / "000002_00.png"))[..., ::-1]
        expected = (batches[0][0].permute(1, 2, 0).numpy() * 255).astype(np.int16)
        assert np.abs(image.astype(np.int16) - expected).max() <= 1


def test_unavailable_contenders_say_why() -> None:
    have_torchvision = importlib.util.find_spec("torchvision") is not None
    assert (contenders.unavailable("torchvision_save_image") is None) == have_torchvision
    assert contenders.unavailable("cv2_sync") is None
    with pytest.raises(ValueError, match="unknown contender"):
        contenders.make("nope")


def test_loop_scenario_rounds_and_summaries(tmp_path: Path) -> None:
    config = tiny(tmp_path, rounds=3, contenders=["none", "cv2_sync", "asyncdump", "torchvision_save_image"])
    result = scenarios.loop_scenario(config, "sleep", 2, quiet)
    assert set(result["contenders"]) <= {"none", "cv2_sync", "asyncdump", "torchvision_save_image"}
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision_save_image" in result["skipped"]
    ours = result["contenders"]["asyncdump"]
    assert ours["written"] == ours["expected"] == 3 * 2 * 2
    assert len(ours["rounds"]) == 3 and len(ours["latencies_ms"]) == 3 * 2
    assert ours["summary"]["overhead_pct"]["n"] == 3
    assert ours["summary"]["peak_rss_bytes"]["median"] > 0
    assert result["contenders"]["none"]["summary"]["overhead_pct"]["median"] == 0
    table = report.loop_table(result)
    assert "| `asyncdump` |" in table and "12/12" in table


def test_cpu_bound_scenario_runs_a_real_step(tmp_path: Path) -> None:
    config = tiny(tmp_path, contenders=["none", "asyncdump"])
    result = scenarios.scenario2(config, quiet)
    assert result["kind"] == "convnet"
    assert result["contenders"]["asyncdump"]["written"] == 2


def test_throughput_scenario(tmp_path: Path) -> None:
    result = scenarios.scenario3(tiny(tmp_path), quiet, max_workers=1)
    assert result["workers"] == [1]
    for case in ("png-32", "jpg-256"):
        summary = result["cases"][case]["summary"]
        assert summary["w1"]["median"] > 0
        expected = summary["w1"]["median"] / summary["single_process"]["median"]
        assert summary["eff_w1"]["median"] == pytest.approx(expected)
    assert "32² PNG (batch 256)" in report.throughput_table(result)
    # every measurement writes into a folder of its own (nothing is deleted between them)
    folders = [p.name for p in (tmp_path / "work").iterdir()]
    assert len(folders) == len(set(folders)) >= 2 * len(result["cases"])


def test_submit_cost_scenario(tmp_path: Path) -> None:
    result = scenarios.scenario4(tiny(tmp_path), quiet)
    assert result["written"] == result["expected"] == 1 + 16 + 16
    for label in ("1 MB", "12 MB", "50 MB"):
        row = result["sizes"][label]["rounds"][0]
        assert row["memcpy_ms"] > 0 and row["submit_ms"] > 0
    assert "12 MB" in report.submit_table(result)


def test_memory_bound_scenario_counts_drops(tmp_path: Path) -> None:
    config = tiny(tmp_path, batch=4, size=64)
    result = scenarios.scenario5(config, quiet)
    block, drop = result["modes"]["block"]["rounds"][0], result["modes"]["drop"]["rounds"][0]
    assert block["written"] == block["files"] == 80 and block["dropped"] == 0
    assert drop["dropped"] > 0 and drop["written"] + drop["dropped"] == drop["submitted"] == 80
    for row in (block, drop):
        assert row["peak_buffered_bytes"] <= row["max_buffer_bytes"] == config.flood_buffer_bytes
        assert row["accounted"] and row["buffer_ok"]
    assert '`"drop"`' in report.memory_table(result)


def test_targets_flag_lost_images() -> None:
    def loop(ours: float, written: int) -> dict[str, object]:
        def entry(overhead: float, done: int) -> dict[str, object]:
            return {"summary": {"overhead_pct": summarize([overhead])}, "written": done, "expected": 4}
        return {"contenders": {"cv2_sync": entry(100.0, 4), "asyncdump": entry(ours, written)}}

    good = {row["target"]: row["met"] for row in report.targets({"scenario1_gpu_bound": loop(1.0, 4)})}
    assert all(good.values()) and len(good) == 3
    bad = report.targets({"scenario1_gpu_bound": loop(10.0, 3)})
    assert [row["met"] for row in bad] == [False, False, False]
    assert "asyncdump: 3/4" in bad[-1]["measured"]


def test_recommend_stops_where_scaling_stops() -> None:
    assert recommend({1: 100.0, 2: 190.0, 3: 200.0})[0] == 2
    assert recommend({1: 100.0, 2: 105.0})[0] == 1
    workers, why = recommend({1: 100.0, 2: 190.0})
    assert workers == 2 and "still scaling" in why


def test_rss_sampler_sees_children() -> None:
    with RssSampler(interval=0.005) as rss:
        child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(80 << 20); "
                                  "b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"])
        child.wait()
    assert rss.peak_bytes >= rss.baseline_bytes + (60 << 20)


def test_cli_help_lists_options() -> None:
    out = subprocess.run([sys.executable, "-m", "asyncdump", "bench", "--quick", "--help"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0
    for option in ("--quick", "--root", "--scenarios", "--json", "--chart"):
        assert option in out.stdout


def test_cli_writes_table_json_and_chart(tmp_path: Path) -> None:
    json_path, chart_path = tmp_path / "r.json", tmp_path / "r.png"
    out = subprocess.run(
        [sys.executable, "-m", "asyncdump", "bench", "--scenarios", "1", "--rounds", "1", "--steps", "2",
         "--step-ms", "1", "--batch", "2", "--size", "32", "--contenders", "none,cv2_sync,asyncdump",
         "--json", str(json_path), "--chart", str(chart_path), "--work", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=90, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "| contender | loop s | overhead vs none |" in out.stdout
    assert "| target (2 cores) | measured | met |" in out.stdout
    document = json.loads(json_path.read_text())
    assert {"schema", "command", "machine", "config", "scenarios", "targets"} <= set(document)
    assert document["command"].startswith("asyncdump bench --scenarios 1 --rounds 1")
    assert document["machine"]["usable cores"] >= 1
    assert document["scenarios"]["scenario1_gpu_bound"]["contenders"]["asyncdump"]["written"] == 4
    assert not (tmp_path / "w").exists()  # the scratch images are removed when the run ends
    assert "GiB of benchmark output" in out.stderr
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "chart skipped: matplotlib" in out.stdout


def test_cli_root_measures_storage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "storage"
    root.mkdir()
    assert main(["bench", "--root", str(root), "--size", "32", "--rounds", "1", "--seconds", "0.1",
                 "--max-workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "asyncdump, 2 workers" in out
    assert "recommendation: AsyncImageSink(..., workers=" in out
    assert list(root.iterdir()) == []  # its images are removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: gpu_check really runs")
def test_gpu_check_exits_cleanly_without_cuda() -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0
    assert "CUDA is not available" in out.stdout and "nothing was checked" in out.stdout
    assert out.stderr == ""


def test_encoder_and_generate_scenarios_report_both_encoders(tmp_path: Path) -> None:
    from asyncdump.bench import encoders

    config = tiny(tmp_path, throughput_images={"png-256": 8})
    images = encoders.content("shapes", 4, 32)
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.uint8
    for encoder in encoders.ENCODERS:
        one = encoders.encode_only(images, encoder)
        assert one["images_per_second"] > 0 and one["mean_bytes"] > 0
    stages = encoders.stage_times(smooth_images(2, 32), tmp_path / "stages")
    assert set(stages) >= {"conversion (fpng layout)", "encode fpng", "write + rename (fpng file)"}
    rate = encoders.generate_rate(tmp_path / "gen", 20, 16, "tar", "opencv")
    assert rate > 0 and not (tmp_path / "gen").exists()
    cpu = encoders.parent_cpu(tmp_path / "cpu", 20, 16, "files")
    assert cpu["parent_cpu_ms"] >= cpu["render_cpu_ms"] >= 0
    assert "fpng / OpenCV" in report.generate_table(
        {"cases": {"16 tar": {"summary": {k: summarize([1.0]) for k in ("fpng", "opencv", "ratio")}}},
         "parent_cpu": {"16 files": {"summary": {k: summarize([v]) for k, v in cpu.items()}}}})
    assert config.rounds == 1


def test_a_run_warns_when_its_scratch_space_is_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from collections import namedtuple

    from asyncdump.bench import cli

    usage = namedtuple("usage", "total used free")
    work = tmp_path / "not" / "yet" / "there"
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage(0, 0, 5 * 2**30))
    cli.warn_if_short_of_space(work, quick=False)
    assert "warning: 5.0 GiB free" in capsys.readouterr().err
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage(0, 0, 500 * 2**30))
    cli.warn_if_short_of_space(work, quick=False)
    cli.warn_if_short_of_space(work, quick=True)
    assert capsys.readouterr().err == ""


def test_submit_beyond_its_copy_is_taken_per_round_against_copy_floor() -> None:
    def entry(overhead: float, p50s: list[float]) -> dict[str, object]:
        return {"summary": {"overhead_pct": summarize([overhead])}, "written": 0, "expected": 0,
                "rounds": [{"p50_ms": p} for p in p50s]}

    def beyond(ours: list[float]) -> dict[str, object]:
        s1 = {"contenders": {"copy_floor": entry(4.0, [1.5, 2.0, 1.0]), "asyncdump": entry(5.0, ours)}}
        rows = report.targets({"scenario1_gpu_bound": s1})
        return next(r for r in rows if "beyond its copy" in r["target"])

    low = beyond([1.7, 2.3, 1.2])  # 0.2, 0.3, 0.2 ms more than the same round's copy
    assert low["measured"] == "0.200 ms" and low["met"]
    high = beyond([1.9, 1.8, 1.5])  # 0.4, -0.2, 0.5
    assert high["measured"] == "0.400 ms" and not high["met"]
