"""Panel jobs: a cell's panel (its SAE breakdown, generated and nearest-corpus inputs) and a
latent's (the SAE latent as the source, ``sae.latent_scope`` with an identity target), checked
against the model and what the server offers (``panels.Panels``), and run on the worker.

They are small: they go through the same queue, bounds and store as grids, run before queued
grids and between a running grid's chunks, one at a time per page (beside its grid).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

import pandas as pd

from superscopes.app.errors import BadRequest, error_text, log_error, show
from superscopes.app.fields import prompt, text
from superscopes.app.jobs import CellJob, Keeper, LatentJob, PanelJob, finite
from superscopes.app.model_cache import ModelCache
from superscopes.app.panels import Panels, train_command
from superscopes.app.request import PANEL_DEFAULTS, parse_cell, parse_latent
from superscopes.app.scheduler import KEEP_JOBS
from superscopes.app.store import RunStore, RunStoreError

if TYPE_CHECKING:
    from superscopes.models import Model


class PanelJobs:
    """Prepares and runs the panel jobs; remembers each latent's latest self-explanation
    (``explained``), to label the breakdowns that list it."""

    def __init__(
        self,
        panels: Panels,
        models: ModelCache,
        score: Callable[[pd.DataFrame], pd.DataFrame],
        keep: Keeper,
        limits: dict,
        default_model: str,
        batch_size: int,
    ):
        self.panels, self.models, self.score, self.keep = panels, models, score, keep
        self.limits, self.default_model, self.batch_size = limits, default_model, batch_size
        self.explained: dict[tuple[str, int], dict] = {}  # (sae, latent) -> its latest self-explanation
        self.recall(keep.store)

    def recall(self, store: RunStore | None) -> None:
        """The self-explanations of the latent runs kept in ``store``."""
        try:
            explained = store.recent(KEEP_JOBS * 4, kind="latent") if store is not None else []
        except RunStoreError as error:  # locked by another process: the page works without them
            log_error(error)
            explained = []
        for run in reversed(explained):
            if run.get("explanation"):
                self.explained[(run["sae"], run["latent"])] = run["explanation"] | {"job": run["id"]}

    def explain(self, state: dict) -> dict:
        """A cell job's state with the self-explanations run since for its latents."""
        result = state.get("result") or {}
        sae_id = (result.get("sae") or {}).get("id")
        if state.get("kind") == "cell" and sae_id:
            latents = [row["latent"] for row in result["sae"].get("latents", [])]
            state["explanations"] = {
                str(i): self.explained[(sae_id, i)] for i in latents if (sae_id, i) in self.explained
            }
        return state

    # ------------------------------------------------------------ preparing

    def _model(self, body: dict) -> tuple[str, object, tuple[str, ...], int]:
        """The request's model (local only): its name, the model, the names an SAE or generator
        may record for it, and its hidden size."""
        from superscopes.models import model_name
        from superscopes.sites import hidden_size

        name = text(body, "model", self.default_model) or self.default_model
        if name in self.models.remote_models:
            raise BadRequest(f"model {name!r}: the SAE, latent and generated-input panels run on local models only")
        model = self.models.model(name)
        return name, model, (name, model_name(model)), hidden_size(model)

    def _offer(
        self,
        body: dict,
        kind: str,
        names: tuple[str, ...],
        hidden: int,
        site: str | None = None,
        layer: int | None = None,
    ) -> str | None:
        """The SAE or generator the request names (``body[kind]``), checked against the model
        (and the cell's ``site``/``layer``): 400 naming the field when it does not fit."""
        wanted = text(body, kind, max_chars=200)
        if not wanted:
            return None
        offers = self.panels.offered(kind)
        if wanted not in offers:
            loaded = ", ".join(offers) or "none"
            raise BadRequest(f"{kind} {show(wanted)} is not loaded on this server; loaded: {loaded}")
        reason = offers[wanted].misfit(names, hidden, site, layer)
        if reason is not None:
            where = names[0] if site is None else f"{names[0]} {site} layer {layer}"
            raise BadRequest(f"{kind} {show(wanted)} does not fit {where}: {reason}")
        return wanted

    def cell(self, body: dict) -> CellJob:
        """A cell panel job: bounds every field, picks the SAE, generator and corpus that apply
        (or records why none does) from their recorded model, site, layer and width."""
        from superscopes.sites import num_layers

        client = text(body, "client") or "anonymous"
        name, model, names, hidden = self._model(body)
        the_prompt = prompt(body, self.limits)
        if not the_prompt.strip():
            raise BadRequest("the prompt is empty: a cell is a token of a prompt")
        cell = parse_cell(body, self.limits, self.models.tokens(model, the_prompt), num_layers(model))
        request = asdict(cell) | {"promotes": PANEL_DEFAULTS["promotes"]}
        for kind in ("sae", "generator", "corpus"):
            chosen = self._offer(body, kind, names, hidden, cell.site, cell.layer) if kind != "corpus" else None
            why = ""
            if chosen is None:
                chosen, why = self.panels.pick(kind, names, hidden, cell.site, cell.layer)
            request[kind], request[f"{kind}_why"] = chosen, why
        if request["generator"] is None:
            request["train_command"] = train_command(name, cell.site, cell.layer)
        return CellJob(id=uuid.uuid4().hex[:12], client=client, model=name, prompt=the_prompt, total=1, request=request)

    def latent(self, body: dict) -> LatentJob:
        """A latent panel job: an SAE that fits the model, one of its latents, a few alphas."""
        client = text(body, "client") or "anonymous"
        name, model, names, hidden = self._model(body)
        if not text(body, "sae", max_chars=200):
            loaded = ", ".join(self.panels.saes) or "none loaded"
            raise BadRequest(f"sae is missing: name the SAE whose latent is the source ({loaded})")
        sae_id = self._offer(body, "sae", names, hidden)
        latent = parse_latent(body, self.limits, sae_id, self.panels.saes[sae_id].size)
        # The prompt the latent was read from: its readouts are judged against it.
        the_prompt = prompt(body, self.limits)
        return LatentJob(
            id=uuid.uuid4().hex[:12],
            client=client,
            model=name,
            prompt=the_prompt,
            total=len(latent.alphas),
            request=asdict(latent),
        )

    # ------------------------------------------------------------ running

    def run(self, job: PanelJob) -> None:
        """Run ``job`` on the worker thread; an error is the job's, reported to the page."""
        with job.lock:
            job.status, job.started = "running", time.time()
            job.running_since = job.started
        try:
            model = self.models.model(job.model)
            result = self._cell(job, model) if isinstance(job, CellJob) else self._latent(job, model)
            status, error = "done", None
        except Exception as exc:  # reported to the page; the traceback goes to the terminal
            log_error(exc)
            result, status, error = None, "error", error_text(exc)
        with job.lock:
            job.result, job.status, job.error, job.finished = result, status, error, time.time()
            job.done = job.total if status == "done" else 0
        self.keep(job, now=True)

    def _cell(self, job: PanelJob, model: Model) -> dict:
        from superscopes.app.panels import breakdown, generated, nearest, read_vector

        r, panels = job.request, self.panels
        vector = read_vector(model, job.prompt, r["site"], r["layer"], r["position"])
        result: dict = {"norm": float(vector.norm())}
        if r["sae"]:
            sae = panels.sae(r["sae"])
            result["sae"] = {"id": r["sae"], "label": repr(sae)} | breakdown(model, sae, vector, r["k"], r["promotes"])
        else:
            result["sae"] = {"id": None, "why": r["sae_why"], "available": panels.config()["saes"]}
        generator = panels.generators[r["generator"]] if r["generator"] else None
        if generator is not None:
            inputs = generated(model, generator.loaded, vector, r["samples"], r["seed"])
            result["generated"] = {"id": generator.id, "detail": generator.detail, "seed": r["seed"], "inputs": inputs}
        else:
            result["generated"] = {"id": None, "why": r["generator_why"], "command": r["train_command"]}
        if r["corpus"]:
            corpus = panels.corpora[r["corpus"]]
            std = None if generator is None else generator.loaded.std
            inputs, scale = nearest(model, corpus.loaded, vector, r["samples"], std)
            result["nearest"] = {"id": corpus.id, "detail": corpus.detail, "inputs": inputs, "std": scale}
        else:
            result["nearest"] = {"id": None, "why": r["corpus_why"]}
        return result

    def _latent(self, job: PanelJob, model: Model) -> dict:
        from superscopes.app.panels import latent_frame
        from superscopes.metrics import is_echo

        r = job.request
        sae = self.panels.sae(r["sae"])
        frame, scale = latent_frame(model, sae, r["latent"], r["alphas"], r["max_new_tokens"], self.batch_size)
        if job.prompt.strip():  # judged against the prompt the latent was read from, as the grid's readouts
            frame["similarity"] = self.score(frame.assign(source=job.prompt))["similarity"].to_numpy()
        else:
            frame["similarity"] = None
        rows = [
            {
                "alpha": float(row.alpha),
                "output": row.output,
                "similarity": finite(row.similarity),
                "self_similarity": finite(float(row.self_similarity)),
                "relevancy_mean": finite(float(row.relevancy_mean)),
                "echo": is_echo(row.output, "", row.target),
            }
            for row in frame.itertuples(index=False)
        ]
        # The self-explanation: the alpha whose text depends most on the latent (mean relevancy, as
        # recipes/sae_self_explanation.py chooses), ties to the smaller alpha.
        scored = [row for row in rows if row["relevancy_mean"] is not None]
        chosen = max(scored, key=lambda row: row["relevancy_mean"], default=None)
        keys = ("alpha", "output", "self_similarity", "relevancy_mean")
        explanation = None if chosen is None else {k: chosen[k] for k in keys}
        if explanation is not None:
            self.explained[(r["sae"], r["latent"])] = explanation | {"job": job.id}
        target, layer = str(frame["target"].iloc[0]), int(frame["target_layer"].iloc[0])
        return {"rows": rows, "scale": scale, "target": target, "explanation": explanation, "layer": layer}
