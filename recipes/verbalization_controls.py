"""Verbalisation controls (Li et al., 2025): does a Patchscope readout reveal more than the
input and the reader's own knowledge?

On Li et al.'s six Patchscopes factual tasks (``LI_TASKS``: country_currency, food_from_country,
person_plays_position_in_sport, person_plays_pro_sport, product_by_company, star_constellation;
millicentli/verb_faithfulness, ``notebooks/view_prompt_baseline.ipynb``), two models (default
SmolLM2-135M-Instruct and Gemma-3-270m) each verbalise, one graph run per condition.

Li et al.'s comparison, on every unfiltered row of the tasks (``recipes._facts.li_rows``), scored
by their ``check_correct`` (the object in the text, case-insensitive) and averaged as their
notebook averages: per task, then the mean over the tasks:

- nothing but the input: Li et al.'s input-only prompt (``recipes._facts``: their exact text,
  20 tokens);
- the Patchscope as Li run it (``src/utils/patchscopes_utils.py``, ``patchscopes``): the whole
  snippet's last token at source layer l written over the template's last token ("x") at
  target layer l*, 20 new tokens; a row counts for l if some l* answers, averaged over l (the
  notebook's Patchscopes cell).

The controls, on up to ``--max-rows`` subjects per task picked round-robin over who knows the fact:

- its own activations (the attribute-extraction Patchscope as the Patchscopes paper runs it:
  h_l at the last subject token of the snippet cut after the subject, written at layer l* over
  the placeholder); the Patchscopes paper's known-fact filter is its score on the rows whose fact
  the verbaliser knows, reported beside Li's comparison;
- the other model's activations through an affine map per (l, l*) fitted by ridge least
  squares on held-out text (``superscopes.lens``: aligned word ends), ``transforms=["affine"]``
  with ``target_model``; and the same with a shuffled source (the snippet of another subject of the
  same task with another object), the chance level of a cross-model "hit", drawn 3 times (seeds
  seed, seed + 1, seed + 2): a row's control score is its mean over the draws, and each draw's
  accuracy with their spread is reported;
- its own knowledge: the plain question ("The capital city of France").

A patch condition scores a row as Li et al. score Patchscopes: for each source layer, whether
some target layer answers, averaged over source layers. Rows are split by which model knows
the fact. Privileged information would show as cross-model success above the shuffled source
on facts only the source model knows; success that tracks the verbaliser's own knowledge
means the readout passes on the subject and the verbaliser answers from what it knows. Every
comparison is paired over rows (bootstrap interval, Holm over the family); the majority class
(the most common object of the task's other subjects) stands beside every accuracy; echoes
(the output only repeats the subject) never count there. Deviations, named: two source and two
target layers per model (Li: every source layer into every target layer below 16 on
Llama-3.1-8B-Instruct), 20 new tokens for the controls too; the Patchscope's text is the new
tokens only (Li's decode also holds the target prompt, in which no task's object occurs); at most
``--max-rows`` subjects per task for the controls; the tasks' other rows of the data
(country_capital_city, country_largest_city) only as a named extension (``--tasks``), reported
apart and never in the mean over Li's tasks; ``--li-samples`` draws rows per task as Li's
``--n_samples`` does (default: every row, as their reported runs).
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pandas as pd
import torch

from superscopes import metrics

from . import _facts as F
from ._common import Run, depth_layers, parser, recipe_main, write_summary

NAME = "verbalization_controls"
DESCRIPTION = __doc__.splitlines()[0]
OTHER = "gemma3-270m"
LI_TASKS = [
    "country_currency",
    "food_from_country",
    "person_plays_position_in_sport",
    "person_plays_pro_sport",
    "product_by_company",
    "star_constellation",
]
EXTENSION_TASKS = ["country_capital_city", "country_largest_city"]  # ours, never in the mean over Li's tasks
TASKS = LI_TASKS
QUICK_TASKS = ["country_currency"]
DRAWS = 3  # shuffled-source draws per cross-model condition
INPUT, LI_PATCH = "input only (Li)", "Patchscope (Li's rows)"
FIT_TASKS = ["person_father", "person_mother"]  # snippets for the affine maps (never evaluated here)
SOURCE_DEPTHS, TARGET_DEPTHS = (0.15, 0.3), (0.0, 0.15)  # l and l* as shares of each model's depth
MAJORITY = "majority class"  # the most common object of the task's other subjects (unfiltered rows)
RIDGE = 0.05  # times the source's summed centred variance per dimension (raised held-out R^2 on 320 snippets)
PAPER = (
    "Li et al. (2025), Llama-3.1-8B-Instruct, 6 factual Patchscopes tasks: input-only 0.644 > LIT 0.602 > "
    "Patchscopes 0.487; their knowledge controls show readouts drawing on the verbaliser's own knowledge"
)


def fit_snippets(n: int, seed: int) -> list[str]:
    """``n`` distinct snippets of at least four words from tasks not evaluated here (seeded sample)."""
    texts = set()
    for task in FIT_TASKS:
        frame = pd.read_csv(F.FACTUAL / f"{task}.tsv", sep="\t", index_col=0, keep_default_na=False)
        texts |= {t for t in frame["prompt_source"].str.strip() if len(t.split()) >= 4}
    texts = sorted(texts)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def pick_rows(rows: pd.DataFrame, known: dict[str, set], names: list[str], max_rows: int, seed: int) -> pd.DataFrame:
    """One snippet per subject (seeded), up to ``max_rows`` subjects per task, taken round-robin
    over the knowledge categories (who knows the fact) so that every category is represented."""
    rng, picked = random.Random(seed), []
    for task, part in rows.groupby("task", sort=False):
        subjects = list(dict.fromkeys(part["subject"]))
        rng.shuffle(subjects)
        groups: dict[tuple, list[str]] = {}
        for s in subjects:
            groups.setdefault(tuple((task, s) in known[m] for m in names), []).append(s)
        order, keys = [], sorted(groups, reverse=True)
        while any(groups[k] for k in keys) and len(order) < max_rows:
            order += [groups[k].pop(0) for k in keys if groups[k] and len(order) < max_rows]
        for s in order:
            options = part[part["subject"] == s]
            picked.append(options.iloc[rng.randrange(len(options))])
    return pd.DataFrame(picked).reset_index(drop=True)


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--other", default=OTHER, help=f"the second model (default {OTHER})")
    p.add_argument("--tasks", help=f"comma list of factual tasks (default {','.join(TASKS)})")
    p.add_argument("--max-rows", type=int, help="subjects per task (default 12; quick 3)")
    p.add_argument(
        "--limit-subjects", type=int, help="only the first N subjects per task, input-only rows too (quick 6)"
    )
    p.add_argument("--fit-snippets", type=int, help="snippets for the affine maps (default 400; quick 24)")
    p.add_argument("--li-samples", type=int, help="Li's rows per task, drawn as their --n_samples (default all)")
    return p


def evaluated_rows(run: Run, models: dict, tasks: list[str], limit: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exact crops for both tokenizers, each subject's knowledge in both models, the picked rows."""
    names = list(models)
    rows = pd.concat([F.load_task(t, limit) for t in tasks], ignore_index=True)
    rows = rows[
        [
            all(F.crop_is_exact(models[m].tokenizer, sn, su, so) for m in names)
            for sn, su, so in zip(rows["snippet"], rows["subject"], rows["source"])
        ]
    ]
    specs = {m: functools.partial(F.knowledge, run, models[m], rows, F.LI_NEW_TOKENS) for m in names}
    table = F.conditions(run, "knowledge.csv", specs, tasks=tasks)
    known = {
        m: set(zip(*table.loc[(table["condition"] == m) & table["known"], ["task", "subject"]].T.values)) for m in names
    }
    rows = pick_rows(rows, known, names, run.args.max_rows or (3 if run.args.quick else 12), run.args.seed)
    for m in names:
        rows[f"{m} knows"] = [(t, s) in known[m] for t, s in zip(rows["task"], rows["subject"])]
    a, b = (rows[f"{m} knows"] for m in names)
    rows["category"] = np.select(
        [a & b, a & ~b, ~a & b], ["both know", f"only {names[0]}", f"only {names[1]}"], "neither knows"
    )
    return rows.assign(row=range(len(rows))), table


