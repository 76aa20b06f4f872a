"""``App``: what each endpoint does, over the model cache, the queue and the run store.

The HTTP layer (``web.py``) parses nothing but the body's JSON; ``App`` checks the fields
(``request.py``), builds the job (``grid.py``, ``panel_jobs.py``), queues it (``scheduler.py``)
and answers with the JSON the page reads. A run the process no longer holds is read back from
the store (``store.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from http import HTTPStatus
from threading import Thread

import pandas as pd

from superscopes.app.errors import BadRequest, NotFound, Refused, log_error
from superscopes.app.fields import SITES, parse_whole, text
from superscopes.app.fields import prompt as parse_prompt
from superscopes.app.grid import GridRunner, grid_job
from superscopes.app.jobs import GridJob, Job, Keeper, PanelJob, slug
from superscopes.app.model_cache import ModelCache
from superscopes.app.panel_jobs import PanelJobs
from superscopes.app.panels import Panels
from superscopes.app.request import DEFAULTS, LIMITS, PANEL_DEFAULTS, TRANSFORMS, extra_readouts, parse_grid
from superscopes.app.scheduler import Scheduler
from superscopes.app.store import RunStore, RunStoreError, check_run_id
from superscopes.models import DEFAULT_MODEL


class App:
    """State shared by the request handlers: model cache, jobs, judge and limits.

    ``models``: already-loaded models to offer (name -> nnsight model), e.g. a tiny one in
    tests. ``judge``: ``frame -> frame with a similarity column`` (default: the MiniLM judge).
    ``chunk_rows``: about how many patched rows one ``superscopes.run`` call gets.
    ``store``: where runs are kept across restarts (None: only in this process's memory).
    ``saes``, ``generators``, ``corpora``: what the cell panels may use (``panels.Panels``);
    the embedded SAEs are offered with the embedded models (``offer_embedded``).
    """

    def __init__(
        self,
        default_model: str = DEFAULT_MODEL,
        models: dict | None = None,
        judge: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
        remote_models: list[str] | None = None,
        limits: dict | None = None,
        chunk_rows: int = 32,
        batch_size: int = 64,
        offer_embedded: bool = True,
        store: RunStore | None = None,
        saes: Sequence = (),
        generators: Sequence = (),
        corpora: Sequence = (),
    ):
        from superscopes.judge import DEFAULT_THRESHOLD

        self.limits = {**LIMITS, **(limits or {})}
        self.default_model = default_model
        self.judge = judge
        self.threshold = DEFAULT_THRESHOLD
        self.chunk_rows = chunk_rows
        self.batch_size = batch_size
        self.models = ModelCache(default_model, models, remote_models, offer_embedded)
        self.store = store
        keep = Keeper(store)
        self.panels = Panels(saes, generators, corpora, embedded=offer_embedded)
        self.panel_jobs = PanelJobs(self.panels, self.models, self.score, keep, self.limits, default_model, batch_size)
        self.grids = GridRunner(self.models, self.score, keep, chunk_rows)
        self.scheduler = Scheduler(self.limits["max_queued"], keep, self.grids.run, self.panel_jobs.run)

    @property
    def jobs(self) -> dict[str, Job]:
        return self.scheduler.jobs

    @property
    def quick(self) -> deque[PanelJob]:
        return self.scheduler.quick

    @property
    def worker(self) -> Thread | None:
        return self.scheduler.worker

    @property
    def remote_configured(self) -> bool:
        return self.models.remote_configured

    def model_choices(self) -> list[dict]:
        return self.models.choices()

    def model(self, name: str) -> object:
        """The named model, loaded on first use and cached in this process."""
        return self.models.model(name)

    def score(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with a similarity column: the given judge, else MiniLM (loaded on first use)."""
        if self.judge is not None:
            return self.judge(frame)
        from superscopes.judge import score

        return score(frame)

    # ------------------------------------------------------------ reading

    def config(self, client: str | None = None) -> dict:
        """What the page needs to lay out its form, and the ``client``'s active job."""
        from superscopes.prompts import TEMPLATES

        active = self.scheduler.active_job(client) if client else None
        return {
            "models": self.model_choices(),
            "default_model": self.default_model,
            "remote_configured": self.remote_configured,
            "limits": self.limits,
            "sites": SITES,
            "transforms": TRANSFORMS,
            "readouts": extra_readouts(),
            "templates": {name: {"text": t.text, "placeholder": t.placeholder} for name, t in TEMPLATES.items()},
            "defaults": DEFAULTS,
            "threshold": self.threshold,
            "active_job": active.id if active else None,
            "keeps_runs": self.store is not None,
            "panels": self.panels.config() | {"defaults": PANEL_DEFAULTS},
        }

    def tokens(self, body: dict) -> dict:
        """The prompt's tokens and the model's number of layers (the form's token and layer pickers)."""
        from superscopes.sites import num_layers

        name = text(body, "model", self.default_model) or self.default_model
        prompt = parse_prompt(body, self.limits)
        model = self.model(name)
        return {
            "model": name,
            "prompt": prompt,
            "tokens": self.models.tokens(model, prompt) if prompt else [],
            "num_layers": num_layers(model),
        }

    def _kept(self, job_id: str) -> dict:
        """A kept run's state (a run of an earlier server, or one dropped from memory)."""
        try:
            kept = self.store.state(check_run_id(job_id)) if self.store is not None else None
        except RunStoreError as error:
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
        if kept is None:
            raise NotFound(f"no run {job_id!r} on this server: it was never run here, or the history dropped it")
        return kept

    def state(self, job_id: str, since: int = 0, controls_since: int = 0) -> dict:
        """A live job's state, else the kept run's (rows from ``since``, controls from ``controls_since``)."""
        job, ahead = self.scheduler.find(job_id)
        if job is not None:
            return self.panel_jobs.explain(job.state(since, ahead, controls_since))
        kept = self._kept(job_id)
        rows, controls = kept["rows"][max(0, since) :], kept["controls"][max(0, controls_since) :]
        return self.panel_jobs.explain(
            kept | {"rows": rows, "controls": controls, "ahead": 0, "cancelling": False, "eta": None}
        )

    def runs(self, limit: int) -> dict:
        """The newest runs for the history list: kept ones, with live ones' progress."""
        with self.scheduler.lock:
            live = dict(self.jobs)
        try:
            found = self.store.recent(limit) if self.store is not None else None
        except RunStoreError as error:  # locked or unreadable: this server's own runs still list
            log_error(error)
            found = None
        if found is None:
            grids = [j for j in live.values() if isinstance(j, GridJob)]
            newest = sorted(grids, key=lambda j: j.started, reverse=True)[:limit]
            found = [{"id": j.id, "created": j.started, "status": j.status} for j in newest]
        runs = []
        for run in found:
            job = live.get(run["id"])
            runs.append(run | (job.summary() | {"status": job.status} if job is not None else {}))
        return {"runs": runs}

    def csv(self, job_id: str) -> tuple[str, bytes]:
        """A grid's file name and its results so far as CSV (formula-safe)."""
        job, _ = self.scheduler.find(job_id)
        kind = job.kind if job is not None else self._kept(job_id).get("kind", "grid")
        if kind != "grid":
            raise NotFound(f"run {job_id!r} is a {kind} panel job: only grids have a CSV")
        if isinstance(job, GridJob):
            prompt, data = job.prompt, job.csv()
        else:
            kept = self._kept(job_id)
            try:
                prompt, data = kept["prompt"], self.store.csv(job_id)
            except RunStoreError as error:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
            if data is None and kept.get("dropped"):
                raise NotFound(f"run {job_id!r} was too large to keep its results: run it again for a CSV")
            if data is None:
                raise NotFound(f"run {job_id!r} stopped before any of its cells finished: it has no CSV")
        return f"superscopes-{slug(prompt)}-{job_id}.csv", data

    # ------------------------------------------------------------ jobs

    def job(self, job_id: str) -> Job:
        return self.scheduler.job(job_id)

    def prepare(self, body: dict) -> GridJob:
        """Parse and bound the grid (pure checks first), refuse a page that has one queued
        before loading the model (a refused page costs nothing), then plan it."""
        request = parse_grid(body, self.limits, self.default_model)
        self.scheduler.admit(request.client)
        model = self.model(request.model)
        return grid_job(request, model, self.models, self.limits, self.chunk_rows, self.batch_size, self.threshold)

    def start(self, body: dict) -> dict:
        """Queue a grid; its state, with how many jobs run before it."""
        return self.scheduler.enqueue(self.prepare(body))

    def focus(self, job_id: str, body: dict) -> dict:
        """Run the remaining chunks of the token at ``position`` next."""
        position = parse_whole(body.get("position"), "position", 0, self.limits["max_prompt_tokens"] - 1)
        job = self.job(job_id)
        if not isinstance(job, GridJob):
            raise BadRequest(f"job {job.id} is a {job.kind} panel job, not a grid: it has no tokens to reorder")
        positions = job.grid["positions"]
        if position not in positions:
            raise BadRequest(
                f"position {position} is not a source token of this run; its source tokens are at {positions}"
            )
        with job.lock:
            job.focus = position
        return {"job": job.id, "focus": position}

    def prepare_cell(self, body: dict) -> PanelJob:
        """A cell panel job (``panel_jobs.PanelJobs.cell``), admitted for its page."""
        job = self.panel_jobs.cell(body)
        self.scheduler.admit(job.client, panel=True)
        return job

    def prepare_latent(self, body: dict) -> PanelJob:
        """A latent panel job (``panel_jobs.PanelJobs.latent``), admitted for its page."""
        job = self.panel_jobs.latent(body)
        self.scheduler.admit(job.client, panel=True)
        return job

    def start_panel(self, job: PanelJob) -> dict:
        """Queue a panel job ahead of queued grids; its state."""
        return self.scheduler.enqueue(job)

    def cancel(self, job_id: str) -> dict:
        """Drop a queued job at once; a running one stops after the chunk in progress."""
        return self.scheduler.cancel(job_id)

    def close(self) -> None:
        """Cancel every job and stop the worker after its chunk in progress."""
        self.scheduler.close()
