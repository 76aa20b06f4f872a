"""Real text for the lens recipes (token_identity, cross_model, inverse_scope): random token
positions in the Patchscopes snippets (``superscopes.corpus.patchscopes_snippets``, imported
here as ``load_snippets``) drawn as the Patchscopes code draws them, and the log lines those
recipes print.

The paper samples positions of Pile texts (PAIR-code/interpretability,
patchscopes/code/next_token_prediction.ipynb and patch_cross_model.ipynb: one
``random.randint`` position per text, up to 10 tries for a position both tokenizers agree on);
the Pile is not available offline, so these snippets stand in for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from superscopes.corpus import patchscopes_snippets as load_snippets  # noqa: F401  (the recipes' name)


def sample_prefixes(
    tokenizers: Sequence, texts: Sequence[str], seed: int, include_last: bool = False, tries: int = 10
) -> list[tuple[int, str, list[int]]]:
    """One random token position per text, as the Patchscopes code draws it, and the text up to
    and including that token: ``(text index, prefix, [position in each tokenizer])``.

    A position is any token of the first tokenizer but a leading BOS and, unless
    ``include_last``, the text's last token (``randint(start, n - 2)`` in the paper's code); with
    several tokenizers, only positions where every tokenizer ends a token at the same character
    (both models have read exactly the same text). A draw counts only if the prefix re-tokenises
    to the same tokens in every tokenizer (the paper's check); after ``tries`` failed draws
    the text is skipped. A causal model's state at the position is the same on the prefix as on
    the whole text, so the prefix's last token is the source position."""
    from superscopes.lens import token_ends

    rng = np.random.default_rng(seed)
    chosen = []
    for index, text in enumerate(texts):
        found = [token_ends(tok, text, skip_first=False) for tok in tokenizers]
        ids = [tok(text)["input_ids"] for tok in tokenizers]
        first, *others = found
        ends = [e for e, i in first.items() if (include_last or i < len(ids[0]) - 1) and all(e in o for o in others)]
        for end in rng.permutation(sorted(ends))[:tries].tolist():
            prefix = text[:end]
            positions = [f[end] for f in found]
            if all(tok(prefix)["input_ids"] == i[: p + 1] for tok, i, p in zip(tokenizers, ids, positions)):
                chosen.append((index, prefix, positions))
                break
    return chosen


def evaluated_and_fit(
    tokenizers: Sequence, texts: Sequence[str], seed: int, n: int, n_fit: int, include_last: bool = False
) -> tuple[list[tuple[int, str, list[int]]], list[str]]:
    """``n`` distinct prefixes to evaluate (``sample_prefixes`` over ``texts`` in order: a prompt
    is a unit, and two texts may start alike), and ``n_fit`` prefixes of the texts after the last
    one used, the last token allowed (the paper's training positions): maps fitted on them never
    see an evaluated text."""
    chosen, seen = [], set()
    for drawn in sample_prefixes(tokenizers, texts, seed, include_last):
        if len(chosen) == n:
            break
        if drawn[1] not in seen:
            seen.add(drawn[1])
            chosen.append(drawn)
    rest = texts[chosen[-1][0] + 1 :]
    return chosen, [prefix for _, prefix, _ in sample_prefixes(tokenizers, rest, seed + 1, include_last=True)][:n_fit]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
