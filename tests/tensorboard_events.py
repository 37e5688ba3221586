"""Read TensorBoard event files back with TensorBoard's own reader (EventAccumulator)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


class ImageEvent(NamedTuple):
    step: int
    wall_time: float
    width: int
    height: int
    pixels: np.ndarray  # decoded PNG, HWC


def load(logdir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def images(logdir: Path) -> dict[str, list[ImageEvent]]:
    """Every image event by tag, in file order, its PNG decoded by PIL."""
    accumulator = load(logdir)
    out: dict[str, list[ImageEvent]] = {}
    for tag in accumulator.Tags()["images"]:
        out[tag] = [ImageEvent(e.step, e.wall_time, e.width, e.height,
                               np.asarray(Image.open(io.BytesIO(e.encoded_image_string))))
                    for e in accumulator.Images(tag)]
    return out


def scalars(logdir: Path) -> dict[str, list[Any]]:
    accumulator = load(logdir)
    return {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}
