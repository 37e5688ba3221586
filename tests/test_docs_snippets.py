"""Every fenced snippet in README.md and docs/*.md runs, at a small size, or is listed here
with the reason it does not; so the docs cannot drift from the code.

Each snippet is found by its page and its first line. ``RUN`` says how to run one: definitions
it assumes (``prelude``), the sizes made small (``shrink``: each "in the doc" text must still be
in the snippet, so a changed snippet fails here instead of silently running something else),
and what to check afterwards. ``SKIP`` gives the reason for the rest (diagrams, formulas,
multi-minute runs, someone else's code). Signatures are compared with the code instead of
run, and excerpts with the file they are taken from. A snippet in neither table fails the
suite, and so does an entry that matches no snippet.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import asyncdump

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1",
           PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int
    lang: str
    text: str

    @property
    def key(self) -> tuple[str, str]:
        return self.page, self.text.strip().splitlines()[0].strip()


def snippets() -> list[Snippet]:
    found = []
    for page in PAGES:
        source = (ROOT / page).read_text()
        for match in FENCE.finditer(source):
            indent = len(match.group(1))
            text = "".join(line[indent:] for line in match.group(3).splitlines(keepends=True))
            found.append(Snippet(page, source.count("\n", 0, match.start()) + 1, match.group(2),
                                 text))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun() -> str:
    """torchrun on a free local port (tests run beside other jobs), with 2 ranks at most."""
    return f"torchrun --master_addr=127.0.0.1 --master_port={free_port()}"


@dataclass(frozen=True)
class Run:
    prelude: str = ""  # python: what the snippet assumes exists (a model, a loop counter)
    epilogue: str = ""  # python: checks inside the snippet's process
    shrink: tuple[tuple[str, str], ...] = ()  # (in the doc, at test size); every one must occur
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, str], None] | None = None  # (folder, stdout)
    timeout: float = 120.0


def same_files(a: str, b: str, pattern: str) -> Callable[[Path, str], None]:
    def check(work: Path, out: str) -> None:
        left = {p.name: p.read_bytes() for p in sorted((work / a).glob(pattern))}
        right = {p.name: p.read_bytes() for p in sorted((work / b).glob(pattern))}
        assert left and left == right, f"{a} and {b} differ"
    return check


def pngs(folder: str, count: int) -> Callable[[Path, str], None]:
    def check(work: Path, out: str) -> None:
        assert len(list((work / folder).rglob("*.png"))) == count
    return check


def manifest_lines(folder: str, count: int) -> Callable[[Path, str], None]:
    def check(work: Path, out: str) -> None:
        lines = (work / folder / "manifest.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["index"] for line in lines) == list(range(count))
    return check


def copy_examples(work: Path) -> None:
    shutil.copytree(ROOT / "examples", work / "examples")


def _digits(text: str) -> str:
    return re.sub(r"\d+", "N", " ".join(text.split()))


def bench_recommendation(work: Path, out: str) -> None:
    """The printed recommendation, and the one quoted in benchmarks.md, have the code's form."""
    from asyncdump.bench.storage import recommend

    forms = {_digits(f"recommendation: AsyncImageSink(..., {recommend(rates)[1]})")
             for rates in ({1: 100.0, 2: 300.0}, {1: 300.0, 2: 100.0})}
    printed = re.search(r"^recommendation: .*$", out, re.M)
    assert printed is not None and _digits(printed.group(0)) in forms, out
    documented = (ROOT / "docs" / "benchmarks.md").read_text()
    quoted = re.search(r"it printed\s+`(recommendation: [^`]*)`", documented)
    assert quoted is not None and _digits(quoted.group(1)) in forms, "benchmarks.md's example"


