"""Verbalisation controls (Li et al., 2025): does a Patchscope readout reveal more than the input and the reader's own knowledge?

On the Patchscopes factual tasks (subject snippet -> "The capital city of x"), two models
(default SmolLM2-135M-Instruct and Gemma-3-270m) each act as the *verbaliser* of:

- its own activations (the attribute-extraction Patchscope: h_l at the last subject token
  written at layer l* over the placeholder, 10 greedy tokens, success = object in output);
- nothing but the input (zero-shot: "<snippet>\\n<question>" as text; Li et al.'s input-only
  baseline);
- the *other* model's activations through an affine map fitted by least squares on held-out
  text (``superscopes.lens``: aligned word-end positions of both tokenizers), patched with
  ``superscopes.run(source, Scope(transforms=["affine"], ...), target_model=verbaliser)``;
- its own knowledge: the plain question ("The capital city of France").

Rows are split by which model knows the fact. If cross-model readouts succeed only where the
verbaliser itself knows the answer, the readout conveys the subject (which the verbaliser
completes from its own knowledge), not privileged information of the source model; success
on facts the source knows and the verbaliser does not would be privileged information.
Snippets are cropped after the subject (see ``recipes.attribute_extraction``); the crop must
be exact for both tokenizers.
"""

from __future__ import annotations

import itertools
import random

import pandas as pd
import torch

from ._common import Run, depth_layers, parser, recipe_main, write_summary
from .attribute_extraction import (
    FACTUAL, MAX_NEW_TOKENS, chosen_tasks, crop_is_exact, greedy, knowledge, load_task, mentions,
)  # fmt: skip

NAME = "verbalization_controls"
DESCRIPTION = __doc__.splitlines()[0]
OTHER = "gemma3-270m"
TASKS = ["country_capital_city", "country_currency", "country_largest_city", "food_from_country"]
QUICK_TASKS = ["country_currency"]
FIT_TASKS = ["person_father", "person_mother"]  # snippets for the affine maps (never evaluated here)
SOURCE_DEPTHS = (0.15, 0.3)  # source layers l as a share of the source model's depth
TARGET_DEPTHS = (0.0, 0.15)  # target layers l* as a share of the verbaliser's depth
# Ridge of the affine maps, relative to the source's summed centred variance per dimension
# (|Xc|_F^2 / d_in): on 320 snippets it raised held-out R^2 over plain least squares
# (e.g. SmolLM2 L9 -> Gemma L3 0.47 -> 0.55, Gemma L5 -> SmolLM2 L9 0.43 -> 0.50).
RIDGE = 0.05
SELF, CROSS = "Patchscope (own activations)", "cross-model (other model's activations)"
ZERO_SHOT, KNOWS = "zero-shot (input only)", "plain question (own knowledge)"
PAPER = (
    "Li et al. (2025), Llama-3.1-8B-Instruct, 6 factual Patchscopes tasks: input-only zero-shot 0.644 > "
    "LIT 0.602 > Patchscopes 0.487, i.e. the input alone answers more than the activation readouts; their "
    "knowledge controls show readouts drawing on the verbaliser's own knowledge"
)


def fit_snippets(n: int, seed: int) -> list[str]:
    """``n`` distinct snippets from tasks not evaluated here (seeded sample)."""
    texts = []
    for task in FIT_TASKS:
        frame = pd.read_csv(FACTUAL / f"{task}.tsv", sep="\t", index_col=0, keep_default_na=False)
        texts += list(dict.fromkeys(frame["prompt_source"].str.strip()))
    texts = sorted(set(t for t in texts if len(t.split()) >= 4))
    random.Random(seed).shuffle(texts)
    return texts[:n]


