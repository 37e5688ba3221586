"""Scenario 9: datasets and a GPU-bound loop on an object store (S3 or any fsspec URL),
side by side with plain uploads of the same bytes by the same client, in one run.

Each round runs, in an order rotated per round (every run writes under a prefix of its own):

    files   ``write_dataset(..., URL, mode="files")`` as ``asyncdump generate`` runs it
            (synthetic 256² shapes rendered in the loop, default batch size);
            the same into a local folder; a plain thread pool of as many threads as the
            dataset has workers, one PUT per image of the same bytes (pre-encoded: the
            untimed reference run's files) through the same fsspec client; and the
            server's ceiling: many threads PUTting 1-byte objects through the same client,
            and (on the moto server the bench starts) through bare HTTP connections, whose
            client costs next to no CPU
    tar     ``write_dataset(..., mode="tar")`` to the store and to a folder; a plain loop
            PUTting the same shards (the reference run's ``*.tar``) one after the other
    loop    scenario 1's GPU-bound loop with the default sink: no saving, a folder root,
            the store root (images counted back by listing the prefix)

Per run: images/s, the parent's CPU seconds per image (``time.process_time``: all of its
threads, rendering measured apart), the workers' (reaped children, ``os.times``), and, when
the bench started the server itself, the server process's CPU (as a share of one core) and
the whole machine's: on a machine the server shares, they say whose limit a rate is.

Without ``--store URL`` the bench starts ``moto_server`` (moto's S3 server) on a free
loopback port and stops it afterwards; with one, the endpoint and credentials are the AWS
environment's (``AWS_ENDPOINT_URL``, ...) or ``--storage-option``s, the bucket must exist, and
everything written goes under one new prefix that is removed at the end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from . import contenders
from .measure import count_files, scratch_folder, summarize_rounds

Log = Callable[[str], None]
BUCKET = "asyncdump-bench"  # the bucket made on a server the bench starts itself
MOTO_CREDENTIALS = {"key": "bench", "secret": "bench", "client_kwargs": {"region_name": "us-east-1"}}
CEILING_THREADS = 8
TARGET_RATE_RATIO = 0.8  # the issue's: generate >= 0.8x the plain uploads of the same bytes
TARGET_LOOP_POINTS = 2.0  # store root's loop overhead <= the folder root's + 2 points
TARGET_CPU_RATIO = 1.10  # the parent's CPU per image, store / folder
SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` fit for a report: credentials replaced by ``"***"``."""
    return {k: redact(v) if isinstance(v, dict) else
            "***" if any(w in k.lower() for w in SECRET_WORDS) and k != "endpoint_url" else v
            for k, v in options.items()}


def unavailable(url: str | None) -> str | None:
    """Why the scenario cannot run here, or None."""
    import importlib.util

    if url is None or url.startswith(("s3://", "s3a://")):
        for module, package in (("fsspec", "asyncdump[s3]"), ("s3fs", "asyncdump[s3]")):
            if importlib.util.find_spec(module) is None:
                return f"skipped: {module} is not importable (pip install '{package}')"
    if url is None and moto_server_command() is None:
        return ("skipped: no --store URL was given and moto_server (pip install 'moto[server]') "
                "is not installed to start a local S3 server")
    return None


# ---------------------------------------------------------------- the server
def moto_server_command() -> list[str] | None:
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("moto_server")
    return [found] if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server(log: Log) -> Iterator[tuple[str, int]]:
    """moto's S3 server in its own process on 127.0.0.1: ``(endpoint, pid)``; stopped after."""
    command = moto_server_command()
    if command is None:
        raise RuntimeError("moto_server is not installed")
    port = _free_port()
    server = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30  # bounded: moto imports for a few seconds
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        log(f"  moto_server (pid {server.pid}) on http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ---------------------------------------------------------------- measuring one run
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq")  # guest time is inside user


def _busy_seconds(times: Any) -> float:
    return float(sum(getattr(times, name, 0.0) for name in BUSY_FIELDS))


def _total_seconds(times: Any) -> float:
    return float(sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0))