MODEL = """
import torch
class MyDiffusionModel(torch.nn.Module):   # stands in for the reader's model
    def sample(self, noise, labels):
        return torch.sigmoid(noise)
"""
LOOP = """
import torch
class Accelerator:
    is_main_process = True
accelerator = Accelerator()
samples = torch.rand(12, 3, 16, 16) * 2 - 1
"""
LIGHTNING = """
import torch
import lightning as L
from torch.utils.data import DataLoader, TensorDataset
class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    def training_step(self, batch, batch_idx):
        return self.conv(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def log_images(self, batch):
        return torch.tanh(self.conv(batch[0]))
model = Model()
loader = DataLoader(TensorDataset(torch.rand(8, 3, 16, 16)), batch_size=2)
"""
SMALL_GENERATE = (("--count 1000000", "--count 120 --shard-size 30"),
                  ("torchrun --nproc_per_node=4", "{torchrun} --nproc_per_node=2"))

RUN: dict[tuple[str, str], Run] = {
    ("README.md", "from asyncdump import AsyncImageSink"): Run(
        prelude="import torch\nsteps = 2\nz = torch.randn(4, 8)\n"
                "def generator(z):\n    return torch.rand(4, 3, 16, 16) * 2 - 1\n",
        check=pngs("samples", 8)),
    ("README.md", "import asyncdump"): Run(
        prelude=LOOP + "step = 500\n", check=pngs("samples", 1)),
    ("docs/api.md", "from asyncdump import AsyncImageSink, SinkStats, AsyncDumpError, "
                    "BufferFullError, save_image, flush"): Run(),
    ("docs/benchmarks.md", "asyncdump bench --root /mnt/data/samples --size 256 --format png "
                           "[--max-workers 8] [--seconds 4]"): Run(
        setup=lambda work: (work / "storage").mkdir(),
        shrink=(("/mnt/data/samples", "storage"), ("--size 256", "--size 32"),
                ("[--max-workers 8] [--seconds 4]", "--max-workers 1 --seconds 0.1 --rounds 1")),
        check=bench_recommendation),
    ("docs/datasets.md", "asyncdump generate --out data/shapes --count 1000000 --size 64 "
                         "--format png --mode tar --seed 0"): Run(
        shrink=SMALL_GENERATE, check=same_files("data/shapes", "data/shapes_4ranks", "*.tar")),
    ("docs/datasets.md", "import torch"): Run(
        prelude=MODEL,
        shrink=((".cuda()", ""), ('"cuda"', '"cpu"'), ("count=1_000_000, batch_size=64",
                                                       "count=120, batch_size=16"),
                ("shard_size=1000", "shard_size=40")),
        check=manifest_lines("data/samples", 120)),
    ("docs/datasets.md", "from asyncdump import DatasetSink"): Run(
        prelude="import torch\ndef generate(indices):\n"
                "    return torch.rand(len(indices), 3, 8, 8), [{'label': i % 3} for i in indices]\n",
        shrink=(("count=100_000", "count=100"),), check=manifest_lines("data/samples", 100)),
    ("docs/encoders.md", "from asyncdump import AsyncImageSink"): Run(),
    ("docs/encoders.md", "asyncdump generate --out data --count 100000 --png-encoder opencv"):
        Run(shrink=(("--count 100000", "--count 20"),), check=manifest_lines("data", 20)),
    ("docs/integrations.md", "cd examples"): Run(
        setup=copy_examples,
        shrink=(("--count 2000", "--count 80"), ("--shard-size 500", "--shard-size 40"),
                ("torchrun --nproc_per_node 2", "{torchrun} --nproc_per_node 2")),
        check=same_files("examples/conv_data", "examples/conv_data_2ranks", "*.tar")),
    ("docs/integrations.md", "import glob, webdataset as wds"): Run(
        prelude="import torch\nfrom asyncdump import write_dataset\n"
                "write_dataset(lambda idx: (torch.rand(len(idx), 3, 8, 8), "
                "[{'label': i % 10} for i in idx]), 'conv_data', count=20, mode='tar', "
                "shard_size=10, progress=False)\n",
        epilogue="assert image.shape == (8, 8, 3) and label == 9 and meta == {'label': 9}\n"),
    ("docs/integrations.md", "import lightning as L"): Run(
        prelude=LIGHTNING,
        shrink=(("max_steps=10_000", "max_steps=4"), ("every_n_steps=500", "every_n_steps=2")),
        check=pngs("samples", 2), timeout=180),
    ("docs/integrations.md", "import asyncdump"): Run(
        prelude=LOOP + "loader = range(3)\n", check=pngs("samples", 1)),
    ("docs/torchvision.md", "# from torchvision.utils import save_image"): Run(
        prelude="import torch\nsteps = 2\nfake = torch.rand(6, 3, 16, 16) * 2 - 1\n",
        check=pngs("samples", 2)),
}

