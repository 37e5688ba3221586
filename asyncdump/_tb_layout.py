"""SummaryWriter's image layout, planned for the sink (used by ``asyncdump.tensorboard``).

What ``SummaryWriter.add_image(s)`` does to a tensor, in the caller's thread:
``make_np`` -> ``convert_to_HWC`` (4 letters: its grid, 8 columns, no padding, black fill;
gray repeated to RGB) -> ``astype(float32) * 255``, clip to [0, 255], truncate (uint8 as is)
-> PIL PNG. Here the one copy into the staging buffer lays out the grid (tiles, gray -> RGB)
in the input's own dtype, and a worker applies the truncating rule and encodes.

Never imports torch: a tensor reaches it only when the caller already imported torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._protocol import FloatRule
from ._staging import _ITEMSIZE, Batch, _host_view, _torch_dtype_names, torch_module

GRID_COLUMNS = 8  # SummaryWriter's make_grid(I, ncols=8)
TRUNCATE = FloatRule((0.0, 1.0), None, None, truncate=True)
ACCEPTED_DTYPES = ("float16", "bfloat16", "float32", "float64", "uint8", "bool")
_LETTERS = {4: "NCHW", 3: "CHW", 2: "HW"}


@dataclass(frozen=True)
class Plan:
    """Where each input image goes: ``perm`` views the input as (N, C, H, W), (C, H, W) or
    (H, W); the picture is ``rows`` x ``cols`` tiles of ``height`` x ``width``."""

    perm: tuple[int, ...]
    count: int
    channels: int  # of the input
    height: int
    width: int
    rows: int
    cols: int
    channels_last: bool  # the input's C is its last axis: stage the picture as HWC

    @property
    def out_channels(self) -> int:
        return 3 if self.channels == 1 else self.channels

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the picture TensorBoard shows."""
        return self.out_channels, self.rows * self.height, self.cols * self.width


def plan(shape: tuple[int, ...], dataformats: Any) -> Plan:
    """Check ``shape`` against ``dataformats`` as SummaryWriter does; raise ValueError naming
    the problem (where SummaryWriter raises, and for what it would write but asyncdump does not)."""
    if not isinstance(dataformats, str):
        raise TypeError(f"dataformats must be a str such as 'NCHW', 'NHWC', 'CHW', 'HWC' or 'HW', "
                        f"got {type(dataformats).__name__}")
    if len(set(dataformats)) != len(dataformats):
        raise ValueError(f"dataformats {dataformats!r} uses a letter twice")
    if len(shape) != len(dataformats):
        raise ValueError(f"the tensor has {len(shape)} dimensions {tuple(shape)} but dataformats "
                         f"{dataformats!r} has {len(dataformats)} letters")
    fmt = dataformats.upper()
    letters = _LETTERS.get(len(fmt))
    if letters is None or sorted(fmt) != sorted(letters):
        raise ValueError(f"dataformats must be an ordering of NCHW (a batch), CHW or HW (one image), "
                         f"got {dataformats!r}")
    perm = tuple(fmt.find(c) for c in letters)
    dims = dict(zip(letters, (shape[i] for i in perm), strict=True))
    count, channels = dims.get("N", 1), dims.get("C", 1)
    height, width = dims["H"], dims["W"]
    if len(fmt) == 4:
        if channels not in (1, 3):
            raise ValueError(f"add_images takes 1 or 3 channels (SummaryWriter's grid has no "
                             f"alpha), got {channels} in shape {tuple(shape)} ({dataformats})")
        if count < 1:
            raise ValueError(f"add_images needs at least one image, got shape {tuple(shape)}")
    elif channels not in (1, 3, 4):
        raise ValueError(f"an image must have 1, 3 or 4 channels, got {channels} in shape "
                         f"{tuple(shape)} ({dataformats})")
    if height < 1 or width < 1:
        raise ValueError(f"cannot write an empty image: shape {tuple(shape)} ({dataformats})")
    cols = min(count, GRID_COLUMNS) if len(fmt) == 4 else 1
    rows = math.ceil(count / cols)
    channels_last = fmt.endswith("C") and channels > 1
    return Plan(perm, count, channels, height, width, rows, cols, channels_last)


