"""Issue 19, "Smaller" items: inputs and name fields that used to raise torch's, numpy's or
their own errors, the errno said twice in failures, and what workers print on stderr.

Real sinks, real workers, real files. What a worker prints is checked in a child process
whose stderr the workers inherit.
"""

from __future__ import annotations

import copy
import errno
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import read_rgb, torchvision_pixels

from asyncdump import AsyncDumpError, AsyncImageSink


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncImageSink]:
    with AsyncImageSink(tmp_path_factory.mktemp("small"), workers=1, value_range=(-1, 1)) as shared:
        yield shared


def refused_and_still_usable(sink: AsyncImageSink, bad: Any, error: type[Exception], match: str) -> None:
    """``submit(bad)`` raises ``error``, stages nothing, and the next batch is written."""
    before = sink.stats.submitted
    with pytest.raises(error, match=match):
        sink.submit(bad)
    assert sink.stats.submitted == before
    [path] = sink.submit(np.zeros((3, 4, 4), np.uint8)).result(timeout=60)
    assert path.exists() and sink.stats.submitted == before + 1


# ---------------------------------------------------------------------- item 1: inputs
def _nested(layout: Any) -> torch.Tensor:
    images = [torch.rand(3, 4, 4), torch.rand(3, 5, 4)]
    with warnings.catch_warnings():  # "the PyTorch API of nested tensors is in prototype stage"
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor(images, layout=layout)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("make, match", [
    (lambda: _nested(torch.strided), "nested tensors are not supported; pass a regular tensor"),
    (lambda: _nested(torch.jagged), "nested tensors are not supported; pass a regular tensor"),
    (lambda: torch.rand(3, 4, 4).to_sparse(), r"layout torch.sparse_coo are not supported; .*to_dense"),
    (lambda: torch.rand(4, 4).to_sparse_csr(), r"layout torch.sparse_csr are not supported; .*to_dense"),
], ids=["nested", "nested-jagged", "sparse-coo", "sparse-csr"])
def test_nested_and_sparse_tensors_are_type_errors(sink: AsyncImageSink,
                                                   make: Callable[[], torch.Tensor], match: str) -> None:
    refused_and_still_usable(sink, make(), TypeError, match)


def _neg_view(x: torch.Tensor) -> torch.Tensor:
    return (-x)._neg_view()


def _channels_last_neg_view(x: torch.Tensor) -> torch.Tensor:
    return (-x).contiguous(memory_format=torch.channels_last)._neg_view()


def _conj_imag(x: torch.Tensor) -> torch.Tensor:
    return torch.complex(torch.zeros_like(x), -x).conj().imag


@pytest.mark.parametrize("view_of, dtype", [
    (view_of, dtype) for view_of in (_neg_view, _channels_last_neg_view)
    for dtype in (torch.float32, torch.float64, torch.bfloat16)
] + [(_conj_imag, torch.float32), (_conj_imag, torch.float64)],  # no complex bfloat16
    ids=lambda v: getattr(v, "__name__", str(v).removeprefix("torch.")).lstrip("_"))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_negative_bit_tensors_are_written_with_their_values(
        sink: AsyncImageSink, view_of: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
        device: str) -> None:
    """Views whose values are x, with the negative bit set (``z.conj().imag`` makes them)."""
    x = (torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1).to(dtype)
    view = view_of(x.to(device))
    assert view.is_neg() and torch.equal(view.resolve_neg().cpu(), x)
    paths = sink.submit(view).result(timeout=60)
    assert view.is_neg()  # the caller's tensor is left as it was
    for i, path in enumerate(paths):
        expected = torchvision_pixels(x[i].float(), (-1, 1)).astype(int)
        tolerance = 1 if device == "cuda" else 0  # docs/api.md: the GPU's float math may round apart
        assert np.abs(read_rgb(path).astype(int) - expected).max() <= tolerance


@pytest.mark.filterwarnings("ignore:the matrix subclass is not the recommended way")
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_np_matrix_is_one_gray_image(sink: AsyncImageSink, dtype: type) -> None:
    values = np.random.default_rng(4).random((5, 7)) * 2 - 1
    matrix = np.matrix(values * 127 + 128 if dtype is np.uint8 else values, dtype=dtype)
    [path] = sink.submit(matrix).result(timeout=60)
    plain = np.asarray(matrix)
    expected = plain if dtype is np.uint8 else torchvision_pixels(torch.from_numpy(plain)[None], (-1, 1))
    np.testing.assert_array_equal(read_rgb(path), expected)


