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


# ---------------------------------------------------------------- echoes


def target_examples(target: str) -> list[str]:
    """The few-shot example names of a "name: description, name: description, x" target
    ("Syria", "Leonardo DiCaprio", "Samsung" in the entity-description prompt)."""
    return [name for name, _ in _examples(target)]


def _examples(target: str) -> list[tuple[str, str]]:
    """(name, description) of each "name: description" item of a few-shot target."""
    pairs = []
    for item in re.split(r",\s*|\n", str(target)):
        name, sep, description = item.partition(":")
        if sep and name.strip():
            pairs.append((name.strip(), description.strip()))
    return pairs


def is_echo(text: str, token: str = "", target: str = "", span: int = 4) -> bool:
    """Whether a readout only echoes what it was given rather than reading the vector out:

    - it repeats only the source token (nothing left once the token and punctuation go), or
    - its first item copies the target prompt's own few-shot examples: it names one of their
      entities ("Leonardo DiCaprio: American actor"), copies an example's whole description
      when that is shorter than ``span`` words (two or three: "American actor"), or copies
      ``span`` consecutive words of the target prompt (four: "Country in the United Kingdom"
      for "Wales" reuses an example's frame with a new answer, and is a readout).

    This is the one rule of every path that judges readouts (``judge.score``/``flag_echoes``,
    the CLI, the recipes, the explorer): echoes are counted apart and never succeed."""
    rest = str(text)
    token = str(token).strip()
    if token:
        rest = re.sub(re.escape(token), " ", rest, flags=re.IGNORECASE)
    if not words(rest):
        return True
    if not target:
        return False
    item = words(first_item(text))
    if not item:
        return False
    for name in target_examples(target):
        name_words = words(name)
        if name_words and _contains(item, name_words):
            return True
    short = [words(description) for _, description in _examples(target)]
    if any(2 <= len(d) < span and _contains(item, d) for d in short):
        return True
    target_words = words(target)
    grams = {tuple(target_words[i : i + span]) for i in range(len(target_words) - span + 1)}
    return any(tuple(item[i : i + span]) in grams for i in range(len(item) - span + 1))


