"""DatasetSink / write_dataset: manifest, sharded folders, tar shards, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import POISON, install_poison_harness, read_rgb

from asyncdump import DatasetError, DatasetSink, write_dataset
from asyncdump._fsutil import temp_name


class TinyModel(torch.nn.Module):
    """A stand-in generator: latent -> 3x16x16 image in [0, 1], deterministic per index."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 3 * 16 * 16), torch.nn.Sigmoid())

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, 3, 16, 16)


MODEL = TinyModel()


def make(indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
    z = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(i)) for i in indices])
    return MODEL(z), [{"label": i % 10, "seed": i} for i in indices]


def lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def test_files_mode_manifest_and_sharded_folders(tmp_path: Path) -> None:
    summary = write_dataset(make, tmp_path, count=45, batch_size=8, shard_size=20, workers=1,
                            job={"model": "tiny"})
    assert (summary.images, summary.failed, summary.skipped, summary.complete) == (45, 0, 0, True)
    entries = lines(tmp_path)
    assert [e["index"] for e in entries] == list(range(45))
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["000000", "000001", "000002"]
    assert [len(list(p.iterdir())) for p in folders] == [20, 20, 5]
    images, _ = make([33])
    expected = (images[0] * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    entry = entries[33]
    assert entry["path"] == "000001/000000033.png" and entry["label"] == 3
    assert entry["meta"] == {"seed": 33} and entry["shape"] == [16, 16, 3]
    data = (tmp_path / entry["path"]).read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    np.testing.assert_array_equal(read_rgb(tmp_path / entry["path"]), expected)
    assert summary.bytes == sum(e["bytes"] for e in entries)


def test_tar_mode_members_offsets_and_byte_limit(tmp_path: Path) -> None:
    summary = write_dataset(make, tmp_path, count=30, batch_size=4, mode="tar", shard_size=12,
                            shard_bytes=8 * 1024, workers=1)
    assert summary.images == 30 and summary.complete
    tars = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert "shard-000000.tar" in tars and "shard-000000-1.tar" in tars  # split by bytes
    for name in tars:
        assert (tmp_path / name).stat().st_size <= 8 * 1024
    entries = lines(tmp_path)
    assert [e["index"] for e in entries] == list(range(30))
    for entry in entries:
        tar_name, member = entry["path"].split("/")
        raw = (tmp_path / tar_name).read_bytes()
        data = raw[entry["offset"]: entry["offset"] + entry["bytes"]]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        with tarfile.open(tmp_path / tar_name) as tar:
            assert tar.extractfile(member).read() == data  # type: ignore[union-attr]
            meta = json.loads(tar.extractfile(member.replace(".png", ".json")).read())  # type: ignore[union-attr]
            label = tar.extractfile(member.replace(".png", ".cls")).read()  # type: ignore[union-attr]
        assert label == str(entry["index"] % 10).encode()  # WebDataset's .cls: the int label
        assert meta == {"label": entry["index"] % 10, "seed": entry["index"]}
    assert not list(tmp_path.glob(".*"))


def test_wrong_shapes_are_refused_and_nothing_durable_is_lost(tmp_path: Path) -> None:
    calls = []

    def drifting(indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
        calls.append(indices)
        images, meta = make(indices)
        return (images if len(calls) < 3 else images[:, :, :8]), meta

    with pytest.raises(ValueError, match="differs from earlier batches"):
        write_dataset(drifting, tmp_path, count=40, batch_size=5, workers=1)
    entries = lines(tmp_path)
    assert [e["index"] for e in entries] == list(range(10))  # the two good batches
    for entry in entries:
        assert (tmp_path / entry["path"]).is_file()

    with DatasetSink(tmp_path, count=40, workers=1, resume=True) as sink:
        assert sink.skipped == 10 and sink.remaining == 30
        batch = next(sink.pending(5))
        with pytest.raises(ValueError, match=r"\(B, C, H, W\) batch with B = len\(indices\) = 5"):
            sink.submit(batch, torch.zeros(4, 3, 16, 16))
        with pytest.raises(ValueError, match="next batch from pending"):
            sink.submit([39], torch.zeros(1, 3, 16, 16))
        with pytest.raises(TypeError, match="JSON-serialisable"):
            sink.submit(batch, torch.zeros(5, 3, 16, 16), [{"x": object()}] * 5)
        sink.submit(batch, *make(batch))
    assert [e["index"] for e in lines(tmp_path)] == list(range(15))


def test_resume_writes_only_the_missing_and_cleans_up(tmp_path: Path) -> None:
    for mode in ("files", "tar"):
        clean, partial = tmp_path / f"{mode}-clean", tmp_path / f"{mode}-partial"
        options = {"count": 26, "batch_size": 4, "shard_size": 8, "workers": 1, "mode": mode}
        write_dataset(make, clean, **options)

        def failing(indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
            if indices[0] >= 12:
                raise KeyboardInterrupt
            return make(indices)

        with pytest.raises(KeyboardInterrupt):
            write_dataset(failing, partial, **options)
        done = {e["index"] for e in lines(partial)}
        assert done == (set(range(12)) if mode == "files" else set(range(8)))  # whole shards in tar
        (partial / temp_name("shard-000009.tar", "123")).write_bytes(b"half a shard")
        (partial / "000001").mkdir(exist_ok=True)
        (partial / "000001" / temp_name("000000013.png", "123-4-5")).write_bytes(b"half a file")
        asked: list[int] = []

        def recording(indices: list[int], asked: list[int] = asked) -> tuple[torch.Tensor, list[dict]]:
            asked.extend(indices)
            return make(indices)

        summary = write_dataset(recording, partial, resume=True, **options)
        assert sorted(asked) == sorted(set(range(26)) - done)
        assert summary.skipped == len(done) and summary.images == 26 - len(done)
        if mode == "tar":  # empty folder made above is not part of the dataset
            (partial / "000001").rmdir()
        files = {str(p.relative_to(partial)): p.read_bytes() for p in partial.rglob("*") if p.is_file()}
        assert files == {str(p.relative_to(clean)): p.read_bytes()
                         for p in clean.rglob("*") if p.is_file()}


def test_torn_last_line_is_ignored_and_foreign_job_refused(tmp_path: Path) -> None:
    write_dataset(make, tmp_path, count=10, batch_size=5, workers=1, job={"model": "a"})
    manifest = tmp_path / "manifest.jsonl"
    text = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(text[:7]) + text[7][:20])  # a crash cut the last write short
    with pytest.raises(DatasetError, match="holds a different job"):
        DatasetSink(tmp_path, count=10, workers=1, resume=True, job={"model": "b"})
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetSink(tmp_path, count=10, workers=1, job={"model": "a"})
    with DatasetSink(tmp_path, count=10, workers=1, resume=True, job={"model": "a"}) as sink:
        assert sink.skipped == 7
        for batch in sink.pending(5):
            sink.submit(batch, *make(batch))
    assert [e["index"] for e in lines(tmp_path)] == list(range(10))


@pytest.mark.parametrize("mode", ["files", "tar"])
def test_manifest_lines_are_canonical_and_match_the_bytes(tmp_path: Path, mode: str) -> None:
    """Lines are formatted directly: they must equal what a merge/resume rewrite writes."""
    from asyncdump._manifest import dumps_line

    def odd(indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
        images, _ = make(indices)
        return images, [{"label": f"é{i}", "z": [1.5, None, True], "a": {"ü": i, "c": "x"},
                         "b": {2: 0, 10: {11: 1, 9: 2}}} for i in indices]

    out = tmp_path / mode
    write_dataset(odd, out, count=30, batch_size=7, mode=mode, shard_size=10, workers=1)
    text = (out / "manifest.jsonl").read_text(encoding="utf-8")
    assert [dumps_line(json.loads(line)) for line in text.splitlines(keepends=True)] == \
        text.splitlines(keepends=True)
    entries = lines(out)
    assert [e["index"] for e in entries] == list(range(30))
    assert entries[4]["label"] == "é4" and entries[4]["meta"]["b"] == {"2": 0, "10": {"11": 1, "9": 2}}
    for entry in entries[:12]:
        if mode == "files":
            data = (out / entry["path"]).read_bytes()
        else:
            tar_name, member = entry["path"].split("/")
            with tarfile.open(out / tar_name) as tar:
                data = tar.extractfile(member).read()
        assert len(data) == entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]


def test_construction_failing_after_the_sink_started_releases_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    me = psutil.Process()
    children, fds = {p.pid for p in me.children()}, set(os.listdir("/proc/self/fd"))
    threads = _asyncdump_threads()  # save_image's sinks of earlier tests may still be open
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the progress bar comes after the sink
    with pytest.raises(ImportError):
        DatasetSink(tmp_path / "ds", count=10, workers=2, progress=True)
    assert {p.pid for p in me.children()} <= children  # its workers are stopped and reaped
    assert set(os.listdir("/proc/self/fd")) <= fds  # manifest, buffer and sockets closed
    assert _asyncdump_threads() <= threads  # its collector thread ended: the sink was closed
    monkeypatch.delitem(sys.modules, "tqdm")
    summary = write_dataset(make, tmp_path / "ds", count=10, batch_size=4, resume=True)
    assert summary.complete and summary.images == 10


def _asyncdump_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("asyncdump")}


def test_a_failed_tar_batch_counts_each_lost_image_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 0-3 opens the shard's tar part; batch 4-7 holds an image that kills every worker.
    The part is discarded: 8 images lost, each counted once, nothing half-written."""
    install_poison_harness(tmp_path / "harness", monkeypatch)

    def poisoned(indices: list[int]) -> np.ndarray:
        images = np.zeros((len(indices), 3, 8, 8), np.uint8)
        images[[i == 5 for i in indices]] = POISON
        return images

    root = tmp_path / "data"
    summary = write_dataset(poisoned, root, count=8, batch_size=4, mode="tar", shard_size=8,
                            workers=1, png_encoder="opencv")
    assert (summary.images, summary.failed, summary.complete) == (0, 8, False)
    assert lines(root) == [] and not list(root.glob("*.tar"))
