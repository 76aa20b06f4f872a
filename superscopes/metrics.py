"""Text metrics for readouts: RougeL (LCS F-measure on lowercased word tokens) and helpers.

RougeL here follows Lin (2004): with LCS the longest common subsequence of the candidate's
and the reference's word tokens, P = LCS / len(candidate), R = LCS / len(reference) and
F = (1 + beta^2) P R / (R + beta^2 P); beta = 1 gives the F1 that ``rouge-score`` reports
as ``rougeL.fmeasure`` (without its stemming). Tokens are runs of letters and digits,
lowercased, so punctuation is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lowercased word tokens (runs of letters and digits)."""
    return _WORD.findall(str(text).lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> float:
    """RougeL F-measure in [0, 1]; 0 when either text has no word tokens."""
    cand, ref = words(candidate), words(reference)
    if not cand or not ref:
        return 0.0
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def first_item(text: str) -> str:
    """The first item of a list-style readout: the text up to the first comma or newline,
    after leading separators (colons, commas, semicolons, whitespace). The entity-description
    target lists "name: description, ...", so a patched placeholder usually continues with
    ": <description>, <next name>: ..."."""
    text = str(text).lstrip(" \t\r\n:,;")
    return re.split(r"[,\n]", text, maxsplit=1)[0].strip()


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign (McNemar) test p-value for paired binary outcomes: ``wins`` pairs
    where method A succeeds and B fails, ``losses`` the reverse (ties carry no information)."""
    from math import comb

    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def echoes(token: str, text: str, min_chars: int = 3) -> bool:
    """Whether ``text`` repeats the source token verbatim (case-insensitive; tokens shorter than
    ``min_chars`` after stripping never count). A judge that embeds the source prompt rewards
    such echoes ("-great-great-great" for "Great") whether or not the entity was read out."""
    token = str(token).strip().lower()
    return len(token) >= min_chars and token in str(text).lower()


def names_entity(source: str, token: str, text: str, ignore: str = "", min_chars: int = 4) -> bool:
    """Whether ``text`` contains a word of ``source`` other than the word holding the source token
    ("Diana" or "Princess" in a readout of "Wales" from "Diana, Princess of Wales"): evidence that
    the readout is about the entity rather than an echo of the token. Words shorter than
    ``min_chars`` (articles, "of") and words of ``ignore`` (the target prompt, whose few-shot
    names the readout may copy: "Leonardo") never count."""
    token = str(token).strip().lower()
    skip = set(words(ignore))
    others = {w for w in words(source) if len(w) >= min_chars and w not in skip and not (token and token in w)}
    return bool(others & set(words(text)))
