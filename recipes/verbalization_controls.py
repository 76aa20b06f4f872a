"""Verbalisation controls (Li et al., 2025): does a Patchscope readout reveal more than the input and the reader's own knowledge?

On the Patchscopes factual tasks (subject snippet -> "The capital city of x"), two models
(default SmolLM2-135M-Instruct and Gemma-3-270m) each verbalise, one graph run per condition:

- its own activations (the attribute-extraction Patchscope: h_l at the last subject token
  written at layer l* over the placeholder);
- nothing but the input: Li et al.'s input-only prompt (``recipes._facts``: their exact text,
  20 tokens, their success test), on every unfiltered row of the tasks;
- the other model's activations through an affine map per (l, l*) fitted by ridge least
  squares on held-out text (``superscopes.lens``: aligned word ends), ``transforms=["affine"]``
  with ``target_model``; and the same with a shuffled source (the snippet of another subject of the
  same task with another object), the chance level of a cross-model "hit";
- its own knowledge: the plain question ("The capital city of France").

A patch condition scores a row as Li et al. score Patchscopes: for each source layer, whether
some target layer answers, averaged over source layers. Rows are split by which model knows
the fact. Privileged information would show as cross-model success above the shuffled source
on facts only the source model knows; success that tracks the verbaliser's own knowledge
means the readout passes on the subject and the verbaliser answers from what it knows. Every
comparison is paired over rows (bootstrap interval, Holm over the family); the majority class
(the most common object of the task's other subjects) stands beside every accuracy; echoes
(the output only repeats the subject) never count. Deviations, named: 20 new tokens for every
condition, two source and two target layers per model, at most ``--max-rows`` subjects per task.
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
TASKS = ["country_capital_city", "country_currency", "country_largest_city", "food_from_country"]
QUICK_TASKS = ["country_currency"]
FIT_TASKS = ["person_father", "person_mother"]  # snippets for the affine maps (never evaluated here)
SOURCE_DEPTHS, TARGET_DEPTHS = (0.15, 0.3), (0.0, 0.15)  # l and l* as shares of each model's depth
MAJORITY = "majority class"  # the most common object of the task's other subjects (unfiltered rows)
RIDGE = 0.05  # times the source's summed centred variance per dimension (raised held-out R^2 on 320 snippets)
PAPER = ("Li et al. (2025), Llama-3.1-8B-Instruct, 6 factual Patchscopes tasks: input-only 0.644 > LIT 0.602 > "
         "Patchscopes 0.487; their knowledge controls show readouts drawing on the verbaliser's own knowledge")  # fmt: skip


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
    p.add_argument("--limit-subjects", type=int, help="only the first N subjects per task, input-only rows too (quick 6)")
    p.add_argument("--fit-snippets", type=int, help="snippets for the affine maps (default 400; quick 24)")
    return p


def evaluated_rows(run: Run, models: dict, tasks: list[str], limit: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exact crops for both tokenizers, each subject's knowledge in both models, the picked rows."""
    names = list(models)
    rows = pd.concat([F.load_task(t, limit) for t in tasks], ignore_index=True)
    rows = rows[[all(F.crop_is_exact(models[m].tokenizer, sn, su, so) for m in names)
                 for sn, su, so in zip(rows["snippet"], rows["subject"], rows["source"])]]  # fmt: skip
    specs = {m: functools.partial(F.knowledge, run, models[m], rows, F.LI_NEW_TOKENS) for m in names}
    table = F.conditions(run, "knowledge.csv", specs)
    known = {m: set(zip(*table.loc[(table["condition"] == m) & table["known"], ["task", "subject"]].T.values)) for m in names}
    rows = pick_rows(rows, known, names, run.args.max_rows or (3 if run.args.quick else 12), run.args.seed)
    for m in names:
        rows[f"{m} knows"] = [(t, s) in known[m] for t, s in zip(rows["task"], rows["subject"])]
    a, b = (rows[f"{m} knows"] for m in names)
    rows["category"] = np.select([a & b, a & ~b, ~a & b], ["both know", f"only {names[0]}", f"only {names[1]}"], "neither knows")
    return rows.assign(row=range(len(rows))), table


