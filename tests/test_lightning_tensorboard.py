"""``ImageLogger(tensorboard=True)``: grids go to the trainer's TensorBoardLogger."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard_events import images
from test_lightning import Tiny, loader
from torch.utils.tensorboard.summary import image as summary_image

from asyncdump.grid import make_grid
from asyncdump.lightning import ImageLogger


def fit(module: L.LightningModule, callbacks: list[Any], logger: Any, steps: int = 6) -> None:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader())


def summary_writer_pixels(chw: torch.Tensor) -> np.ndarray:
    """What ``SummaryWriter.add_image(tag, chw)`` would store, decoded."""
    png = summary_image("x", chw, dataformats="CHW").value[0].image.encoded_image_string
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.timeout(180)
def test_grids_go_to_the_tensorboard_logger_instead_of_files(tmp_path: Path) -> None:
    module = Tiny()
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    fit(module, [ImageLogger(None, every_n_steps=2, max_images=4, tensorboard=True,
                             normalize=True, padding=1)], logger)
    assert not list(tmp_path.rglob("*.png"))
    events = images(Path(logger.log_dir))  # complete when fit returns
    assert sorted(events) == ["inputs", "recon"]
    for key, logged in events.items():
        assert [e.step for e in logged] == [2, 4, 6]
        for event, tensors in zip(logged, module.logged, strict=True):
            grid = make_grid(tensors[key][:4], normalize=True, padding=1)
            np.testing.assert_array_equal(event.pixels, summary_writer_pixels(grid))


@pytest.mark.timeout(180)
def test_grids_go_to_files_and_tensorboard(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    fit(Tiny(), [ImageLogger(tmp_path / "files", every_n_steps=3, tensorboard=True)], logger)
    assert sorted(p.name for p in (tmp_path / "files" / "inputs").iterdir()) == [
        "00000003.png", "00000006.png"]
    assert [e.step for e in images(Path(logger.log_dir))["recon"]] == [3, 6]


def test_tensorboard_needs_a_tensorboard_logger(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs tensorboard=True"):
        ImageLogger(None)
    with pytest.raises(ValueError, match="needs a TensorBoardLogger"):
        fit(Tiny(), [ImageLogger(None, every_n_steps=1, tensorboard=True)], logger=False, steps=1)