class Unformattable:
    def __format__(self, spec: str) -> str:
        raise RuntimeError("no format for you")


def test_name_field_whose_format_raises_is_a_value_error_naming_it(root: Path) -> None:
    with AsyncImageSink(root, workers=1, name="{tag}_{index}") as named:
        with pytest.raises(ValueError, match=r"'\{tag\}_\{index\}' failed to format field \{tag\}: "
                                             r"RuntimeError: no format for you; each field needs"):
            named.submit(np.zeros((2, 3, 4, 4), np.uint8), tag=Unformattable())
        assert named.stats.submitted == 0
        [path] = named.submit(np.zeros((3, 4, 4), np.uint8), tag="ok").result(timeout=60)
    assert path == root / "ok_0.png" and path.exists()  # the refused batch used up no index


# ---------------------------------------------------------------------- item 2: errno once
def test_failed_write_says_its_errno_once(root: Path) -> None:
    root.mkdir()
    (root / "a").write_text("a file where a folder would go")
    (root / "taken.png").write_text("an existing file")
    with AsyncImageSink(root, workers=1, on_error="ignore") as failing:
        future = failing.submit(np.zeros((2, 3, 4, 4), np.uint8), names=["a/b", "taken"])
        with pytest.raises(AsyncDumpError) as caught:
            future.result(timeout=60)
    causes = dict(caught.value.failures)
    not_a_folder, exists = causes[root / "a" / "b.png"], causes[root / "taken.png"]
    assert isinstance(not_a_folder, OSError) and not_a_folder.errno in (errno.ENOTDIR, errno.EEXIST)
    assert str(not_a_folder).startswith(f"[Errno {not_a_folder.errno}] {os.strerror(not_a_folder.errno)}")
    assert isinstance(exists, FileExistsError)
    assert str(exists).startswith(f"[Errno {errno.EEXIST}] a file is already there; overwrite=False")
    summary = str(caught.value)  # describe_failures: one line per image
    for text in (str(not_a_folder), str(exists), summary):
        assert text.count("[Errno") == text.count(": [Errno") + text.startswith("[Errno"), text
        assert "Error: [Errno" not in text, text
    assert summary.count("[Errno") == 2, summary


# ---------------------------------------------------------------------- items 3 and 4: stderr
def run_child(tmp_path: Path, body: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, str(script), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=100)


# Loaded by the workers only. Their fsync stalls (a slow disk), so each image's temp file is
# there while the test acts. A worker used to answer SIGTERM with SystemExit and then run the
# interpreter's teardown (atexit callbacks, __del__ methods), where a second SIGTERM (a launcher
# signalling every process, then close() its workers) printed "Exception ignored ...
# SystemExit: 143". The harness sends that second SIGTERM from an atexit callback.
SIGTERM_HARNESS = """
import atexit, os, signal, sys, time

if "asyncdump._worker" in sys.orig_argv:
    def _stalled_fsync(fd):
        time.sleep(60)

    os.fsync = _stalled_fsync
    atexit.register(os.kill, os.getpid(), signal.SIGTERM)
"""

SIGTERM_CHILD = """
    import os, signal, sys, time, warnings
    from pathlib import Path
    import numpy as np
    from asyncdump import AsyncDumpError, AsyncImageSink

    out = Path(sys.argv[1])

    def wait_for(condition):
        deadline = time.monotonic() + 60  # a bound on a hang, not a timing claim
        while not condition():
            assert time.monotonic() < deadline, "gave up waiting"
            time.sleep(0.01)

    def temp_files(folder):
        return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]

    # SIGTERM from outside while the image's temp file is open, three times: the sink gives up
    # on the image and names the workers' exit code.
    sink = AsyncImageSink(out / "killed", workers=1, fsync=True, on_error="ignore")
    future = sink.submit(np.zeros((3, 8, 8), np.uint8))
    pid = None
    for _ in range(3):
        wait_for(lambda: sink.worker_pids not in ([], [pid]))  # a replacement once one died
        wait_for(lambda: temp_files(out / "killed"))
        pid = sink.worker_pids[0]
        os.kill(pid, signal.SIGTERM)
    try:
        future.result(timeout=60)
    except AsyncDumpError as error:
        print("FAILED", error)
    sink.close()

    # close() raises (its timeout passed) while a worker writes: SIGTERM from the sink.
    sink = AsyncImageSink(out / "closed", workers=1, fsync=True)
    sink.submit(np.zeros((3, 8, 8), np.uint8))
    wait_for(lambda: temp_files(out / "closed"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sink.close(timeout=0)
        except TimeoutError:
            print("CLOSE RAISED TimeoutError")
    print("WARNED", [str(w.message) for w in caught])
    print("LEFT", temp_files(out / "killed") + temp_files(out / "closed"))
"""


