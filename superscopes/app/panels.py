"""The explorer's research panels for a clicked cell (source prompt, token, site, layer).

- SAE breakdown: the cell's source vector's top SAE latents (``sae.decompose``), each labelled
  by what can be read off it without a judge: the tokens its decoder direction promotes
  through the model's own final norm and unembedding (``lens.decode``, i.e. ``ops.unembed``:
  a logit-lens reading of the direction, as if it left the last block), and its
  self-explanation where a latent job has been run for it.
- A latent as the source: ``sae.latent_scope`` (identity target, a few alphas) with
  ``sae.explanation_scores`` (self-similarity, relevancy).
- Generated inputs: a trained InverseScope generator's seeded samples for the vector
  (``inverse.Generator``), each with its own activation's distance to the vector, beside the
  nearest inputs of a corpus of (input, activation) pairs (``pairs.pt``, as ``superscopes
  inverse train`` writes it) by the same standardised distance.

``Panels`` holds what the server offers (SAEs, generators, corpora) and says, for a cell,
which one applies or why none does, from their recorded model, site, layer and width (no
weights are read for that). The ``*_result`` functions compute; the app runs them on its
worker thread, never in a request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from superscopes.files import load_torch

if TYPE_CHECKING:
    from superscopes.models import Model

EMBEDDED_PREFIX = "embedded:"
# The README's full-size command (about 45 min on two CPU cores), at the cell's site and layer.
TRAIN_COMMAND = (
    "python -m superscopes.inverse train --model {model} --site {site} --layer {layer} --steps 3000 "
    "--out results/inverse/{slug}-L{layer}"
)
SERVE_COMMAND = "superscopes app --model {model} --generator results/inverse/{slug}-L{layer}"
CHUNK = 8192  # corpus activations compared with the vector at a time (bounded memory)


def same_model(recorded: str | None, names: tuple[str, ...]) -> bool:
    """Whether a recorded model name is one of ``names`` (a repo id's last part, any case:
    ``HuggingFaceTB/SmolLM2-135M`` is ``smollm2-135m``)."""
    if not recorded:
        return True  # nothing recorded: the width check decides
    short = {str(n).rstrip("/").rsplit("/", 1)[-1].lower() for n in names if n}
    return recorded.rstrip("/").rsplit("/", 1)[-1].lower() in short


@dataclass
class Offered:
    """One SAE, generator or corpus the server offers: where it reads, without its weights."""

    id: str
    kind: str  # sae | generator | corpus
    model: str | None
    site: str
    layer: int
    d_in: int
    detail: str
    path: Path | None = None
    loaded: object = field(default=None, repr=False)
    size: int = 0  # an SAE's latents

    def describe(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "site": self.site,
            "layer": self.layer,
            "d_in": self.d_in,
            "detail": self.detail,
            **({"latents": self.size} if self.kind == "sae" else {}),
        }

    def words(self) -> str:
        return f"{self.id} ({self.model or 'any model'}, {self.site} layer {self.layer}, width {self.d_in})"

    def misfit(
        self, names: tuple[str, ...], hidden: int, site: str | None = None, layer: int | None = None
    ) -> str | None:
        """Why this does not apply to a model (``names``, hidden size ``hidden``) at
        ``site``/``layer``; None if it does."""
        if not same_model(self.model, names):
            return f"it was made for {self.model}"
        if self.d_in != hidden:
            return f"its width {self.d_in} is not {names[0]}'s hidden size {hidden}"
        if site is not None and (self.site, self.layer) != (site, layer):
            return f"it reads {self.site} layer {self.layer}"
        return None


def _sae_offer(source, id_: str) -> Offered:
    from superscopes import sae as S

    if isinstance(source, S.SAE):
        sae = source
        return Offered(id_, "sae", sae.model, sae.site, sae.layer, sae.d_in, repr(sae), loaded=sae, size=sae.d_sae)
    import json

    path = Path(source)
    if not ((path / S.CFG_FILE).is_file() and (path / S.WEIGHTS_FILE).is_file()):  # other formats: read it now
        sae = S.load_folder(path)
        return Offered(id_, "sae", sae.model, sae.site, sae.layer, sae.d_in, repr(sae), loaded=sae, size=sae.d_sae)
    cfg = json.loads((path / S.CFG_FILE).read_text())  # a SAELens folder: its weights are read when it is used
    site, layer = S.hook_site(S.cfg_field(cfg, "hook_name"), where=f"{path / S.CFG_FILE}: ")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    kind = cfg.get("architecture", "standard") + (f" k={k}" if k else "")
    model = S.cfg_field(cfg, "model_name")
    return Offered(
        id_,
        "sae",
        model,
        site,
        layer,
        int(cfg["d_in"]),
        f"{kind}, {cfg['d_sae']} latents",
        path=path,
        size=int(cfg["d_sae"]),
    )


def _generator_offer(source, id_: str) -> Offered:
    from superscopes.inverse import Generator

    if isinstance(source, Generator):
        generator, path = source, None
    else:
        path = Path(source) / "generator.pt" if Path(source).is_dir() else Path(source)
        generator = Generator.load(path)
    c = generator.config
    steps = generator.history[-1]["step"] if generator.history else c.steps
    detail = f"{c.n_layers}-layer generator, {steps} steps, inputs up to {c.max_tokens} tokens"
    return Offered(
        id_, "generator", c.model or None, c.site, c.layer, generator.d_in, detail, path=path, loaded=generator
    )


def _corpus_offer(source, id_: str) -> Offered:
    """A corpus of pairs: a ``pairs.pt`` file (or a folder holding one), or a dict of it."""
    if isinstance(source, dict):
        saved, path = source, None
    else:
        path = Path(source)
        path = path / "pairs.pt" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no corpus of pairs at {path} (superscopes inverse train --out writes pairs.pt)")
        saved = load_torch(path, mmap=True)
    read = saved.get("read") or {}
    if not {"inputs", "activations"} <= set(saved) or "site" not in read:
        raise ValueError(f"{path}: a corpus of pairs holds read (model, site, layer), inputs and activations")
    acts = saved["activations"]
    detail = f"{len(saved['inputs'])} inputs of {read.get('texts', '?')} {read.get('corpus', '')} texts".replace(
        "  ", " "
    )
    return Offered(
        id_,
        "corpus",
        read.get("model"),
        read["site"],
        int(read["layer"]),
        int(acts.shape[1]),
        detail,
        path=path,
        loaded=(saved["inputs"], acts),
    )


def _unique_id(base: str, taken: dict) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


class Panels:
    """The SAEs, generators and corpora a server offers (``saes``: folders or ``SAE`` objects;
    ``generators``: ``generator.pt`` files, their folders or ``Generator`` objects;
    ``corpora``: ``pairs.pt`` files or folders). A generator folder's own ``pairs.pt`` (its
    training corpus) is offered as a corpus too. ``embedded``: offer the package's SAEs."""

    def __init__(self, saes=(), generators=(), corpora=(), embedded: bool = True):
        from superscopes import sae as S

        self.saes: dict[str, Offered] = {}
        self.generators: dict[str, Offered] = {}
        self.corpora: dict[str, Offered] = {}
        self.lock = threading.Lock()  # lazy SAE loads from request threads and the worker
        if embedded:
            for model, folder in S.EMBEDDED.items():
                self.saes[EMBEDDED_PREFIX + model] = _sae_offer(S.EMBEDDED_DIR / folder, EMBEDDED_PREFIX + model)
        embedded_dirs = {(S.EMBEDDED_DIR / folder).resolve(): model for model, folder in S.EMBEDDED.items()}
        for source in saes:
            if isinstance(source, S.SAE):
                base = f"sae:{source.site}-{source.layer}"
            elif Path(source).resolve() in embedded_dirs:  # an embedded SAE given by its folder: its own name
                base = EMBEDDED_PREFIX + embedded_dirs[Path(source).resolve()]
                if base in self.saes:
                    continue
            else:
                base = f"sae:{Path(source).name}"
            offer = _sae_offer(source, _unique_id(base, self.saes))
            self.saes[offer.id] = offer
        for source in generators:
            base = "generator:" + (Path(source).name if isinstance(source, (str, Path)) else "in-memory")
            offer = _generator_offer(source, _unique_id(base, self.generators))
            self.generators[offer.id] = offer
            beside = offer.path.parent / "pairs.pt" if offer.path is not None else None
            if beside is not None and beside.is_file():  # its training corpus
                corpora = [beside, *corpora]
        for source in corpora:
            base = "corpus:" + (Path(source).parent.name if isinstance(source, (str, Path)) else "in-memory")
            offer = _corpus_offer(source, _unique_id(base, self.corpora))
            self.corpora[offer.id] = offer

    def config(self) -> dict:
        return {
            "saes": [o.describe() for o in self.saes.values()],
            "generators": [o.describe() for o in self.generators.values()],
            "corpora": [o.describe() for o in self.corpora.values()],
        }

    def offered(self, kind: str) -> dict[str, Offered]:
        return {"sae": self.saes, "generator": self.generators, "corpus": self.corpora}[kind]

    def pick(self, kind: str, names: tuple[str, ...], hidden: int, site: str, layer: int) -> tuple[str | None, str]:
        """The first offered ``kind`` that applies to the cell, or None and why none does."""
        offers = self.offered(kind)
        why = []
        for offer in offers.values():
            reason = offer.misfit(names, hidden, site, layer)
            if reason is None:
                return offer.id, ""
            why.append(f"{offer.words()}: {reason}")
        where = f"{names[0]} {site} layer {layer}"
        if not offers:
            return None, f"no {kind} is loaded on this server, so none applies to {where}"
        return None, f"no {kind} here applies to {where}. Loaded: " + "; ".join(why)

    def sae(self, sae_id: str):
        """The SAE, its weights read on first use."""
        from superscopes import sae as S

        offer = self.saes[sae_id]
        with self.lock:
            if offer.loaded is None:
                offer.loaded = S.load_folder(offer.path)
        return offer.loaded


