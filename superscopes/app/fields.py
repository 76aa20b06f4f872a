"""One field's parsing and bound: pure functions from a JSON value to a checked value, each
error a ``BadRequest`` (a 400) that names the field and what it takes. ``request`` builds
whole requests from them."""

from __future__ import annotations

import argparse
import math
import re

from superscopes.app.errors import BadRequest, show

MAX_FIELD_CHARS = {"client": 64, "model": 200, "placeholder": 40, "layers": 200}  # the rest: request.LIMITS
SITES = {"mlp_in": "MLP input", "mlp_out": "MLP output", "resid_post": "Hidden state"}


def unique(values: list) -> list:
    """``values`` without repeats, in their order."""
    return list(dict.fromkeys(values))


def text(body: dict, name: str, default: str = "", max_chars: int | None = None) -> str:
    """A text field within ``max_chars`` (or its ``MAX_FIELD_CHARS``); ``default`` when absent or null."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be text, got {show(value)}")
    cap = max_chars if max_chars is not None else MAX_FIELD_CHARS.get(name)
    if cap is not None and len(value) > cap:
        raise BadRequest(f"{name} has {len(value)} characters; this page takes at most {cap}")
    return value


def prompt(body: dict, limits: dict) -> str:
    """The prompt, within ``max_prompt_chars`` (it may be empty: the callers say what that means)."""
    value = text(body, "prompt")
    cap = limits["max_prompt_chars"]
    if len(value) > cap:
        raise BadRequest(f"the prompt has {len(value)} characters; this page takes at most {cap}")
    return value


def parse_whole(value, name: str, low: int, high: int) -> int:
    """A whole number in ``[low, high]``: a JSON integer, an integral float (``4.0``), or digits
    as text; ``1e309`` (infinity once parsed), ``true`` and ``4.5`` are refused."""
    if isinstance(value, float) and value.is_integer():  # False for inf and nan
        value = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {show(value)}")
    return value


def _layer_range(name: str, shown: str, low: int, high: int, num_layers: int, model: str) -> None:
    bad = low if low >= num_layers else num_layers if high >= num_layers else None
    if bad is not None:
        raise BadRequest(f"{name} {shown}: layer {bad} is out of range: {model} has layers 0-{num_layers - 1}")


def check_layers(value, num_layers: int, model: str = "the model") -> None:
    """Refuse a layer list or range with a layer the model lacks, before anything is expanded
    (``"1-1000000000"`` would otherwise be a list of a billion numbers)."""
    if isinstance(value, list):
        for layer in value:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise BadRequest(f"layers {show(value)}: give whole numbers")
            _layer_range("layers", show(value), layer, layer, num_layers, model)
        return
    layers = str(value if value is not None else "").replace(" ", "")
    if len(layers) > MAX_FIELD_CHARS["layers"]:
        raise BadRequest(f"layers has {len(layers)} characters; this page takes at most {MAX_FIELD_CHARS['layers']}")
    if layers in ("", "all"):
        return  # parse_layers says what to do with an empty field
    from superscopes.parsing import parse_layers as parse

    try:
        parse(layers, num_layers, model)  # the one parser, bounded by the model's layers before it expands a range
    except argparse.ArgumentTypeError as error:
        raise BadRequest(str(error)) from None


def parse_layers(value) -> list[int] | str:
    """A layer list, or a range or list as text (``all`` stays ``"all"``); ``check_layers`` bounds it first."""
    from superscopes.parsing import parse_layers as parse

    if isinstance(value, list):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise BadRequest(f"layers {value!r}: give whole numbers")
        return value
    layers = str(value if value is not None else "").replace(" ", "")
    if not layers:
        raise BadRequest("layers is empty: give a range such as 1-7, a list such as 1,3,5-7, or all")
    try:
        return parse(layers)
    except argparse.ArgumentTypeError as error:
        raise BadRequest(str(error)) from None


def parse_alphas(value, max_count: int, max_abs: float) -> list[float]:
    """Distinct sorted alphas: at most ``max_count`` (counted before any is converted), each
    finite and within ``±max_abs``."""
    if isinstance(value, list):
        items = value
    else:
        items = [x for x in str(value if value is not None else "").replace(" ", "").split(",") if x]
    if not items:
        raise BadRequest("alphas is empty: give numbers such as 1,3,6,9,12,15")
    if len(items) > max_count:
        raise BadRequest(f"alphas has {len(items)} values; a run takes at most {max_count} (the cell cap)")
    alphas = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            alpha = float(item)
        except (TypeError, ValueError):
            raise BadRequest(f"alpha {show(item)} is not a number") from None
        if not math.isfinite(alpha):
            raise BadRequest(f"alpha {alpha} is not a finite number")
        if abs(alpha) > max_abs:
            raise BadRequest(f"alpha {alpha:g} is out of range: alphas go from -{max_abs:g} to {max_abs:g}")
        alphas.append(alpha)
    return sorted(unique(alphas))


def parse_target_layer(value, num_layers: int, model: str = "the model") -> int | str:
    """``same``, or a layer the model has."""
    if value == "same":
        return "same"
    try:
        layer = parse_whole(value, "target_layer", -(10**12), 10**12)
    except BadRequest:
        raise BadRequest(f"target_layer {show(value)}: use same, or a layer of {model} (0-{num_layers - 1})") from None
    if not 0 <= layer < num_layers:
        raise BadRequest(f"target_layer {layer} is out of range: {model} has layers 0-{num_layers - 1}")
    return layer


def parse_site(value: str) -> str:
    """One of ``SITES``."""
    if value not in SITES:
        raise BadRequest(f"site {show(value)} is not valid here; choose from {', '.join(SITES)}")
    return value


def parse_sites(value) -> list[str]:
    """At least one of ``SITES``, as a list or a comma list; repeats dropped."""
    sites = [s for s in value.split(",") if s] if isinstance(value, str) else value
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise BadRequest(f"sites must be a list of site names, got {show(sites)}")
    if not sites:
        raise BadRequest(f"pick at least one site ({', '.join(SITES.values())})")
    return unique([parse_site(site) for site in sites])


def parse_flag(value, name: str) -> bool:
    """A JSON ``true`` or ``false``."""
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {show(value)}")
    return value