def affine_maps(run: Run, models: dict, layers: dict, targets: dict) -> dict:
    """A ridge affine map per (source model, verbaliser, l, l*), fitted on 80% of held-out
    snippets; its held-out R^2 goes to maps.csv."""
    from superscopes.lens import aligned_positions, apply_affine, collect, fit_affine, r_squared

    names, texts = list(models), fit_snippets(run.args.fit_snippets or (24 if run.args.quick else 400), run.args.seed)
    pos = dict(zip(names, aligned_positions(models[names[0]].tokenizer, models[names[1]].tokenizer, texts)))
    prompt_of = torch.tensor([i for i, p in enumerate(pos[names[0]]) for _ in p])
    fit = prompt_of < int(0.8 * len(texts))
    acts = {m: collect(models[m], texts, "resid_post", sorted(set(layers[m]) | set(targets[m])), pos[m], 32, run.remote)
            for m in names}  # fmt: skip
    maps, records = {}, []
    for s, v in [(names[0], names[1]), (names[1], names[0])]:
        for ls, lv in ((ls, lv) for ls in layers[s] for lv in targets[v]):
            X, Y = acts[s][ls], acts[v][lv]
            ridge = RIDGE * float((X[fit] - X[fit].mean(0)).pow(2).sum()) / X.shape[1]
            maps[(s, v, ls, lv)] = fit_affine(X[fit], Y[fit], ridge=ridge)
            records.append({"source_model": s, "verbaliser": v, "layer": ls, "target_layer": lv,
                            "r2_heldout": r_squared(apply_affine(X[~fit], *maps[(s, v, ls, lv)]), Y[~fit])})  # fmt: skip
    pd.DataFrame(records).to_csv(run.out / "maps.csv", index=False)
    return maps