def affine_maps(run: Run, models: dict, layers: dict, targets: dict) -> dict:
    """A ridge affine map per (source model, verbaliser, l, l*), fitted on 80% of held-out
    snippets; its held-out R^2 goes to maps.csv."""
    from superscopes.lens import aligned_positions, apply_affine, collect, fit_affine, r_squared

    names, texts = list(models), fit_snippets(run.args.fit_snippets or (24 if run.args.quick else 400), run.args.seed)
    pos = dict(zip(names, aligned_positions(models[names[0]].tokenizer, models[names[1]].tokenizer, texts)))
    prompt_of = torch.tensor([i for i, p in enumerate(pos[names[0]]) for _ in p])
    fit = prompt_of < int(0.8 * len(texts))
    acts = {
        m: collect(models[m], texts, "resid_post", sorted(set(layers[m]) | set(targets[m])), pos[m], 32, run.remote)
        for m in names
    }
    maps, records = {}, []
    for s, v in [(names[0], names[1]), (names[1], names[0])]:
        for ls, lv in ((ls, lv) for ls in layers[s] for lv in targets[v]):
            X, Y = acts[s][ls], acts[v][lv]
            ridge = RIDGE * float((X[fit] - X[fit].mean(0)).pow(2).sum()) / X.shape[1]
            maps[(s, v, ls, lv)] = fit_affine(X[fit], Y[fit], ridge=ridge)
            records.append(
                {
                    "source_model": s,
                    "verbaliser": v,
                    "layer": ls,
                    "target_layer": lv,
                    "r2_heldout": r_squared(apply_affine(X[~fit], *maps[(s, v, ls, lv)]), Y[~fit]),
                }
            )
    pd.DataFrame(records).to_csv(run.out / "maps.csv", index=False)
    return maps


