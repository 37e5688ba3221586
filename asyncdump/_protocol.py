"""The wire protocol between a sink's collector thread and its worker processes.

Pixels never cross it: a job names offsets into the shared buffer. Every message is one of the
records below, pickled over the worker's socket. Imports nothing heavy, because the worker
(numpy and cv2, never torch) imports it too.

    parent -> worker   RunJob · Probe · Stop
    worker -> parent   Ready once it has started, then per image of a file job
                           with fsync only: Encoded (the complete temp file is on disk, the
                           pixels may be reused while the fsyncs run),
                           then Written (renamed to its final name) or Failed;
                       per image of an encode-only job EncodedBytes or Failed;
                       ProbeAnswer per Probe.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple


class FloatRule(NamedTuple):
    """The float -> 8-bit rule for one channel count (docs/inputs.md): mean/std per channel."""

    value_range: tuple[float, float]
    mean: list[float] | None
    std: list[float] | None
    truncate: bool = False  # TensorBoard's rule: floor(y * 255) instead of rounding half up


class GridSpec(NamedTuple):
    """``save_image``'s grid, tiled by the worker from a staged B x C x H x W batch (``_tile``)."""

    images: int
    channels: int
    height: int
    width: int
    dtype: str  # "float32" (converted by the rule) | "uint8" (as is)
    nrow: int
    padding: int
    pad_pixel: int  # the padding's 8-bit value, as torchvision computes it from pad_value
    value_range: tuple[float, float] | None  # None: the images' own min/max (normalize=True)
    scale_each: bool  # with value_range None: min/max per image, not per batch


class ImageSpec(NamedTuple):
    """What a worker needs to read one staged image and pick its encoder."""

    channels: int
    height: int
    width: int
    dtype: str  # what the buffer holds: the input dtype, or uint8/uint16 when converted
    layout: str  # "nchw" | "nhwc"
    converted: bool  # staged on the GPU: already in the encoder's layout and channel order
    encoder: str = "opencv"  # "fpng" (RGB order) | "opencv" (BGR order)
    rule: FloatRule | None = None  # for float input converted by the worker
    grid: GridSpec | None = None  # save_image: the staged "image" is a batch to tile


class JobSettings(NamedTuple):
    """Shared by every job of one batch."""

    spec: ImageSpec
    image_bytes: int
    extension: str  # given to cv2.imencode
    params: tuple[tuple[str, int], ...]  # OpenCV flags by name, e.g. (("IMWRITE_PNG_COMPRESSION", 1),)
    fsync: bool = False
    return_bytes: bool = False  # encode only: send the file's bytes home instead of writing
    sha256: bool = False  # hash each file and send the digest home
    store: Any = None  # a _stores.StoreSpec: PUT each file to this object store instead
    root: str = ""  # the sink's root: every path is below it, written relative to its folder fds
    overwrite: bool = True  # False: never replace an existing file (FileExistsError)


class Item(NamedTuple):
    """One image of a job."""

    position: int  # in its batch
    final: str  # the path it is renamed to
    temp: str  # the hidden temp file it is written to first
    offset: int  # where its pixels start in the shared buffer


class RunJob(NamedTuple):
    """Encode (and write) consecutive images of one batch, in order."""

    job_id: int
    items: list[Item]
    settings: JobSettings


class Probe(NamedTuple):
    """Diagnostics: answer with this process's ``sys.modules``."""

    probe_id: int


class Stop(NamedTuple):
    """Exit once the jobs before this message are done."""


class Ready(NamedTuple):
    pid: int


class Encoded(NamedTuple):
    job_id: int
    position: int  # of the image in its batch


class Written(NamedTuple):
    job_id: int
    position: int  # of the image in its batch
    nbytes: int
    sha256: str | None  # the file's hex digest when the job asked for it


class EncodedBytes(NamedTuple):
    job_id: int
    position: int  # of the image in its batch
    data: bytes
    sha256: str | None


class Failed(NamedTuple):
    job_id: int
    position: int  # of the image in its batch
    errno: int | None  # set when the cause was an OSError (ENOSPC, EACCES, ...)
    message: str
    traceback: str


class ProbeAnswer(NamedTuple):
    probe_id: int
    pid: int
    modules: list[str]


ToWorker = RunJob | Probe | Stop
Report = Ready | Encoded | Written | EncodedBytes | Failed | ProbeAnswer


def framed(messages: Iterable[Any]) -> bytes:
    """``messages`` pickled and framed as ``multiprocessing.connection.Connection`` frames them
    (a signed 4-byte length, then the bytes): written in one go, ``Connection.recv`` reads
    each. For sends that must not wait (the pool's outboxes) and reports sent together."""
    return b"".join(struct.pack("!i", len(data)) + data
                    for data in map(ForkingPickler.dumps, messages))
