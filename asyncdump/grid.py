"""``save_image`` / ``make_grid``: torchvision's drop-ins, written by process-wide sinks.

    from asyncdump import save_image          # was: from torchvision.utils import save_image
    save_image(fake, f"samples/{step}.png", nrow=8, normalize=True, value_range=(-1, 1))

    caller's thread                       make_grid with torchvision's algorithm, on the tensor's
                                          device, in its dtype (torch ops: a few copies, no sync)
      -> float32 grid: handed on as is    the sink's rule with value_range (0, 1) *is*
                                          torchvision's mul(255).add_(0.5).clamp_(0, 255)
      -> float16/bfloat16/float64 grid:   torchvision's three ops in that dtype, then uint8
      -> internal AsyncImageSink          one per (folder of fp, format, suffix), created on first
                                          use, one worker each (so repeated saves to one path land
                                          in call order), overwrite=True; at most
                                          ``MAX_OPEN_SINKS`` open, the least recently used one is
                                          closed in the background (a new sink for its folder
                                          waits for that close: call order holds across it)
    flush()                               waits for every internal sink; also run at exit

Writing to the user's exact path keeps the sink's path rules meaningful: the root is the
folder of ``fp`` and the name is a single file name inside it, so nothing can resolve
elsewhere, and a symlinked output folder (common on clusters) is fine.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ._codecs import CODECS
from ._errors import AsyncDumpError
from ._sink import AsyncImageSink
from ._staging import ACCEPTED, TORCH_DTYPES, inspect

MAX_OPEN_SINKS = 4
SINK_BUFFER_BYTES = 32 << 20  # grown per sink to twice the largest grid seen
# PIL's default quality for the lossy formats, so file sizes match what torchvision users get.
PIL_DEFAULT_QUALITY = {"jpg": 75, "jpeg": 75, "webp": 80}
# File extensions (lower case) that pick a format when ``format`` is None, as PIL does.
EXTENSION_FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpeg", ".jpe": "jpg",
                     ".webp": "webp", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff"}
FORMAT_ALIASES = {"tif": "tiff"}


def _torch() -> Any:
    import torch  # save_image only runs for callers that have torch; importing asyncdump doesn't

    return torch


# ---------------------------------------------------------------------------------- the grid
def make_grid(
    tensor: Any,
    nrow: int = 8,
    padding: int = 2,
    normalize: bool = False,
    value_range: tuple[float, float] | None = None,
    scale_each: bool = False,
    pad_value: float = 0.0,
) -> Any:
    """``torchvision.utils.make_grid``: same arguments, same values, on the tensor's device.

    Also takes numpy arrays (converted with ``torch.from_numpy``). Never records autograd.
    """
    torch = _torch()
    _check_grid_args(nrow, padding, value_range, pad_value)
    with torch.no_grad():
        t = _as_tensor(tensor)
        if t.dim() == 2:  # one image H x W
            t = t.unsqueeze(0)
        if t.dim() == 3:  # one image C x H x W
            if t.size(0) == 1:
                t = torch.cat((t, t, t), 0)
            t = t.unsqueeze(0)
        if t.dim() != 4:
            raise ValueError(f"save_image/make_grid take (B, C, H, W), (C, H, W), (H, W) or a list "
                             f"of (C, H, W) tensors; got shape {tuple(t.shape)}")
        if t.size(1) == 1:  # gray images become RGB, as in torchvision
            t = torch.cat((t, t, t), 1)
        if t.size(0) == 0:
            raise ValueError("save_image got an empty batch (B = 0): there is nothing to save")
        if normalize:
            t = t.clone()  # never modify the caller's tensor
            _normalize_(t, value_range, scale_each)
        if t.size(0) == 1:
            return t.squeeze(0)
        nmaps = t.size(0)
        xmaps = min(nrow, nmaps)
        ymaps = math.ceil(nmaps / xmaps)
        height, width = int(t.size(2) + padding), int(t.size(3) + padding)
        grid = t.new_full((t.size(1), height * ymaps + padding, width * xmaps + padding), pad_value)
        k = 0
        for y in range(ymaps):
            for x in range(xmaps):
                if k >= nmaps:
                    break
                grid.narrow(1, y * height + padding, height - padding).narrow(
                    2, x * width + padding, width - padding).copy_(t[k])
                k += 1
        return grid


def _check_grid_args(nrow: Any, padding: Any, value_range: Any, pad_value: Any) -> None:
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be an int >= 1 (images per grid row), got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0 (pixels), got {padding!r}")
    if value_range is not None and (
            not isinstance(value_range, (tuple, list)) or len(value_range) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value_range)):
        raise ValueError(f"value_range must be None or a tuple (min, max) of numbers, "
                             f"got {value_range!r}")
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)):
        raise ValueError(f"pad_value must be a number, got {pad_value!r}")


def _as_tensor(tensor: Any) -> Any:
    torch = _torch()
    if isinstance(tensor, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tensor))
    if isinstance(tensor, torch.Tensor):
        return tensor.detach()
    if isinstance(tensor, (list, tuple)):
        if not tensor:
            raise ValueError("save_image got an empty list: there is nothing to save")
        items = [_as_tensor(item) if isinstance(item, (torch.Tensor, np.ndarray)) else item
                 for item in tensor]
        if not all(isinstance(item, torch.Tensor) for item in items):
            kinds = sorted({type(item).__name__ for item in items})
            raise TypeError(f"a list given to save_image must hold tensors (or numpy arrays), "
                            f"got {', '.join(kinds)}")
        shapes = {tuple(item.shape) for item in items}
        if len(shapes) != 1:
            raise ValueError(f"the tensors in the list must all have the same shape, got "
                             f"{sorted(shapes)}")
        return torch.stack(items, dim=0)
    raise TypeError(f"save_image takes a torch.Tensor, a list of tensors or a numpy array, "
                    f"got {type(tensor).__name__}")


def _normalize_(t: Any, value_range: tuple[float, float] | None, scale_each: bool) -> None:
    """torchvision's ``norm_range`` in place (per image when ``scale_each``)."""
    if value_range is not None:
        for image in (t if scale_each else [t]):
            _norm_ip(image, float(value_range[0]), float(value_range[1]))
    elif t.dtype == _torch().float32:
        _norm_by_extrema_(t, scale_each)
    else:  # torchvision literally: float(t.min()) syncs with the GPU; rare dtypes only
        for image in (t if scale_each else [t]):
            _norm_ip(image, float(image.min()), float(image.max()))