class Meter:
    """Wall time, the parent's CPU, the reaped children's (the sink's workers, waited for at
    ``close``), the server process's and the whole machine's, over a ``with`` block."""

    def __init__(self, server_pid: int | None):
        self._server = psutil.Process(server_pid) if server_pid else None
        self.seconds = self.parent_cpu = self.children_cpu = 0.0
        self.server_cpu: float | None = None
        self.machine_busy_pct = 0.0

    def _server_cpu(self) -> float | None:
        if self._server is None:
            return None
        try:
            times = self._server.cpu_times()
        except psutil.Error:
            return None
        return float(times.user + times.system)

    def __enter__(self) -> Meter:
        self._machine = psutil.cpu_times()
        self._server_began = self._server_cpu()
        children = os.times()
        self._children = children.children_user + children.children_system
        self._cpu = time.process_time()
        self._began = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._began
        self.parent_cpu = time.process_time() - self._cpu
        children = os.times()
        self.children_cpu = children.children_user + children.children_system - self._children
        server = self._server_cpu()
        if server is not None and self._server_began is not None:
            self.server_cpu = server - self._server_began
        machine = psutil.cpu_times()
        total = _total_seconds(machine) - _total_seconds(self._machine)
        self.machine_busy_pct = 100 * (_busy_seconds(machine) - _busy_seconds(self._machine)) / total \
            if total > 0 else 0.0

    def row(self, images: int) -> dict[str, Any]:
        out = {"seconds": self.seconds, "images_per_second": images / self.seconds,
               "parent_cpu_ms": self.parent_cpu / images * 1e3,
               "machine_busy_pct": self.machine_busy_pct}
        if self.server_cpu is not None:
            out["server_cpu_pct"] = 100 * self.server_cpu / self.seconds  # of one core
            out["server_cpu_ms"] = self.server_cpu / images * 1e3
        return out


# ---------------------------------------------------------------- the store
class Store:
    """The store under test: one fsspec client (asyncdump's settings) and a run prefix."""

    def __init__(self, url: str, storage_options: dict[str, Any], server_pid: int | None,
                 endpoint: str | None = None):
        from .._stores import open_destination

        self.base = url.rstrip("/")
        self.storage_options = storage_options
        self.server_pid = server_pid
        self.endpoint = endpoint  # set for the bench's own server, which takes unsigned requests
        self.client = open_destination(self.base, storage_options, check=False)
        self.fs = self.client.fs
        self._count = 0

    def fresh(self, what: str) -> str:
        """A prefix no earlier run of this scenario used."""
        self._count += 1
        return f"{self.base}/{what}-{self._count:03d}"

    def listing(self, url: str) -> dict[str, int]:
        """Relative key -> size of every object under ``url``."""
        self.fs.invalidate_cache()
        root = self.fs._strip_protocol(url).rstrip("/")
        found = self.fs.find(root, detail=True)
        return {path[len(root) + 1:]: int(info.get("size") or info.get("Size") or 0)
                for path, info in found.items()}

    def remove(self, url: str) -> None:
        """Delete a run's objects (untimed), so the server holds at most one run's."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.fs._strip_protocol(url), recursive=True)
        self.fs.invalidate_cache()

    def put(self, url: str, data: bytes) -> None:
        self.client.put(url, data, overwrite=True)  # what a DatasetSink's workers send


def local_listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def store_check(store: Store, url: str, count: int, reference: dict[str, int]) -> dict[str, Any]:
    """Images the store holds for a dataset run: the manifest's indices whose object (files)
    or shard (tar) is listed; and whether the listing equals the folder reference's."""
    listing = store.listing(url)
    try:
        lines = store.fs.cat_file(store.fs._strip_protocol(f"{url}/manifest.jsonl")).splitlines()
    except FileNotFoundError:
        lines = []
    entries = [json.loads(line) for line in lines if line.strip()]
    present = {e["index"] for e in entries
               if (e["path"].split("/", 1)[0] if ".tar/" in e["path"] else e["path"]) in listing}
    return {"written": len(present & set(range(count))), "expected": count,
            "same_as_folder": listing == reference}


# ---------------------------------------------------------------- the contenders
def _render(size: int, seed: int = 0) -> tuple[Callable[[list[int]], Any], list[float]]:
    """``asyncdump generate``'s built-in generator, and a list that gathers its CPU time."""
    from .. import synthetic

    spent = [0.0]

    def generate(indices: list[int]) -> Any:
        began = time.thread_time()
        out = synthetic.render(indices, seed=seed, size=size)
        spent[0] += time.thread_time() - began
        return out
    return generate, spent


