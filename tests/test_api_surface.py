"""The public surface is a contract: pin it."""

from pathlib import Path

import asyncdump
from asyncdump import AsyncDumpError, BufferFullError, DatasetError


def test_all_is_pinned_and_sorted() -> None:
    assert asyncdump.__all__ == sorted(asyncdump.__all__)
    assert set(asyncdump.__all__) == {"AsyncDumpError", "AsyncImageSink", "BufferFullError",
                                      "DatasetError", "DatasetSink", "DatasetSummary", "SinkStats",
                                      "__version__", "flush", "save_image", "write_dataset"}
    for name in asyncdump.__all__:
        assert hasattr(asyncdump, name), name


def test_version_and_typed_marker() -> None:
    assert isinstance(asyncdump.__version__, str) and asyncdump.__version__
    assert (Path(asyncdump.__file__).parent / "py.typed").exists()


def test_error_hierarchy() -> None:
    assert issubclass(BufferFullError, AsyncDumpError)
    assert issubclass(DatasetError, AsyncDumpError)
    assert issubclass(AsyncDumpError, Exception)


def test_import_does_not_import_torch_or_cv2() -> None:
    import subprocess
    import sys

    code = "import sys, asyncdump; print('torch' in sys.modules, 'cv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_save_image_has_torchvisions_signature_plus_format() -> None:
    import inspect

    params = inspect.signature(asyncdump.save_image).parameters
    assert list(params) == ["tensor", "fp", "nrow", "padding", "normalize", "value_range",
                            "scale_each", "pad_value", "format"]
    assert [params[p].default for p in list(params)[2:]] == [8, 2, False, None, False, 0.0, None]
