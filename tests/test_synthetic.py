"""The built-in generator's two renderers paint the same pixels, and the pixels never change."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from asyncdump import synthetic

# sha256 prefixes of the NCHW bytes and of the metadata, computed with the renderer before the
# numpy path existed (commit c6917dd): a dataset resumed across versions must not change.
GOLDEN = [
    (16, 0, 0, 24, "9842c104aef0ac7a", "ff86ede42b7fd6f3"),
    (64, 7, 1000, 16, "93d010a605536f47", "8299107f21dfa3b0"),
    (256, 0, 0, 8, "13b01ff846601800", "e200a9ec147f6e5c"),
    (301, 2**40 + 3, 5, 4, "abf8068e6c226318", "a44b7edd76c75b9d"),
]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.mark.parametrize(("size", "seed", "first", "count", "pixels", "meta"), GOLDEN)
def test_render_matches_the_recorded_images(size: int, seed: int, first: int, count: int,
                                            pixels: str, meta: str) -> None:
    images, metadata = synthetic.render(list(range(first, first + count)), seed=seed, size=size)
    assert images.shape == (count, 3, size, size) and images.dtype == torch.uint8
    assert _sha(images.contiguous().numpy().tobytes()) == pixels
    assert _sha(json.dumps(metadata, sort_keys=True).encode()) == meta


@pytest.mark.parametrize("size", [1, 2, 3, 17, 63, 64, 65, 128, 255])
@pytest.mark.parametrize("seed", [0, 99, 2**63 + 5])
def test_numpy_and_torch_renderers_agree(size: int, seed: int) -> None:
    indices = list(range(seed % 1000, seed % 1000 + 48))
    scene = synthetic._scene(indices, seed, size)
    by_torch = synthetic._pixels_torch(scene, "cpu").numpy()
    by_numpy = synthetic._pixels_numpy(scene).transpose(0, 3, 1, 2)
    assert np.array_equal(by_torch, by_numpy)
    # 48 images are enough to draw every texture and every shape count
    texture = (synthetic.parameters(seed, indices, 12 + 6 * synthetic.MAX_SHAPES)[:, 6] % 4)
    assert set(texture.tolist()) == {0, 1, 2, 3}
    assert {len(m["objects"]) for m in synthetic._scene(indices, seed, size).metadata} == {1, 2, 3}


def test_cpu_render_is_channels_last_from_numpy_min_size() -> None:
    big, _ = synthetic.render([0, 1], seed=0, size=synthetic.NUMPY_MIN_SIZE)
    small, _ = synthetic.render([0, 1], seed=0, size=synthetic.NUMPY_MIN_SIZE - 1)
    assert big.permute(0, 2, 3, 1).is_contiguous()  # HWC bytes: one memcpy, no reorder for fpng
    assert small.is_contiguous()


def test_a_batch_does_not_change_an_image() -> None:
    together, _ = synthetic.render([3, 4, 5, 6], seed=1, size=96)
    alone, _ = synthetic.render([5], seed=1, size=96)
    assert torch.equal(together[2], alone[0])
