"""The collector thread: it alone owns the workers, the pending jobs, probes and restarts.

    wait on [hand-over pipe, every worker socket (and its writability while a send waits)]
      handed-over parts -> cut into jobs -> pending queue -> sent to the least busy worker
                           (two jobs each at most; sends never block, see _pool.py)
      NotStaged        -> its images fail (they never reached the buffer)
      Encoded          -> release that image's bytes (its temp file is complete)
      Written / Failed -> count, resolve the batch's Future when its last image is done
      EOF (a worker died) -> finish or re-send its jobs (pixels are still in the buffer),
                             start a new worker

Other threads talk to it only through the ``HandOver``, ``Accounting``, the buffer, and the
few methods below marked as callable from any thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections import deque

from ._accounting import Accounting
from ._buffer import SharedBuffer
from ._errors import AsyncDumpError, RemoteTraceback
from ._fsutil import unlink_quietly
from ._handover import HandOver
from ._jobs import DONE, ENCODED, PENDING, Job, NotStaged, StagedPart, next_id
from ._pool import WorkerProcess, start_worker, stop_workers
from ._protocol import (
    Encoded,
    EncodedBytes,
    Failed,
    Probe,
    ProbeAnswer,
    Ready,
    Report,
    Written,
)

MAX_JOB_ATTEMPTS = 3  # a job whose worker dies this often fails instead of looping
MAX_START_FAILURES = 3  # workers dying before Ready this often in a row break the sink
JOBS_PER_WORKER = 2  # one being written, one waiting in the pipe
MAX_JOB_IMAGES = 256  # bounds a job's message, and what a worker's death puts back in the queue

Modules = dict[int, list[str]]


class Collector:
    """Runs the workers for one sink; ``start`` it, then ``stop`` it once."""

    def __init__(self, buffer: SharedBuffer, handover: HandOver, accounting: Accounting,
                 workers: int):
        self._buffer = buffer
        self._handover = handover
        self._accounting = accounting
        self._count = workers
        self._workers: list[WorkerProcess] = []
        self._pending: deque[Job | NotStaged] = deque()
        self._probe_requests: deque[concurrent.futures.Future[Modules]] = deque()
        # probe id -> (request, answers so far, pids still to answer)
        self._probes: dict[int, tuple[concurrent.futures.Future[Modules], Modules, set[int]]] = {}
        self._start_failures = 0  # consecutive workers that died before saying Ready
        self.broken: BaseException | None = None  # set once; then nothing more is written
        self._stopping = threading.Event()
        self._abort: BaseException | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="asyncdump-collector", daemon=True)

    # ------------------------------------------------------------- any thread
    def start(self) -> None:
        """Start the workers and the thread; raise AsyncDumpError if the workers cannot start."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise AsyncDumpError(f"could not start asyncdump workers: {self._start_error}") \
                from self._start_error

    def stop(self, abort: BaseException | None) -> None:
        """Finish every job (``abort`` None), or fail what is not written yet with ``abort``;
        stop the workers and end the thread."""
        self._abort = abort
        self._stopping.set()
        self._handover.wake()
        self._thread.join()

    def break_sink(self, reason: BaseException) -> None:
        """A fatal fault: fail everything not yet written, refuse new work."""
        self.broken = reason
        self._buffer.wake_all()
        self._handover.wake()

    def probe(self, timeout: float) -> Modules:
        request: concurrent.futures.Future[Modules] = concurrent.futures.Future()
        self._probe_requests.append(request)
        self._handover.wake()
        return request.result(timeout)

    @property
    def workers(self) -> list[WorkerProcess]:
        """A snapshot of the live workers."""
        return list(self._workers)

    # ------------------------------------------------------------- collector thread
    def _main(self) -> None:
        try:
            for _ in range(self._count):
                self._workers.append(start_worker(self._buffer.fd, self._buffer.mapped_bytes))
        except BaseException as exc:
            self._start_error = exc
            stop_workers(self._workers, timeout=2.0)
            self._workers.clear()
            self._started.set()
            return
        self._started.set()
        try:
            try:
                self._loop()
            except BaseException as exc:  # a bug or a fatal fault: fail loudly, never hang
                if self.broken is not None:
                    raise
                self.break_sink(exc)
                self._loop()  # broken mode: fail whatever still arrives, until stopped
        finally:
            reason = self._abort or self.broken
            if reason is None:
                stop_workers(self._workers, timeout=10.0)
            else:
                self._stop_now_and_fail_all(reason)

    def _loop(self) -> None:
        while True:
            by_conn = {w.conn: w for w in self._workers}
            sending = [w.conn for w in self._workers if not self._send_pending(w)]
            readable = self._handover.wait(list(by_conn), sending)
            self._take_handed_over()  # new work first: its send releases the GIL to the producer
            for conn in readable:
                self._drain(by_conn[conn])
            self._take_handed_over()
            while self._probe_requests:
                self._send_probe(self._probe_requests.popleft())
            if self.broken is not None:  # no more writing: stop workers, fail what is left
                self._stop_now_and_fail_all(self.broken)
            if self._stopping.is_set():
                if self._abort is not None or self.broken is not None:
                    return
                if not self._pending and not self._handover and not any(
                        w.inflight for w in self._workers):
                    return

    @staticmethod
    def _send_pending(worker: WorkerProcess) -> bool:
        """Send what the worker's socket takes now; True if nothing is left to send."""
        try:
            return worker.send_pending()
        except OSError:  # it died: reading its socket reports the EOF
            return True

    def _take_handed_over(self) -> None:
        self._pending.extend(self._handed_over())
        if self.broken is None:
            self._dispatch()

    def _handed_over(self) -> list[Job | NotStaged]:
        """What producers handed over, in order, with each staged part cut into its jobs."""
        items: list[Job | NotStaged] = []
        for item in self._handover.take():
            if isinstance(item, StagedPart):
                items.extend(item.jobs())
            else:
                items.append(item)
        return items

    def _dispatch(self) -> None:
        while self._pending and self._workers:
            job = self._pending[0]
            if isinstance(job, NotStaged):
                self._pending.popleft()
                self._fail_not_staged(job)
                continue
            worker = min(self._workers, key=lambda w: w.inflight_images)
            if len(worker.inflight) >= JOBS_PER_WORKER:
                return
            try:
                worker.post(job.order())  # never waits: the worker may be blocked reporting
            except OSError:
                return  # the worker is dying: its EOF is handled next round
            self._pending.popleft()
            worker.inflight[job.id] = job
            worker.inflight_images += len(job.items)

    def _fail_not_staged(self, record: NotStaged) -> None:
        for index in record.indices:
            self._accounting.image_failed(record.batch, index, record.reason)

    def _drain(self, worker: WorkerProcess) -> None:
        """Handle every report a live worker has sent; EOF means it died."""
        if worker not in self._workers:
            return  # died earlier in this round
        if not self._handle_reports(worker):
            self._on_worker_death(worker)

    def _handle_reports(self, worker: WorkerProcess) -> bool:
        """Handle what is readable now; False once the worker's socket is at EOF."""
        while True:
            try:
                if not worker.has_reports():
                    return True
                report = worker.conn.recv()
            except (EOFError, OSError):
                return False
            self._handle(worker, report)

    def _handle(self, worker: WorkerProcess, report: Report) -> None:
        match report:
            case Ready():
                worker.ready = True
                self._start_failures = 0
                if worker.replaces_death_at is not None:  # death noticed -> replacement Ready
                    counters = self._accounting.counters
                    counters.max_restart_seconds = max(
                        counters.max_restart_seconds, time.perf_counter() - worker.replaces_death_at)
            case ProbeAnswer(probe_id, pid, modules):
                self._probes[probe_id][1][pid] = modules
                self._probe_answered(probe_id, pid)
            case Encoded(job_id, index) if job_id in worker.inflight:
                job = worker.inflight[job_id]
                self._release_image(job, index)
                job.states[index] = ENCODED
            case Written(job_id, index, nbytes, sha256) if job_id in worker.inflight:
                job = worker.inflight[job_id]
                if job.batch.results is not None:
                    job.batch.results[index] = (sha256, nbytes)
                self._image_written(job, index, nbytes)
                self._retire_if_done(worker, job)
            case EncodedBytes(job_id, index, data, sha256) if job_id in worker.inflight:
                job = worker.inflight[job_id]
                assert job.batch.results is not None
                job.batch.results[index] = (data, sha256) if job.batch.digest else data
                self._image_written(job, index, len(data))
                self._retire_if_done(worker, job)
            case Failed(job_id, index, errno, message, traceback) if job_id in worker.inflight:
                job = worker.inflight[job_id]
                cause: BaseException = OSError(errno, message) if errno is not None \
                    else RuntimeError(message)
                cause.__cause__ = RemoteTraceback(traceback)
                self._image_failed(job, index, cause)
                self._retire_if_done(worker, job)

    @staticmethod
    def _retire_if_done(worker: WorkerProcess, job: Job) -> None:
        if all(state == DONE for state in job.states.values()):
            del worker.inflight[job.id]
            worker.inflight_images -= len(job.items)

    def _release_image(self, job: Job, index: int) -> None:
        if job.states[index] == PENDING:
            self._buffer.release(job.offset_of(index), job.settings.image_bytes)

    def _image_written(self, job: Job, index: int, nbytes: int) -> None:
        self._release_image(job, index)
        job.states[index] = DONE
        self._accounting.image_written(job.batch, nbytes)

    def _image_failed(self, job: Job, index: int, error: BaseException) -> None:
        self._release_image(job, index)
        job.states[index] = DONE
        self._accounting.image_failed(job.batch, index, error)

    def _send_probe(self, request: concurrent.futures.Future[Modules]) -> None:
        if not self._workers:
            request.set_result({})
            return
        probe_id = next_id()
        self._probes[probe_id] = (request, {}, {w.pid for w in self._workers})
        for worker in self._workers:
            with contextlib.suppress(OSError):  # dying: its EOF ends its part of the probe
                worker.post(Probe(probe_id))

    def _probe_answered(self, probe_id: int, pid: int) -> None:
        """``pid`` answered or died: resolve the probe once no live worker owes an answer."""
        request, answers, awaiting = self._probes[probe_id]
        awaiting.discard(pid)
        if not awaiting:
            del self._probes[probe_id]
            request.set_result(answers)

    # ------------------------------------------------------------- faults
    def _on_worker_death(self, worker: WorkerProcess) -> None:
        """Finish what the dead worker had encoded, re-queue the rest, start a replacement."""
        noticed = time.perf_counter()
        worker.close()
        exit_code = worker.process.wait()
        self._workers.remove(worker)
        for probe_id in list(self._probes):  # it will never answer
            self._probe_answered(probe_id, worker.pid)
        if not worker.ready:  # died while starting: its jobs never began
            self._start_failures += 1
            self._pending.extendleft(reversed(list(worker.inflight.values())))
            if self._start_failures >= MAX_START_FAILURES:
                raise AsyncDumpError(f"{self._start_failures} workers in a row died while starting "
                                     f"(last exit code {exit_code}); see their stderr")
        else:  # a worker runs its jobs in order: only the first had started
            for position, job in enumerate(worker.inflight.values()):
                self._recover(job, exit_code, in_progress=position == 0)
        if self._stopping.is_set() and self._abort is not None:
            return
        try:
            replacement = start_worker(self._buffer.fd, self._buffer.mapped_bytes)
        except Exception as exc:
            if not self._workers:
                raise AsyncDumpError(f"a worker died (exit code {exit_code}) and no new one "
                                     f"could be started: {exc}") from exc
            return
        replacement.replaces_death_at = noticed
        self._workers.append(replacement)
        self._accounting.counters.worker_restarts += 1

    def _recover(self, job: Job, exit_code: int, in_progress: bool) -> None:
        """Settle a dead worker's job: finish encoded images, re-queue the others.

        Only the image the worker was on when it died is charged an attempt, so images
        queued behind a poison image are never failed for it.
        """
        again = []
        charged = not in_progress
        for item in job.items:
            state = job.states[item.position]
            if state == DONE:
                continue
            if state == ENCODED:  # the temp file was complete: finish the rename ourselves
                try:
                    if os.path.exists(item.temp):
                        os.replace(item.temp, item.final)
                    self._image_written(job, item.position, os.path.getsize(item.final))
                except OSError as exc:
                    self._image_failed(job, item.position, exc)
                continue
            unlink_quietly(item.temp)
            attempts = job.attempts if charged else job.attempts + 1
            charged = True
            if attempts >= MAX_JOB_ATTEMPTS:
                self._image_failed(job, item.position, AsyncDumpError(
                    f"a worker died {attempts} times (last exit code {exit_code}) "
                    "while writing this image; giving up on it"))
            else:  # one job per image from now on: a poison image then fails alone
                again.append(Job(job.batch, [item], job.settings, attempts=attempts))
        self._pending.extendleft(reversed(again))

    def _stop_now_and_fail_all(self, reason: BaseException) -> None:
        """Stop the workers at once, count what they reported before, fail everything else."""
        stop_workers(self._workers, timeout=0.0, close=False)
        for worker in self._workers:
            self._handle_reports(worker)
            worker.close()
        self._pending.extend(self._handed_over())
        jobs = list(self._pending) + [job for w in self._workers for job in w.inflight.values()]
        self._pending.clear()
        self._workers.clear()
        for job in jobs:
            if isinstance(job, NotStaged):
                self._fail_not_staged(job)
                continue
            for index, state in list(job.states.items()):
                if state != DONE:
                    self._image_failed(job, index, reason)
