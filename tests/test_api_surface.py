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


def test_save_image_has_torchvisions_signature() -> None:
    """torchvision: ``save_image(tensor, fp, format=None, **kwargs)``, the kwargs being
    ``make_grid``'s options; here they are spelled out, keyword-only, with its defaults."""
    import inspect

    params = inspect.signature(asyncdump.save_image).parameters
    assert list(params)[:3] == ["tensor", "fp", "format"]
    assert all(params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in list(params)[:3])
    assert params["format"].default is None
    grid_options = {p: params[p].default for p in list(params)[3:]}
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in grid_options)
    assert grid_options == {"nrow": 8, "padding": 2, "normalize": False, "value_range": None,
                            "scale_each": False, "pad_value": 0.0}  # make_grid's defaults
    make_grid = inspect.signature(asyncdump.grid.make_grid).parameters
    assert {p: make_grid[p].default for p in list(make_grid)[1:]} == grid_options