def train_command(model: str, site: str, layer: int) -> str:
    """The commands that train a generator for ``model`` at ``site``/``layer`` and serve it."""
    import re

    slug = re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-").lower() or "model"
    return (
        TRAIN_COMMAND.format(model=model, site=site, layer=layer, slug=slug)
        + "\n"
        + SERVE_COMMAND.format(model=model, slug=slug, layer=layer)
    )


# ---------------------------------------------------------------- the worker's side


def read_vector(model: Model, prompt: str, site: str, layer: int, position: int) -> torch.Tensor:
    """The activation ``[d]`` at ``site``/``layer`` and ``position`` of ``prompt`` (as the grid reads it)."""
    from superscopes import ops

    with torch.inference_mode(), model.trace(prompt):
        vector = ops.read(model, site, layer, position=position).save()
    return vector[0].detach().float().cpu()


def breakdown(model: Model, sae, vector: torch.Tensor, k: int, promotes: int) -> dict:
    """The vector's ``k`` most active latents, each with the ``promotes`` tokens its decoder
    direction promotes through the model's own unembedding, and how well the SAE
    reconstructs the vector."""
    from superscopes.lens import decode

    with torch.inference_mode():
        latents = sae.decompose(vector, k)
        active = int((sae.encode(vector[None]) > 0).sum())
        reconstruction = sae(vector[None])[0].float()
        rows = sae.W_dec.detach()[[i for i, _ in latents]].float() if latents else torch.empty(0, sae.d_in)
        top = decode(model, rows, top_k=promotes) if latents else {"ids": [], "probs": []}
    tokenizer = model.tokenizer
    shown = []
    for (latent, activation), ids, probs in zip(latents, top["ids"], top["probs"]):
        shown.append(
            {
                "latent": latent,
                "activation": activation,
                "promotes": [tokenizer.decode([int(i)]) for i in ids],
                "promotes_probs": [float(p) for p in probs],
            }
        )
    error = (vector - reconstruction).norm() / vector.norm().clamp_min(1e-12)
    return {
        "latents": shown,
        "active": active,
        "reconstruction_cosine": float(torch.nn.functional.cosine_similarity(reconstruction, vector, dim=0)),
        "error_share": float(error),
    }


