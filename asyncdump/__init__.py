"""asyncdump: save images from PyTorch loops without waiting for encoding or disk.

    from asyncdump import AsyncImageSink
    with AsyncImageSink("samples", format="png") as sink:
        for step, batch in enumerate(loader):
            ...
            sink.submit(fake_images, step=step)   # returns at once
"""

from ._errors import AsyncDumpError, BufferFullError, DatasetError
from ._sink import AsyncImageSink
from ._stats import SinkStats
from .dataset import DatasetSink, DatasetSummary, write_dataset
from .grid import flush, save_image

__version__ = "0.1.0"

__all__ = [
    "AsyncDumpError",
    "AsyncImageSink",
    "BufferFullError",
    "DatasetError",
    "DatasetSink",
    "DatasetSummary",
    "SinkStats",
    "__version__",
    "flush",
    "save_image",
    "write_dataset",
]