def run_conditions(run: Run, models: dict, rows: pd.DataFrame, tasks: list[str], limit: int | None) -> pd.DataFrame:
    """Every condition's texts, one graph run each, judged (success, echo)."""
    import superscopes
    from superscopes.sites import num_layers

    names = list(models)
    layers = {m: depth_layers(SOURCE_DEPTHS[: 1 if run.args.quick else 2], num_layers(models[m])) for m in names}
    targets = {m: depth_layers(TARGET_DEPTHS[: 1 if run.args.quick else 2], num_layers(models[m])) for m in names}
    maps = functools.cache(lambda: affine_maps(run, models, layers, targets))
    shuffled = rows["source"].copy()  # another subject of the same task, with another object
    for _, part in rows.groupby("task"):
        shuffled[part.index] = part["source"].values[F.other_sources(list(part["object"]), run.args.seed)]
    li = pd.concat([F.li_rows(t, limit) for t in tasks], ignore_index=True)
    meta = rows[["row", "task", "subject", "object", "snippet"]]

    def patch(s: str, v: str, sources: pd.Series):
        def make() -> pd.DataFrame:
            kwargs = {"layers": layers[s], "target_layers": targets[v]}
            if s != v:
                pairs = [(ls, lv) for ls in layers[s] for lv in targets[v]]
                kwargs = {"layer_pairs": pairs, "transforms": ["affine"], "affine_weight": {p: maps()[(s, v, *p)][0] for p in pairs},
                          "affine_bias": {p: maps()[(s, v, *p)][1] for p in pairs}}  # fmt: skip
            scope = superscopes.Scope(list(sources), sites=["resid_post"], alphas=[1], target=list(rows["template"]),
                                      max_new_tokens=F.LI_NEW_TOKENS, batch_size=run.args.batch_size, **kwargs)  # fmt: skip
            frame = run.scope(models[s], scope, target_model=models[v]).drop(columns=["source", "token", "target"])
            frame["row"] = np.repeat(rows["row"].values, len(frame) // len(rows))  # cells come in prompt order
            return frame.merge(meta, on="row").assign(source_model=s, verbaliser=v)
        return make

    def input_only(m: str):
        prompts = [F.input_only_prompt(models[m].tokenizer, s, t) for s, t in zip(li["snippet"], li["template"])]
        return lambda: li.assign(row=-1, verbaliser=m, output=F.greedy(run, models[m], prompts, F.LI_NEW_TOKENS))

    specs = {}
    for v, s in [(names[0], names[0]), (names[1], names[1]), (names[0], names[1]), (names[1], names[0])]:
        specs[f"{v}: input only (Li)"] = input_only(v)
        specs[f"{v}: {'own Patchscope' if s == v else f'reads {s}'}"] = patch(s, v, rows["source"])
        if s != v:
            specs[f"{v}: reads {s}, shuffled source"] = patch(s, v, shuffled)
    return F.conditions(run, "cells.csv", specs, F.judged, layers=layers, targets=targets)


def row_scores(cells: pd.DataFrame, rows: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One row per evaluated row; per condition its score (patches: any l*, mean over l), plus
    the cross-model scores restricted to the facts only the source model knows."""
    scores = rows.set_index("row")[["task", "subject", "object", "category", *[f"{m} knows" for m in names]]].copy()
    for name, part in cells.groupby("condition"):
        if "input only" in name:
            hit = part.drop_duplicates(["task", "subject", "snippet"]).set_index(["task", "subject", "snippet"])["success"]
            scores[name] = [hit.get(k, np.nan) for k in zip(rows["task"], rows["subject"], rows["snippet"])]
        else:
            scores[name] = metrics.any_then_mean(part, "success", "row", any_over="target_layer", mean_over="layer")
    for s, v in [(names[0], names[1]), (names[1], names[0])]:
        for name in (f"{v}: reads {s}", f"{v}: reads {s}, shuffled source"):
            scores[f"{name} [only {s} knows]"] = scores[name].where(scores["category"] == f"only {s}")
    for m in names:
        scores[f"{m}: plain question"] = scores[f"{m} knows"]
    li = cells[cells["row"] < 0].drop_duplicates(["task", "subject", "snippet"])  # the task's other subjects' objects
    scores[MAJORITY] = [metrics.majority_share([o], li.loc[(li["task"] == t) & (li["subject"] != s), "object"])
                        for t, s, o in zip(scores["task"], scores["subject"], scores["object"])]  # fmt: skip
    return scores.astype({c: float for c in scores.columns if ":" in c or c == MAJORITY})


def family(names: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for (v, s) in [(names[0], names[1]), (names[1], names[0])]:
        pairs += [(f"{v}: own Patchscope", f"{v}: input only (Li)"), (f"{v}: own Patchscope", MAJORITY),
                  (f"{v}: input only (Li)", MAJORITY), (f"{v}: reads {s}", f"{v}: input only (Li)"),
                  (f"{v}: reads {s}", f"{v}: own Patchscope"), (f"{v}: reads {s}", f"{v}: reads {s}, shuffled source"),
                  (f"{v}: reads {s} [only {s} knows]", f"{v}: reads {s}, shuffled source [only {s} knows]")]  # fmt: skip
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
    cells = run_conditions(run, models, rows, tasks, limit)
    scores = row_scores(cells, rows, names)
    scores.to_csv(run.out / "per_row.csv")
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
    findings = [metrics.describe(r) for _, r in table.iterrows()] + [
        "Rows by who knows the fact: "
        + ", ".join(f"{k} {v}" for k, v in rows["category"].value_counts().sort_index().items()) + ".",
        "Held-out R^2 of the affine maps: " + ", ".join(f"{r.source_model} L{r.layer} -> {r.verbaliser} "
                                                       f"L{r.target_layer} {r.r2_heldout:.2f}" for r in maps.itertuples()) + ".",
        f"Echoes never count: {int(cells['echo'].sum())} of {len(cells)} texts only repeat the subject.",
    ]  # fmt: skip
    write_summary(run, f"Verbalisation controls on {names[0]} and {names[1]}", metrics.describe(table.iloc[0]), PAPER,
                  {"models": ", ".join(names), "tasks": ", ".join(tasks), "rows": f"{len(rows)} (one snippet per subject)",
                   "input only": f"Li's prompt on {int((cells['row'] < 0).sum() // 2)} unfiltered rows per model",
                   "affine maps": f"ridge least squares on {', '.join(FIT_TASKS)} snippets, 80% fit / 20% R^2",
                   "generation": f"greedy, {F.LI_NEW_TOKENS} new tokens; success: Li's check_correct, echoes never",
                   "seed": args.seed, "cells": len(cells)},  # fmt: skip
                  findings, {"Comparisons over rows (Holm over the family)": table.round(4),
                             "Accuracy by knowledge category": by_category.round(3).reset_index(),
                             "Knowledge check": known.groupby("condition")["known"].agg(["size", "sum"]).reset_index()},
                  ["accuracy_heatmaps.png"])  # fmt: skip


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
