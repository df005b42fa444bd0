"""Document jobs (`POST /v1/documents`): their own bounded queue and thread, cancellable, and
recorded on disk.

A job is cut into pieces (indexing one document, precomputing one batch of chunks) that run on
the engine's scheduler one at a time, so answers go on between them instead of waiting behind
the whole job. A cancelled job stops before its next piece. Each job's record is written
atomically after every piece (under the index folder, ``jobs/``): a server killed mid-job
reports the job failed after a restart, never done; what its pieces committed stays."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from chunkcache.api import schemas as s
from chunkcache.atomic import write_json_atomic
from chunkcache.errors import InvalidInputError
from chunkcache.scheduler import CancelledRequestError, QueueFullError, Scheduler

log = logging.getLogger(__name__)
T = TypeVar("T")
JOBS_DIR = "jobs"  # in the index folder
_KEPT = 1000  # finished jobs remembered (in memory and on disk)
_RETRY_S = 0.05  # the engine's queue full: try the piece again after this long
FINISHED = ("done", "failed", "cancelled")
INTERRUPTED = ("the server stopped while this job ran; what it committed is kept: POST the documents "
               "again to finish (documents already indexed are skipped as unchanged)")


class JobNotFoundError(InvalidInputError):
    """No job of that id (HTTP 404)."""


@dataclass(frozen=True)
class JobWork:
    """What the job's pieces call; each runs on the engine thread."""

    index_document: Callable[[s.DocumentIn], dict[str, int]]  # the IngestReport's counts
    chunks_of: Callable[[list[s.DocumentIn]], list[str]]  # chunk texts not yet stored
    precompute: Callable[[list[str]], None]
    batch: int


class _Job:
    def __init__(self, record: s.Job, documents: list[s.DocumentIn], precompute: bool) -> None:
        self.record, self.documents, self.precompute = record, documents, precompute
        self.cancelled = threading.Event()