def _norm_ip(img: Any, low: float, high: float) -> None:
    img.clamp_(min=low, max=high)
    img.sub_(low).div_(max(high - low, 1e-5))


def _norm_by_extrema_(t: Any, scale_each: bool) -> None:
    """``norm_ip(t, float(t.min()), float(t.max()))`` without moving min/max to the host.

    Equal for float32: torchvision's divisor is ``float32(max(double(hi) - double(lo), 1e-5))``;
    the difference of two float32 values in double is exact or, when their exponents are far
    apart, within a quarter unit of float32 of ``hi``, so rounding it once more gives the same
    float32 as computing ``hi - lo`` in float32; clamping at 1e-5 is monotone.
    """
    torch = _torch()
    if scale_each:
        low = t.amin(dim=(1, 2, 3), keepdim=True)
        high = t.amax(dim=(1, 2, 3), keepdim=True)
    else:
        low, high = t.min(), t.max()
    t.clamp_(min=low, max=high)
    t.sub_(low).div_(torch.clamp(high - low, min=1e-5))


# ---------------------------------------------------------------------------------- writing
def _resolve_format(path: str, format: str | None) -> tuple[str, str]:
    """(codec key, suffix as written): ``format`` wins; else the extension, as PIL does."""
    suffix = os.path.splitext(path)[1]
    if format is None:
        key = EXTENSION_FORMATS.get(suffix.lower())
        if key is None:
            raise ValueError(f"cannot tell the image format from {os.path.basename(path)!r}: use "
                             f"one of the extensions {', '.join(sorted(EXTENSION_FORMATS))} "
                             f"or pass format= (one of {', '.join(sorted(CODECS))})")
        return key, suffix
    if not isinstance(format, str):
        raise TypeError(f"format must be a str or None, got {type(format).__name__}")
    key = FORMAT_ALIASES.get(format.lower(), format.lower())
    if key not in CODECS:
        raise ValueError(f"format must be one of {', '.join(sorted(CODECS))} (or None to use "
                         f"the extension of fp), got {format!r}")
    return key, suffix