def generated(model: Model, generator, vector: torch.Tensor, samples: int, seed: int) -> list[dict]:
    """``samples`` seeded inputs from the generator for the vector, each with the distance of
    its own activation (at its last token) to the vector (``inverse.distance``)."""
    from superscopes.inverse import distance, last_token_activations

    c = generator.config
    texts = generator.sample_texts(model.tokenizer, vector[None], samples, seed)[0]
    readable = [t for t in texts if t.strip()]  # a sample of special tokens only decodes to nothing
    acts = last_token_activations(model, readable, c.site, c.layer) if readable else torch.empty(0, vector.numel())
    found = dict(zip(readable, distance(acts, vector[None], generator.std).tolist()))
    return [{"text": t, "distance": found.get(t)} for t in texts]


def nearest(
    model: Model, corpus: tuple, vector: torch.Tensor, n: int, std: torch.Tensor | None
) -> tuple[list[dict], str]:
    """The corpus's ``n`` distinct input texts whose activations are nearest the vector by the
    standardised distance (``std``: the generator's, else the corpus's own), and which std was
    used. Distinct: corpus texts often share a prefix, and a repeated input says nothing new."""
    from superscopes.inverse import distance

    inputs, acts = corpus
    scale = "the generator's"
    if std is None:
        scale = "the corpus's"
        std = acts.float().std(0).clamp_min(1e-4)
    found = torch.cat([distance(acts[i : i + CHUNK], vector[None], std) for i in range(0, len(acts), CHUNK)])
    shown: dict[str, float] = {}
    for i in found.argsort().tolist():
        shown.setdefault(model.tokenizer.decode(inputs[i]), float(found[i]))
        if len(shown) == n:
            break
    return [{"text": text, "distance": d} for text, d in shown.items()], scale


def latent_frame(model: Model, sae, latent: int, alphas: list[float], max_new_tokens: int, batch_size: int):
    """``sae.latent_scope`` for one latent (identity target at the SAE's layer), run and scored
    by ``sae.explanation_scores``; the latent's mean activation is its scale where recorded."""
    import superscopes
    from superscopes import sae as S

    scale = "mean" if sae.mean_activation is not None else "unit"
    scope = S.latent_scope(
        sae, [latent], model=model, scale=scale, alphas=alphas, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    frame = superscopes.run(model, scope, progress=False, threads=None)  # the app's --threads
    return S.explanation_scores(model, scope, frame), scale