class DocumentJobs:
    """Queue ``POST /v1/documents`` work and run it piece by piece on ``scheduler``."""

    def __init__(self, scheduler: Scheduler, work: JobWork, folder: Path | None, max_queue: int) -> None:
        self.scheduler, self.work, self.folder = scheduler, work, folder
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._records: dict[str, s.Job] = {}
        self._live: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        if folder is not None:
            self._load(folder)
        self._thread = threading.Thread(target=self._run, name="chunkcache-jobs", daemon=True)
        self._thread.start()

    # --- what the routes call ------------------------------------------------------------
    def submit(self, documents: list[s.DocumentIn], precompute: bool) -> s.Job:
        record = s.Job(id=f"job-{uuid.uuid4().hex[:16]}", status="queued", created=int(time.time()))
        job = _Job(record, documents, precompute)
        with self._lock:
            self._records[record.id] = record
            self._live[record.id] = job
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                del self._records[record.id], self._live[record.id]
            raise QueueFullError(
                f"{self._queue.maxsize} document jobs are already waiting; retry later"
            ) from None
        self._save(record)
        self._trim()
        return record.model_copy()

    def get(self, job_id: str) -> s.Job:
        with self._lock:  # copied as saved: progress is recorded under the lock
            record = self._records.get(job_id)
            copy = None if record is None else record.model_copy()
        if copy is None:
            raise JobNotFoundError(f"no job {job_id!r}; job ids come from POST /v1/documents")
        return copy

    def cancel(self, job_id: str) -> s.Job:
        """Stop the job before its next piece (a finished job is left as it is)."""
        with self._lock:
            job = self._live.get(job_id)
        if job is not None:
            job.cancelled.set()
            if job.record.status == "queued":
                self._finish(job, "cancelled", "cancelled before it started")
        return self.get(job_id)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; the running one stops before its next piece and is recorded failed."""
        self._closing.set()
        with self._lock:
            live = list(self._live.values())
        for job in live:
            job.cancelled.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # --- the jobs thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing.is_set():
            job = self._queue.get()
            if job is None:
                return
            if job.record.status != "queued":  # cancelled while it waited
                continue
            try:
                self._work(job)
            except _Stopped as stop:
                status = "failed" if self._closing.is_set() else "cancelled"
                self._finish(job, status, str(stop))
            except Exception as exc:  # noqa: BLE001 - reported through GET /v1/jobs/{id}
                self._finish(job, "failed", f"{type(exc).__name__}: {exc}")
            else:
                self._finish(job, "done", None)
        with self._lock:  # closing: what still waits will not run
            waiting = [j for j in self._live.values() if j.record.status == "queued"]
        for job in waiting:
            self._finish(job, "failed", "the server stopped before this job started; POST the documents again")

    def _work(self, job: _Job) -> None:
        counts = {"added": 0, "updated": 0, "unchanged": 0, "chunks_added": 0, "chunks_removed": 0,
                  "chunks_precomputed": 0}
        job.record.status, job.record.result = "running", dict(counts)
        self._save(job.record)
        for doc in job.documents:
            for name, n in self._piece(job, lambda d=doc: self.work.index_document(d)).items():
                counts[name] = counts.get(name, 0) + n
            self._progress(job, counts)
        if not job.precompute:
            return
        todo = self._piece(job, lambda: self.work.chunks_of(job.documents))
        counts["chunks_to_precompute"] = len(todo)
        for start in range(0, len(todo), self.work.batch):
            batch = todo[start:start + self.work.batch]
            self._piece(job, lambda b=batch: self.work.precompute(b))
            counts["chunks_precomputed"] += len(batch)
            self._progress(job, counts)

    def _piece(self, job: _Job, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread and wait for it; retried while the engine's queue is
        full (answers come first); stopped by cancel or shutdown."""
        while True:
            if job.cancelled.is_set():
                raise _Stopped("the server is shutting down" if self._closing.is_set() else "cancelled")
            try:
                future = self.scheduler.call(fn, job.cancelled)
            except QueueFullError:
                time.sleep(_RETRY_S)
                continue
            except CancelledRequestError as exc:
                raise _Stopped(str(exc)) from exc
            try:
                return future.result()
            except CancelledRequestError as exc:
                raise _Stopped(str(exc)) from exc

    # --- records -------------------------------------------------------------------------
    def _progress(self, job: _Job, counts: dict[str, int]) -> None:
        with self._lock:  # saved before anyone can read it: a restart never shows less than GET did
            job.record.result = dict(counts)
            self._save(job.record)

    def _finish(self, job: _Job, status: str, error: str | None) -> None:
        with self._lock:  # saved before anyone can read the new status: GET and the file agree
            if job.record.status in FINISHED:
                return
            job.record.status, job.record.error = status, error  # type: ignore[assignment]
            self._live.pop(job.record.id, None)
            self._save(job.record)
        if status == "failed":
            log.warning("document job %s failed: %s", job.record.id, error)

    def _save(self, record: s.Job) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder / f"{record.id}.json", record.model_dump())
        except OSError as exc:  # the job goes on; only its record after a restart is lost
            log.warning("could not record document job %s in %s: %s", record.id, self.folder, exc)

    def _load(self, folder: Path) -> None:
        """Read the records a previous server left; a job it left queued or running was cut
        short: recorded failed."""
        for path in sorted(folder.glob("job-*.json")) if folder.is_dir() else []:
            try:
                record = s.Job.model_validate(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable job record %s: %s", path, exc)
                continue
            if record.status not in FINISHED:
                record.status, record.error = "failed", INTERRUPTED
                self._save(record)
            self._records[record.id] = record
        self._trim()

    def _trim(self) -> None:
        with self._lock:
            finished = sorted((r for r in self._records.values() if r.status in FINISHED), key=lambda r: r.created)
            drop = finished[: max(0, len(self._records) - _KEPT)]
            for record in drop:
                del self._records[record.id]
        for record in drop:
            if self.folder is not None:
                (self.folder / f"{record.id}.json").unlink(missing_ok=True)


class _Stopped(Exception):
    """A job stopped between pieces (cancel or shutdown)."""
