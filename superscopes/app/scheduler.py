"""The queue: which job runs next, on the one worker thread (the model is one).

Grids wait in ``queue``; panel jobs in ``quick``, which runs before queued grids and between a
running grid's chunks. One queued or running job of each kind per page (client id), and a cap
on all jobs together, so that no page starves the others.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus

from superscopes.app.errors import Busy, NotFound, Refused
from superscopes.app.jobs import GridJob, Job, Keeper, PanelJob
from superscopes.app.store import check_run_id

KEEP_JOBS = 32  # finished jobs kept in memory (the store keeps them all)


class Scheduler:
    """The jobs this process knows, the two queues and the worker that runs them: grids with
    ``run_grid`` (which runs the waiting panel jobs between its chunks), panel jobs with ``run_panel``."""

    def __init__(
        self,
        max_queued: int,
        keep: Keeper,
        run_grid: Callable[[GridJob, Callable[[], None]], None],
        run_panel: Callable[[PanelJob], None],
    ):
        self.max_queued = max_queued
        self.keep = keep
        self.run_grid, self.run_panel = run_grid, run_panel
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queue: deque[GridJob] = deque()  # waiting grids, run in order
        self.quick: deque[PanelJob] = deque()  # panel jobs: before queued grids and between a grid's chunks
        self.changed = threading.Condition(self.lock)
        self.current: GridJob | None = None  # the grid the worker runs
        self.worker: threading.Thread | None = None
        self.closed = False

    def find(self, job_id: str) -> tuple[Job | None, int]:
        """A live job (or None) and how many jobs run before it."""
        with self.lock:
            job = self.jobs.get(check_run_id(job_id))
            return job, self.ahead(job) if job is not None else 0

    def job(self, job_id: str) -> Job:
        """A live job; NotFound if this process holds none of that id."""
        job, _ = self.find(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} running on this server (it may have finished before a restart)")
        return job

    def active_job(self, client: str) -> Job | None:
        """The page's queued or running job, if it has one."""
        with self.lock:
            return next((j for j in self.jobs.values() if j.client == client and j.active), None)

    def ahead(self, job: Job) -> int:
        """Jobs that run before a queued one (hold ``lock``): panel jobs wait only for those
        queued before them and the running chunk; grids, for every panel job too."""
        if job in self.quick:
            return self.quick.index(job) + (self.current is not None)
        if job in self.queue:
            return len(self.quick) + self.queue.index(job) + (self.current is not None)
        return 0

    def admit(self, client: str, panel: bool = False) -> None:
        """Refuse a second grid (or a second panel job: ``panel``) from one page, or any job
        while the queue is full."""
        with self.lock:
            self._admit(client, panel)

    def _admit(self, client: str, panel: bool) -> None:
        running = next(
            (j for j in self.jobs.values() if j.client == client and j.active and isinstance(j, PanelJob) == panel),
            None,
        )
        if running is not None:
            raise Busy(running.id, f"a {running.kind} panel job" if panel else "a run")
        waiting = len(self.queue) + len(self.quick) + (self.current is not None)
        if waiting >= self.max_queued:
            raise Refused(
                HTTPStatus.SERVICE_UNAVAILABLE, f"the queue is full ({waiting} runs): try again when one finishes"
            )

    def enqueue(self, job: Job) -> dict:
        """Admit ``job`` again (others may have queued since it was prepared), keep at most
        KEEP_JOBS finished jobs, queue it (a panel job ahead of the grids), wake the worker; its state."""
        panel = isinstance(job, PanelJob)
        with self.lock:
            self._admit(job.client, panel)
            self.jobs[job.id] = job
            finished = [j for j in self.jobs.values() if not j.active]
            for old in sorted(finished, key=lambda j: j.finished or j.started)[: max(0, len(self.jobs) - KEEP_JOBS)]:
                del self.jobs[old.id]
            (self.quick if panel else self.queue).append(job)
            ahead = self.ahead(job)
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="superscopes-worker", daemon=True)
                self.worker.start()
            self.changed.notify()
        self.keep(job)
        return job.state(0, ahead)

    def cancel(self, job_id: str) -> dict:
        """Drop a queued job at once; a running one stops after the chunk in progress."""
        job = self.job(job_id)
        job.cancel.set()
        with self.lock:
            waiting = self.quick if job in self.quick else self.queue
            dropped = job in waiting
            if dropped:
                waiting.remove(job)
                with job.lock:
                    job.status, job.finished = "cancelled", time.time()
        if dropped:
            self.keep(job)
        return job.state() | {"rows": [], "controls": []}  # the page has the rows: only the status changed

    def close(self) -> None:
        """Cancel every job and stop the worker after its chunk in progress."""
        with self.lock:
            self.closed = True
            for job in [*self.queue, *self.quick]:
                job.cancel.set()
            if self.current is not None:
                self.current.cancel.set()
            self.changed.notify_all()

    def run_waiting_panels(self) -> None:
        """Run the queued panel jobs now (the worker, between a grid's chunks)."""
        while True:
            with self.lock:
                if not self.quick or self.closed:
                    return
                job = self.quick.popleft()
            self.run_panel(job)

    def _work(self) -> None:
        """The worker thread: waiting panel jobs first, then the next grid, until ``close``."""
        while True:
            with self.lock:
                while not self.queue and not self.quick and not self.closed:
                    self.changed.wait()
                if self.closed:
                    return
                job: Job = self.quick.popleft() if self.quick else self.queue.popleft()
                if isinstance(job, GridJob):
                    self.current = job
            if isinstance(job, PanelJob):
                self.run_panel(job)
                continue
            with job.lock:
                job.status, job.started = "running", time.time()
            try:
                self.run_grid(job, self.run_waiting_panels)
            finally:
                with self.lock:
                    self.current = None
