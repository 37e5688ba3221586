"""Validate what ``submit`` got and copy host batches into the staging buffer.

It never imports torch: a tensor can only reach ``submit`` if the caller already imported
torch, so ``sys.modules`` has it. CUDA batches are staged by ``_device``.

    numpy array / CPU tensor   one copy of the raw values into the buffer (numpy's single-
                               threaded copy: torch's threaded ``copy_`` wakes its pool on every
                               call and steals the workers' cores); the worker converts.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._codecs import Codec
from ._protocol import FloatRule, ImageSpec

NUMPY_DTYPES = {"float16", "float32", "float64", "uint8", "uint16", "bool"}
TORCH_DTYPES = {
    "torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32",
    "torch.float64": "float64", "torch.uint8": "uint8", "torch.uint16": "uint16",
    "torch.bool": "bool",
}
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
ACCEPTED = "float16, bfloat16 (torch), float32, float64, uint8, uint16, bool"
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
             "uint8": 1, "uint16": 2, "bool": 1}


@dataclass(frozen=True)
class Conversion:
    """The float -> 8-bit rule's parameters (docs/api.md)."""

    value_range: tuple[float, float]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def parse(cls, value_range: Any, mean: Any, std: Any) -> Conversion:
        """Validate the sink's ``value_range``/``mean``/``std`` arguments."""
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise ValueError(f"value_range must be a pair of numbers (lo, hi), got {value_range!r}") \
                from None
        if not lo < hi:
            raise ValueError(f"value_range must have lo < hi, got {value_range!r}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (as for transforms.Normalize) or neither")
        if mean is None:
            return cls((lo, hi), None, None)
        try:
            mean_t = tuple(float(v) for v in mean)
            std_t = tuple(float(v) for v in std)
        except (TypeError, ValueError):
            raise ValueError(f"mean and std must be sequences of numbers, got {mean!r}, {std!r}") \
                from None
        if not mean_t or len(mean_t) != len(std_t):
            raise ValueError(f"mean and std must have the same length (1 or one per channel), "
                             f"got {len(mean_t)} and {len(std_t)}")
        return cls((lo, hi), mean_t, std_t)

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a handful of channel counts per sink
    def for_channels(self, channels: int) -> FloatRule:
        """The parameters a worker needs, with mean/std broadcast to ``channels``."""
        def fit(values: tuple[float, ...] | None, what: str) -> list[float] | None:
            if values is None:
                return None
            if len(values) == 1:
                return list(values) * channels
            if len(values) != channels:
                raise ValueError(f"{what} has {len(values)} values but the images have "
                                 f"{channels} channel(s); give one value or one per channel")
            return list(values)
        return FloatRule(self.value_range, fit(self.mean, "mean"), fit(self.std, "std"))


@dataclass(frozen=True)
class Batch:
    """A validated batch: what is copied into the buffer, in which layout and dtype."""

    source: Any  # numpy array (B, C, H, W) or (B, H, W, C) per ``layout``, or a CUDA tensor
    on_cuda: bool
    count: int
    channels: int
    height: int
    width: int
    dtype: str  # what the buffer holds: the input dtype, or uint8/uint16 for the GPU path
    layout: str  # "nchw" | "nhwc"
    image_bytes: int
    # Set by callers that lay the pixels out themselves (asyncdump.tensorboard's grids):
    fill: Callable[[int, int, np.ndarray], None] | None = None  # (start, stop, destination)
    rule: FloatRule | None = None  # instead of the sink's float rule

    def spec(self, encoder: str, rule: FloatRule | None) -> ImageSpec:
        """The per-image description a worker needs; ``rule`` only where the worker converts."""
        needs_rule = not self.on_cuda and self.dtype in FLOAT_DTYPES
        return ImageSpec(self.channels, self.height, self.width, self.dtype, self.layout,
                         self.on_cuda, encoder, rule if needs_rule else None)


@functools.lru_cache(maxsize=1)
def _torch_dtype_names(torch: Any) -> dict[Any, str]:
    """``TORCH_DTYPES`` keyed by the dtype objects of this torch (older ones lack uint16)."""
    return {getattr(torch, name.split(".")[1]): value for name, value in TORCH_DTYPES.items()
            if hasattr(torch, name.split(".")[1])}


def torch_module() -> Any:
    """torch if the program imported it, else None (this module never imports it)."""
    return sys.modules.get("torch")


CHANNELS = (1, 3, 4)
_SHAPES = "(B, C, H, W), (C, H, W) or (H, W)"
_CHANNELS_LAST_HINT = " (channels-last arrays: pass arr.transpose(2, 0, 1), or (0, 3, 1, 2) for a batch)"


def _shape_error(shape: Sequence[int]) -> ValueError:
    return ValueError(f"images must have shape {_SHAPES} with C in {{1, 3, 4}} (channels) and "
                      f"H, W >= 1; got shape {tuple(shape)}")


