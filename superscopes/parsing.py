"""Text -> grid values, one syntax for the command line, the recipes and the explorer.

Errors are ``argparse.ArgumentTypeError`` naming the bad text and the accepted forms, so
argparse prints them as usage errors and the explorer turns them into a 400.
"""

from __future__ import annotations

import argparse
import re

# Patched rows per forward pass. Rows that continue one shared prefix gain from wide batches
# on a CPU (126 rows of the paper grid: 128 is ~15% less CPU than 64, benchmarks/graph.py).
DEFAULT_BATCH_SIZE = 128
# Torch CPU threads while a grid runs, the same in Python (``run(threads=...)``), the CLI and
# the recipes (``--threads``): one is fastest for these small batched passes on a shared CPU
# (the README grid: 5 s on one thread, 27 s on torch's default of one per core).
DEFAULT_THREADS = 1
LAYER_SYNTAX = "'all', '3', '1-7' or '1,3,5-7'"


# No model has this many layers. Every range is checked against a bound before it is expanded,
# so "1-1000000000" is an error naming it, not a list of a billion numbers (MemoryError).
MAX_LAYERS = 1000


def parse_layers(text: str, num_layers: int | None = None, model: str | None = None) -> list[int] | str:
    """``all``, ``3``, ``1-7`` or ``1,3,5-7`` (spaces ignored); ``3-1`` is an error, and so is a
    layer at or past ``num_layers`` (the model's, when known; else ``MAX_LAYERS``)."""
    text = text.replace(" ", "")
    if text == "all":
        return "all"
    bound = MAX_LAYERS if num_layers is None else num_layers
    valid = f"{model} has layers 0-{bound - 1}" if model else f"layers run 0-{bound - 1} (no model has more)"
    layers: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"layers {text!r}: use {LAYER_SYNTAX} ({part!r} is not a layer or range)")
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if high < low:
            raise argparse.ArgumentTypeError(f"layers {text!r}: the range {part!r} is reversed; write {high}-{low}")
        if high >= bound:  # the first layer of the range past the bound
            raise argparse.ArgumentTypeError(f"layers {text!r}: layer {max(low, bound)} is out of range: {valid}")
        layers += range(low, high + 1)
    return layers


def parse_floats(text: str) -> list[float]:
    """``1,3.5,-2`` (spaces ignored)."""
    try:
        return [float(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def parse_target_layers(text: str) -> list[int | str]:
    """``0``, ``same`` or a comma list of them."""
    try:
        return [x if x == "same" else int(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"target layer {text!r}: use 0, same, an integer, or a comma list") from None


def parse_names(text: str) -> list[str]:
    """A comma list of names, spaces around them stripped: ``"mlp_out, resid_post"``."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name; give a comma list such as mlp_out,resid_post")
    return names


def join_negative_values(argv: list[str], options: set[str]) -> list[str]:
    """``--alphas -3,6`` -> ``--alphas=-3,6``: argparse would read ``-3,6`` as an option."""
    joined: list[str] = []
    for word in argv:
        if joined and joined[-1] in options and re.fullmatch(r"-[\d.][\d.,\s+eE-]*", word):
            joined[-1] = f"{joined[-1]}={word}"
        else:
            joined.append(word)
    return joined


class HelpFormatter(argparse.HelpFormatter):
    """Every --help shows each option's default (when it has one: not None or a False flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        says_default = "default" in text.lower()  # the text already names it ("default: the embedded ones")
        if action.default not in (None, False, "", argparse.SUPPRESS) and not says_default:
            text += " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``HelpFormatter`` by default. argparse builds
    sub-command parsers with the parent's own class, so every verb below it shows its
    defaults as well, without naming the formatter at each ``add_parser``."""

    def __init__(self, *args, formatter_class: type[argparse.HelpFormatter] = HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


# Errors a command reports as one line (a wrong value, a missing file, a failed remote run)
# rather than as a traceback: the command line and the recipes print them alike.
USER_ERRORS = (ValueError, KeyError, RuntimeError)


def error_line(error: BaseException) -> str:
    """``superscopes: error: <message>``, API keys and tokens scrubbed."""
    from superscopes.remote import redact

    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return f"superscopes: error: {redact(str(message))}"