def pick_rows(rows: pd.DataFrame, known: dict[str, set], names: list[str], max_rows: int, seed: int) -> pd.DataFrame:
    """One snippet per subject (seeded), then up to ``max_rows`` subjects per task, taken
    round-robin over the knowledge categories (who knows the fact) so that every category
    is represented."""
    rng = random.Random(seed)
    picked = []
    for task, part in rows.groupby("task", sort=False):
        subjects = list(dict.fromkeys(part["subject"]))
        rng.shuffle(subjects)
        groups: dict[tuple, list[str]] = {}
        for s in subjects:
            groups.setdefault(tuple((task, s) in known[m] for m in names), []).append(s)
        order, keys = [], sorted(groups, reverse=True)
        while any(groups[k] for k in keys) and len(order) < max_rows:
            for k in keys:
                if groups[k] and len(order) < max_rows:
                    order.append(groups[k].pop(0))
        for s in order:
            options = part[part["subject"] == s]
            picked.append(options.iloc[rng.randrange(len(options))])
    return pd.DataFrame(picked).reset_index(drop=True)


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--other", default=OTHER, help=f"the second model (default {OTHER})")
    p.add_argument("--tasks", default=None, help=f"comma list of factual tasks (default {','.join(TASKS)})")
    p.add_argument("--max-rows", type=int, default=None, help="subjects per task (default 12; quick 3)")
    p.add_argument("--limit-subjects", type=int, default=None, help="check only the first N subjects per task")
    p.add_argument("--fit-snippets", type=int, default=None, help="snippets for the affine maps (default 400; quick 24)")
    return p


