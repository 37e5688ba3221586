"""Memory stays bounded over a long run with a template without ``{index}`` (issue 9's soak).

Runs ``benchmarks/soak_names.py`` (the script the 1,000,000-image soak uses) on 100,000 tiny
images in its own process: real workers, real files on tmpfs, the parent's RSS measured after
warm-up and at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "soak_names.py"
BOUND_MIB = 20


def test_100k_images_with_a_custom_template_keep_parent_memory_flat(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "100000", "--warmup", "20000",
         "--clean-every", "20000", "--json"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["written"] == result["images"] == 100_000 and result["failed"] == 0
    print(f"\nsoak 100k: parent RSS {result['rss_warm_mib']:.1f} -> {result['rss_end_mib']:.1f} MiB "
          f"({result['growth_mib']:+.1f}), {result['seconds']:.0f} s")
    assert result["growth_mib"] < BOUND_MIB, result["samples"]
