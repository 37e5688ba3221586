"""Smoke run without torch (issue 18): numpy batches through the sink, then ``asyncdump
generate --generator`` with a numpy generator, on whatever Python runs this script.

Run by ``make smoke-python`` (from ``.ci/run``) on the oldest and the newest supported Python,
in a venv that has asyncdump's dependencies except torch. Exits non-zero on any failure.
Not collected by pytest (its name does not start with ``test_``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

GENERATOR = '''
import numpy as np

def generate(indices):
    """Deterministic images: every pixel is (index + y + x) mod 256, in 3 channels."""
    y, x = np.mgrid[0:12, 0:10]
    return np.stack([np.stack([(i + y + x + c) % 256 for c in range(3)]).astype(np.uint8)
                     for i in indices])
'''


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"smoke run failed: {what}")


def sink_round_trip(root: Path) -> None:
    from asyncdump import AsyncImageSink

    rng = np.random.default_rng(0)
    floats = rng.random((5, 3, 9, 11), dtype=np.float32)
    floats[0, :, 0, 0] = np.nan  # black, by construction (issue 18)
    floats[0, :, -1, -1] = np.nan
    uint8 = rng.integers(0, 256, (4, 17, 13, 3), dtype=np.uint8)
    with AsyncImageSink(root, workers=2) as sink:
        float_paths = sink.submit(floats).result(timeout=60)
        uint8_paths = sink.submit(uint8.transpose(0, 3, 1, 2)).result(timeout=60)  # channels-last
    expected = np.clip(np.nan_to_num(floats, nan=0.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    for path, want in zip(float_paths, expected, strict=True):
        got = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1]
        check(np.array_equal(got, want.transpose(1, 2, 0)), f"pixels of {path.name}")
    for path, want in zip(uint8_paths, uint8, strict=True):
        got = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1]
        check(np.array_equal(got, want), f"pixels of {path.name}")
    check("torch" not in sys.modules, "the sink imported torch")


def generate_with_numpy_generator(folder: Path) -> None:
    (folder / "numpy_gen.py").write_text(GENERATOR)
    out = folder / "dataset"
    command = [sys.executable, "-m", "asyncdump", "generate", "--generator", "numpy_gen:generate",
               "--count", "24", "--batch-size", "8", "--shard-size", "10", "--workers", "1",
               "--out", str(out)]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)
    check(done.returncode == 0, f"generate exited {done.returncode}: {done.stderr[-2000:]}")
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    check(len(lines) == 24, f"24 manifest lines, got {len(lines)}")
    check((out / "dataset.json").exists(), "dataset.json written")
    y, x = np.mgrid[0:12, 0:10]
    for line in lines[:: 7]:
        index = line["index"]
        got = cv2.imread(str(out / line["path"]), cv2.IMREAD_UNCHANGED)[..., ::-1]
        want = np.stack([(index + y + x + c) % 256 for c in range(3)], axis=-1)
        check(np.array_equal(got, want.astype(np.uint8)), f"pixels of index {index}")


def main() -> None:
    try:
        import torch  # noqa: F401
        raise SystemExit("smoke run needs a venv without torch")
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        sink_round_trip(Path(tmp) / "sink")
        generate_with_numpy_generator(Path(tmp))
    print(f"smoke run passed on Python {sys.version.split()[0]} without torch "
          f"(numpy {np.__version__}, OpenCV {cv2.__version__}, pid {os.getpid()})")


if __name__ == "__main__":
    main()