def host_batch(images: Any, dataformats: Any) -> tuple[Batch | None, Plan]:
    """Check ``images``; a numpy array or CPU tensor becomes a one-image Batch that lays
    itself out in the buffer (None for a CUDA tensor: see ``device_picture``)."""
    torch = torch_module()
    is_tensor = torch is not None and isinstance(images, torch.Tensor)
    if not is_tensor and not isinstance(images, np.ndarray):
        raise TypeError(f"img_tensor must be a torch.Tensor or numpy.ndarray, got {type(images).__name__}")
    dtype = _torch_dtype_names(torch).get(images.dtype) if is_tensor else images.dtype.name
    if dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"unsupported dtype {images.dtype} for a TensorBoard image; accepted: "
                        f"{', '.join(ACCEPTED_DTYPES)} (floats in [0, 1], uint8 in [0, 255])")
    layout = plan(tuple(images.shape), dataformats)
    if is_tensor and not images.is_cpu:
        if not images.is_cuda:
            raise ValueError(f"tensors on {images.device.type!r} are not supported; "
                             "pass a CPU or CUDA tensor (or call .cpu())")
        return None, layout
    array = _host_view(torch, images, dtype) if is_tensor else images
    source = array.transpose(layout.perm)
    channels, height, width = layout.shape
    stored = array.dtype.newbyteorder("=")  # bfloat16: its bits as uint16, as the sink stages it

    def fill(start: int, stop: int, destination: np.ndarray) -> None:
        _lay_out(source, layout, destination.view(stored))

    batch = Batch(source, False, 1, channels, height, width, dtype,
                  "nhwc" if layout.channels_last else "nchw",
                  channels * height * width * _ITEMSIZE[dtype], fill=fill, rule=TRUNCATE)
    return batch, layout


def _tiles(flat: np.ndarray, layout: Plan) -> np.ndarray:
    """The staged picture as a (rows, cols, C, H, W) view of ``flat`` (its buffer region)."""
    c, r, k, h, w = layout.out_channels, layout.rows, layout.cols, layout.height, layout.width
    if layout.channels_last:
        return flat.reshape(r, h, k, w, c).transpose(0, 2, 4, 1, 3)
    return flat.reshape(c, r, h, k, w).transpose(1, 3, 0, 2, 4)


def _lay_out(source: np.ndarray, layout: Plan, flat: np.ndarray) -> np.ndarray:
    """Copy ``source`` (N, C, H, W), (C, H, W) or (H, W) into ``flat`` as TensorBoard's
    picture: tiles in rows of ``cols``, gray broadcast to three channels, black fill."""
    images = source.reshape((1,) * (4 - source.ndim) + source.shape)  # -> (N, C, H, W)
    tiles = _tiles(flat, layout)
    full = layout.count // layout.cols  # complete rows of tiles
    if full:
        rows = images[:full * layout.cols].reshape(full, layout.cols, *images.shape[1:])
        np.copyto(tiles[:full], rows, casting="equiv")
    rest = layout.count - full * layout.cols
    if rest:
        np.copyto(tiles[full, :rest], images[full * layout.cols:], casting="equiv")
        tiles[full, rest:] = 0
    return flat


def device_picture(images: Any, layout: Plan) -> Any:
    """SummaryWriter's picture of a device tensor, made on its device: a uint8 (C, H, W)
    tensor (``* 255`` in float32, NaN -> 0, clip, truncate, tiles); no host synchronisation."""
    torch = torch_module()
    x = images.detach().permute(layout.perm)
    if x.dtype == torch.uint8:
        y = x
    elif x.dtype == torch.bool:
        y = x.to(torch.uint8) * 255
    else:
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float16)  # what SummaryWriter's make_np does first
        y = torch.nan_to_num(x.float() * 255.0, nan=0.0).clamp_(0.0, 255.0).to(torch.uint8)
    y = y.reshape((1,) * (4 - y.dim()) + tuple(y.shape))
    picture = torch.empty(layout.shape, dtype=torch.uint8, device=y.device)
    tiles = picture.view(layout.out_channels, layout.rows, layout.height, layout.cols,
                         layout.width).permute(1, 3, 0, 2, 4)
    full = layout.count // layout.cols
    if full:
        tiles[:full].copy_(y[:full * layout.cols].reshape(full, layout.cols, *y.shape[1:]))
    rest = layout.count - full * layout.cols
    if rest:
        tiles[full, :rest].copy_(y[full * layout.cols:])
        tiles[full, rest:].zero_()
    return picture