def dataset_run(root: str | Path, count: int, size: int, mode: str, shard_size: int,
                workers: int | None, storage_options: dict[str, Any] | None,
                server_pid: int | None) -> dict[str, Any]:
    """What ``asyncdump generate --size SIZE --mode MODE`` does (``write_dataset``'s loop),
    timed from the sink's start to its close. The parent's CPU is also split: the
    constructor's (start-up: clients, the store's checks, ``dataset.json``) and rendering's."""
    from .. import synthetic
    from ..dataset import DatasetSink

    generate, render_cpu = _render(size)
    with Meter(server_pid) as meter:
        began = time.process_time()
        sink = DatasetSink(root, count=count, mode=mode, shard_size=shard_size, workers=workers,
                           job={"generator": synthetic.GENERATOR_ID, "seed": 0, "size": size},
                           storage_options=storage_options)
        startup = time.process_time() - began
        with sink:
            for indices in sink.pending(synthetic.default_batch_size(size)):
                sink.submit(indices, *generate(indices))
    summary = sink.summary
    assert summary is not None
    row = meter.row(count)
    row["workers_cpu_ms"] = meter.children_cpu / count * 1e3  # their start-up (imports) included
    row["mb_per_second"] = summary.bytes / meter.seconds / 1e6  # image bytes
    row["render_cpu_ms"] = render_cpu[0] / count * 1e3
    row["parent_cpu_beyond_render_ms"] = row["parent_cpu_ms"] - row["render_cpu_ms"]
    row["parent_startup_cpu_s"] = startup
    row["parent_cpu_steady_ms"] = row["parent_cpu_beyond_render_ms"] - startup / count * 1e3
    row["bytes"] = summary.bytes
    row["failed"] = summary.failed
    return row


def pool_run(store: Store, url: str, files: dict[str, bytes], threads: int) -> dict[str, Any]:
    """One PUT per object from ``threads`` threads sharing one client; rate per object."""
    items = list(files.items())
    with Meter(store.server_pid) as meter:
        if threads == 1:
            for name, data in items:
                store.put(f"{url}/{name}", data)
        else:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                for future in [pool.submit(store.put, f"{url}/{name}", data) for name, data in items]:
                    future.result()
    return meter.row(len(items))


def multipart_run(store: Store, url: str, files: dict[str, bytes]) -> dict[str, Any]:
    """One object after the other as the dataset's uploader sends a tar part: an S3 multipart
    upload from a spool file (written before the clock starts), same client; rate per object."""
    import tempfile

    from .._stores._multipart import upload_file

    spools = []
    try:
        for name, data in files.items():
            spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
            spools.append((name, spool, len(data)))
            spool.write(data)
            spool.flush()
        with Meter(store.server_pid) as meter:
            for name, spool, size in spools:
                upload_file(store.client, f"{url}/{name}", spool.fileno(), size)
    finally:
        for _, spool, _ in spools:
            spool.close()
    return meter.row(len(files))


def bare_run(store: Store, url: str, count: int, threads: int) -> dict[str, Any]:
    """``count`` unsigned 1-byte PUTs over ``threads`` keep-alive HTTP connections: the
    server's own ceiling, with a client that costs next to no CPU (moto accepts them)."""
    import http.client
    import urllib.parse

    assert store.endpoint is not None
    where = urllib.parse.urlsplit(store.endpoint)
    path = "/" + store.fs._strip_protocol(url).rstrip("/")

    def put_some(first: int) -> None:
        connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=60)
        try:
            for i in range(first, count, threads):
                connection.request("PUT", f"{path}/{i:08d}", body=b"x")
                answer = connection.getresponse()
                answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"bare PUT to {store.endpoint}: HTTP {answer.status}")
        finally:
            connection.close()

    with Meter(store.server_pid) as meter, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(put_some, t) for t in range(threads)]:
            future.result()
    return meter.row(count)


def _is_image(name: str, ext: str) -> bool:
    return name.endswith(ext) and not name.startswith("manifest")


# ---------------------------------------------------------------- the scenario
def scenario9(config: Any, log: Log) -> dict[str, Any]:
    """Object storage: files, tar, the parent's CPU and the GPU-bound loop (see the module)."""
    why = unavailable(config.store_url)
    if why:
        log(f"  {why}")
        return {"skipped": why}
    if config.store_url is not None:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        base = f"{config.store_url.rstrip('/')}/asyncdump-bench-{stamp}"
        store = Store(base, dict(config.storage_options), None)
        store.client.check()  # a missing bucket or bad credentials: fail now
        try:
            return _scenario(config, store, log, server="given")
        finally:
            log(f"  removing {base}")
            store.remove(base)
    with moto_server(log) as (endpoint, pid):
        options = {**MOTO_CREDENTIALS, "endpoint_url": endpoint, **config.storage_options}
        store = Store(f"s3://{BUCKET}/run", options, pid, endpoint)
        store.fs.call_s3("create_bucket", Bucket=BUCKET)
        return _scenario(config, store, log, server="moto_server on loopback, started by the bench")