SKIP: dict[tuple[str, str], str] = {
    ("README.md", "make demo   # the main job: a simulated training loop saved three ways, "
                  "side by side"):
        "make test is this suite; make demo runs `asyncdump demo`, which tests/test_cli.py runs "
        "at a tiny size",
    ("README.md", "training loop                          worker processes (numpy + cv2, "
                  "never torch)"): "a diagram",
    ("docs/api.md", "y = x * std[c] + mean[c]            (only when mean/std are given)"):
        "the conversion rule as formulas: tests/test_parity.py checks it",
    ("docs/benchmarks.md", "make bench                      # the full run (about 12 min on 2 "
                           "cores, ~21 GiB of scratch files, before scenario 8 added about 5 "
                           "min and 0.8 GiB); installs the `bench` extra if missing"):
        "the full benchmark takes 2.5 to 12 minutes; tests/test_bench.py runs its paths at "
        "a tiny size",
    ("docs/benchmarks.md", "asyncdump bench --json benchmarks/results/readme-run.json --chart "
                           "benchmarks/results/chart.png"): "the full benchmark (599 s)",
    ("docs/datasets.md", "DIR/dataset.json                 the job: asyncdump_dataset (layout "
                         "version), count, format, quality, mode, shard_size, shard_bytes, "
                         "png_encoder, job"): "a folder layout",
    ("docs/design.md", "training loop                          worker processes (numpy + cv2, "
                       "never torch)"): "a diagram",
    ("docs/design.md", "training loop (producer thread)                               "
                       "AsyncImageSink (_sink.py)"): "a diagram",
    ("docs/inputs.md", "y = x * std[c] + mean[c]                 (only with mean/std)"):
        "the conversion rule as formulas: tests/test_parity.py checks it",
    ("docs/integrations.md", "asyncdump generate --generator MODULE:FUNCTION --out DIR --count "
                             "N [options]"): "a template; the concrete commands below run",
    ("docs/integrations.md", "class ImageLogger(Callback):                           "
                             "# CompVis, abridged"):
        "CompVis' code, abridged, for comparison (it needs their model)",
    ("docs/scale.md", ".venv/bin/python benchmarks/soak_names.py --images 1000000 --warmup "
                      "20000"):
        "a 1,000,000-image soak (minutes); tests/test_soak_names.py runs it at 100,000 images",
}

# Checked against the code instead of run.
SIGNATURES = {
    ("docs/api.md", "sink = AsyncImageSink("): asyncdump.AsyncImageSink,
    ("docs/api.md", "asyncdump.save_image(tensor, fp, format=None, *, nrow=8, padding=2, "
                    "normalize=False,"): asyncdump.save_image,
}
EXCERPTS = {("docs/integrations.md", "@torch.no_grad()"): "examples/conv_generator.py"}
MANIFEST_LINE = ("docs/datasets.md", '{"bytes":')


def event_files(folder: str) -> Callable[[Path, str], None]:
    def check(work: Path, out: str) -> None:
        assert list((work / folder).glob("events.out.tfevents.*")), f"no event file in {folder}"
    return check


