"""Request parsing and bounds: pure functions from a request body to typed requests.

Each field is checked against its bound before it is expanded or used, so that no request
costs more than its size, and each error (``BadRequest``, a 400) names the field and what it
takes. Fields that depend on the model (its layers, the prompt's tokens, an SAE's width) are
checked by the functions that take those facts as arguments, once the model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

from superscopes.app.errors import BadRequest, Refused, show
from superscopes.app.fields import (
    SITES,
    check_layers,
    parse_alphas,
    parse_flag,
    parse_layers,
    parse_site,
    parse_sites,
    parse_target_layer,
    parse_whole,
    prompt,
    text,
    unique,
)

LIMITS = {
    "max_cells": 2000,  # cells per run (tokens x sites x layers x alphas)
    "max_prompt_chars": 300,
    "max_prompt_tokens": 48,
    "max_template_chars": 1000,
    "max_new_tokens": 32,
    "max_abs_alpha": 1000,
    "max_queued": 32,  # jobs queued or running, all pages together
    "max_latents": 32,  # latents a breakdown lists
    "max_samples": 8,  # generated (and nearest-corpus) inputs a cell panel shows
    "max_latent_alphas": 8,  # alphas of a latent job
}
MAX_BODY = 64 * 1024
TRANSFORMS = {
    "scale": "scale: v' = alpha * v",
    "cfg": "cfg: v' = base + alpha * (v - base)",
    "norm": "norm: v rescaled to the replaced vector's norm, times alpha",
}
DEFAULTS = {
    "prompt": "Diana, Princess of Wales",
    "tokens": "all",
    "layers": "1-7",
    "target_layer": "same",
    "sites": list(SITES),
    "alphas": "1,3,6,9,12,15",
    "transform": "scale",
    "target": "entity",
    "placeholder": "x",
    "max_new_tokens": 10,
    "controls": True,
    "readouts": [],
}
PANEL_DEFAULTS = {"k": 10, "samples": 5, "seed": 0, "alphas": "1,2,4,8", "max_new_tokens": 10, "promotes": 5}
# Controls beside each best readout, as the recipes run them: control -> (transform, alpha);
# alpha None is the best readout's own alpha (a random direction with the written vector's norm).
CONTROLS = {"alpha1": ("scale", 1.0), "norm": ("norm", 1.0), "random": ("random", None)}
# The columns of a grid's rows on the page; the explorer fills these itself (it judges every row).
ROW_COLUMNS = ["token", "position", "site", "layer", "target_layer", "alpha", "output", "similarity", "echo"]


@dataclass(frozen=True)
class GridRequest:
    """A grid as the page sent it, each field within its bound. ``layers`` and ``target_layer``
    are kept as sent: they are checked against the model's layers by ``grid_layers``."""

    client: str
    model: str
    prompt: str
    tokens: str  # all | last | match
    token: str  # the piece of the prompt to scope (tokens == "match")
    sites: list[str]
    alphas: list[float]
    transform: str
    target_kind: str  # entity | identity | custom
    target: str  # "entity", "identity" or the custom template
    placeholder: str | None  # a custom template's placeholder
    max_new_tokens: int
    controls: bool
    readouts: list[str]  # registered readouts beside the generated text (superscopes.readouts)
    focus: int | None  # a token the page has clicked: runs first if it is a source token
    layers: object
    target_layer: object


@dataclass(frozen=True)
class CellRequest:
    """A cell panel's cell and how much to show of it."""

    position: int
    token: str
    site: str
    layer: int
    k: int
    samples: int
    seed: int


@dataclass(frozen=True)
class LatentRequest:
    """A latent panel's SAE latent and the alphas to write it with."""

    sae: str
    latent: int
    alphas: list[float]
    max_new_tokens: int


def parse_body(raw: bytes | None, content_type: str) -> dict:
    """A job-starting POST's JSON object: only ``application/json`` (a form or a
    ``text/plain`` fetch from another site cannot send it without a CORS preflight), each field
    text, a number, or a list of them."""
    if raw is None:
        raise BadRequest(f"the request body is missing its length or is over {MAX_BODY} bytes")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Refused(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send the request as application/json, not {show(media_type)}"
        )
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise BadRequest("the request nests too deeply: each field is text, a number or a list of them") from None
    except UnicodeDecodeError:
        raise BadRequest("the request is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"the request is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request must be a JSON object")
    for name, value in body.items():
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict) or any(isinstance(item, (list, dict)) for item in items):
            raise BadRequest(f"{show(name)} nests too deeply: give text, a number or a list of them")
    return body


