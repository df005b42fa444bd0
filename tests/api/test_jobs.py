"""Document jobs run piece by piece on the engine's scheduler: other work goes on between pieces,
a job is cancellable, and its record survives the process (an interrupted job reads failed)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from chunkcache.api import schemas as s
from chunkcache.api.jobs import INTERRUPTED, DocumentJobs, JobNotFoundError, JobWork
from chunkcache.scheduler import QueueFullError, Scheduler


class _Work:
    """Pieces that take ``piece_s`` each and record what ran, in order."""

    def __init__(self, piece_s: float = 0.02) -> None:
        self.piece_s, self.ran, self.gate = piece_s, [], threading.Event()
        self.gate.set()

    def index_document(self, doc: s.DocumentIn) -> dict[str, int]:
        self.gate.wait(10)
        time.sleep(self.piece_s)
        self.ran.append(f"index {doc.id}")
        return {"added": 1, "chunks_added": 2}

    def chunks_of(self, docs: list[s.DocumentIn]) -> list[str]:
        return [f"{d.id}-{i}" for d in docs for i in range(2)]

    def precompute(self, texts: list[str]) -> None:
        time.sleep(self.piece_s)
        self.ran.append(f"precompute {len(texts)}")

    def jobs(self, scheduler: Scheduler, folder: Path | None, max_queue: int = 4) -> DocumentJobs:
        return DocumentJobs(scheduler, JobWork(self.index_document, self.chunks_of, self.precompute, 3), folder, max_queue)


def _docs(n: int) -> list[s.DocumentIn]:
    return [s.DocumentIn(id=f"d{i}", text=f"text {i}") for i in range(n)]


def _wait(jobs: DocumentJobs, job_id: str, statuses: tuple[str, ...] = ("done", "failed", "cancelled")) -> s.Job:
    deadline = time.monotonic() + 30
    while (job := jobs.get(job_id)).status not in statuses:
        if time.monotonic() > deadline:
            raise AssertionError(f"job stuck in {job.status}")
        time.sleep(0.01)
    return job


@pytest.fixture()
def scheduler():  # type: ignore[no-untyped-def]
    sched = Scheduler(None, None, max_queue=8)  # type: ignore[arg-type]  # calls only
    yield sched
    sched.close(10)


def test_a_job_runs_in_pieces_and_other_work_goes_on_between_them(scheduler: Scheduler, tmp_path: Path) -> None:
    work = _Work()
    jobs = work.jobs(scheduler, tmp_path / "jobs")
    job = jobs.submit(_docs(10), precompute=True)
    while not work.ran:
        time.sleep(0.005)
    scheduler.call(lambda: work.ran.append("answer")).result(10)
    done = _wait(jobs, job.id)
    assert done.status == "done" and done.result is not None
    assert done.result["added"] == 10 and done.result["chunks_added"] == 20
    assert done.result["chunks_precomputed"] == done.result["chunks_to_precompute"] == 20
    assert 0 < work.ran.index("answer") < 9  # it did not wait behind the ten documents
    assert work.ran.count("precompute 3") == 6 and work.ran[-1] == "precompute 2"  # batches of 3
    on_disk = json.loads((tmp_path / "jobs" / f"{job.id}.json").read_text())
    assert on_disk["status"] == "done" and on_disk["result"] == done.result
    jobs.close()


def test_cancel_stops_a_running_job_before_its_next_piece_and_a_queued_one_at_once(
        scheduler: Scheduler, tmp_path: Path) -> None:
    work = _Work(piece_s=0.05)
    jobs = work.jobs(scheduler, tmp_path / "jobs")
    running = jobs.submit(_docs(40), precompute=True)
    queued = jobs.submit(_docs(2), precompute=False)
    _wait(jobs, running.id, ("running",))
    assert jobs.cancel(queued.id).status == "cancelled"
    jobs.cancel(running.id)
    stopped = _wait(jobs, running.id)
    assert stopped.status == "cancelled" and stopped.result is not None and stopped.result["added"] < 40
    time.sleep(0.2)
    assert jobs.get(running.id).result == stopped.result  # nothing ran after the cancel
    assert not any(step.startswith("precompute") for step in work.ran)
    assert jobs.cancel(running.id).status == "cancelled"  # a finished job stays as it is
    with pytest.raises(JobNotFoundError, match="POST /v1/documents"):
        jobs.cancel("job-nope")
    jobs.close()


def test_a_job_cut_short_by_the_process_reads_failed_after_a_restart(scheduler: Scheduler, tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    for status in ("queued", "running", "done"):
        record = s.Job(id=f"job-{status}", status=status, created=1, result={"added": 1})  # type: ignore[arg-type]
        (folder / f"{record.id}.json").write_text(json.dumps(record.model_dump()))
    (folder / "job-torn.json").write_text('{"id": "job-to')  # not written by us (ours are atomic): skipped
    jobs = _Work().jobs(scheduler, folder)
    for status in ("queued", "running"):
        job = jobs.get(f"job-{status}")
        assert job.status == "failed" and job.error == INTERRUPTED and job.result == {"added": 1}
        assert json.loads((folder / f"job-{status}.json").read_text())["status"] == "failed"
    assert jobs.get("job-done").status == "done"
    with pytest.raises(JobNotFoundError):
        jobs.get("job-torn")
    jobs.close()


def test_the_job_queue_is_bounded_and_shutdown_fails_what_is_unfinished(scheduler: Scheduler) -> None:
    work = _Work()
    work.gate.clear()  # the first job holds the jobs thread
    jobs = work.jobs(scheduler, None, max_queue=2)
    first = jobs.submit(_docs(1), precompute=False)
    _wait(jobs, first.id, ("running",))
    waiting = [jobs.submit(_docs(1), precompute=False) for _ in range(2)]
    with pytest.raises(QueueFullError, match="document jobs"):
        jobs.submit(_docs(1), precompute=False)
    closer = threading.Thread(target=jobs.close)
    closer.start()
    work.gate.set()
    closer.join(10)
    assert jobs.get(first.id).status == "done"  # its one piece had started: it finished
    assert all(jobs.get(j.id).status == "failed" for j in waiting)
