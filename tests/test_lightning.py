"""``asyncdump.lightning.ImageLogger`` in a real ``lightning.Trainer`` on the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from helpers import read_rgb, torchvision_pixels
from torch.utils.data import DataLoader, TensorDataset

import asyncdump
from asyncdump import AsyncDumpError
from asyncdump.lightning import ImageLogger

BATCH, SIDE = 6, 8


class Tiny(L.LightningModule):
    """A conv layer; ``log_images`` returns the inputs and the layer's output, and remembers
    what it returned and in which mode it was called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.logged: list[dict[str, torch.Tensor]] = []
        self.modes: list[tuple[bool, bool]] = []  # (training, grad enabled) inside log_images
        self.train_modes: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.train_modes.append(self.training)
        return self.conv(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def log_images(self, batch: Any) -> dict[str, torch.Tensor]:
        self.modes.append((self.training, torch.is_grad_enabled()))
        x = batch[0]
        out = {"inputs": x, "recon": torch.sigmoid(self.conv(x))}
        self.logged.append({k: v.clone() for k, v in out.items()})
        return out


def loader() -> DataLoader:
    images = torch.rand(4 * BATCH, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(images), batch_size=BATCH)


def fit(module: L.LightningModule, callbacks: list[Any], steps: int = 6, **trainer_args: Any) -> None:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lightning's advice on num_workers and the like
        trainer.fit(module, loader())


def grid(images: torch.Tensor, **norm: Any) -> np.ndarray:
    """torchvision's grid (nrow 8, padding 2, pad 0) of at most 8 images, as HWC uint8."""
    n = images.shape[0]
    out = np.zeros((SIDE + 4, n * (SIDE + 2) + 2, 3), np.uint8)
    for k in range(n):
        out[2:2 + SIDE, 2 + k * (SIDE + 2): 2 + k * (SIDE + 2) + SIDE] = \
            torchvision_pixels(images[k], **norm)
    return out


def test_grids_written_every_n_steps_with_the_right_pixels(tmp_path: Path) -> None:
    module = Tiny()
    signed = ImageLogger(tmp_path / "signed", every_n_steps=3, max_images=2, normalize=True,
                         value_range=(-1, 1),
                         images=lambda m, batch: batch[0] * 2 - 1)  # a plain tensor in [-1, 1]
    single = ImageLogger(tmp_path / "single", every_n_steps=6, max_images=2,
                         images=lambda m, batch: batch[0][0])  # one (C, H, W) image
    fit(module, [ImageLogger(tmp_path / "default", every_n_steps=2, max_images=4), signed, single])

    # Complete when fit returns: no flush by the test.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")) == [
        f"default/{key}/{step:08d}.png" for key in ("inputs", "recon") for step in (2, 4, 6)] + [
        f"signed/images/{step:08d}.png" for step in (3, 6)] + ["single/images/00000006.png"]
    assert module.modes == [(False, False)] * 3  # eval, no grad, only when due
    assert module.train_modes == [True] * 6  # train mode restored after each log
    for logged, step in zip(module.logged, (2, 4, 6), strict=True):
        for key in ("inputs", "recon"):
            written = read_rgb(tmp_path / "default" / key / f"{step:08d}.png")
            np.testing.assert_array_equal(written, grid(logged[key][:4]))  # capped at 4
    batches = list(loader())
    for step in (3, 6):  # global_step 3 ends batch index 2
        np.testing.assert_array_equal(read_rgb(tmp_path / "signed" / "images" / f"{step:08d}.png"),
                                      grid(batches[(step - 1) % 4][0][:2], value_range=(0.0, 1.0)))
    np.testing.assert_array_equal(read_rgb(tmp_path / "single" / "images" / "00000006.png"),
                                  torchvision_pixels(batches[1][0][0]))  # one image: no padding


def test_gradient_accumulation_logs_once_per_optimizer_step_and_never_before_one(
        tmp_path: Path) -> None:
    """With 2 batches per optimizer step, global_step is 0 for the first batch (no step yet),
    and each later value is seen by two batches: one grid per due optimizer step, none at 0."""
    module = Tiny()
    fit(module, [ImageLogger(tmp_path, every_n_steps=2, max_images=2)], steps=4,
        accumulate_grad_batches=2)
    assert sorted(p.name for p in (tmp_path / "inputs").glob("*.png")) == [
        "00000002.png", "00000004.png"]
    assert len(module.logged) == 2
    batches = list(loader())
    np.testing.assert_array_equal(read_rgb(tmp_path / "inputs" / "00000002.png"),
                                  grid(batches[3][0][:2]))  # batch 3 ends optimizer step 2


def test_a_failed_write_is_an_error_not_silence(tmp_path: Path) -> None:
    class Sabotage(Tiny):
        """At the second log, a file takes the place of the ``inputs`` folder: the worker's
        write of that grid fails after save_image has returned."""

        def log_images(self, batch: Any) -> dict[str, torch.Tensor]:
            if len(self.logged) == 1:
                shutil.rmtree(tmp_path / "inputs")
                (tmp_path / "inputs").write_text("not a folder")
            return super().log_images(batch)

    with pytest.raises(AsyncDumpError, match="ImageLogger could not write") as caught:
        fit(Sabotage(), [ImageLogger(tmp_path, every_n_steps=2)], steps=4)
    assert f"{tmp_path / 'inputs'}/0000000" in str(caught.value.__cause__)  # step 2 or 4
    assert (tmp_path / "recon" / "00000004.png").is_file()  # the other grid was written
    with pytest.raises(AsyncDumpError, match="failed to write"):
        asyncdump.flush()  # save_image's own report of the same failure, taken here


def test_bad_arguments_and_results_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1, got 0"):
        ImageLogger(tmp_path, every_n_steps=0)
    with pytest.raises(TypeError, match=r"unknown save_image option.*nrows.*accepted: format, nrow"):
        ImageLogger(tmp_path, nrows=4)
    with pytest.raises(ValueError, match="format"):
        ImageLogger(tmp_path, format="gif")
    assert ImageLogger(tmp_path, format="jpg").extension == ".jpg"

    class NoLogImages(Tiny):
        log_images = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match="has no log_images"):
        fit(NoLogImages(), [ImageLogger(tmp_path, every_n_steps=1)], steps=1)
    with pytest.raises(TypeError, match="must return a tensor or a dict of name -> tensor, got a list"):
        fit(Tiny(), [ImageLogger(tmp_path, every_n_steps=1, images=lambda m, b: [b[0]])], steps=1)


def test_import_asyncdump_does_not_import_lightning() -> None:
    code = "import sys, asyncdump; print('lightning' in sys.modules, 'pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


DDP_SCRIPT = '''
import os, sys, warnings
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from asyncdump.lightning import ImageLogger

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    def training_step(self, batch, batch_idx):
        return self.conv(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def log_images(self, batch):
        with open(os.path.join(sys.argv[1], f"called.rank{self.global_rank}"), "a") as log:
            log.write(f"{self.global_step}\\n")
        return torch.sigmoid(self.conv(batch[0]))

warnings.simplefilter("ignore")
data = DataLoader(TensorDataset(torch.rand(16, 3, 8, 8)), batch_size=2)
trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False,
                    callbacks=[ImageLogger(os.path.join(sys.argv[1], "out"), every_n_steps=2)])
trainer.fit(Tiny(), data)
'''


def test_only_global_rank_zero_logs_under_ddp(tmp_path: Path) -> None:
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                            text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "called.rank0").read_text().split() == ["2", "4"]
    assert not (tmp_path / "called.rank1").exists()  # log_images never ran on rank 1
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [
        "00000002.png", "00000004.png"]