TENSORBOARD = """
import torch
from torch.utils.tensorboard import SummaryWriter
fake = torch.rand(4, 3, 8, 8)
"""
RUN.update({
    ("README.md", "from asyncdump.tensorboard import ImageWriter"): Run(
        prelude=TENSORBOARD + "writer = SummaryWriter('runs')\nstep = 0\n",
        epilogue="images.close()\nwriter.close()\n", check=event_files("runs")),
    ("docs/integrations.md", "from torch.utils.tensorboard import SummaryWriter"): Run(
        prelude=TENSORBOARD + "steps = 2\nloss = torch.tensor(1.0)\n", check=event_files("runs/exp")),
    ("docs/integrations.md", 'trainer = L.Trainer(logger=TensorBoardLogger("tb_logs"), callbacks=['):
        Run(prelude="import lightning as L\nfrom lightning.pytorch.loggers import TensorBoardLogger\n"
                    "from asyncdump.lightning import ImageLogger\n"),
})
SKIP.update({
    ("docs/benchmarks.md", "asyncdump bench --scenarios 8 --rounds 3 --no-chart   # plus --json "
                           "and --work in a scratch folder"): "a benchmark run (168 s)",
})
SKIP.update({
    ("docs/benchmarks.md", "asyncdump bench --scenarios 9                  # a moto_server on "
                           "loopback, started and stopped by the bench"):
        "a benchmark run of minutes, and a bucket of yours for the next lines: "
        "tests/test_bench_object_store.py runs scenario 9 at a tiny size, with the moto_server "
        "the bench starts and with --root s3://... and --storage-option against moto on loopback",
})


SKIP.update({
    ("docs/versions.md", "nice -n 10 make test-oldest TORCH_SPEC=torch==2.3.0 "
                         "OLDEST_VENV=.venv-oldest-t23"):
        "a by-hand run of minutes that installs a multi-GB torch build; make test-oldest runs "
        "in CI with the local torch",
    ("docs/versions.md", "~/.pyenv/versions/3.13.0/bin/python3.13 -m venv .venv313"):
        "a by-hand run of the whole suite on Python 3.13 with a multi-GB torch build; "
        "make smoke-python runs Python 3.13 in CI",
})


SKIP.update({
    ("docs/object-storage.md", "from asyncdump import AsyncImageSink, save_image"):
        "needs a bucket on a store: tests/test_object_store.py makes the same calls against "
        "moto's S3 server on loopback",
    ("docs/object-storage.md", "pip install 'asyncdump[s3]'        # fsspec + s3fs; other stores: "
                               "pip install gcsfs / adlfs"): "installs packages",
    ("docs/object-storage.md", 'AsyncImageSink("s3://bucket/x", storage_options={"endpoint_url": '
                               '"http://minio:9000",'):
        "an endpoint on another host: tests/test_object_store.py passes storage_options to "
        "moto's server on loopback",
    ("docs/object-storage.md", "asyncdump generate --out s3://my-bucket/shapes --count 100000 "
                               "--size 64 --seed 0"):
        "needs a bucket on a store: tests/test_dataset_store.py runs generate, kill -9, "
        "--resume and --storage-option against moto's S3 server on loopback, "
        "tests/test_dataset_store_ranks.py the same under torchrun with 2 ranks",
    ("docs/object-storage.md", "PREFIX/dataset.json                            the job; PUT "
                               "first, before any image (as in a folder)"):
        "a layout listing, not code",
    ("docs/object-storage.md", "asyncdump generate --out s3://my-bucket/shards --count 1000000 "
                               "--size 256 --mode tar --shard-size 1000"):
        "needs a bucket on a store (and a million images): tests/test_dataset_store_tar.py runs "
        "generate --mode tar, kill -9 and --resume against moto's S3 server on loopback",
    ("docs/object-storage.md", "# on each of N nodes (node_rank 0..N-1), 8 ranks per node"):
        "needs several nodes and a bucket: tests/test_dataset_store_ranks.py runs the same "
        "command under torchrun with 2 ranks on one machine against moto",
})


def lookup(snippet: Snippet) -> list[str]:
    """Which tables list this snippet (the manifest line by prefix: it is all one line)."""
    tables = [name for name, table in (("RUN", RUN), ("SKIP", SKIP), ("SIGNATURES", SIGNATURES),
                                       ("EXCERPTS", EXCERPTS)) if snippet.key in table]
    if snippet.page == MANIFEST_LINE[0] and snippet.key[1].startswith(MANIFEST_LINE[1]):
        tables.append("MANIFEST_LINE")
    return tables