def test_sigterm_ends_a_worker_quietly_with_143_and_no_temp_file(tmp_path: Path) -> None:
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "sitecustomize.py").write_text(SIGTERM_HARNESS)
    done = run_child(tmp_path, SIGTERM_CHILD, pythonpath=harness)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # no "Exception ignored ... SystemExit: 143", nothing else either
    assert "a worker died 3 times (last exit code 143)" in done.stdout, done.stdout
    assert "CLOSE RAISED TimeoutError" in done.stdout and "1 image(s) were not written" in done.stdout
    assert "LEFT []" in done.stdout, done.stdout


LARGE_FLOATS_CHILD = """
    import sys
    from pathlib import Path
    import numpy as np
    from asyncdump import AsyncImageSink

    out = Path(sys.argv[1])
    big = {"float64": (1e300, 1e38), "float32": (3e38, 1e38)}
    settings = {"plain": {}, "mean_std": {"value_range": (-1, 1), "mean": (0.5,), "std": (2.0,)}}
    for name, kwargs in settings.items():
        with AsyncImageSink(out / name, workers=1, **kwargs) as sink:
            for dtype, (huge, large) in big.items():
                x = np.array([[huge, -huge, large, -large], [np.inf, -np.inf, np.nan, 0.5]], dtype)
                sink.submit(x, names=[dtype]).result(timeout=60)
"""


def test_large_floats_print_no_overflow_warning_in_workers(tmp_path: Path) -> None:
    done = run_child(tmp_path, LARGE_FLOATS_CHILD)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # numpy's "RuntimeWarning: overflow encountered in cast/multiply"
    last = {"plain": 128, "mean_std": 255}  # 0.5; 0.5 * 2 + 0.5 clamped to 1
    for setting, value in last.items():
        for dtype in ("float64", "float32"):
            pixels = read_rgb(tmp_path / "out" / setting / f"{dtype}.png")
            np.testing.assert_array_equal(pixels, [[255, 0, 255, 0], [255, 0, 0, value]])


@pytest.mark.parametrize("keyword", ["index", "batch", "rank"])
def test_submit_keyword_naming_a_builtin_field_is_a_value_error(sink: AsyncImageSink,
                                                                keyword: str) -> None:
    before = sink.stats.submitted
    with pytest.raises(ValueError, match=rf"'{keyword}'.*built-in template fields"):
        sink.submit(np.zeros((1, 3, 4, 4), np.uint8), **{keyword: 7})
    assert sink.stats.submitted == before
    sink.submit(np.zeros((1, 3, 4, 4), np.uint8)).result(timeout=60)  # still usable


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_sink_cannot_be_copied_or_pickled(sink: AsyncImageSink,
                                            duplicate: Callable[[Any], Any]) -> None:
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        duplicate(sink)
    sink.submit(np.zeros((1, 3, 4, 4), np.uint8)).result(timeout=60)


def test_submit_raising_an_earlier_failure_says_its_batch_was_not_accepted(root: Path) -> None:
    root.mkdir()
    (root / "00000000.png").write_bytes(b"mine")  # overwrite=False: the first image fails
    sink = AsyncImageSink(root, workers=1)
    assert isinstance(sink.submit(np.zeros((1, 3, 4, 4), np.uint8)).exception(timeout=60),
                      AsyncDumpError)
    refused = np.full((2, 3, 4, 4), 7, np.uint8)
    with pytest.raises(AsyncDumpError, match=r"this call's batch was not accepted.*submit it again"):
        sink.submit(refused)
    assert (sink.stats.submitted, sink.stats.written, sink.stats.failed) == (1, 0, 1)
    paths = sink.submit(refused).result(timeout=60)  # submitted again: no index was used
    assert [p.name for p in paths] == ["00000001.png", "00000002.png"]
    with pytest.raises(AsyncDumpError):  # close reports the failure since the last flush
        sink.close()
    assert (root / "00000000.png").read_bytes() == b"mine"
    assert read_rgb(root / "00000002.png").tolist() == np.full((4, 4, 3), 7).tolist()
