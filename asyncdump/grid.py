"""``save_image`` / ``make_grid``: torchvision's drop-ins, written by process-wide sinks.

    from asyncdump import save_image          # was: from torchvision.utils import save_image
    save_image(fake, f"samples/{step}.png", nrow=8, normalize=True, value_range=(-1, 1))

    caller's thread, float32/uint8      checks, then stages the batch as it is: CPU, one copy into
    on CPU or CUDA (the common case)    the shared buffer; CUDA, torchvision's normalisation and
                                        rounding on the GPU (min/max stay device tensors, no sync)
                                        and an asynchronous copy of the uint8 batch
      -> worker process (_tile)         converts each image by the rule (CPU input: with the
                                        batch's or each image's min/max for normalize=True
                                        without value_range) and tiles the grid as make_grid
                                        does, padding included; then encodes and writes
    caller's thread, other dtypes       make_grid with torchvision's algorithm on the tensor's
    (float16/bfloat16/float64, uint16)  device, in its dtype (torchvision rounds in that dtype),
                                        and the grid is handed on as one image
      -> internal AsyncImageSink        one per (folder of fp, format, suffix), created on first
                                        use, one worker each (so repeated saves to one path land
                                        in call order), overwrite=True; at most
                                        ``MAX_OPEN_SINKS`` open, the least recently used one is
                                        closed in the background (a new sink for its folder
                                        waits for that close: call order holds across it)
    flush()                             waits for every internal sink; also run at exit

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
from ._protocol import GridSpec
from ._sink import AsyncImageSink
from ._staging import ACCEPTED, TORCH_DTYPES, inspect
from ._stores import is_url

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
    if is_url(text):  # an object store: the sink of its "folder" PUTs it (docs/object-storage.md)
        if text.endswith("/") or text.rstrip("/").count("/") < 3:
            raise ValueError(f"fp must name an object inside a bucket, got {text!r}")
        return text
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise ValueError(f"fp must name a file, got {text!r}")
    return os.path.abspath(text)


def _pixels_for_sink(grid: Any) -> Any:
    """What the sink gets: float32 as is (its rule is torchvision's), other floats as uint8."""
    torch = _torch()
    if grid.dtype == torch.float32 or not grid.is_floating_point():
        return grid
    # torchvision's ops in the grid's own dtype: the rounding of a half/double product matters.
    # NaN -> -inf first, so NaN ends as 0 whatever the clamp does with NaN (issue 18).
    out = torch.nan_to_num(grid, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return out.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


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


def _stage_for_workers(t: Any, nrow: int, padding: int, normalize: bool,
                       value_range: tuple[float, float] | None, scale_each: bool, pad: float,
                       key: str) -> tuple[Any, GridSpec] | None:
    """The batch as the workers tile it, and its GridSpec; None where the caller builds the
    grid (float16/bfloat16/float64, whose rounding torchvision does in their own dtype; uint16;
    devices other than CPU and CUDA).

    CPU: the batch as it is (one copy into the buffer in ``submit``); the worker converts,
    normalises (its own min/max when no ``value_range``) and tiles. CUDA: converted to uint8
    here, on the GPU, with min/max as device tensors (no synchronisation), as the sink's own
    CUDA path converts; the worker tiles.
    """
    torch = _torch()
    if t.dtype not in (torch.float32, torch.uint8) or t.device.type not in ("cpu", "cuda"):
        return None
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"save_image/make_grid take (B, C, H, W), (C, H, W), (H, W) or a list "
                         f"of (C, H, W) tensors; got shape {tuple(t.shape)}")
    if t.size(0) == 0:
        raise ValueError("save_image got an empty batch (B = 0): there is nothing to save")
    inspect(t, CODECS[key])  # shape/format errors now, before any sink is started
    b, c, h, w = (int(n) for n in t.shape)
    if t.dtype == torch.uint8:
        pad_pixel, dtype, rule_range = int(pad), "uint8", None
    else:
        pad_pixel = _pad_pixel(pad)
        if t.device.type == "cuda":
            t = _to_uint8_on_device(t, normalize, value_range, scale_each)
            dtype, rule_range = "uint8", None
        else:
            dtype = "float32"
            rule_range = (0.0, 1.0) if not normalize else None if value_range is None else (
                float(value_range[0]), float(value_range[1]))
    spec = GridSpec(b, c, h, w, dtype, nrow, padding, pad_pixel, rule_range,
                    normalize and scale_each)
    return t.reshape(1, 1, b * c * h, w), spec


def _pad_pixel(pad_value: float) -> int:
    """The padding's byte: torchvision's mul(255).add_(0.5).clamp_(0, 255) in float32, cast."""
    value = np.float32(pad_value) * np.float32(255) + np.float32(0.5)
    return 0 if np.isnan(value) else int(min(max(value, 0.0), 255.0))


def _to_uint8_on_device(t: Any, normalize: bool, value_range: tuple[float, float] | None,
                        scale_each: bool) -> Any:
    """torchvision's normalisation and rounding on the GPU: nothing waits for it here."""
    torch = _torch()
    with torch.no_grad():
        if normalize:
            t = t.clone()
            _normalize_(t, value_range, scale_each)
        out = t.mul(255).add_(0.5).clamp_(0, 255)
        return torch.nan_to_num_(out, nan=0.0).to(torch.uint8)


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


# torchvision's signature is save_image(tensor, fp, format=None, **kwargs), the kwargs going to
# make_grid. The grid options are spelled out here as keyword-only parameters with make_grid's
# defaults: the same calls are valid (format third, options by keyword only), an unknown option
# is a TypeError as there, and IDEs can show them.
def save_image(
    tensor: Any,
    fp: str | os.PathLike[str],
    format: str | None = None,
    *,
    nrow: int = 8,
    padding: int = 2,
    normalize: bool = False,
    value_range: tuple[float, float] | None = None,
    scale_each: bool = False,
    pad_value: float = 0.0,
) -> concurrent.futures.Future[list[Path]]:
    """``torchvision.utils.save_image``, asynchronous: same arguments, same pixels, same grid.

    Returns at once with a Future of ``[Path(fp)]``; ``asyncdump.flush()`` waits for all saves.
    ``fp`` may be an fsspec URL (``"s3://bucket/samples/x.png"``): the Future then gives the
    URL, once the store acknowledged the object (docs/object-storage.md).
    Also takes uint8 (written as is), uint16 (16-bit PNG/TIFF) and bool (0/255) tensors, which
    torchvision rejects. ``fp`` must be a path: file objects are not supported.
    """
    path = _check_fp(fp)
    key, suffix = _resolve_format(path, format)
    _check_grid_args(nrow, padding, value_range, pad_value)
    prepared, pad = _prepare_input(tensor, normalize, pad_value)
    folder, name = os.path.split(path)
    stem = name[: len(name) - len(suffix)] if suffix else name
    staged = _stage_for_workers(prepared, nrow, padding, normalize, value_range, scale_each, pad,
                                key)
    if staged is not None:  # float32 and uint8 on CPU/CUDA: the workers build the grid
        batch, spec = staged
        with _SINKS.lock:
            _SINKS.check_process()
            sink = _SINKS.sink_for(folder, key, suffix, batch.numel() * batch.element_size())
            return sink._submit_grid(batch, stem, spec)
    grid = make_grid(prepared, nrow=nrow, padding=padding, normalize=normalize,
                     value_range=value_range, scale_each=scale_each, pad_value=pad)
    pixels = _pixels_for_sink(grid)
    if pixels.device.type not in ("cpu", "cuda"):
        pixels = pixels.cpu()  # other accelerators: a synchronous copy, as torchvision does
    inspect(pixels, CODECS[key])  # shape/format errors now, before any sink is started
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