def find(key: tuple[str, str]) -> Snippet:
    matches = [s for s in snippets() if s.key == key]
    assert len(matches) == 1, f"{key} matches {len(matches)} snippets: update this test's tables"
    return matches[0]


def test_every_snippet_is_run_or_skipped_with_a_reason() -> None:
    found = snippets()
    assert len(found) > 20
    unlisted = [f"{s.page}:{s.line}: {s.key[1]!r}" for s in found if len(lookup(s)) != 1]
    assert not unlisted, "snippets listed in no table (or in two): " + "; ".join(unlisted)
    keys = {s.key for s in found}
    stale = [k for table in (RUN, SKIP, SIGNATURES, EXCERPTS) for k in table if k not in keys]
    assert not stale, f"entries that match no snippet (was the doc edited?): {stale}"
    assert all(len(reason) > 5 for reason in SKIP.values())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("key", list(RUN), ids=[f"{p}:{first[:40]}" for p, first in RUN])
def test_snippet_runs(tmp_path: Path, key: tuple[str, str]) -> None:
    snippet, run = find(key), RUN[key]
    text = snippet.text
    for doc, small in run.shrink:
        assert doc in text, f"{doc!r} is no longer in the snippet: update its entry"
        text = text.replace(doc, small.format(torchrun=torchrun()))
    if run.setup is not None:
        run.setup(tmp_path)
    if snippet.lang == "python":
        script = tmp_path / "snippet.py"
        script.write_text(run.prelude + "\n" + text + "\n" + run.epilogue)
        command = [sys.executable, str(script)]
    else:
        assert not run.prelude and not run.epilogue
        command = ["bash", "-euo", "pipefail", "-c", text]
    done = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=run.timeout)
    assert done.returncode == 0, f"{snippet.page}:{snippet.line} failed:\n{text}\n" \
                                 f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    if run.check is not None:
        run.check(tmp_path, done.stdout)


def _signature_of(text: str) -> inspect.Signature:
    """The documented call as a ``def``: comments dropped, ``-> ...`` dropped."""
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    code = re.sub(r"\)\s*->.*$", ")", code.strip(), flags=re.S)
    params = code.split("(", 1)[1]
    tree = ast.parse(f"def f({params.rstrip()[:-1]}): pass")
    scope: dict[str, object] = {}
    exec(compile(tree, "<doc>", "exec"), scope)  # only literal defaults: parsed above
    return inspect.signature(scope["f"])  # type: ignore[arg-type]


@pytest.mark.parametrize("key", list(SIGNATURES), ids=[k[1][:30] for k in SIGNATURES])
def test_documented_signature_is_the_code_s(key: tuple[str, str]) -> None:
    documented = _signature_of(find(key).text)
    actual = inspect.signature(SIGNATURES[key])
    params = [p for p in actual.parameters.values() if p.name != "self"]
    assert [(p.name, p.kind, p.default) for p in documented.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize("key", list(EXCERPTS))
def test_excerpt_is_taken_from_its_file(key: tuple[str, str]) -> None:
    source = {line.strip() for line in (ROOT / EXCERPTS[key]).read_text().splitlines()}
    for line in find(key).text.splitlines():
        if line.strip() and line.strip() != "...":
            assert line.strip() in source, f"{line.strip()!r} is not in {EXCERPTS[key]}"


@pytest.mark.timeout(120)
def test_example_manifest_line_is_what_generate_writes(tmp_path: Path) -> None:
    """datasets.md shows the manifest line of index 1 of ``--size 32`` (defaults otherwise)."""
    [line] = [s for s in snippets() if "MANIFEST_LINE" in lookup(s)]
    documented = json.loads(line.text.replace('..."', '"'))
    done = subprocess.run([sys.executable, "-m", "asyncdump", "generate", "--out", "d",
                           "--count", "2", "--size", "32", "--no-progress"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    written = [json.loads(x) for x in (tmp_path / "d" / "manifest.jsonl").read_text().splitlines()]
    [actual] = [entry for entry in written if entry["index"] == documented["index"]]
    assert actual["sha256"].startswith(documented.pop("sha256"))
    del actual["sha256"]
    assert actual == documented
