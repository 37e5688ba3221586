"""``ImageLogger``: a Lightning callback that writes sample grids without stalling the step.

    from asyncdump.lightning import ImageLogger
    trainer = lightning.Trainer(callbacks=[ImageLogger("samples", every_n_steps=500)])

Every ``every_n_steps`` optimizer steps, on global rank zero: ``images(pl_module, batch)`` (or
``pl_module.log_images(batch)``) under ``torch.no_grad()`` in eval mode -> a tensor or a dict
of name -> tensor -> each capped at ``max_images`` -> ``asyncdump.save_image`` (returns at once)
-> ``dirpath/{name}/{global_step:08d}.png``. The futures are checked at each later log and
awaited at train end and teardown, so the files are complete when ``trainer.fit`` returns and
a failed write raises instead of vanishing. Needs ``pip install 'asyncdump[lightning]'``.

``tensorboard=True`` also sends each grid to the trainer's ``TensorBoardLogger`` (its
``experiment``, a ``SummaryWriter``) through ``asyncdump.tensorboard.ImageWriter``: tag = the
result's name, step = ``global_step``; ``dirpath=None`` then writes no files. Needs
``pip install 'asyncdump[lightning,tensorboard]'``.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("asyncdump.lightning needs the lightning package: "
                      "pip install 'asyncdump[lightning]'") from exc
import torch

from ._codecs import get_codec
from ._errors import AsyncDumpError
from .grid import _check_grid_args, _resolve_format, make_grid, save_image

__all__ = ["ImageLogger"]

SAVE_OPTIONS = tuple(p for p in inspect.signature(save_image).parameters if p not in ("tensor", "fp"))
PLAIN_KEY = "images"  # the folder of a plain tensor result


class ImageLogger(pl.Callback):
    """Write image grids every ``every_n_steps`` training steps, asynchronously, on rank zero.

    Args:
        dirpath: output folder; each result goes to ``dirpath/{name}/{global_step:08d}.png``
            (name ``images`` when ``images`` returns a plain tensor).
        every_n_steps: log after every this many optimizer steps (``trainer.global_step``).
        images: ``images(pl_module, batch) -> tensor | dict[str, tensor]``; None calls
            ``pl_module.log_images(batch)`` (the CompVis convention).
        max_images: at most this many images of each tensor go into its grid.
        tensorboard: also send each grid to the trainer's ``TensorBoardLogger`` (tag: the
            result's name); with ``dirpath=None``, send it there instead of writing files.
        save_kwargs: ``asyncdump.save_image`` options (``nrow``, ``normalize``,
            ``value_range``, ...); ``format`` also sets the file extension.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None,
        every_n_steps: int = 500,
        images: Callable[[Any, Any], Any] | None = None,
        max_images: int = 8,
        tensorboard: bool = False,
        **save_kwargs: Any,
    ):
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("max_images", max_images)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if images is not None and not callable(images):
            raise TypeError(f"images must be a callable (pl_module, batch) -> tensor or dict, "
                            f"or None for pl_module.log_images(batch); got {type(images).__name__}")
        unknown = sorted(set(save_kwargs) - set(SAVE_OPTIONS))
        if unknown:
            raise TypeError(f"unknown save_image option(s) {', '.join(unknown)}; accepted: "
                            f"{', '.join(SAVE_OPTIONS)}")
        _check_grid_args(save_kwargs.get("nrow", 8), save_kwargs.get("padding", 2),
                         save_kwargs.get("value_range"), save_kwargs.get("pad_value", 0.0))
        fmt = save_kwargs.get("format")
        self.extension = ".png" if fmt is None else get_codec(_resolve_format("x", fmt)[0]).extension
        if dirpath is None and not tensorboard:
            raise ValueError("dirpath=None writes no files: it needs tensorboard=True")
        self.tensorboard = bool(tensorboard)
        self._tb_writer: Any = None  # asyncdump.tensorboard.ImageWriter, from the first log
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_steps = every_n_steps
        self.images = images
        self.max_images = max_images
        self.save_kwargs = save_kwargs
        self._pending: list[concurrent.futures.Future[list[Path]]] = []
        self._last_step = -1

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._raise_failures(wait=False)
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step \
                or not trainer.is_global_zero:
            # no optimizer step yet (the first batches under gradient accumulation), not due,
            # or the same optimizer step again (gradient accumulation)
            return
        self._last_step = step
        for key, tensor in self._collect(pl_module, batch).items():
            capped = tensor[: self.max_images] if tensor.ndim == 4 else tensor  # else one image
            if self.tensorboard:
                self._send_to_tensorboard(trainer, key, capped, step)
            if self.dirpath is not None:
                path = self.dirpath / key / f"{step:08d}{self.extension}"
                self._pending.append(save_image(capped, path, **self.save_kwargs))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.tensorboard:
            _tensorboard_logger(trainer)  # fail before training, not at the first log

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_failures(wait=True)
        self._close_tensorboard()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After an exception train end never ran: still finish the files, but do not hide the
        # exception that is on its way out with a write error.
        try:
            self._raise_failures(wait=True)
        except AsyncDumpError as exc:
            warnings.warn(f"ImageLogger: {exc}", RuntimeWarning, stacklevel=2)
        try:
            self._close_tensorboard()
        except AsyncDumpError as exc:
            warnings.warn(f"ImageLogger: {exc}", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ helpers
    def _collect(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        """Call the images function in eval mode without gradients; check what it returns."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                if self.images is not None:
                    result = self.images(pl_module, batch)
                else:
                    log_images = getattr(pl_module, "log_images", None)
                    if not callable(log_images):
                        raise TypeError(f"{type(pl_module).__name__} has no log_images(batch); "
                                        "define it or pass ImageLogger(images=fn(pl_module, batch))")
                    result = log_images(batch)
        finally:
            pl_module.train(was_training)
        items = {PLAIN_KEY: result} if isinstance(result, torch.Tensor) else result
        if not isinstance(items, dict) or not all(isinstance(v, torch.Tensor) for v in items.values()):
            raise TypeError(f"the images function must return a tensor or a dict of name -> tensor, "
                            f"got {_describe(result)}")
        for key in items:
            if not isinstance(key, str) or not key or key in (".", "..") or "/" in key or "\\" in key:
                raise ValueError(f"image names become folder names: {key!r} is not usable "
                                 "(a non-empty str without slashes)")
        return items

    def _raise_failures(self, wait: bool) -> None:
        """Drop finished futures; raise the first failed write. ``wait``: finish them all first."""
        if wait and self._pending:
            concurrent.futures.wait(self._pending)
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            error = future.exception()
            if error is not None:
                raise AsyncDumpError(f"ImageLogger could not write an image grid: {error}") \
                    from error


    def _send_to_tensorboard(self, trainer: pl.Trainer, key: str, tensor: torch.Tensor,
                             step: int) -> None:
        """The grid ``save_image`` would write, through ``ImageWriter.add_image`` (which
        converts with SummaryWriter's own rule, as ``experiment.add_image`` would)."""
        if self._tb_writer is None:
            from .tensorboard import ImageWriter

            self._tb_writer = ImageWriter(_tensorboard_logger(trainer).experiment)
        options = {k: v for k, v in self.save_kwargs.items() if k != "format"}
        self._tb_writer.add_image(key, make_grid(tensor, **options), global_step=step)

    def _close_tensorboard(self) -> None:
        """Write every pending TensorBoard image; raise AsyncDumpError for failed ones."""
        writer, self._tb_writer = self._tb_writer, None
        if writer is not None:
            writer.close()


def _tensorboard_logger(trainer: pl.Trainer) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger
    raise ValueError("ImageLogger(tensorboard=True) needs a TensorBoardLogger among the trainer's "
                     "loggers (Trainer(logger=TensorBoardLogger(...)); the default logger is one "
                     "when tensorboard is installed)")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"a dict of {', '.join(kinds) or 'nothing'}"
    return f"a {type(value).__name__}"
