"""The contenders: asyncdump and the ways people save images from a loop without it.

Each contender gets a fresh folder, ``save(batch, step)`` is called once per loop step with a
``(B, 3, H, W)`` float tensor in [0, 1] (on the loop's device), and ``finish()`` waits until
every image is on disk. Only ``save`` runs inside the timed loop; ``finish`` is the drain.
"""

from __future__ import annotations

import abc
import concurrent.futures
import importlib.util
import mmap
from pathlib import Path
from typing import Any

import numpy as np


def per_image_uint8(image: Any) -> np.ndarray:
    """What the common per-image loop does: ``.cpu()``, permute, ``*255``, clip, ``astype``."""
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    return (array * 255).clip(0, 255).astype(np.uint8)


def _imwrite(cv2: Any, path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), rgb[..., ::-1]):  # imwrite reports failure only this way
        raise OSError(f"cv2.imwrite failed for {path}")


class Contender(abc.ABC):
    """One way of saving a batch per step."""

    name = ""
    asynchronous = False

    def __init__(self, fmt: str = "png"):
        self.fmt = fmt
        self.folder = Path()

    def start(self, folder: Path) -> None:
        """Prepare to write into ``folder`` (outside the timed loop)."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, step: int, index: int) -> Path:
        return self.folder / f"{step:06d}_{index:02d}.{self.fmt}"

    @abc.abstractmethod
    def save(self, batch: Any, step: int) -> None:
        """Save one batch; the time this takes is the loop's cost."""

    def finish(self) -> dict[str, Any]:
        """Wait until everything is on disk; return extra facts for the report."""
        return {}

    def count_written(self) -> int:
        """Finished images this contender wrote (after ``finish``)."""
        from .measure import count_files

        return count_files(self.folder, f".{self.fmt}")


class NoSave(Contender):
    """The loop without saving: the floor every other contender is compared with."""

    name = "none"

    def save(self, batch: Any, step: int) -> None:
        return None


class CopyFloor(NoSave):
    """The floor of any saver that must take the pixels before returning: one copy of the
    batch into pre-faulted shared memory, at rotating offsets as a backlog would use it.
    Writes nothing (its loop overhead is what a perfect ``submit`` would cost)."""

    name = "copy_floor"
    SLOTS = 8  # batches the region holds: each copy lands in memory not just read by the cache

    def start(self, folder: Path) -> None:
        super().start(folder)
        self._region: mmap.mmap | None = None
        self._next = 0

    def reserve(self, batch_bytes: int) -> None:
        """Map and pre-fault the shared region (outside the timed loop, as the sink does)."""
        self._region = mmap.mmap(-1, self.SLOTS * batch_bytes)
        self._view = np.frombuffer(self._region, np.uint8)
        self._view[:] = 1

    def save(self, batch: Any, step: int) -> None:
        array = batch.detach().cpu().numpy()
        if self._region is None:
            self.reserve(array.nbytes)
        start = self._next * array.nbytes
        np.copyto(self._view[start:start + array.nbytes].view(array.dtype).reshape(array.shape), array)
        self._next = (self._next + 1) % self.SLOTS

    def finish(self) -> dict[str, Any]:
        self._view = None  # type: ignore[assignment]
        if self._region is not None:
            self._region.close()
        return {}


class _PerImageSync(Contender):
    """The common per-image loop: convert each image in the loop, then ``write`` it."""

    def save(self, batch: Any, step: int) -> None:
        for i in range(batch.shape[0]):
            self.write(self.path(step, i), per_image_uint8(batch[i]))

    @abc.abstractmethod
    def write(self, path: Path, rgb: np.ndarray) -> None:
        """Encode and write one HWC RGB uint8 image."""


class PilSync(_PerImageSync):
    """``PIL.Image.fromarray(...).save(...)`` per image, in the loop."""

    name = "pil_sync"

    def write(self, path: Path, rgb: np.ndarray) -> None:
        from PIL import Image

        Image.fromarray(rgb).save(path)


class Cv2Sync(_PerImageSync):
    """``cv2.imwrite`` per image, in the loop."""

    name = "cv2_sync"

    def write(self, path: Path, rgb: np.ndarray) -> None:
        import cv2

        _imwrite(cv2, path, rgb)


class TorchvisionSaveImage(Contender):
    """``torchvision.utils.save_image`` per image, in the loop."""

    name = "torchvision_save_image"

    def start(self, folder: Path) -> None:
        super().start(folder)
        from torchvision.utils import save_image

        self._save_image = save_image

    def save(self, batch: Any, step: int) -> None:
        for i in range(batch.shape[0]):
            self._save_image(batch[i], str(self.path(step, i)))