def reused_controls(transform: str, alphas: list[float]) -> set[str]:
    """Controls whose readout the grid already holds (same transform, alpha 1): not run again."""
    return {name for name, (t, alpha) in CONTROLS.items() if t == transform and alpha in alphas}


def _target(body: dict, limits: dict) -> tuple[str, str, str | None]:
    """The target's kind, its prompt (a kind's name, or the custom template) and placeholder."""
    kind = text(body, "target", "entity", max_chars=20)
    if kind in ("entity", "identity"):
        return kind, kind, None
    if kind != "custom":
        raise BadRequest(f"target {kind!r}: choose entity, identity or custom")
    template = text(body, "template", max_chars=limits["max_template_chars"])
    placeholder = text(body, "placeholder", "x") or "x"
    if not template.strip():
        raise BadRequest("the custom target template is empty: write a prompt containing the placeholder")
    return kind, template, placeholder


def extra_readouts() -> list[dict]:
    """The registered readouts a grid may add to its generated text: every one but the primary
    ones and those whose columns the explorer fills itself (it judges every row: ``judge``)."""
    from superscopes import readouts

    return [r for r in readouts.available() if not r["primary"] and not set(ROW_COLUMNS) & set(r["columns"])]


def parse_readouts(value) -> list[str]:
    """A list of registered readouts' names, each offered here, without repeats."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"readouts must be a list of names; got {str(value)[:80]!r}")
    offered = [r["name"] for r in extra_readouts()]
    for name in value:
        if name not in offered:
            raise BadRequest(f"readout {name[:40]!r} is not offered here; choose from {', '.join(offered) or 'none'}")
    return unique(value)


def parse_grid(body: dict, limits: dict, default_model: str) -> GridRequest:
    """Every field of a grid that can be checked without the model, in the page's order."""
    client = text(body, "client") or "anonymous"
    model = text(body, "model", default_model) or default_model
    the_prompt = prompt(body, limits)
    if not the_prompt.strip():
        raise BadRequest("the prompt is empty: type the text whose tokens you want to scope")
    mode = text(body, "tokens", "all", max_chars=10)
    if mode not in ("all", "last", "match"):
        raise BadRequest(f"tokens {mode!r}: choose all, last or match")
    match = text(body, "token", max_chars=limits["max_prompt_chars"])
    if mode == "match" and not match:
        raise BadRequest("type the token to scope (a piece of the prompt), or choose all or last tokens")
    sites = parse_sites(body.get("sites", DEFAULTS["sites"]))
    alphas = parse_alphas(body.get("alphas", DEFAULTS["alphas"]), limits["max_cells"], limits["max_abs_alpha"])
    transform = text(body, "transform", "scale", max_chars=20)
    if transform not in TRANSFORMS:
        raise BadRequest(f"transform {transform!r} is not offered here; choose {', '.join(TRANSFORMS)}")
    target_kind, target, placeholder = _target(body, limits)
    max_new_tokens = parse_whole(
        body.get("max_new_tokens", DEFAULTS["max_new_tokens"]), "max_new_tokens", 1, limits["max_new_tokens"]
    )
    controls = parse_flag(body.get("controls", DEFAULTS["controls"]), "controls")
    chosen_readouts = parse_readouts(body.get("readouts", DEFAULTS["readouts"]))
    focus = body.get("focus")
    if focus is not None:
        focus = parse_whole(focus, "focus", 0, limits["max_prompt_tokens"] - 1)
    return GridRequest(
        client=client,
        model=model,
        prompt=the_prompt,
        tokens=mode,
        token=match,
        sites=sites,
        alphas=alphas,
        transform=transform,
        target_kind=target_kind,
        target=target,
        placeholder=placeholder,
        max_new_tokens=max_new_tokens,
        controls=controls,
        readouts=chosen_readouts,
        focus=focus,
        layers=body.get("layers", DEFAULTS["layers"]),
        target_layer=body.get("target_layer", DEFAULTS["target_layer"]),
    )


