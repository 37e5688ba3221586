"""Tar shards read by the real ``webdataset`` package: keys, pixels, ``.cls`` labels, ``.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from asyncdump import write_dataset

COUNT = 23


def pixels(index: int, channels: int = 3) -> np.ndarray:
    """A (C, H, W) uint8 image unique to ``index``."""
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, size=(channels, 12, 10), dtype=np.uint8)


def make(indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
    images = torch.from_numpy(np.stack([pixels(i) for i in indices]))
    # every third image has no label: no .cls member for it
    meta = [{"label": i % 7, "name": f"img{i}"} if i % 3 else {"name": f"img{i}"} for i in indices]
    return images, meta


def shards(root: Path) -> list[str]:
    return sorted(str(p) for p in root.glob("*.tar"))


@pytest.mark.parametrize("shard_bytes", [None, 4096])
def test_webdataset_reads_every_sample(tmp_path: Path, shard_bytes: int | None) -> None:
    summary = write_dataset(make, tmp_path, count=COUNT, batch_size=4, mode="tar", shard_size=10,
                            shard_bytes=shard_bytes, workers=1)
    assert summary.complete
    if shard_bytes:
        assert len(shards(tmp_path)) > 3  # shards split into parts by bytes
    seen = []
    for sample in wds.WebDataset(shards(tmp_path), shardshuffle=False).decode("rgb8"):
        index = int(sample["__key__"])
        seen.append(index)
        assert sample["__key__"] == f"{index:09d}"
        expected = pixels(index).transpose(1, 2, 0)  # rgb8: HWC uint8, RGB
        assert sample["png"].dtype == np.uint8
        np.testing.assert_array_equal(sample["png"], expected)
        _, meta = make([index])
        assert sample["json"] == meta[0]
        if "label" in meta[0]:
            assert sample["cls"] == meta[0]["label"]  # decoded to int by WebDataset
        else:
            assert "cls" not in sample
    assert sorted(seen) == list(range(COUNT))


def test_to_tuple_gives_image_and_label(tmp_path: Path) -> None:
    def labelled(indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
        images = torch.from_numpy(np.stack([pixels(i, channels=1) for i in indices]))
        return images, [{"label": i % 5} for i in indices]

    write_dataset(labelled, tmp_path, count=12, batch_size=5, mode="tar", shard_size=5, workers=1)
    dataset = wds.WebDataset(shards(tmp_path), shardshuffle=False).decode("rgb8").to_tuple("png", "cls")
    pairs = list(dataset)
    assert len(pairs) == 12
    for index, (image, label) in enumerate(pairs):  # shards sorted: samples in index order
        gray = pixels(index, channels=1)[0]
        np.testing.assert_array_equal(image, np.repeat(gray[:, :, None], 3, axis=2))
        assert label == index % 5 and isinstance(label, int)
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [e["label"] for e in manifest] == [i % 5 for i in range(12)]