class ThreadPoolCv2(Contender):
    """The hand-rolled async: ``.cpu().numpy()`` in the loop, ``cv2.imwrite`` in a
    ``ThreadPoolExecutor()`` (Python's default thread count; the queue is unbounded)."""

    name = "threadpool_cv2"
    asynchronous = True

    def start(self, folder: Path) -> None:
        super().start(folder)
        import cv2

        self._cv2 = cv2
        self._executor = concurrent.futures.ThreadPoolExecutor()
        self._futures: list[concurrent.futures.Future[None]] = []

    def save(self, batch: Any, step: int) -> None:
        array = batch.detach().cpu().numpy()
        if batch.device.type == "cpu":
            # .numpy() of a CPU tensor is a view: a real loop overwrites that memory next step.
            array = array.copy()
        for i in range(array.shape[0]):
            self._futures.append(self._executor.submit(self._write, array[i], step, i))

    def _write(self, chw: np.ndarray, step: int, index: int) -> None:
        rgb = (chw.transpose(1, 2, 0) * 255).clip(0, 255).astype(np.uint8)
        _imwrite(self._cv2, self.path(step, index), rgb)

    def finish(self) -> dict[str, Any]:
        for future in self._futures:
            future.result()
        self._executor.shutdown()
        return {"threads": self._executor._max_workers}


class AsyncDumpContender(Contender):
    """``AsyncImageSink.submit(batch)``; the sink is created before the timed loop."""

    name = "asyncdump"
    asynchronous = True

    def __init__(self, fmt: str = "png", workers: int | None = None, **sink_options: Any):
        super().__init__(fmt)
        self.workers = workers
        self.sink_options = sink_options
        if workers is not None:
            self.name = f"asyncdump_w{workers}"

    def start(self, folder: Path) -> None:
        super().start(folder)
        from .. import AsyncImageSink

        self.sink = AsyncImageSink(folder, workers=self.workers, format=self.fmt,
                                   name="{step:06d}_{batch:02d}", **self.sink_options)

    def save(self, batch: Any, step: int) -> None:
        self.sink.submit(batch, step=step)

    def finish(self) -> dict[str, Any]:
        worker_rss = self.sink.stats.worker_rss_bytes
        self.sink.close()
        stats = self.sink.stats
        return {"workers": stats.workers or self.sink.workers, "submit_seconds": stats.submit_seconds,
                "blocked_seconds": stats.blocked_seconds, "dropped": stats.dropped,
                "peak_buffered_bytes": stats.peak_buffered_bytes,
                "max_buffer_bytes": stats.max_buffer_bytes, "worker_rss_bytes": worker_rss}


ALL = ["none", "copy_floor", "pil_sync", "cv2_sync", "torchvision_save_image", "threadpool_cv2",
       "asyncdump", "asyncdump_w1"]


def default_names() -> list[str]:
    """``ALL``, plus asyncdump with one worker per usable core: in a GPU-bound loop the loop's
    own core is idle, so this shows what the default (cores - 1) leaves on the table."""
    from .._defaults import usable_cores

    cores = usable_cores()
    return [*ALL, f"asyncdump_w{cores}"] if cores > 1 else list(ALL)


def unavailable(name: str) -> str | None:
    """Why contender ``name`` cannot run here, or None."""
    needs = {"pil_sync": ("PIL", "pillow (pip install 'asyncdump[bench]')"),
             "torchvision_save_image": ("torchvision", "torchvision")}
    if name in needs:
        module, package = needs[name]
        if importlib.util.find_spec(module) is None:
            return f"skipped: {package} is not importable"
    return None


def make(name: str, fmt: str = "png") -> Contender:
    """A fresh contender by its report name."""
    simple: dict[str, type[Contender]] = {
        "none": NoSave, "copy_floor": CopyFloor, "pil_sync": PilSync, "cv2_sync": Cv2Sync,
        "torchvision_save_image": TorchvisionSaveImage, "threadpool_cv2": ThreadPoolCv2,
    }
    if name in simple:
        return simple[name](fmt)
    if name == "asyncdump":
        return AsyncDumpContender(fmt)
    if name.startswith("asyncdump_w"):
        return AsyncDumpContender(fmt, workers=int(name.removeprefix("asyncdump_w")))
    raise ValueError(f"unknown contender {name!r}; known: {', '.join(ALL)}")