def grid_layers(request: GridRequest, num_layers: int, model: str) -> tuple[list[int], int | str]:
    """The grid's layers (sorted, distinct) and target layer, checked against the model's."""
    check_layers(request.layers, num_layers, model)
    layers = parse_layers(request.layers)
    chosen = list(range(num_layers)) if layers == "all" else sorted(unique(layers))
    return chosen, parse_target_layer(request.target_layer, num_layers, model)


def check_prompt_tokens(pieces: list[dict], limits: dict) -> None:
    """Refuse a prompt of more than ``max_prompt_tokens`` tokens (``pieces``)."""
    if len(pieces) > limits["max_prompt_tokens"]:
        raise BadRequest(f"the prompt has {len(pieces)} tokens; this page takes at most {limits['max_prompt_tokens']}")


def grid_cells(request: GridRequest, pieces: list[dict], num_layers: int, limits: dict) -> tuple[int, int]:
    """The grid's cells and control cells, within this page's cap (``pieces``: the prompt's
    tokens; ``num_layers``: the layers the grid reads)."""
    check_prompt_tokens(pieces, limits)
    n_tokens = sum(not p["special"] for p in pieces) if request.tokens == "all" else 1
    if request.tokens == "all" and not n_tokens:
        raise BadRequest("the prompt has only special tokens: type some text")
    cap, n_sites, n_alphas = limits["max_cells"], len(request.sites), len(request.alphas)
    n_cells = n_tokens * n_sites * num_layers * n_alphas
    if n_cells > cap:
        raise BadRequest(
            f"the grid has {n_cells} cells ({n_tokens} tokens x {n_sites} sites x "
            f"{num_layers} layers x {n_alphas} alphas), over this page's cap of "
            f"{cap}: choose fewer tokens, layers, sites or alphas"
        )
    per_best = len(CONTROLS) - len(reused_controls(request.transform, request.alphas)) if request.controls else 0
    n_controls = n_tokens * n_sites * num_layers * per_best
    if n_cells + n_controls > cap:
        raise BadRequest(
            f"the grid's {n_cells} cells and {n_controls} control cells ({per_best} per best readout) make "
            f"{n_cells + n_controls}, over this page's cap of {cap}: choose fewer tokens, "
            "layers or sites, or turn the controls off"
        )
    return n_cells, n_controls


def parse_cell(body: dict, limits: dict, pieces: list[dict], num_layers: int) -> CellRequest:
    """A cell of a prompt with ``pieces`` (its tokens) in a model of ``num_layers`` layers."""
    check_prompt_tokens(pieces, limits)
    position = parse_whole(body.get("position"), "position", 0, len(pieces) - 1)
    site = parse_site(text(body, "site", max_chars=20))
    layer = parse_whole(body.get("layer"), "layer", 0, num_layers - 1)
    k = parse_whole(body.get("k", PANEL_DEFAULTS["k"]), "k", 1, limits["max_latents"])
    samples = parse_whole(body.get("samples", PANEL_DEFAULTS["samples"]), "samples", 1, limits["max_samples"])
    seed = parse_whole(body.get("seed", PANEL_DEFAULTS["seed"]), "seed", 0, 2**31 - 1)
    return CellRequest(position, pieces[position]["text"], site, layer, k, samples, seed)


def parse_latent(body: dict, limits: dict, sae: str, size: int) -> LatentRequest:
    """A latent of the SAE ``sae`` (``size`` latents), its alphas and the readouts' length."""
    latent = parse_whole(body.get("latent"), "latent", 0, size - 1)
    alphas = parse_alphas(
        body.get("alphas", PANEL_DEFAULTS["alphas"]), limits["max_latent_alphas"], limits["max_abs_alpha"]
    )
    max_new_tokens = parse_whole(
        body.get("max_new_tokens", PANEL_DEFAULTS["max_new_tokens"]), "max_new_tokens", 1, limits["max_new_tokens"]
    )
    return LatentRequest(sae, latent, alphas, max_new_tokens)