def experiment(run: Run) -> None:
    args = run.args

    import superscopes
    from superscopes import plots
    from superscopes.lens import aligned_positions, collect, fit_affine, r_squared, apply_affine
    from superscopes.models import model_name
    from superscopes.sites import num_layers

    tasks = chosen_tasks(args, TASKS, QUICK_TASKS)
    max_rows = args.max_rows or (3 if args.quick else 12)
    limit_subjects = args.limit_subjects or (6 if args.quick else None)
    n_fit = args.fit_snippets or (24 if args.quick else 400)
    depths_source = SOURCE_DEPTHS[:1] if args.quick else SOURCE_DEPTHS
    depths_target = TARGET_DEPTHS[:1] if args.quick else TARGET_DEPTHS
    models = {}
    for name in (args.model, args.other):
        model = run.load_model(name)
        models[model_name(model)] = model
    names = list(models)
    if len(names) != 2:
        raise SystemExit("--model and --other must be two different models")
    source_layers = {m: depth_layers(depths_source, num_layers(models[m])) for m in names}
    target_layers = {m: depth_layers(depths_target, num_layers(models[m])) for m in names}

    # Rows: exact crops for both tokenizers; knowledge of every subject in both models.
    rows = pd.concat([load_task(t, limit_subjects) for t in tasks], ignore_index=True)
    exact = [all(crop_is_exact(models[m].tokenizer, sn, su, so) for m in names)
             for sn, su, so in zip(rows["snippet"], rows["subject"], rows["source"])]  # fmt: skip
    rows = rows[exact].reset_index(drop=True)
    know_store = run.store("knowledge.csv", ["verbaliser", "task"])
    for m, task in run.pending(know_store, [(m, t) for m in names for t in tasks], key=lambda unit: unit):
        part = rows[rows["task"] == task]
        know_store.append(knowledge(models[m], part, args.batch_size, run.remote).assign(verbaliser=m))
    known_table = know_store.load()
    known = {m: set(zip(*[known_table.loc[(known_table["verbaliser"] == m) & known_table["known"], c]
                          for c in ("task", "subject")])) for m in names}  # fmt: skip
    rows = pick_rows(rows, known, names, max_rows, args.seed)
    for m in names:
        rows[f"{m} knows"] = [(t, s) in known[m] for t, s in zip(rows["task"], rows["subject"])]
    rows.to_csv(run.out / "rows.csv", index=False)
    meta = rows.set_index(["task", "source"])

    # Zero-shot (input only) per verbaliser.
    base_store = run.store("baselines.csv", ["verbaliser", "task"])
    for m, task in run.pending(base_store, [(m, t) for m in names for t in tasks], key=lambda unit: unit):
        part = rows[rows["task"] == task]
        if part.empty:
            continue
        prompts = [f"{s}\n{q}" for s, q in zip(part["source"], part["question"])]
        outputs = greedy(models[m], prompts, batch_size=args.batch_size, remote=run.remote)
        base_store.append(pd.DataFrame({
            "verbaliser": m, "task": task, "method": ZERO_SHOT, "subject": part["subject"].values,
            "object": part["object"].values, "source": part["source"].values, "prompt": prompts,
            "output": outputs, "success": [mentions(o, ob) for o, ob in zip(outputs, part["object"])],
        }))  # fmt: skip

    # Patch cells: own activations (one rectangular grid per model and task) and cross-model pairs.
    store = run.store("cells.csv", ["method", "source_model", "verbaliser", "task", "unit"])
    done = store.done()

    def finish(frame: pd.DataFrame, method: str, source_model: str, verbaliser: str, task: str, unit: str):
        frame = frame.drop(columns=["output_ids"])
        for column, value in reversed(list(dict(method=method, source_model=source_model, verbaliser=verbaliser,
                                                task=task, unit=unit).items())):  # fmt: skip
            frame.insert(0, column, value)
        frame = frame.drop(columns=["model"] + (["target_model"] if "target_model" in frame else []))
        keys = list(zip(frame["task"], frame["source"]))
        frame["subject"] = [meta.loc[k, "subject"] for k in keys]
        frame["object"] = [meta.loc[k, "object"] for k in keys]
        frame["success"] = [mentions(o, ob) for o, ob in zip(frame["output"], frame["object"])]
        return frame

    for m in names:
        for task in tasks:
            part = rows[rows["task"] == task]
            if part.empty or store.key([SELF, m, m, task, "grid"]) in done:
                continue
            scope = superscopes.Scope(
                list(part["source"]), sites=["resid_post"], layers=source_layers[m], alphas=[1],
                target=part["template"].iloc[0], target_layers=target_layers[m], max_new_tokens=MAX_NEW_TOKENS,
                batch_size=args.batch_size,
            )  # fmt: skip
            store.append(finish(run.scope(models[m], scope), SELF, m, m, task, "grid"))

    directions = [(names[0], names[1]), (names[1], names[0])]
    pairs = {(s, v): [(ls, lv) for ls in source_layers[s] for lv in target_layers[v]] for s, v in directions}
    missing = [(s, v, t, p) for s, v in directions for t in tasks for p in pairs[(s, v)]
               if not rows[rows["task"] == t].empty and store.key([CROSS, s, v, t, f"{p[0]}->{p[1]}"]) not in done]  # fmt: skip
    map_rows = []
    if missing or not (run.out / "maps.csv").exists():
        # Affine maps per (source layer, target layer), fitted on 80% of held-out snippets, R^2 on the rest.
        texts = fit_snippets(n_fit, args.seed)
        pos = dict(zip(names, aligned_positions(models[names[0]].tokenizer, models[names[1]].tokenizer, texts)))
        counts = [len(p) for p in pos[names[0]]]
        prompt_of = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
        fit_mask = prompt_of < int(0.8 * len(texts))
        acts = {}
        for m in names:
            layers_needed = sorted(set(source_layers[m]) | set(target_layers[m]))
            acts[m] = collect(models[m], texts, "resid_post", layers_needed, pos[m], batch_size=32, remote=run.remote)
        maps = {}
        for s, v in directions:
            for ls, lv in pairs[(s, v)]:
                X, Y = acts[s][ls], acts[v][lv]
                Xc = X[fit_mask] - X[fit_mask].mean(0)
                W, b = fit_affine(X[fit_mask], Y[fit_mask], ridge=RIDGE * float(Xc.pow(2).sum()) / X.shape[1])
                maps[(s, v, ls, lv)] = (W, b)
                map_rows.append({"source_model": s, "verbaliser": v, "layer": ls, "target_layer": lv,
                                 "fit_positions": int(fit_mask.sum()), "heldout_positions": int((~fit_mask).sum()),
                                 "r2_heldout": r_squared(apply_affine(X[~fit_mask], W, b), Y[~fit_mask])})  # fmt: skip
        pd.DataFrame(map_rows).to_csv(run.out / "maps.csv", index=False)
        # One run per (source model, verbaliser, task) over its missing layer pairs, a map per pair.
        for (s, v, task), group in itertools.groupby(missing, key=lambda item: item[:3]):
            todo = [pair for *_, pair in group]
            part = rows[rows["task"] == task]
            weights, biases = ({p: maps[(s, v, *p)][i] for p in todo} for i in (0, 1))
            scope = superscopes.Scope(
                list(part["source"]), sites=["resid_post"], layer_pairs=todo, alphas=[1], transforms=["affine"],
                affine_weight=weights, affine_bias=biases, target=part["template"].iloc[0],
                max_new_tokens=MAX_NEW_TOKENS, batch_size=args.batch_size,
            )  # fmt: skip
            frame = run.scope(models[s], scope, target_model=models[v])
            for ls, lv in todo:
                pair_rows = frame[(frame["layer"] == ls) & (frame["target_layer"] == lv)].reset_index(drop=True)
                store.append(finish(pair_rows, CROSS, s, v, task, f"{ls}->{lv}"))
    maps_table = pd.read_csv(run.out / "maps.csv")

    # Load and check.
    expected = len(rows) * sum(
        [len(source_layers[m]) * len(target_layers[m]) for m in names] + [len(pairs[d]) for d in directions]
    )
    cells = run.cells(store, expected, unique=["method", "source_model", "verbaliser", "source", "layer", "target_layer"])
    baselines = base_store.load()

    # Per row: each method's success (patch methods at their best (l, l*) pooled over tasks).
    per_cell = cells.groupby(["method", "source_model", "verbaliser", "layer", "target_layer"])["success"].mean()
    per_cell = per_cell.rename("accuracy").reset_index()
    best_cells = per_cell.loc[per_cell.groupby(["method", "source_model", "verbaliser"])["accuracy"].idxmax()]
    table = rows[["task", "subject", "object", "source", *[f"{m} knows" for m in names]]].copy()
    columns = {}
    for m in names:
        z = baselines[baselines["verbaliser"] == m].set_index(["task", "source"])["success"]
        columns[(m, ZERO_SHOT)] = f"{m}: {ZERO_SHOT}"
        table[columns[(m, ZERO_SHOT)]] = [bool(z.get((t, s), False)) for t, s in zip(table["task"], table["source"])]
        for method in (SELF, CROSS):
            b = best_cells[(best_cells["method"] == method) & (best_cells["verbaliser"] == m)]
            if b.empty:
                continue
            b = b.iloc[0]
            chosen = cells[(cells["method"] == method) & (cells["verbaliser"] == m) & (cells["layer"] == b["layer"])
                           & (cells["target_layer"] == b["target_layer"])].set_index(["task", "source"])["success"]  # fmt: skip
            columns[(m, method)] = f"{m}: {method}"
            table[columns[(m, method)]] = [bool(chosen.get((t, s), False)) for t, s in zip(table["task"], table["source"])]
        any_cell = cells[(cells["method"] == CROSS) & (cells["verbaliser"] == m)].groupby(["task", "source"])["success"].any()
        table[f"{m}: cross-model, any pair"] = [bool(any_cell.get((t, s), False)) for t, s in zip(table["task"], table["source"])]
    table.to_csv(run.out / "per_row.csv", index=False)

    def category(row) -> str:
        a, b = row[f"{names[0]} knows"], row[f"{names[1]} knows"]
        return {(True, True): "both know", (True, False): f"only {names[0]}",
                (False, True): f"only {names[1]}", (False, False): "neither knows"}[(bool(a), bool(b))]  # fmt: skip

    table["category"] = table.apply(category, axis=1)
    summary = []
    for m in names:
        other = names[1] if m == names[0] else names[0]
        for method in (KNOWS, ZERO_SHOT, SELF, CROSS):
            for cat, part in [("all rows", table), *table.groupby("category", sort=False)]:
                if method == KNOWS:
                    values = part[f"{m} knows"]
                elif (m, method) in columns:
                    values = part[columns[(m, method)]]
                else:
                    continue
                b = best_cells[(best_cells["method"] == method) & (best_cells["verbaliser"] == m)]
                summary.append({
                    "verbaliser": m, "reads": {KNOWS: "plain question", ZERO_SHOT: "snippet + question as text",
                                               SELF: f"own h ({m})", CROSS: f"{other}'s h, affine map"}[method],
                    "method": method, "rows": cat, "n": len(part), "accuracy": float(values.mean()) if len(part) else float("nan"),
                    "cell": "" if b.empty else f"l={int(b.iloc[0]['layer'])}, l*={int(b.iloc[0]['target_layer'])}",
                })  # fmt: skip
    summary = pd.DataFrame(summary)
    summary.to_csv(run.out / "summary.csv", index=False)

    def acc(m, method, rows_=None) -> float:
        s = summary[(summary["verbaliser"] == m) & (summary["method"] == method) & (summary["rows"] == (rows_ or "all rows"))]
        return float(s["accuracy"].iloc[0]) if len(s) else float("nan")

    def n_of(cat: str) -> int:
        return int((table["category"] == cat).sum())

    # Figures.
    figures = []
    shown = summary[summary["rows"] != "all rows"].copy()
    shown["accuracy"] = shown["accuracy"].astype(float).round(2)
    fig, axes = plots.figure(2, cols=1, size=(11.0, 4.2))
    for ax, m in zip(axes, names):
        part = shown[shown["verbaliser"] == m]
        plots.bars(part, x="rows", y="accuracy", hue="method", ax=ax, annotate=True,
                   title=f"verbaliser {m}: accuracy by who knows the fact", xlabel="rows (who answers the plain question)",
                   ylabel="accuracy (object in 10 greedy tokens)")  # fmt: skip
        ax.set_ylim(0, 1.15)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figures.append("accuracy_by_knowledge.png")
    plots.save(fig, run.out / figures[-1], title=(f"Verbalisation controls: {names[0]} and {names[1]}, {len(rows)} "
                                                  f"rows of {len(tasks)} factual tasks, best (l, l*) per method"))  # fmt: skip

    fig, axes = plots.figure(4, cols=2, size=(5.0, 3.8))
    panels = [(SELF, m, m) for m in names] + [(CROSS, s, v) for s, v in directions]
    for ax, (method, s, v) in zip(axes, panels):
        part = per_cell[(per_cell["method"] == method) & (per_cell["source_model"] == s) & (per_cell["verbaliser"] == v)]
        wide = part.pivot(index="target_layer", columns="layer", values="accuracy").sort_index(ascending=False)
        plots.heatmap(wide, ax=ax, vmin=0, vmax=1, label="accuracy",
                      title=f"{s} h_l -> {v}" + (" (affine)" if method == CROSS else " (own)"),
                      xlabel=f"source layer l ({s})", ylabel=f"target layer l* ({v})")  # fmt: skip
    figures.append("accuracy_heatmaps.png")
    plots.save(fig, run.out / figures[-1], title=f"Patch accuracy per (l, l*), {len(rows)} rows, all categories")

    a, b = names
    findings = []
    for m in names:
        findings.append(
            f"{m} as verbaliser, all {len(table)} rows: own knowledge {acc(m, KNOWS):.3f}, input-only zero-shot "
            f"{acc(m, ZERO_SHOT):.3f}, Patchscope on its own activations {acc(m, SELF):.3f}, reading the other model's "
            f"activations {acc(m, CROSS):.3f}."
        )
    for s, v in directions:
        findings.append(
            f"{v} reading {s}'s activations: {acc(v, CROSS, 'both know'):.3f} on facts both know (n={n_of('both know')}), "
            f"{acc(v, CROSS, f'only {v}'):.3f} on facts only {v} knows (n={n_of(f'only {v}')}), "
            f"{acc(v, CROSS, f'only {s}'):.3f} on facts only the source {s} knows (n={n_of(f'only {s}')}), "
            f"{acc(v, CROSS, 'neither knows'):.3f} on facts neither knows (n={n_of('neither knows')})."
        )
    for m in names:
        findings.append(
            f"{m}'s own Patchscope vs its input-only baseline on the facts it knows: "
            f"{_known_acc(table, columns, m, SELF):.3f} vs {_known_acc(table, columns, m, ZERO_SHOT):.3f} "
            "(Li et al.: the input alone answers at least as often as the readout)."
        )
    def hits(v: str, cat: str) -> str:
        part = table[table["category"] == cat]
        column = columns.get((v, CROSS))
        return "0 of 0" if part.empty or column is None else f"{int(part[column].sum())} of {len(part)}"

    def verdict(s: str, v: str) -> str:
        part = table[table["category"] == f"only {s}"]
        column = columns.get((v, CROSS))
        if part.empty or column is None:
            return f"{v} reading {s}: no rows to test privileged information."
        k = int(part[column].sum())
        if k >= 3 and k / len(part) >= 0.25:
            return f"{v} reading {s}: {k} of {len(part)} hits is worth a closer look (possible privileged information)."
        return f"{v} reading {s}: {k} of {len(part)} hits, no clear evidence of privileged information."

    beats = [m for m in names if acc(m, ZERO_SHOT) >= acc(m, SELF)]
    findings.append(
        "What the readouts reveal beyond the input: the input-only baseline answers at least as often as the own-"
        f"activation Patchscope for {', '.join(beats) or 'neither model'} (Li et al.'s ordering"
        + (")" if len(beats) == len(names) else "; not for the others)")
        + ". Cross-model readouts succeed on facts only the source knows in "
        + "; ".join(f"{hits(v, f'only {s}')} rows ({v} reading {s})" for s, v in directions)
        + ", against " + "; ".join(f"{hits(v, 'both know')} on facts both know ({v})" for _, v in directions)
        + " and " + "; ".join(f"{hits(v, f'only {v}')} on facts only the verbaliser {v} knows" for _, v in directions)
        + ". "
        + " ".join(verdict(s, v) for s, v in directions)
    )
    findings.append(
        "Privileged information would show as cross-model success on facts only the source knows; success that "
        "tracks the verbaliser's own knowledge means the readout passes on the subject, and the verbaliser answers "
        "from what it knows. Held-out R^2 of the affine maps: "
        + ", ".join(f"{r.source_model} L{r.layer} -> {r.verbaliser} L{r.target_layer}: {r.r2_heldout:.2f}"
                    for r in maps_table.itertuples())  # fmt: skip
        + "."
    )
    findings.append(
        f"Small samples: {len(rows)} rows ({max_rows} subjects per task at most, one snippet each); best cells are "
        "picked on the same rows, so patch accuracies are optimistic."
    )
    write_summary(
        run,
        title=f"Verbalisation controls on {a} and {b}",
        ours=(f"{a}: zero-shot {acc(a, ZERO_SHOT):.3f}, own Patchscope {acc(a, SELF):.3f}, reading {b} "
              f"{acc(a, CROSS):.3f}; {b}: zero-shot {acc(b, ZERO_SHOT):.3f}, own Patchscope {acc(b, SELF):.3f}, "
              f"reading {a} {acc(b, CROSS):.3f} (all {len(rows)} rows); cross-model hits on facts only the source "
              f"knows: {hits(b, f'only {a}')} ({b} reading {a}), {hits(a, f'only {b}')} ({a} reading {b})"),  # fmt: skip
        paper=PAPER,
        settings={
            "models": f"{a} ({num_layers(models[a])} layers), {b} ({num_layers(models[b])} layers)",
            "data": f"Patchscopes factual TSVs, tasks {', '.join(tasks)}; {len(rows)} rows (one snippet per subject)",
            "source layers l": {m: source_layers[m] for m in names},
            "target layers l*": {m: target_layers[m] for m in names},
            "affine maps": f"least squares on resid_post at aligned word ends of {n_fit} snippets of {', '.join(FIT_TASKS)} "
                           "(80% fit, 20% held out for R^2), "
                           f"ridge {RIDGE} x |Xc|^2 / d_in",
            "target": "the task's prompt_target, residual output at 'x' overwritten, alpha 1",
            "generation": f"greedy, {MAX_NEW_TOKENS} new tokens; success = object string in the output",
            "best cell": "per (method, verbaliser), pooled over tasks",
            "seed": args.seed,
            "cells": len(cells),
        },
        findings=findings,
        tables={"Accuracy by verbaliser, method and knowledge category": summary,
                "Affine maps (held-out R^2)": maps_table},  # fmt: skip
        figures=figures,
    )


def _known_acc(table: pd.DataFrame, columns: dict, m: str, method: str) -> float:
    part = table[table[f"{m} knows"]]
    if (m, method) not in columns or part.empty:
        return float("nan")
    return float(part[columns[(m, method)]].mean())


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