def _scenario(config: Any, store: Store, log: Log, server: str) -> dict[str, Any]:
    import torch

    from .. import _defaults

    workers = config.store_workers or _defaults.default_workers()
    size, files_count, tar_count = config.size, config.store_images, config.store_tar_images
    shard = config.store_shard_size
    work = config.work / "object-store"
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as `asyncdump generate` does on the CPU: the other cores encode
    try:
        log(f"  reference runs into a folder (untimed): {files_count} files, {tar_count} in tar")
        references: dict[str, Path] = {}
        for mode, count in (("files", files_count), ("tar", tar_count)):
            references[mode] = scratch_folder(work / f"reference-{mode}")
            dataset_run(references[mode], count, size, mode, shard, workers, None, None)
        ext = ".png"
        payload = {mode: {name: (folder / name).read_bytes()
                          for name in sorted(local_listing(folder))
                          if _is_image(name, ".tar" if mode == "tar" else ext)}
                   for mode, folder in references.items()}
        listing = {mode: local_listing(folder) for mode, folder in references.items()}
        tar = _probe_tar(store, size, shard, workers)
        rounds: dict[str, dict[str, list[dict[str, Any]]]] = {"files": {}, "tar": {}}
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "files store": lambda: _dataset_on_store(store, "files", files_count, size, shard, workers,
                                                     listing["files"]),
            "files folder": lambda: _dataset_in_folder(work / "files", "files", files_count, size,
                                                       shard, workers, ext),
            "files pool": lambda: _uploads(store, "pool", payload["files"], workers),
            "files ceiling": lambda: _uploads(store, "ceiling",
                                              {f"{i:08d}": b"x" for i in range(files_count)},
                                              CEILING_THREADS),
        }
        if store.endpoint is not None:
            runs["files bare"] = lambda: _bare(store, files_count)
        if tar is None:
            runs.update({
                "tar store": lambda: _dataset_on_store(store, "tar", tar_count, size, shard, workers,
                                                       listing["tar"]),
                "tar folder": lambda: _dataset_in_folder(work / "tar", "tar", tar_count, size, shard,
                                                         workers, ext),
                "tar plain": lambda: _uploads(store, "shards", payload["tar"], 1, images=tar_count),
                "tar multipart": lambda: _uploads(store, "multipart", payload["tar"], 1,
                                                  images=tar_count, multipart=True),
            })
        else:
            log(f"  tar mode on the store: {tar}")
        names = list(runs)
        for r in range(config.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                mode, who = name.split()
                row = runs[name]()
                rounds[mode].setdefault(who, []).append(row)
                log(f"  round {r + 1}/{config.rounds} {name:<13} {row['images_per_second']:8.1f}/s, "
                    f"parent {row['parent_cpu_ms']:.3f} ms/image"
                    + (f", server {row['server_cpu_pct']:.0f} % of a core" if "server_cpu_pct" in row else "")
                    + f", machine {row['machine_busy_pct']:.0f} % busy"
                    + (f", {row['written']}/{row['expected']} images" if "written" in row else ""))
    finally:
        torch.set_num_threads(threads_before)
    loop = _loop(config, store, log)
    out: dict[str, Any] = {
        "server": server, "store": store.base, "storage_options": redact(store.storage_options),
        "size": size, "workers": workers, "ceiling_threads": CEILING_THREADS,
        "files": _summarise(rounds["files"], files_count, "pool", {"images": files_count}),
        "loop": loop,
    }
    out["tar"] = {"skipped": tar} if tar is not None else _summarise(
        rounds["tar"], tar_count, "plain",
        {"images": tar_count, "shard_size": shard, "shards": len(payload["tar"]),
         "shard_mb": statistics.mean(len(b) for b in payload["tar"].values()) / 1e6})
    files = out["files"]
    files["image_kib"] = statistics.mean(len(b) for b in payload["files"].values()) / 1024
    return out


def _probe_tar(store: Store, size: int, shard: int, workers: int) -> str | None:
    """None when tar mode works on this store; else its one-line refusal (a store without S3's
    multipart uploads)."""
    from ..dataset import DatasetSink

    url = store.fresh("probe-tar")
    try:
        with DatasetSink(url, count=1, mode="tar", shard_size=shard, workers=1,
                         storage_options=store.storage_options):
            pass
    except ValueError as exc:
        return f"skipped: {str(exc).splitlines()[0]}"
    finally:
        store.remove(url)
    return None


def _dataset_on_store(store: Store, mode: str, count: int, size: int, shard: int, workers: int,
                      reference: dict[str, int]) -> dict[str, Any]:
    url = store.fresh(f"{mode}-generate")
    row = dataset_run(url, count, size, mode, shard, workers, store.storage_options, store.server_pid)
    row.update(store_check(store, url, count, reference))
    store.remove(url)
    return row


def _dataset_in_folder(base: Path, mode: str, count: int, size: int, shard: int, workers: int,
                       ext: str) -> dict[str, Any]:
    folder = scratch_folder(base)  # kept until the run ends (see measure.scratch_folder)
    row = dataset_run(folder, count, size, mode, shard, workers, None, None)
    if mode == "files":
        row["written"] = count_files(folder, ext)
    else:
        lines = (folder / "manifest.jsonl").read_text().splitlines()
        row["written"] = len({json.loads(line)["index"] for line in lines})
    row["expected"] = count
    return row


def _uploads(store: Store, what: str, files: dict[str, bytes], threads: int,
             images: int | None = None, multipart: bool = False) -> dict[str, Any]:
    """PUT ``files`` (rate per image: ``images`` when the objects are shards), or with
    ``multipart`` send each as the tar uploader does."""
    url = store.fresh(what)
    row = multipart_run(store, url, files) if multipart else pool_run(store, url, files, threads)
    objects = len(store.listing(url))
    if images is not None:  # shards: rates per image, and bytes per second
        scale = images / len(files)
        for key in ("images_per_second",):
            row[key] *= scale
        for key in ("parent_cpu_ms", "server_cpu_ms"):
            if key in row:
                row[key] /= scale
    row["mb_per_second"] = sum(map(len, files.values())) / row["seconds"] / 1e6
    row["requests_per_second"] = len(files) / row["seconds"]
    row["objects"], row["objects_expected"] = objects, len(files)
    store.remove(url)
    return row


def _bare(store: Store, count: int) -> dict[str, Any]:
    url = store.fresh("bare")
    row = bare_run(store, url, count, CEILING_THREADS)
    row["requests_per_second"] = row["images_per_second"]
    row["objects"], row["objects_expected"] = len(store.listing(url)), count
    store.remove(url)
    return row


def _summarise(rounds: dict[str, list[dict[str, Any]]], count: int, baseline: str,
               facts: dict[str, Any]) -> dict[str, Any]:
    """Per-round ratios against the plain uploads (and the ceiling), then summaries."""
    ratios: list[dict[str, float]] = []
    n = min(len(v) for v in rounds.values())
    for i in range(n):
        store, folder, plain = rounds["store"][i], rounds["folder"][i], rounds[baseline][i]
        # The slower of generating into a folder and uploading the finished bytes: what a
        # perfect overlap of the two would reach on this machine.
        bound = min(folder["images_per_second"], plain["images_per_second"])
        row = {"store_vs_plain": store["images_per_second"] / plain["images_per_second"],
               **({"store_vs_multipart": store["images_per_second"]
                   / rounds["multipart"][i]["images_per_second"],
                   "multipart_vs_plain": rounds["multipart"][i]["images_per_second"]
                   / plain["images_per_second"]} if "multipart" in rounds else {}),
               "store_vs_bound": store["images_per_second"] / bound,
               "folder_vs_plain": folder["images_per_second"] / plain["images_per_second"],
               "parent_cpu_store_vs_folder": store["parent_cpu_ms"] / folder["parent_cpu_ms"],
               "parent_cpu_beyond_render_store_vs_folder":
                   store["parent_cpu_beyond_render_ms"] / folder["parent_cpu_beyond_render_ms"],
               "parent_cpu_steady_store_vs_folder":
                   store["parent_cpu_steady_ms"] / folder["parent_cpu_steady_ms"]}
        if "ceiling" in rounds:
            ceiling = rounds["ceiling"][i]["requests_per_second"]
            row["store_vs_ceiling"] = store["images_per_second"] / ceiling
            row["plain_vs_ceiling"] = plain["images_per_second"] / ceiling
        if "bare" in rounds:
            bare = rounds["bare"][i]["requests_per_second"]
            row["store_vs_bare"] = store["images_per_second"] / bare
            row["plain_vs_bare"] = plain["images_per_second"] / bare
        ratios.append(row)
    return {**facts, "baseline": baseline,
            "writers": {who: {"summary": summarize_rounds(rows, [k for k, v in rows[0].items()
                                                                if isinstance(v, int | float)
                                                                and not isinstance(v, bool)]),
                              "rounds": rows}
                        for who, rows in rounds.items()},
            "ratios": {"summary": summarize_rounds(ratios, ratios[0].keys()), "rounds": ratios},
            "written": sum(r["written"] for who in ("store", "folder") for r in rounds[who]),
            "expected": sum(r["expected"] for who in ("store", "folder") for r in rounds[who]),
            "objects": sum(r["objects"] for who, rows in rounds.items() if who not in ("store", "folder")
                           for r in rows),
            "objects_expected": sum(r["objects_expected"] for who, rows in rounds.items()
                                    if who not in ("store", "folder") for r in rows)}


# ---------------------------------------------------------------- scenario 1 with a store root
class StoreSinkContender(contenders.AsyncDumpContender):
    """Scenario 1's ``asyncdump`` contender (default sink) with the store as its root."""

    name = "asyncdump_store"

    def __init__(self, store: Store):
        super().__init__("png", storage_options=store.storage_options)
        self.store = store
        self.url = ""

    def start(self, folder: Path) -> None:
        self.folder = folder
        self.url = self.store.fresh("loop")
        from .. import AsyncImageSink

        self.sink = AsyncImageSink(self.url, format=self.fmt, name="{step:06d}_{batch:02d}",
                                   **self.sink_options)

    def count_written(self) -> int:
        written = sum(1 for name in self.store.listing(self.url) if name.endswith(f".{self.fmt}"))
        self.store.remove(self.url)
        return written


class FolderSinkContender(contenders.AsyncDumpContender):
    """The same default sink with a folder root (named apart from scenario 1's)."""

    name = "asyncdump_folder"


def _loop(config: Any, store: Store, log: Log) -> dict[str, Any]:
    from .scenarios import _loop_summaries, loop_batches, loop_rounds, make_step

    step = make_step("sleep", config.device, config.step_ms)
    batches = loop_batches(config)
    makers: dict[str, Callable[[], contenders.Contender]] = {
        "none": lambda: contenders.make("none"), "asyncdump_folder": FolderSinkContender,
        "asyncdump_store": lambda: StoreSinkContender(store)}
    rounds = loop_rounds(config, makers, batches, config.loop_steps, step, "store-loop", log)
    summaries = _loop_summaries(rounds)
    points = [s["overhead_pct"] - f["overhead_pct"] for s, f in
              zip(summaries["asyncdump_store"]["rounds"], summaries["asyncdump_folder"]["rounds"],
                  strict=True)]
    return {"kind": "sleep", "steps": config.loop_steps, "step_ms": config.step_ms,
            "batch_shape": [config.batch, 3, config.size, config.size], "device": config.device,
            "skipped": {}, "contenders": summaries,
            "store_minus_folder_points": summarize_rounds([{"p": p} for p in points], ["p"])["p"],
            "points_rounds": points}


# ---------------------------------------------------------------- report
def table(result: dict[str, Any]) -> str:
    from .report import _range, _table, loop_table

    if "skipped" in result:
        return result["skipped"]
    files, tar = result["files"], result["tar"]
    head = (f"Store: {result['store']} ({result['server']}); {result['size']}² RGB PNG; "
            f"{result['workers']} worker(s), the plain pool as many threads; "
            f"the ceiling {result['ceiling_threads']} threads of 1-byte PUTs.")

    def server(s: dict[str, Any]) -> str:
        return _range(s["server_cpu_pct"], "{:.0f}") + " %" if "server_cpu_pct" in s else "–"

    def writer_rows(part: dict[str, Any], labels: dict[str, str]) -> list[list[str]]:
        rows = []
        for who, label in labels.items():
            if who not in part["writers"]:
                continue
            s = part["writers"][who]["summary"]
            requests = who in ("ceiling", "bare")
            rate = _range(s["requests_per_second" if requests else "images_per_second"], "{:.1f}")
            rows.append([label, rate + (" requests/s" if requests else ""),
                         _range(s["mb_per_second"], "{:.1f}") if "mb_per_second" in s else "–",
                         server(s), _range(s["machine_busy_pct"], "{:.0f}") + " %",
                         _range(s["parent_cpu_ms"]),
                         _range(s["workers_cpu_ms"]) if "workers_cpu_ms" in s else "–",
                         _objects(part["writers"][who]["rounds"])])
        return rows

    header = ["writer", "images/s", "MB/s", "server CPU (of one core)", "machine busy",
              "parent CPU ms/image", "child processes CPU ms/image", "images / objects"]
    files_table = _table(header, writer_rows(files, {
        "store": "`write_dataset` → store, files mode (as `generate`)",
        "pool": f"plain pool, {result['workers']} thread(s), one PUT per image, same client",
        "ceiling": f"ceiling, same client: {result['ceiling_threads']} threads, 1-byte PUTs",
        "bare": f"server's ceiling, bare HTTP: {result['ceiling_threads']} connections, 1-byte PUTs",
        "folder": "`write_dataset` → folder, files mode"}))
    fr = files["ratios"]["summary"]
    ratio_names = {"store_vs_plain": "`write_dataset` → store / plain pool",
                   "folder_vs_plain": "`write_dataset` → folder / plain pool",
                   "store_vs_bound": "`write_dataset` → store / the slower of folder and plain pool",
                   "plain_vs_ceiling": "plain pool / ceiling through the same client",
                   "store_vs_ceiling": "`write_dataset` → store / ceiling through the same client",
                   "plain_vs_bare": "plain pool / the server's bare-HTTP ceiling",
                   "store_vs_bare": "`write_dataset` → store / the server's bare-HTTP ceiling"}
    ratios = _table(["files mode, ratio of rates (per round, then median)", "ratio"],
                    [[label, _range(fr[key], "{:.2f}")] for key, label in ratio_names.items() if key in fr])
    lines = [head, "", f"**Files mode**, {files['images']} images per run, "
             f"{files['image_kib']:.1f} KiB per image:", "", files_table, "", ratios]
    if "skipped" in tar:
        lines += ["", f"**Tar mode**: {tar['skipped']}"]
    else:
        tr = tar["ratios"]["summary"]
        lines += ["", f"**Tar mode**, {tar['images']} images per run, shards of {tar['shard_size']} "
                  f"({tar['shards']} shards of {tar['shard_mb']:.1f} MB):", "",
                  _table(header, writer_rows(tar, {
                      "store": "`write_dataset` → store, tar mode (as `generate`)",
                      "plain": "plain loop, one PUT per shard of the same bytes, same client",
                      "multipart": "plain loop, each shard as one multipart upload of 8 MiB "
                                   "parts (as the uploader sends it), same client",
                      "folder": "`write_dataset` → folder, tar mode"})), "",
                  _table(["tar mode, ratio of rates (per round, then median)", "ratio"], [
                      ["`write_dataset` → store / plain loop", _range(tr["store_vs_plain"], "{:.2f}")],
                      ["`write_dataset` → folder / plain loop", _range(tr["folder_vs_plain"], "{:.2f}")],
                      ["`write_dataset` → store / plain multipart loop",
                       _range(tr["store_vs_multipart"], "{:.2f}")],
                      ["plain multipart loop / plain loop", _range(tr["multipart_vs_plain"], "{:.2f}")],
                      ["`write_dataset` → store / the slower of folder and plain loop",
                       _range(tr["store_vs_bound"], "{:.2f}")]])]
    cpu_rows = []
    for mode, part in (("files", files), ("tar", tar)):
        if "skipped" in part:
            continue
        ratio = part["ratios"]["summary"]
        for who in ("folder", "store"):
            s = part["writers"][who]["summary"]
            mine = who == "store"
            cpu_rows.append([
                mode, who, _range(s["parent_cpu_ms"]),
                _range(ratio["parent_cpu_store_vs_folder"], "{:.2f}") if mine else "",
                _range(s["render_cpu_ms"]), _range(s["parent_startup_cpu_s"]),
                _range(s["parent_cpu_steady_ms"]),
                _range(ratio["parent_cpu_steady_store_vs_folder"], "{:.2f}") if mine else "",
                _range(s["workers_cpu_ms"])])
    lines += ["", "**The parent's CPU per image** (`time.process_time`: all its threads). "
              "\"Start-up\" is the `DatasetSink` constructor's, per run; \"the rest\" excludes "
              "it and rendering. Child processes (the workers; the tar uploader) are counted once "
              "reaped at close, their start-up included:", "",
              _table(["mode", "root", "parent CPU ms/image", "store / folder", "of which rendering",
                      "start-up CPU s", "the rest, ms/image", "the rest, store / folder",
                      "child processes CPU ms/image"], cpu_rows)]
    loop = result["loop"]
    lines += ["", f"**Scenario 1's loop with a store root** ({loop['steps']} steps of "
              f"{loop['step_ms']:g} ms, {'×'.join(map(str, loop['batch_shape']))} float32, default sink):",
              "", loop_table(loop), "",
              "store root − folder root, loop overhead: "
              f"{_range(loop['store_minus_folder_points'], '{:+.2f}')} points (per round, then median)."]
    return "\n".join(lines)


def _objects(rows: list[dict[str, Any]]) -> str:
    if "written" in rows[0]:
        return f"{sum(r['written'] for r in rows)}/{sum(r['expected'] for r in rows)}"
    return f"{sum(r['objects'] for r in rows)}/{sum(r['objects_expected'] for r in rows)}"


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    if "skipped" in result:
        return []
    out = []
    files, tar, loop = result["files"], result["tar"], result["loop"]
    ratio = files["ratios"]["summary"]["store_vs_plain"]["median"]
    ceiling = files["ratios"]["summary"]["plain_vs_ceiling"]["median"]
    out.append({"target": f"scenario 9: generate files mode to the store ≥ {TARGET_RATE_RATIO:g}× a "
                          f"plain pool of {result['workers']} thread(s), one PUT per image",
                "measured": f"{ratio:.2f}× (the pool at {ceiling:.2f} of the same client's "
                            f"{result['ceiling_threads']}-thread ceiling)",
                "met": ratio >= TARGET_RATE_RATIO})
    if "skipped" in tar:
        out.append({"target": "scenario 9: generate tar mode to the store ≥ 0.8× a plain loop of "
                              "the same shards", "measured": tar["skipped"], "met": False})
    else:
        summary = tar["ratios"]["summary"]
        ratio = summary["store_vs_plain"]["median"]
        measured = f"{ratio:.2f}×"
        if "store_vs_multipart" in summary:
            measured += (f" ({summary['store_vs_multipart']['median']:.2f}× the same shards sent "
                         "as multipart uploads)")
        out.append({"target": f"scenario 9: generate tar mode to the store ≥ {TARGET_RATE_RATIO:g}× a "
                              "plain loop of the same shards", "measured": measured,
                    "met": ratio >= TARGET_RATE_RATIO})
    points = loop["store_minus_folder_points"]["median"]
    out.append({"target": f"scenario 9: GPU-bound loop, store root ≤ folder root + "
                          f"{TARGET_LOOP_POINTS:g} points of loop overhead",
                "measured": f"{points:+.2f} points", "met": points <= TARGET_LOOP_POINTS})
    for mode, part in (("files", files), ("tar", tar)):
        if "skipped" in part:
            continue
        cpu = part["ratios"]["summary"]["parent_cpu_store_vs_folder"]["median"]
        out.append({"target": f"scenario 9: parent CPU per image, store ≤ {TARGET_CPU_RATIO:.2f}× "
                              f"folder ({mode} mode)", "measured": f"{cpu:.2f}×",
                    "met": cpu <= TARGET_CPU_RATIO})
    return out


def lost(result: dict[str, Any]) -> list[str]:
    """Every run of this scenario that wrote fewer images (or objects) than it should."""
    if "skipped" in result:
        return []
    out = []
    for mode in ("files", "tar"):
        part = result[mode]
        if "skipped" in part:
            continue
        if part["written"] != part["expected"]:
            out.append(f"scenario9 {mode}: {part['written']}/{part['expected']} images")
        if part["objects"] != part["objects_expected"]:
            out.append(f"scenario9 {mode} plain uploads: "
                       f"{part['objects']}/{part['objects_expected']} objects")
    for name, c in result["loop"]["contenders"].items():
        if c["written"] != c["expected"]:
            out.append(f"scenario9 loop {name}: {c['written']}/{c['expected']}")
    return out
