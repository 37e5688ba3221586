"""A small conv generator for ``asyncdump generate --generator conv_generator:generate``.

Randomly initialised (nothing is downloaded): a stand-in for your GAN, diffusion pipeline or
renderer. The module is imported once per rank, so the model is built once, on this rank's GPU
when there is one. Each image depends only on its index (its noise is seeded by it), so
``--resume`` and any number of ranks give the same dataset.

    cd examples
    asyncdump generate --generator conv_generator:generate --out conv_out --count 2000
"""

from __future__ import annotations

import os

import torch
from torch import nn

LATENT = 64
CLASSES = 10

if torch.cuda.is_available():
    DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
else:
    DEVICE = torch.device("cpu")
    torch.set_num_threads(1)  # leave the other cores to asyncdump's encoder processes

torch.manual_seed(0)  # the same weights on every rank


def up() -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="bilinear")


MODEL = nn.Sequential(  # latent (LATENT, 4, 4) -> image (3, 64, 64) in [0, 1]
    nn.Conv2d(LATENT + CLASSES, 128, 3, padding=1), nn.ReLU(), up(),
    nn.Conv2d(128, 64, 3, padding=1), nn.ReLU(), up(),
    nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), up(),
    nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), up(),
    nn.Conv2d(16, 3, 3, padding=1),
).to(DEVICE).eval()


@torch.no_grad()
def generate(indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
    """``(B, 3, 64, 64)`` float images in [0, 1] and one metadata dict per index."""
    noise = torch.stack([torch.randn(LATENT, 4, 4, generator=torch.Generator().manual_seed(i))
                         for i in indices]).to(DEVICE)
    labels = torch.tensor([i % CLASSES for i in indices])
    onehot = nn.functional.one_hot(labels, CLASSES).float().to(DEVICE)[:, :, None, None]
    raw = MODEL(torch.cat([noise, onehot.expand(-1, -1, 4, 4)], dim=1))
    # untrained weights give faint outputs: standardise each channel of each image
    mean, std = raw.mean((2, 3), keepdim=True), raw.std((2, 3), keepdim=True)
    images = torch.sigmoid(2 * (raw - mean) / (std + 1e-6))
    return images, [{"label": i % CLASSES, "seed": i} for i in indices]
