"""Multi-hop self-correction: back-patching (Hopping Too Late) and the CoT Patchscope, each against shuffled sources.

Data: ``recipes/data/multihop.csv`` (151 two-hop queries "[pi2][pi1] is", e.g. "The currency of
| the country whose capital is Lima | is", with the one-hop parts and answer aliases).

1. Unpatched: the model answers the two-hop query and each one-hop query (20 greedy tokens;
   correct if an alias appears as a whole word, case-insensitive; the first hop is judged by
   the bridge's aliases). Evaluated: queries answered wrongly although both hops are answered
   (the papers' setting), whose first-hop phrase pi1 follows a second-hop prefix pi2.
2. CoT Patchscope, as the Patchscopes paper defines it (Ghandeharioun et al., 2024, §5: S = T =
   [pi2][pi1], i = the last token of pi1, i* = the token before pi1, with the attention mask
   changed so that no token of pi1 sees pi2 and no later token of T sees pi1). With that mask
   the source is pi1 alone and the target is pi2 alone: the hidden state of pi1's last token at
   layer l ("... whose capital is Lima") is written over pi2's last token ("of") at layer
   l*, and the model generates from there (``Scope(pi1, target=pi2, target_position="last")``).
3. Back-patching (Biran et al., 2024): in the same query, the last token's hidden state at
   layer l overwrites the residual output of layer l* < l at that position (``target="source"``).
4. CoT Patchscope as the authors' notebook runs it (PAIR-code/interpretability,
   ``patchscopes/code/multihop-CoT.ipynb``, ``generate_CoT_data_prod`` and ``run_experiment``):
   the other direction, S = pi2 ("Who is the current CEO of "), T = pi1 ("the company that
   created {hop1}"), both at their last token: the hidden state of pi2's last token at layer l
   is written over pi1's last token at layer l*, for every (l, l*) pair (source below, equal to
   and above the target), and the model generates from pi1 (``Scope(pi2, target=pi1,
   target_position="last")``); 10 new tokens (``evaluate_attriburte_exraction_batch_multihop``'s
   default, which ``run_experiment`` keeps).
5. Controls: each method with a shuffled source, the hidden state of another evaluated query
   with another answer, drawn 3 times (seeds seed, seed + 1, seed + 2), so that a "fix" by a
   perturbed pass shows as chance; a query's control score is its mean over the draws, and each
   draw's rates with their spread are reported.

Back-patching, the paper's CoT Patchscope and their controls get the same (l, l*) pairs (l on a
stride grid, l* < l on the same grid), so their tries per query are equal; the notebook's
direction and its controls get every pair of the same grid. Per query, "fixed" means some pair
answers, and the per-try rate is the share of pairs that answer (the notebook's direction is
compared with the paper's reading per try only: its "fixed" has more tries). Every comparison
is paired over queries with a bootstrap interval, Holm-corrected as one family. Echoes (the
output only repeats the source token) never count. Deviations, named: the paper tries every
(l, l*) pair, here l* < l on a stride grid (the pairs back-patching allows), and the notebook's
direction every pair of the stride grid, not of every layer; 20 new tokens for the other
conditions (the Patchscopes paper's count; Biran et al. use fewer); the alias rule above in place
of the Patchscopes code's case-sensitive substring; the notebook's direction patches the same
evaluated queries as the others (the notebook patches every query whose two hops the model
answers, whether or not it answers the two-hop query), and pi2 without the notebook's trailing
space (a lone space token after "of" is not how the query is tokenised).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from superscopes import metrics

from . import _facts as F
from ._common import DATA, Run, parser, recipe_main, write_summary

NAME = "multihop"
DESCRIPTION = __doc__.splitlines()[0]
MAX_NEW_TOKENS = 20
NOTEBOOK_NEW_TOKENS = 10  # the notebook's patched generations (max_gen_len's default in its run_experiment)
DRAWS = 3  # shuffled-source draws per method
BACK, COT, SHUFFLED = "back-patching", "CoT Patchscope", ", shuffled source"
NOTEBOOK = "CoT Patchscope (notebook: pi2 -> pi1)"
METHODS = [COT, BACK, NOTEBOOK]
KINDS = {"query": "answer_aliases", "hop1_query": "bridge_aliases", "hop2_query": "answer_aliases"}
PAPER = (
    "Patchscopes (Vicuna-13B, 46 queries whose hops the model answers): two-hop accuracy 19.6% -> 50% with the "
    "CoT Patchscope (some (l, l*) pair right). Hopping Too Late (Biran et al., 2024): back-patching fixes up to "
    "57% (arXiv v1) / 66% (published) of the wrongly answered two-hop queries"
)


def correct(output: str, aliases: str) -> bool:
    """Some ``|``-separated alias appears in the output as a whole word (case-insensitive)."""
    text = str(output).lower()
    return any(
        re.search(r"(?<!\w)" + re.escape(a.strip().lower()) + r"(?!\w)", text) for a in aliases.split("|") if a.strip()
    )


def first_hop_span(query: str, hop1_query: str) -> str | None:
    """The first-hop phrase pi1 as written in the query ("the country whose capital is Lima"):
    the one-hop query without its final " is", found case-insensitively."""
    phrase = hop1_query[: -len(" is")] if hop1_query.endswith(" is") else hop1_query
    start = query.lower().find(phrase.lower())
    return None if start < 0 else query[start : start + len(phrase)]


def layer_pairs(n_layers: int, stride: int) -> list[tuple[int, int]]:
    """(l, l*) with l on the stride grid above 0 and l* < l on the same grid."""
    return [(l, t) for l in range(stride, n_layers, stride) for t in range(0, l, stride)]


def every_pair(n_layers: int, stride: int) -> list[tuple[int, int]]:
    """Every (l, l*) of the stride grid (the notebook's direction: all source x target layers)."""
    grid = range(0, n_layers, stride)
    return [(l, t) for l in grid for t in grid]


def shuffled(method: str, seed: int) -> str:
    """The name of a method's shuffled-source control drawn with ``seed``."""
    return f"{method}{SHUFFLED} (seed {seed})"


def draw_seeds(seed: int) -> list[int]:
    return [seed + k for k in range(DRAWS)]


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--stride", type=int, help="layer stride of l and l* (default 4; quick 8)")
    p.add_argument(
        "--eval-set",
        choices=["answerable", "wrong"],
        help="queries to patch: wrong with both hops right (default), or every wrong one (quick)",
    )
    p.add_argument("--limit", type=int, help="use the first N queries (default all; quick 6)")
    p.add_argument("--max-queries", type=int, help="patch at most N evaluated queries (quick 2)")
    return p


def queries(run: Run, model) -> pd.DataFrame:
    """Every query with its unpatched flags, pi1 (``span``), pi2 (``prefix``) and ``evaluated``."""
    args = run.args
    data = pd.read_csv(DATA / "multihop.csv", keep_default_na=False)
    data = data.head(args.limit or (6 if args.quick else None) or len(data)).reset_index(drop=True)
    data.insert(0, "row", range(len(data)))
    prompts = [p for kind in KINDS for p in data[kind]]
    aliases = {kind: dict(zip(data["row"], data[column])) for kind, column in KINDS.items()}
    unpatched = F.conditions(
        run,
        "baseline.csv",
        {
            "unpatched": lambda: pd.DataFrame(
                {
                    "kind": np.repeat(list(KINDS), len(data)),
                    "row": list(data["row"]) * len(KINDS),
                    "prompt": prompts,
                    "output": F.greedy(run, model, prompts, MAX_NEW_TOKENS),
                }
            )
        },
        lambda f: f.assign(correct=[correct(o, aliases[k][r]) for o, k, r in zip(f["output"], f["kind"], f["row"])]),
    )
    flags = unpatched.pivot(index="row", columns="kind", values="correct").reindex(data["row"])
    data["two_hop_ok"], data["hop1_ok"], data["hop2_ok"] = (flags[k].values.astype(bool) for k in KINDS)
    data["answerable"] = data["hop1_ok"] & data["hop2_ok"]
    data["span"] = [first_hop_span(q, h) for q, h in zip(data["query"], data["hop1_query"])]
    data["prefix"] = [q[: q.find(s)].rstrip() if s else "" for q, s in zip(data["query"], data["span"])]
    wanted = ~data["two_hop_ok"] & (
        data["answerable"] if (args.eval_set or ("wrong" if args.quick else "answerable")) == "answerable" else True
    )
    chosen = data.index[wanted & (data["prefix"] != "")][: args.max_queries or (2 if args.quick else None)]
    return data.assign(evaluated=data.index.isin(chosen))


def run_conditions(
    run: Run, model, ev: pd.DataFrame, pairs: list[tuple[int, int]], notebook_pairs: list[tuple[int, int]]
) -> pd.DataFrame:
    """Each method and its shuffled-source draws, one graph run each, judged per cell (``correct``, ``echo``)."""
    import superscopes

    def patch(sources: list[str], target, grid: list[tuple[int, int]], new_tokens: int) -> Callable[[], pd.DataFrame]:
        def make() -> pd.DataFrame:
            scope = superscopes.Scope(
                sources,
                sites=["resid_post"],
                layer_pairs=grid,
                alphas=[1],
                target=target,
                target_position="placeholder" if target == "source" else "last",
                max_new_tokens=new_tokens,
                batch_size=run.args.batch_size,
            )
            frame = run.scope(model, scope)
            return frame.assign(row=np.repeat(ev["row"].values, len(grid)))  # cells come in prompt order

        return make

    query, span, prefix = (list(ev[c]) for c in ("query", "span", "prefix"))
    # method: (its sources, its target, its pairs, its new tokens)
    methods = {
        BACK: (query, query, pairs, MAX_NEW_TOKENS),
        COT: (span, prefix, pairs, MAX_NEW_TOKENS),
        NOTEBOOK: (prefix, span, notebook_pairs, NOTEBOOK_NEW_TOKENS),
    }
    specs = {}
    for name, (sources, target, grid, new_tokens) in methods.items():
        specs[name] = patch(sources, "source" if name == BACK else target, grid, new_tokens)
        for seed in draw_seeds(run.args.seed):
            other = F.other_sources(list(ev["answer"]), seed)
            specs[shuffled(name, seed)] = patch([sources[j] for j in other], target, grid, new_tokens)
    aliases = dict(zip(ev["row"], ev["answer_aliases"]))

    def judge(frame: pd.DataFrame) -> pd.DataFrame:
        echo = [metrics.is_echo(o, t) for o, t in zip(frame["output"], frame["token"])]
        return frame.assign(
            echo=echo,
            correct=[correct(o, aliases[r]) and not e for o, r, e in zip(frame["output"], frame["row"], echo)],
        )

    return F.conditions(run, "cells.csv", specs, judge, pairs=pairs, notebook_pairs=notebook_pairs, draws=DRAWS)


def query_scores(cells: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    """Per query and condition: fixed (some pair answers) and the per-try rate (share of pairs); per
    method, its shuffled-source control: the mean of its draws."""
    fixed = cells.pivot_table(index="row", columns="condition", values="correct", aggfunc="max").astype(float)
    rate = cells.pivot_table(index="row", columns="condition", values="correct", aggfunc="mean")
    for method in METHODS:
        draws = [shuffled(method, s) for s in seeds]
        fixed[method + SHUFFLED], rate[method + SHUFFLED] = fixed[draws].mean(axis=1), rate[draws].mean(axis=1)
    return pd.concat([fixed.add_suffix(": fixed"), rate.add_suffix(": per try")], axis=1)


def draw_spread(scores: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    """Per method and measure: each shuffled draw's rate over queries (by its seed), their min, max and SD."""
    rows = []
    for method in METHODS:
        for what in (": fixed", ": per try"):
            rates = [float(scores[shuffled(method, s) + what].mean()) for s in seeds]
            by_seed = {f"seed {s}": r for s, r in zip(seeds, rates)}
            spread = {"min": min(rates), "max": max(rates), "sd": float(np.std(rates, ddof=1))}
            rows.append({"control": method + SHUFFLED + what, **by_seed, **spread})
    return pd.DataFrame(rows)


def family() -> list[tuple[str, str]]:
    pairs = []
    for what in (": fixed", ": per try"):
        pairs += [(m + what, m + SHUFFLED + what) for m in (COT, BACK)] + [(BACK + what, COT + what)]
        pairs.append((NOTEBOOK + what, NOTEBOOK + SHUFFLED + what))
    return pairs + [(NOTEBOOK + ": per try", COT + ": per try")]


def heatmaps(run: Run, cells: pd.DataFrame, label: str) -> str:
    from superscopes import plots

    # A control's panel: the mean of its draws.
    panel = cells["condition"].str.replace(r" \(seed \d+\)$", "", regex=True)
    sums = cells.assign(panel=panel).groupby(["panel", "condition", "layer", "target_layer"])["correct"].sum()
    per_pair = sums.groupby(["panel", "layer", "target_layer"]).mean().reset_index()
    fig, axes = plots.figure(2 * len(METHODS), cols=2, size=(5.0, 4.0))
    for ax, name in zip(axes, [n for m in METHODS for n in (m, m + SHUFFLED)]):
        wide = per_pair[per_pair["panel"] == name].pivot(index="target_layer", columns="layer", values="correct")
        title = name if name in METHODS else f"{name} (mean of {DRAWS} draws)"
        plots.heatmap(
            wide.sort_index(ascending=False),
            ax=ax,
            fmt=".1f",
            vmin=0,
            vmax=max(1, per_pair["correct"].max()),
            label="queries fixed",
            title=title,
            xlabel="source layer l",
            ylabel="target layer l*",
        )
    plots.save(fig, run.out / "fixes_heatmap.png", title=f"{label}: wrong two-hop queries fixed per (l, l*)")
    return "fixes_heatmap.png"


def experiment(run: Run) -> None:
    from superscopes.models import model_name
    from superscopes.sites import num_layers

    model = run.load_model()
    label, stride = model_name(model), run.args.stride or (8 if run.args.quick else 4)
    data = queries(run, model)
    data.to_csv(run.out / "queries.csv", index=False)
    ev = data[data["evaluated"]].reset_index(drop=True)
    if ev.empty:
        raise SystemExit("no query to patch: every chosen query is answered, or has no second-hop prefix")
    pairs, notebook_pairs = layer_pairs(num_layers(model), stride), every_pair(num_layers(model), stride)
    cells = run_conditions(run, model, ev, pairs, notebook_pairs)
    seeds = draw_seeds(run.args.seed)
    scores = query_scores(cells, seeds)
    scores.to_csv(run.out / "per_query.csv")
    spread = draw_spread(scores, seeds)
    spread.to_csv(run.out / "shuffled_draws.csv", index=False)
    table = F.comparisons(run, scores, family(), "comparisons.csv")
    answerable = data[data["answerable"]]
    summary = pd.DataFrame(
        {
            "measure": [
                "queries",
                "two-hop accuracy",
                "first hop (bridge) accuracy",
                "second hop accuracy",
                "both hops right",
                "two-hop accuracy where both hops are right",
                "evaluated",
            ],
            "value": [
                len(data),
                data["two_hop_ok"].mean(),
                data["hop1_ok"].mean(),
                data["hop2_ok"].mean(),
                len(answerable),
                answerable["two_hop_ok"].mean(),
                len(ev),
            ],
        }
    )
    summary.to_csv(run.out / "summary.csv", index=False)
    fixed = scores[[f"{c}: fixed" for m in METHODS for c in (m, m + SHUFFLED)]].sum()
    findings = [metrics.describe(r) for _, r in table.iterrows()] + [
        f"Unpatched: two-hop {data['two_hop_ok'].mean():.3f}, bridge {data['hop1_ok'].mean():.3f}, second hop "
        f"{data['hop2_ok'].mean():.3f}; {len(answerable)} of {len(data)} queries have both hops right and the model "
        f"answers {answerable['two_hop_ok'].mean():.3f} of those.",
        f"Queries fixed (some of {len(pairs)} pairs; the notebook's direction: {len(notebook_pairs)}) of {len(ev)}, "
        "controls as the mean of their draws: " + ", ".join(f"{k[:-7]} {v:.1f}" for k, v in fixed.items()) + ".",
        f"Shuffled sources drawn {DRAWS} times (seeds {seeds}); over the draws, the rate per query ranges "
        + "; ".join(f"{r.control} {r.min:.3f}-{r.max:.3f} (SD {r.sd:.3f})" for r in spread.itertuples())
        + ".",
        f"Echoes never count: {int(cells['echo'].sum())} of {len(cells)} texts only repeat the source token.",
        "'Fixed' is an oracle over every pair; the shuffled source is its chance level (a short, common answer such as "
        "'euro' or 'Asia' can come from a perturbed pass), so only the paired test against it says whether a method "
        "fixes more than chance.",
    ]
    write_summary(
        run,
        f"Multi-hop self-correction by patching on {label}",
        "; ".join(metrics.describe(table.iloc[i]) for i in (0, 1, 3)),
        PAPER,
        {
            "model": f"{label} ({num_layers(model)} layers)",
            "data": f"recipes/data/multihop.csv, {len(data)} queries",
            "evaluated": f"{len(ev)} queries",
            "layer pairs (back-patching, the paper's CoT)": pairs,
            "layer pairs (the notebook's direction)": f"every (l, l*) of {list(range(0, num_layers(model), stride))}",
            "shuffled sources": f"{DRAWS} draws per method, seeds {seeds}",
            "generation": f"greedy, {MAX_NEW_TOKENS} new tokens ({NOTEBOOK_NEW_TOKENS} in the notebook's "
            "direction); alias as a whole word, case-insensitive",
            "seed": run.args.seed,
            "cells": len(cells),
        },
        findings,
        {
            "Comparisons over queries (Holm over the family)": table.round(4),
            "Shuffled-source draws (rate over queries per draw)": spread.round(4),
            "Unpatched": summary.round(3),
            "Evaluated queries": ev[["relation", "query", "answer"]],
        },
        [heatmaps(run, cells, label)],
    )


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