def _check_fp(fp: Any) -> str:
    if isinstance(fp, bytes):
        fp = os.fsdecode(fp)
    if not isinstance(fp, (str, os.PathLike)):
        raise TypeError(
            f"fp must be a path (str or os.PathLike), got {type(fp).__name__}: file objects are "
            "not supported, because a worker process writes the file after save_image returns; "
            "pass a file name (or use torchvision.utils.save_image for file objects)")
    text = os.fspath(fp)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise ValueError(f"fp must name a file, got {text!r}")
    return os.path.abspath(text)


def _pixels_for_sink(grid: Any) -> Any:
    """What the sink gets: float32 as is (its rule is torchvision's), other floats as uint8."""
    torch = _torch()
    if grid.dtype == torch.float32 or not grid.is_floating_point():
        return grid
    # torchvision's ops in the grid's own dtype: the rounding of a half/double product matters
    out = grid.mul(255).add_(0.5).clamp_(0, 255)
    return torch.nan_to_num_(out, nan=0.0).to(torch.uint8)


def _prepare_input(tensor: Any, normalize: bool, pad_value: float) -> tuple[Any, float]:
    """Bring integer/bool inputs (which torchvision rejects) to a dtype the grid can use."""
    torch = _torch()
    t = _as_tensor(tensor)
    dtype = TORCH_DTYPES.get(str(t.dtype))
    if dtype is None:
        raise TypeError(f"unsupported dtype {t.dtype}; accepted: {ACCEPTED}")
    if dtype == "bool" or (normalize and dtype in ("uint8", "uint16")):
        return t.to(torch.float32), pad_value
    if dtype in ("uint8", "uint16"):  # written as is; pad_value keeps its 0..1 meaning
        full = 255 if dtype == "uint8" else 65535
        return t, float(min(max(math.floor(pad_value * full + 0.5), 0), full))
    return t, pad_value


class _Sinks:
    """The process-wide internal sinks, keyed by (folder, codec key, suffix)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.open: OrderedDict[tuple[str, str, str], AsyncImageSink] = OrderedDict()
        self.closing: list[tuple[threading.Thread, list[BaseException]]] = []
        # The threads closing sinks, by folder: a new sink for that folder waits for them, so
        # that saves to one path land in call order across an eviction.
        self.closing_in: dict[str, list[threading.Thread]] = {}

    def check_process(self) -> None:
        """After fork the parent's sinks (their threads, their workers) are not ours."""
        if os.getpid() != self.pid:
            self.pid = os.getpid()
            self.open = OrderedDict()
            self.closing = []
            self.closing_in = {}

    def sink_for(self, folder: str, key: str, suffix: str, nbytes: int) -> AsyncImageSink:
        """The open sink for this key (caller holds ``lock``), created or enlarged as needed."""
        index = (folder, key, suffix)
        sink = self.open.get(index)
        if sink is not None and sink.max_buffer_bytes < nbytes:
            del self.open[index]
            self._close_later(folder, sink)
            sink = None
        if sink is None:
            while len(self.open) >= MAX_OPEN_SINKS:
                (old_folder, _, _), oldest = self.open.popitem(last=False)
                self._close_later(old_folder, oldest)
            for thread in self.closing_in.pop(folder, []):
                thread.join()  # the earlier saves to this folder land first
            sink = AsyncImageSink(folder, workers=1, format=key,
                                  quality=PIL_DEFAULT_QUALITY.get(key),
                                  max_buffer_bytes=max(SINK_BUFFER_BYTES, 2 * nbytes),
                                  name="{index:08d}", overwrite=True, extension=suffix)
            self.open[index] = sink
        self.open.move_to_end(index)
        return sink

    def _close_later(self, folder: str, sink: AsyncImageSink) -> None:
        errors: list[BaseException] = []

        def close() -> None:
            try:
                sink.close()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=close, name="asyncdump-grid-close")
        thread.start()
        self.closing.append((thread, errors))
        for name in [f for f, threads in self.closing_in.items()
                     if not any(t.is_alive() for t in threads)]:
            del self.closing_in[name]  # closed already: nothing to wait for
        self.closing_in.setdefault(folder, []).append(thread)

    def flush(self, timeout: float | None) -> None:
        with self.lock:
            self.check_process()
            sinks = list(self.open.values())
            closing, self.closing = self.closing, []
        deadline = None if timeout is None else time.monotonic() + timeout
        errors: list[BaseException] = []
        for thread, thread_errors in closing:
            thread.join(_left(deadline))
            if thread.is_alive():
                with self.lock:
                    self.closing.append((thread, thread_errors))
                raise TimeoutError(f"save_image files not written after {timeout} s")
            errors += thread_errors
        for sink in sinks:
            try:
                sink.flush(_left(deadline))
            except AsyncDumpError as exc:
                errors.append(exc)
            except RuntimeError:  # closed meanwhile by an eviction: its close thread flushed it
                pass
        if errors:
            first = errors[0]
            if len(errors) == 1:
                raise first
            raise AsyncDumpError(f"{len(errors)} save_image folders had failures; first: {first}") \
                from first

    def close_all(self) -> None:
        """At interpreter exit: write what is pending, quietly; failures still warn."""
        with self.lock:
            if os.getpid() != self.pid:
                return
            sinks = list(self.open.values())
            self.open.clear()
            closing, self.closing = self.closing, []
        for thread, errors in closing:
            thread.join()
            for exc in errors:
                warnings.warn(f"asyncdump.save_image: {exc}", RuntimeWarning, stacklevel=1)
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:  # no caller is left to raise to
                warnings.warn(f"asyncdump.save_image: writing at exit failed: {exc}",
                              RuntimeWarning, stacklevel=1)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