def li_rows(run: Run, tasks: list[str], limit: int | None) -> pd.DataFrame:
    """Li et al.'s unfiltered rows of every task, numbered (``li_row``)."""
    li = pd.concat([F.li_rows(t, limit, run.args.li_samples) for t in tasks], ignore_index=True)
    return li.assign(li_row=range(len(li)))


def run_conditions(run: Run, models: dict, rows: pd.DataFrame, li: pd.DataFrame) -> pd.DataFrame:
    """Every condition's texts, one graph run each, judged (success, echo); Li's conditions on
    every row of ``li`` (``row`` -1), the others on the picked ``rows``."""
    import superscopes
    from superscopes.sites import num_layers

    names = list(models)
    layers = {m: depth_layers(SOURCE_DEPTHS[: 1 if run.args.quick else 2], num_layers(models[m])) for m in names}
    targets = {m: depth_layers(TARGET_DEPTHS[: 1 if run.args.quick else 2], num_layers(models[m])) for m in names}
    maps = functools.cache(lambda: affine_maps(run, models, layers, targets))
    meta = rows[["row", "task", "subject", "object", "snippet"]]

    def shuffled(seed: int) -> pd.Series:
        """Each row's source replaced by that of another subject of the same task, with another object."""
        sources = rows["source"].copy()
        for _, part in rows.groupby("task"):
            sources[part.index] = part["source"].values[F.other_sources(list(part["object"]), seed)]
        return sources

    def patch(s: str, v: str, sources: pd.Series):
        def make() -> pd.DataFrame:
            kwargs = {"layers": layers[s], "target_layers": targets[v]}
            if s != v:
                pairs = [(ls, lv) for ls in layers[s] for lv in targets[v]]
                kwargs = {
                    "layer_pairs": pairs,
                    "transforms": ["affine"],
                    "affine_weight": {p: maps()[(s, v, *p)][0] for p in pairs},
                    "affine_bias": {p: maps()[(s, v, *p)][1] for p in pairs},
                }
            scope = superscopes.Scope(
                list(sources),
                sites=["resid_post"],
                alphas=[1],
                target=list(rows["template"]),
                max_new_tokens=F.LI_NEW_TOKENS,
                batch_size=run.args.batch_size,
                **kwargs,
            )
            frame = run.scope(models[s], scope, target_model=models[v]).drop(columns=["source", "token", "target"])
            frame["row"] = np.repeat(rows["row"].values, len(frame) // len(rows))  # cells come in prompt order
            return frame.merge(meta, on="row").assign(source_model=s, verbaliser=v)

        return make

    def input_only(m: str):
        prompts = [F.input_only_prompt(models[m].tokenizer, s, t) for s, t in zip(li["snippet"], li["template"])]
        return lambda: li.assign(row=-1, verbaliser=m, output=F.greedy(run, models[m], prompts, F.LI_NEW_TOKENS))

    def li_patch(m: str):
        """Li's Patchscope: the whole snippet's last token at l, over the template's "x" at l*."""

        def make() -> pd.DataFrame:
            grid = {"layers": layers[m], "target_layers": targets[m], "alphas": [1], "sites": ["resid_post"]}
            texts = {"max_new_tokens": F.LI_NEW_TOKENS, "batch_size": run.args.batch_size}
            scope = superscopes.Scope(list(li["snippet"]), target=list(li["template"]), **grid, **texts)
            frame = run.scope(models[m], scope).drop(columns=["source", "token", "target"])
            frame["li_row"] = np.repeat(li["li_row"].values, len(frame) // len(li))  # cells come in prompt order
            return frame.merge(li, on="li_row").assign(row=-1, source_model=m, verbaliser=m)

        return make

    specs = {}
    for v, s in [(names[0], names[0]), (names[1], names[1]), (names[0], names[1]), (names[1], names[0])]:
        if s == v:
            specs[f"{v}: {INPUT}"], specs[f"{v}: {LI_PATCH}"] = input_only(v), li_patch(v)
        specs[f"{v}: {'own Patchscope' if s == v else f'reads {s}'}"] = patch(s, v, rows["source"])
        if s != v:
            for seed in draw_seeds(run.args.seed):
                specs[shuffled_name(v, s, seed)] = patch(s, v, shuffled(seed))
    tasks = list(dict.fromkeys(li["task"]))
    settings = {"layers": layers, "targets": targets, "tasks": tasks, "draws": DRAWS, "li_rows": len(li)}
    return F.conditions(run, "cells.csv", specs, F.judged, **settings)


def draw_seeds(seed: int) -> list[int]:
    return [seed + k for k in range(DRAWS)]


def shuffled_name(v: str, s: str, seed: int) -> str:
    """The condition of verbaliser ``v`` reading ``s`` from a shuffled source drawn with ``seed``."""
    return f"{v}: reads {s}, shuffled source (seed {seed})"


def row_scores(cells: pd.DataFrame, rows: pd.DataFrame, names: list[str], seed0: int) -> pd.DataFrame:
    """One row per evaluated row; per condition its score (patches: any l*, mean over l; each
    shuffled control: the mean of its draws), plus the cross-model scores restricted to the facts
    only the source model knows."""
    scores = rows.set_index("row")[["task", "subject", "object", "category", *[f"{m} knows" for m in names]]].copy()
    for name, part in cells.groupby("condition"):
        if name.endswith(INPUT):
            hit = part.drop_duplicates(["task", "subject", "snippet"]).set_index(["task", "subject", "snippet"])[
                "success"
            ]
            scores[name] = [hit.get(k, np.nan) for k in zip(rows["task"], rows["subject"], rows["snippet"])]
        elif not name.endswith(LI_PATCH):  # Li's Patchscope is scored on Li's rows (li_accuracy)
            scores[name] = metrics.any_then_mean(part, "success", "row", any_over="target_layer", mean_over="layer")
    for s, v in [(names[0], names[1]), (names[1], names[0])]:
        draws = [shuffled_name(v, s, seed) for seed in draw_seeds(seed0)]
        scores[f"{v}: reads {s}, shuffled source"] = scores[draws].mean(axis=1)  # the control: mean of the draws
        for name in (f"{v}: reads {s}", f"{v}: reads {s}, shuffled source", *draws):
            scores[f"{name} [only {s} knows]"] = scores[name].where(scores["category"] == f"only {s}")
    for m in names:
        scores[f"{m}: plain question"] = scores[f"{m} knows"]
    li = cells[cells["row"] < 0].drop_duplicates(["task", "subject", "snippet"])  # the tasks' other subjects' objects
    scores[MAJORITY] = [
        metrics.majority_share([o], li.loc[(li["task"] == t) & (li["subject"] != s), "object"])
        for t, s, o in zip(scores["task"], scores["subject"], scores["object"])
    ]
    return scores.astype({c: float for c in scores.columns if ":" in c or c == MAJORITY})


def li_row_scores(cells: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One row per Li row (index ``li_row``): its task and, per model, the input-only prompt's hit
    and Li's Patchscope score (any l* per l, then the mean over l), each judged by Li's
    ``check_correct`` as their notebook judges it."""
    li = cells[cells["row"] < 0]
    li = li.assign(hit=[F.mentions(o, b) for o, b in zip(li["output"], li["object"])])
    table = li.drop_duplicates("li_row").set_index("li_row")[["task"]].sort_index()
    for m in names:
        inputs = li[li["condition"] == f"{m}: {INPUT}"]
        patched = li[li["condition"] == f"{m}: {LI_PATCH}"]
        table[f"{m}: {INPUT}"] = inputs.set_index("li_row")["hit"].astype(float)
        table[f"{m}: {LI_PATCH}"] = metrics.any_then_mean(
            patched, "hit", "li_row", any_over="target_layer", mean_over="layer"
        )
    return table


def li_accuracy(li_scores: pd.DataFrame, scores: pd.DataFrame, names: list[str], tasks: list[str]) -> pd.DataFrame:
    """Li et al.'s table: per method, its accuracy per task and the mean over the tasks, as their
    notebook computes it (from ``li_row_scores``). Beside them, the Patchscopes paper's variant:
    the own Patchscope (subject-cropped source, judged with echoes excluded) on the picked rows
    whose fact the verbaliser knows. Extension tasks get their columns but never enter the mean
    over Li's tasks; the mean is over the tasks with rows, and a column counts them."""
    records = []
    for m in names:
        for method in (INPUT, LI_PATCH):
            accuracy = li_scores.groupby("task")[f"{m}: {method}"].mean()
            records.append({"model": m, "method": method, **accuracy.to_dict()})
        known = scores[scores[f"{m} knows"].astype(bool)]
        paper = known.groupby("task")[f"{m}: own Patchscope"].mean()
        records.append({"model": m, "method": "own Patchscope, facts it knows (Patchscopes paper)", **paper.to_dict()})
    table = pd.DataFrame(records).reindex(columns=["model", "method", *tasks])
    ours = [t for t in tasks if t in LI_TASKS]
    table.insert(2, f"mean over {len(ours)} of Li's tasks", table[ours].mean(axis=1))
    # The known-facts variant has no row for a task whose facts the verbaliser knows none of.
    table.insert(3, "Li's tasks with rows", table[ours].notna().sum(axis=1))
    return table.sort_values(["model", "method"]).reset_index(drop=True)


def draw_spread(scores: pd.DataFrame, names: list[str], seeds: list[int]) -> pd.DataFrame:
    """Per cross-model control: each shuffled draw's accuracy over the rows (by its seed; all rows and
    the facts only the source model knows), their min, max and SD."""
    records = []
    for s, v in [(names[0], names[1]), (names[1], names[0])]:
        for suffix in ("", f" [only {s} knows]"):
            rates = [float(scores[shuffled_name(v, s, seed) + suffix].mean()) for seed in seeds]
            by_seed = {f"seed {seed}": r for seed, r in zip(seeds, rates)}
            spread = {"min": min(rates), "max": max(rates), "sd": float(np.std(rates, ddof=1))}
            records.append({"control": f"{v}: reads {s}, shuffled source{suffix}", **by_seed, **spread})
    return pd.DataFrame(records)


def family(names: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for v, s in [(names[0], names[1]), (names[1], names[0])]:
        pairs += [
            (f"{v}: own Patchscope", f"{v}: input only (Li)"),
            (f"{v}: own Patchscope", MAJORITY),
            (f"{v}: input only (Li)", MAJORITY),
            (f"{v}: reads {s}", f"{v}: input only (Li)"),
            (f"{v}: reads {s}", f"{v}: own Patchscope"),
            (f"{v}: reads {s}", f"{v}: reads {s}, shuffled source"),
            (f"{v}: reads {s} [only {s} knows]", f"{v}: reads {s}, shuffled source [only {s} knows]"),
        ]
    return pairs


def experiment(run: Run) -> None:
    from superscopes import plots
    from superscopes.models import model_name

    args, limit = run.args, run.args.limit_subjects or (6 if run.args.quick else None)
    tasks = F.chosen_tasks(args, TASKS, QUICK_TASKS)
    models = {model_name(m): m for m in (run.load_model(args.model), run.load_model(args.other))}
    names = list(models)
    if len(names) != 2:
        raise SystemExit("--model and --other must be two different models")
    rows, known = evaluated_rows(run, models, tasks, limit)
    rows.to_csv(run.out / "rows.csv", index=False)
    li = li_rows(run, tasks, limit)
    cells = run_conditions(run, models, rows, li)
    seeds = draw_seeds(args.seed)
    scores = row_scores(cells, rows, names, args.seed)
    scores.to_csv(run.out / "per_row.csv")
    li_scores = li_row_scores(cells, names)
    accuracy = li_accuracy(li_scores, scores, names, tasks)
    accuracy.to_csv(run.out / "li_accuracy.csv", index=False)
    li_table = F.comparisons(
        run, li_scores, [(f"{m}: {INPUT}", f"{m}: {LI_PATCH}") for m in names], "li_comparisons.csv"
    )
    spread = draw_spread(scores, names, seeds)
    spread.to_csv(run.out / "shuffled_draws.csv", index=False)
    table = F.comparisons(run, scores, family(names), "comparisons.csv")
    methods = [c for c in scores.columns if (":" in c and "[" not in c) or c == MAJORITY]
    by_category = scores.groupby("category")[methods].mean().T.assign(**{"all rows": scores[methods].mean()})
    by_category.to_csv(run.out / "summary.csv")
    patches = cells[cells["row"] >= 0].groupby(["condition", "layer", "target_layer"])["success"].mean().reset_index()
    fig, axes = plots.figure(patches["condition"].nunique(), cols=3, size=(4.2, 3.4))
    for ax, (name, part) in zip(axes, patches.groupby("condition")):
        wide = part.pivot(index="target_layer", columns="layer", values="success").sort_index(ascending=False)
        plots.heatmap(wide, ax=ax, vmin=0, vmax=1, label="success", title=name, xlabel="l", ylabel="l*")
    plots.save(fig, run.out / "accuracy_heatmaps.png", title=f"Patch success per (l, l*), {len(rows)} rows")
    maps = pd.read_csv(run.out / "maps.csv")
    findings = [metrics.describe(r) for _, r in pd.concat([li_table, table]).iterrows()] + [
        "Rows by who knows the fact: "
        + ", ".join(f"{k} {v}" for k, v in rows["category"].value_counts().sort_index().items())
        + ".",
        "Held-out R^2 of the affine maps: "
        + ", ".join(
            f"{r.source_model} L{r.layer} -> {r.verbaliser} L{r.target_layer} {r.r2_heldout:.2f}"
            for r in maps.itertuples()
        )
        + ".",
        f"Shuffled sources drawn {DRAWS} times (seeds {seeds}); over the draws, the accuracy ranges "
        + "; ".join(f"{r.control} {r.min:.3f}-{r.max:.3f} (SD {r.sd:.3f})" for r in spread.itertuples())
        + ".",
        f"Echoes never count in the controls: {int(cells.loc[cells['row'] >= 0, 'echo'].sum())} of "
        f"{int((cells['row'] >= 0).sum())} texts only repeat the subject.",
    ]
    mean, parts = accuracy.columns[2], []
    for m in names:
        a = accuracy[accuracy["model"] == m].set_index("method")[mean]
        parts.append(f"{m}: input only {a[INPUT]:.3f}, Patchscope {a[LI_PATCH]:.3f}")
    paired = "; ".join(
        f"{r.a.removesuffix(f': {INPUT}')} {r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        for r in li_table.itertuples()
    )
    ours = f"Li's comparison ({mean}): " + "; ".join(parts) + f". Input only minus Patchscope per row: {paired}"
    write_summary(
        run,
        f"Verbalisation controls on {names[0]} and {names[1]}",
        ours,
        PAPER,
        {
            "models": ", ".join(names),
            "tasks": ", ".join(tasks),
            "rows": f"{len(rows)} (one snippet per subject)",
            "Li's rows": f"{len(li)} unfiltered rows (input only and Li's Patchscope, per model)",
            "affine maps": f"ridge least squares on {', '.join(FIT_TASKS)} snippets, 80% fit / 20% R^2",
            "generation": f"greedy, {F.LI_NEW_TOKENS} new tokens; success: Li's check_correct (echoes "
            "never count in the controls; Li's comparison counts them as Li do)",
            "shuffled sources": f"{DRAWS} draws per cross-model condition, seeds {seeds}",
            "seed": args.seed,
            "cells": len(cells),
        },
        findings,
        {
            "Li et al.'s comparison: accuracy per task, then their mean": accuracy.round(3),
            "Li's comparison over rows (each unfiltered row a prompt; Holm over the two models)": li_table.round(4),
            "Comparisons over rows (Holm over the family)": table.round(4),
            "Shuffled-source draws (accuracy over the rows per draw)": spread.round(4),
            "Accuracy by knowledge category": by_category.round(3).reset_index(),
            "Knowledge check": known.groupby("condition")["known"].agg(["size", "sum"]).reset_index(),
        },
        ["accuracy_heatmaps.png"],
    )


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