def _contains(haystack: list[str], needle: list[str]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# ---------------------------------------------------------------- statistics at the level of the prompt
# Cells of one prompt (its layers, alphas, sites) are not independent draws: every interval and
# test below resamples or permutes whole prompts, keeping each prompt's cells together.


def per_prompt(frame, value: str, prompt: str = "source", by: str | None = None):
    """Mean of ``value`` per prompt (and per level of ``by``): ``[prompts] x [levels]`` table."""
    if by is None:
        return frame.groupby(prompt)[value].mean().to_frame("all")
    return frame.pivot_table(index=prompt, columns=by, values=value, aggfunc="mean")


def bootstrap_ci(
    values: Sequence[float], stat=None, n_resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (default: mean) over ``values``, one per prompt."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(n_resamples, data.size))
    stats = data[picks].mean(axis=1) if stat is None else np.array([stat(data[p]) for p in picks])
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def paired_permutation_p(differences: Sequence[float], n_resamples: int = 20_000, seed: int = 0) -> float:
    """Two-sided paired test on per-prompt differences (method A minus B): under the null the
    sign of each prompt's difference is exchangeable. Exact when there are at most 16 non-zero
    differences, else Monte Carlo with ``n_resamples`` sign flips (add-one smoothed)."""
    import itertools

    import numpy as np

    d = np.asarray([x for x in differences if x != 0], dtype=float)
    if d.size == 0:
        return 1.0
    observed = abs(d.sum())
    if d.size <= 16:
        signs = np.array(list(itertools.product([1, -1], repeat=d.size)))
        return float((np.abs(signs @ d) >= observed - 1e-12).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice([1.0, -1.0], size=(n_resamples, d.size))
    return float(((np.abs(signs @ d) >= observed - 1e-12).sum() + 1) / (n_resamples + 1))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values for a family of tests (same keys)."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def holm_intervals(
    differences: Sequence[Sequence[float]], p_values: Sequence[float], level: float = 0.95, seed: int = 0
) -> list[tuple[float, float]]:
    """Bootstrap intervals of each test's mean difference at its Holm level: of m tests, the one
    with the k-th smallest p (k from 1) gets level ``1 - (1 - level) / (m - k + 1)``, the level at
    which Holm's step-down procedure tests it. A claim whose interval here reaches 0 is not one
    the family supports, whatever its unadjusted interval says."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rank = {i: k for k, i in enumerate(order)}
    m = len(p_values)
    return [bootstrap_ci(d, level=1 - (1 - level) / (m - rank[i]), seed=seed) for i, d in enumerate(differences)]


def compare(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict:
    """Prompt-level comparison of two conditions, ``a[i]`` and ``b[i]`` the same prompt's scores:
    means, the mean difference with a 95% bootstrap interval over prompts, and the paired p."""
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need one value per prompt in both: {a.shape} vs {b.shape}")
    diff = a - b
    low, high = bootstrap_ci(diff, seed=seed)
    return {
        "n_prompts": int(a.size),
        "mean_a": float(a.mean()) if a.size else float("nan"),
        "mean_b": float(b.mean()) if b.size else float("nan"),
        "difference": float(diff.mean()) if a.size else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "p": paired_permutation_p(diff, seed=seed),
    }


def prompt_means(frame, value: str, prompt: str = "source", by: Sequence[str] = ("layer",), seed: int = 0):
    """Mean of ``value`` per ``by`` group with a 95% bootstrap interval over prompts (columns
    ``value``, ``ci_low``, ``ci_high``, ``n`` prompts): each prompt's mean is one value."""
    import pandas as pd

    rows = []
    for key, part in frame.groupby(list(by)):
        per = part.groupby(prompt)[value].mean()
        low, high = bootstrap_ci(per.to_numpy(), seed=seed)
        rows.append(
            {**dict(zip(by, key)), value: float(per.mean()), "ci_low": low, "ci_high": high, "n": int(per.size)}
        )
    return pd.DataFrame(rows)


def compare_conditions(
    frame,
    condition: str,
    pairs: Sequence[tuple[str, str]],
    by: Sequence[str] = ("layer",),
    value: str = "score",
    prompt: str = "source",
    seed: int = 0,
):
    """Levels of ``condition`` (methods, samplers) in a long ``frame`` compared pairwise per
    ``by`` group, paired by prompt: ``compare_all`` of each group's ``(a, b)`` pairs (a minus
    b), with ``p_holm`` Holm-adjusted over every comparison of the table (one family)."""
    import pandas as pd

    by = list(by)
    parts = []
    for key, part in frame.groupby(by):
        wide = part.pivot_table(index=prompt, columns=condition, values=value, aggfunc="mean")
        present = [(a, b) for a, b in pairs if a in wide and b in wide]
        parts.append(compare_all(wide, present, seed=seed).assign(**dict(zip(by, key))))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if not table.empty:
        table = table[by + [c for c in table.columns if c not in by]]
        adjusted = holm(dict(enumerate(table["p"])))
        table["p_holm"] = [adjusted[i] for i in range(len(table))]
    return table


def cross_fitted_best(
    frame, choice: str, score: str, success: str, by: Sequence[str] = ("layer",), prompt: str = "source", seed: int = 0
):
    """Best-of-K without the selection bias: split the prompts in two halves (seeded), choose
    the ``choice`` level (e.g. alpha) per ``by`` group that has the highest mean ``score`` on
    one half, read ``success`` (mean over its cells) at that level on the other half, then swap. Returns one row
    per (prompt, by...) with the chosen level and its success: every prompt is scored by a
    choice it did not influence."""
    import numpy as np
    import pandas as pd

    prompts = np.array(sorted(frame[prompt].unique()))
    rng = np.random.default_rng(seed)
    halves = np.array_split(rng.permutation(prompts), 2)
    by = list(by)
    parts = []
    for fit, held in ((halves[0], halves[1]), (halves[1], halves[0])):
        fitted = frame[frame[prompt].isin(fit)].groupby(by + [choice])[score].mean().reset_index()
        chosen = fitted.loc[fitted.groupby(by)[score].idxmax(), by + [choice]]
        scored = frame[frame[prompt].isin(held)].merge(chosen, on=by + [choice])
        parts.append(scored.groupby([prompt] + by + [choice])[success].mean().reset_index())
    return pd.concat(parts, ignore_index=True)


def cross_fitted_mean(
    frame,
    choice: str,
    score: str,
    success: str,
    by: Sequence[str] = ("layer",),
    prompt: str = "source",
    seeds: Sequence[int] = (0, 1, 2),
):
    """``success`` of ``cross_fitted_best`` per (prompt, *by), averaged over one random split of the
    prompts per seed: the split is a random draw, and several keep one lucky split from deciding."""
    import pandas as pd

    parts = [cross_fitted_best(frame, choice, score, success, by=by, prompt=prompt, seed=s) for s in seeds]
    return pd.concat(parts).groupby([prompt, *by])[success].mean()


# ---------------------------------------------------------------- baselines, and families of prompt-level comparisons


def majority_share(test_labels: Sequence, train_labels: Sequence | None = None) -> float:
    """The majority-class baseline: the share of ``test_labels`` equal to the most common label
    of ``train_labels`` (default: of the test labels themselves; ties go to the first label in
    sorted order). The accuracy a classifier gets by always answering that label."""
    from collections import Counter

    test = list(test_labels)
    pool = test if train_labels is None else list(train_labels)
    if not test or not pool:
        return float("nan")
    counts = Counter(map(str, pool))
    top = min(counts, key=lambda label: (-counts[label], label))
    return sum(str(label) == top for label in test) / len(test)


def any_then_mean(frame, value: str, prompt: str, any_over: str, mean_over: str):
    """Per prompt: for each level of ``mean_over`` (e.g. the source layer), whether any level of
    ``any_over`` (e.g. the target layer) has a true ``value``; then the mean over ``mean_over``.
    Li et al.'s (2025) Patchscopes accuracy: a source layer counts when some target layer answers."""
    hits = frame.groupby([prompt, mean_over])[value].any()
    return hits.groupby(level=0).mean().rename(value)


def compare_all(scores, pairs, family: Sequence[str] | None = None, seed: int = 0):
    """Prompt-level comparisons between columns of ``scores`` (one row per prompt, one column per
    condition). ``pairs``: ``{name: (a, b)}``, or ``(a, b)`` pairs (named "a vs b"); each
    comparison uses the prompts where both are known (a pair with none is no test and is left
    out). One row per comparison: ``comparison``, ``a``, ``b``, the fields of ``compare`` (a
    minus b), and ``p_holm``, Holm-adjusted within ``family`` (names; default every comparison:
    a family of controls), the plain p outside it."""
    import pandas as pd

    named = pairs if isinstance(pairs, dict) else {f"{a} vs {b}": (a, b) for a, b in pairs}
    rows = []
    for name, (a, b) in named.items():
        both = scores[[a, b]].dropna()
        if len(both):
            rows.append({"comparison": name, "a": a, "b": b, **compare(both[a], both[b], seed=seed)})
    table = pd.DataFrame(
        rows, columns=["comparison", "a", "b", "n_prompts", "mean_a", "mean_b", "difference", "ci_low", "ci_high", "p"]
    )
    members = set(table["comparison"] if family is None else family)
    adjusted = holm({n: p for n, p in zip(table["comparison"], table["p"]) if n in members})
    table["p_holm"] = [adjusted.get(n, p) for n, p in zip(table["comparison"], table["p"])]
    return table


def describe(row, level: float = 0.05) -> str:
    """One row of ``compare_all`` in words: means, the difference with its interval, p, and the
    prompt-level verdict (a above or below b only where the adjusted p says so)."""
    verdict = "no significant prompt-level difference"
    if row["p_holm"] < level:
        verdict = f"{row['a']} {'>' if row['difference'] > 0 else '<'} {row['b']} at the prompt level"
    holm_text = f", Holm p = {row['p_holm']:.3g}" if row["p_holm"] != row["p"] else ""
    return (
        f"{row['a']} {row['mean_a']:.3f} vs {row['b']} {row['mean_b']:.3f} per prompt: difference "
        f"{row['difference']:+.3f} [95% CI {row['ci_low']:+.3f}, {row['ci_high']:+.3f}], paired p = "
        f"{row['p']:.3g}{holm_text}, {row['n_prompts']} prompts: {verdict}"
    )