_SINKS = _Sinks()
# Registered after _sink's own handler (this module imports _sink), so it runs before it:
# internal sinks are closed silently here, never reported as "not closed" by the user.
atexit.register(_SINKS.close_all)


# The parameters repeat make_grid's on purpose: both copy torchvision's signatures exactly, so
# that swapping the import is all a user changes (a shared **kwargs would hide them from IDEs).
def save_image(
    tensor: Any,
    fp: str | os.PathLike[str],
    nrow: int = 8,
    padding: int = 2,
    normalize: bool = False,
    value_range: tuple[float, float] | None = None,
    scale_each: bool = False,
    pad_value: float = 0.0,
    format: str | None = None,
) -> concurrent.futures.Future[list[Path]]:
    """``torchvision.utils.save_image``, asynchronous: same arguments, same pixels, same grid.

    Returns at once with a Future of ``[Path(fp)]``; ``asyncdump.flush()`` waits for all saves.
    Also takes uint8 (written as is), uint16 (16-bit PNG/TIFF) and bool (0/255) tensors, which
    torchvision rejects. ``fp`` must be a path: file objects are not supported.
    """
    path = _check_fp(fp)
    key, suffix = _resolve_format(path, format)
    _check_grid_args(nrow, padding, value_range, pad_value)
    prepared, pad = _prepare_input(tensor, normalize, pad_value)
    grid = make_grid(prepared, nrow=nrow, padding=padding, normalize=normalize,
                     value_range=value_range, scale_each=scale_each, pad_value=pad)
    pixels = _pixels_for_sink(grid)
    if pixels.device.type not in ("cpu", "cuda"):
        pixels = pixels.cpu()  # other accelerators: a synchronous copy, as torchvision does
    inspect(pixels, CODECS[key])  # shape/format errors now, before any sink is started
    folder, name = os.path.split(path)
    stem = name[: len(name) - len(suffix)] if suffix else name
    nbytes = pixels.numel() * pixels.element_size()
    with _SINKS.lock:
        _SINKS.check_process()
        sink = _SINKS.sink_for(folder, key, suffix, nbytes)
        return sink.submit(pixels, names=[stem])


def flush(timeout: float | None = None) -> None:
    """Wait until every ``save_image`` call made so far is on disk (or failed).

    Raises ``AsyncDumpError`` naming the files that failed since the last flush, and
    ``TimeoutError`` after ``timeout`` seconds.
    """
    _SINKS.flush(timeout)