def _channels_error(shape: Sequence[int], channels: int) -> ValueError:
    hint = _CHANNELS_LAST_HINT if len(shape) in (3, 4) and shape[-1] in CHANNELS else ""
    return ValueError(f"images must have 1, 3 or 4 channels (C in {{1, 3, 4}} of shape "
                      f"{_SHAPES}); got {channels} channels in shape {tuple(shape)}{hint}")


def inspect(images: Any, codec: Codec) -> Batch:
    """Check type, shape, dtype and format support; raise TypeError/ValueError naming the fix."""
    torch = torch_module()
    is_tensor = torch is not None and isinstance(images, torch.Tensor)
    if not is_tensor and not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a torch.Tensor or numpy.ndarray, got {type(images).__name__}")
    if is_tensor:
        images = _plain_tensor(torch, images)
    elif isinstance(images, np.matrix):  # always 2-D, and reshape keeps it 2-D: one (H, W) image
        images = np.asarray(images)
    array: np.ndarray | None = None if is_tensor else images
    dtype = _torch_dtype_names(torch).get(images.dtype) if is_tensor else None
    if is_tensor and dtype is not None and images.is_cpu:
        array = _host_view(torch, images, dtype)  # its shape costs less than the tensor's
    shape = tuple(images.shape) if array is None else array.shape
    if len(shape) == 2:
        shape4 = (1, 1, *shape)
    elif len(shape) == 3:
        shape4 = (1, *shape)
    elif len(shape) == 4:
        shape4 = shape
    else:
        raise _shape_error(shape)
    count, channels, height, width = shape4
    if channels not in CHANNELS:
        raise _channels_error(shape, channels)
    if height < 1 or width < 1:
        raise _shape_error(shape)

    if not is_tensor:
        dtype = images.dtype.name if images.dtype.name in NUMPY_DTYPES else None
    if dtype is None:
        raise TypeError(f"unsupported dtype {images.dtype}; accepted: {ACCEPTED}")
    out_depth = "uint16" if dtype == "uint16" else "uint8"
    fmt = codec.extension[1:]
    if out_depth not in codec.dtypes:
        raise ValueError(f"format {fmt!r} cannot store 16-bit images; use png or tiff, "
                         "or convert to uint8 / float first")
    if channels not in codec.channels:
        raise ValueError(f"format {fmt!r} cannot store {channels}-channel images "
                         f"({codec.note or 'unsupported'}); use png, webp or tiff for RGBA")

    on_cuda = bool(is_tensor and images.is_cuda)
    if is_tensor and not on_cuda and not images.is_cpu:
        raise ValueError(f"tensors on {images.device.type!r} are not supported; "
                         "pass a CPU or CUDA tensor (or call .cpu())")
    if on_cuda:
        source = images.detach().reshape(shape4)
        stored = out_depth
        layout = "nhwc"
    else:
        assert array is not None
        array = array.reshape(shape4) if array.ndim != 4 else array
        stored = dtype
        source, layout = array, "nchw"
        if not array.flags.c_contiguous:
            channels_last = array.transpose(0, 2, 3, 1)
            if channels_last.flags.c_contiguous:
                source, layout = channels_last, "nhwc"
    image_bytes = channels * height * width * _ITEMSIZE[stored]
    return Batch(source, on_cuda, count, channels, height, width, stored, layout, image_bytes)


def _plain_tensor(torch: Any, tensor: Any) -> Any:
    """``tensor`` as a dense tensor whose memory holds its values: ``TypeError`` for nested and
    sparse tensors; the negative bit of a lazy view (``z.conj().imag``) is resolved (a copy)."""
    if tensor.is_nested:
        raise TypeError("nested tensors are not supported; pass a regular tensor (for images of one "
                        "shape, torch.stack(t.unbind())) or submit each image of t.unbind()")
    if tensor.layout != torch.strided:
        raise TypeError(f"tensors with layout {tensor.layout} are not supported; pass a dense "
                        "(strided) tensor, e.g. t.to_dense()")
    if tensor.is_neg():
        return tensor.detach().resolve_neg()
    return tensor


def _host_view(torch: Any, tensor: Any, dtype: str) -> np.ndarray:
    """The numpy view of a CPU tensor's values (bfloat16: its raw bits as uint16)."""
    if tensor.requires_grad:  # numpy() refuses it
        tensor = tensor.detach()
    if dtype == "bfloat16":  # numpy has no bfloat16
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def copy_into_buffer(batch: Batch, start: int, stop: int, destination: np.ndarray) -> None:
    """Copy images ``start:stop`` of a host batch into a uint8 view of the buffer (one memcpy
    when the source is contiguous)."""
    if batch.fill is not None:
        batch.fill(start, stop, destination)
        return
    part = batch.source[start:stop]
    storage = "uint16" if batch.dtype == "bfloat16" else batch.dtype
    # "equiv": a byte-swapped (big-endian) array is converted, never reinterpreted
    np.copyto(destination.view(storage).reshape(part.shape), part, casting="equiv")
