"""Attribute extraction Patchscope vs a linear probe and the input-only verbaliser (Patchscopes, Li et al.).

Patchscopes (Ghandeharioun et al., 2024, attribute extraction): read the hidden state of the
last subject token of a real text snippet at layer l ("... ancestors came to the United
States"), write it at layer l* over the placeholder of a relation prompt ("The capital city
of x"), generate 10 greedy tokens; a cell succeeds when the object ("Washington D.C.")
appears in them (case-insensitive). Only facts the unpatched model knows are evaluated: the
model gets the plain question ("The capital city of United States") and must produce the
object in 10 greedy tokens.

Baselines on the same held-out rows:

- linear probe (the paper's): logistic regression predicting the object class from h_l at
  the same position, trained on the task's other known rows (``superscopes.probe``);
- input-only zero-shot verbaliser (Li et al., 2025): the model reads the snippet and the
  question as text ("<snippet>\\n<question>"), no activations.

Source prompts are the snippets cropped right after the subject's first mention (the data's
``source_cropped_toks`` is the same crop). In a causal model the hidden state at the last
subject token does not depend on what follows, so the cropped prompt's last token carries
exactly the vector of the full snippet at the subject position; rows whose tokenisation
changes at the cut are dropped (checked with ``superscopes.prompts.find_token``). The crop
lets one ``Scope`` (last token) batch every subject of a task.
"""

from __future__ import annotations

import random
import re

import pandas as pd
import torch

from ._common import DATA, Run, parser, recipe_main, resolve_layers, write_summary

NAME = "attribute_extraction"
DESCRIPTION = __doc__.splitlines()[0]
FACTUAL = DATA / "patchscopes" / "factual"

# Tasks SmolLM2-135M-Instruct knows at least a few facts of (plain question, 10 greedy tokens;
# subjects known / checked): capital 6/24, currency 21/30, largest city 12/24, food 4/19,
# pro sport 29/266. Left out: product_by_company (9/214, time), company_ceo (1/203),
# star_constellation (3/59), superhero_*, pokemon, person_plays_position (0), person_father /
# person_mother (not checked: 4000+ rows of little-known people).
TASKS = ["country_capital_city", "country_currency", "country_largest_city", "food_from_country", "person_plays_pro_sport"]
QUICK_TASKS = ["country_currency", "country_largest_city"]  # their first 6 subjects include known ones
LAYER_STRIDE = 4 / 30  # l and l*: every 4th layer of SmolLM2's 30 (0, 4, ..., 28), scaled to the model's depth
MAX_NEW_TOKENS = 10
PATCHSCOPES, PROBE, ZERO_SHOT = "Patchscopes (best l, l*)", "linear probe (best l)", "zero-shot, input only"
PROBE_UNSEEN = "probe, unseen subjects (best l)"
FIXED = "Patchscopes (one l, l* for all tasks)"
PAPER = (
    "Patchscopes (Ghandeharioun et al., 2024; 12 factual + commonsense tasks): Patchscopes beats the "
    "logistic-regression probe on 6 of 12 tasks and is comparable on most others. Li et al. (2025), "
    "Llama-3.1-8B-Instruct, 6 factual tasks: zero-shot input-only 0.644 > LIT 0.602 > Patchscopes 0.487"
)


# ---------------------------------------------------------------- data and helpers (shared with verbalization_controls)

_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def unescape(text: str) -> str:
    """Some TSV fields hold literal ``\\u00ed`` escapes (``Bras\\u00edlia``): turn them into characters."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 16)), str(text))


def question(template: str, subject: str) -> str:
    """The plain question: the template's placeholder (its last ``x``) replaced by the subject."""
    cut = template.rfind("x")
    return template[:cut] + subject + template[cut + 1 :]


def mentions(output: str, obj: str) -> bool:
    """The paper's success test: the object string appears in the output (case-insensitive)."""
    return obj.lower() in str(output).lower()


def load_task(task: str, limit_subjects: int | None = None) -> pd.DataFrame:
    """Rows ``task, subject, object, template, question, snippet, source`` of one factual TSV.

    ``source`` is the snippet cut after the subject's first mention; rows whose snippet does
    not contain the subject verbatim are dropped, and (subject, source) pairs are unique.
    ``limit_subjects``: keep the first N subjects (file order)."""
    frame = pd.read_csv(FACTUAL / f"{task}.tsv", sep="\t", index_col=0, keep_default_na=False)
    frame = frame[["subject", "object", "prompt_target", "prompt_source"]].map(unescape)
    if limit_subjects is not None:
        keep = list(dict.fromkeys(frame["subject"]))[:limit_subjects]
        frame = frame[frame["subject"].isin(keep)]
    rows = []
    for subject, obj, template, snippet in frame.itertuples(index=False):
        start = snippet.find(subject)
        if start < 0 or not snippet[:start].strip():
            continue  # subject missing, or nothing before it (then the source is the bare name)
        source = snippet[: start + len(subject)]
        rows.append((task, subject, obj, template, question(template, subject), snippet, source))
    out = pd.DataFrame(rows, columns=["task", "subject", "object", "template", "question", "snippet", "source"])
    return out.drop_duplicates(["subject", "source"]).reset_index(drop=True)


def crop_is_exact(tokenizer, snippet: str, subject: str, source: str) -> bool:
    """True when the cropped source's last token is the snippet's last subject token with the
    same token ids before it, so both give the model the same hidden state there."""
    from superscopes.prompts import find_token

    cropped = tokenizer(source)["input_ids"]
    full = tokenizer(snippet)["input_ids"]
    return full[: len(cropped)] == cropped and find_token(tokenizer, snippet, subject) == len(cropped) - 1


def greedy(model, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 64,
           remote: bool = False) -> list[str]:  # fmt: skip
    """The unpatched model's greedy continuations, through the core graph (transform ``none``:
    nothing is written), so decoding is identical to the patched cells'."""
    import superscopes

    if not prompts:
        return []
    unique = list(dict.fromkeys(prompts))
    scope = superscopes.Scope(
        unique, sites=["resid_post"], layers=[0], alphas=[1], transforms=["none"], target="source",
        target_layers=[0], max_new_tokens=max_new_tokens, batch_size=batch_size,
    )  # fmt: skip
    frame = superscopes.run(model, scope, remote=remote, progress=False)
    outputs = dict(zip(frame["source"], frame["output"]))
    return [outputs[p] for p in prompts]


def knowledge(model, rows: pd.DataFrame, batch_size: int = 64, remote: bool = False) -> pd.DataFrame:
    """One row per (task, subject): the plain question, the model's answer, ``known``."""
    subjects = rows.drop_duplicates(["task", "subject"])[["task", "subject", "object", "question"]].reset_index(drop=True)
    answers = greedy(model, list(subjects["question"]), batch_size=batch_size, remote=remote)
    return subjects.assign(answer=answers, known=[mentions(a, o) for a, o in zip(answers, subjects["object"])])


def split(rows: pd.DataFrame, max_test: int, seed: int) -> pd.Series:
    """Held-out rows (a boolean mask): round-robin over subjects in a seeded order, one snippet
    per subject per round, up to ``max_test``, and only while the object class keeps at least
    one training row (so the probe has seen every class it is tested on)."""
    rng = random.Random(f"{seed}-{rows['task'].iloc[0] if len(rows) else ''}")
    order = list(rows.index)
    rng.shuffle(order)
    by_subject: dict[str, list[int]] = {}
    for i in order:
        by_subject.setdefault(rows.at[i, "subject"], []).append(i)
    train_count = rows["object"].value_counts().to_dict()
    test: list[int] = []
    for round_ in range(max((len(v) for v in by_subject.values()), default=0)):
        for subject in by_subject:
            if len(test) >= max_test:
                break
            if round_ < len(by_subject[subject]):
                i = by_subject[subject][round_]
                if train_count[rows.at[i, "object"]] > 1:
                    test.append(i)
                    train_count[rows.at[i, "object"]] -= 1
    return rows.index.isin(test)


def evaluated_rows(model, tasks: list[str], store, args, limit_subjects: int | None, max_test: int):
    """Load the tasks, keep exact crops, check knowledge (resumable), split: (rows, knowledge table)."""
    frames = [load_task(t, limit_subjects) for t in tasks]
    rows = pd.concat(frames, ignore_index=True)
    exact = [crop_is_exact(model.tokenizer, snippet, subject, source)
             for snippet, subject, source in zip(rows["snippet"], rows["subject"], rows["source"])]  # fmt: skip
    dropped = len(rows) - sum(exact)
    rows = rows[exact].reset_index(drop=True)
    for task in Run.pending(store, tasks, key=lambda task: [task]):
        store.append(knowledge(model, rows[rows["task"] == task], args.batch_size, args.remote))
    known = store.load()
    yes = known[known["known"]]
    known_subjects = set(zip(yes["task"], yes["subject"]))
    rows = rows[[(t, s) in known_subjects for t, s in zip(rows["task"], rows["subject"])]].reset_index(drop=True)
    rows["test"] = False
    for task in tasks:
        mask = rows["task"] == task
        if mask.any():
            rows.loc[mask, "test"] = split(rows[mask], max_test, args.seed)
    return rows, known, dropped


# ---------------------------------------------------------------- the recipe


def build_parser():
    from superscopes.parsing import parse_layers

    p = parser(NAME, DESCRIPTION)
    p.add_argument("--tasks", default=None, help=f"comma list of factual tasks (default {','.join(TASKS)})")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="source layers (default every 4th of 30 layers, scaled to the model's depth: 0,4,...,28)")  # fmt: skip
    p.add_argument("--target-layers", type=parse_layers, default=None, help="target layers l* (default as --layers)")
    p.add_argument("--max-rows", type=int, default=None, help="held-out (patched) rows per task (default 8; quick 2)")
    p.add_argument("--limit-subjects", type=int, default=None, help="check only the first N subjects per task")
    return p


def chosen_tasks(args, default: list[str] = TASKS, quick: list[str] = QUICK_TASKS) -> list[str]:
    """``--tasks`` (else ``quick`` or ``default``), each checked against the data's tasks."""
    tasks = args.tasks.split(",") if args.tasks else (quick if args.quick else default)
    unknown = [t for t in tasks if not (FACTUAL / f"{t}.tsv").exists()]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {sorted(p.stem for p in FACTUAL.glob('*.tsv'))}")
    return tasks


def experiment(run: Run) -> None:
    args = run.args

    import superscopes
    from superscopes import plots
    from superscopes.lens import collect
    from superscopes.probe import fit_probe
    from superscopes.sites import num_layers

    tasks = chosen_tasks(args)
    model = run.load_model()
    n_layers = num_layers(model)
    stride = max(1, round(n_layers * LAYER_STRIDE))
    layers = resolve_layers(args.layers, n_layers, [4, 12] if args.quick else list(range(0, n_layers, stride)))
    targets = resolve_layers(args.target_layers, n_layers, [0, 4] if args.quick else list(range(0, n_layers, stride)))
    max_test = args.max_rows or (2 if args.quick else 8)
    limit_subjects = args.limit_subjects or (6 if args.quick else None)

    rows, known, dropped = evaluated_rows(model, tasks, run.store("knowledge.csv", ["task"]), args, limit_subjects, max_test)
    rows.to_csv(run.out / "rows.csv", index=False)
    test = rows[rows["test"]]

    # Patchscopes: one run per (task, source layer); every held-out row x target layer.
    store = run.store("cells.csv", ["task", "layer"], layers=layers, targets=targets)
    for task, layer in run.pending(store, [(t, l) for t in tasks for l in layers], key=lambda unit: unit):
        part = test[test["task"] == task]
        if part.empty:
            continue
        meta = part.set_index("source")
        scope = superscopes.Scope(
            list(part["source"]), sites=["resid_post"], layers=[layer], alphas=[1], target=part["template"].iloc[0],
            target_layers=targets, max_new_tokens=MAX_NEW_TOKENS, batch_size=args.batch_size,
        )  # fmt: skip
        frame = run.scope(model, scope)
        frame.insert(0, "task", task)
        frame["subject"] = frame["source"].map(meta["subject"])
        frame["object"] = frame["source"].map(meta["object"])
        frame["success"] = [mentions(o, obj) for o, obj in zip(frame["output"], frame["object"])]
        store.append(frame.drop(columns=["output_ids"]))
    cells = run.cells(store, len(test) * len(layers) * len(targets), unique=["task", "source", "layer", "target_layer"])
    if cells.empty:
        cells = pd.DataFrame(columns=["task", "source", "layer", "target_layer", "output", "success"])

    # Baselines: the input-only zero-shot verbaliser, and a linear probe per layer.
    base_store = run.store("baselines.csv", ["task"])
    for task in run.pending(base_store, tasks, key=lambda task: [task]):
        part = test[test["task"] == task]
        if part.empty:
            continue
        prompts = [f"{s}\n{q}" for s, q in zip(part["source"], part["question"])]
        outputs = greedy(model, prompts, batch_size=args.batch_size, remote=run.remote)
        base_store.append(pd.DataFrame({
            "task": task, "method": ZERO_SHOT, "subject": part["subject"].values, "object": part["object"].values,
            "source": part["source"].values, "prompt": prompts, "output": outputs,
            "success": [mentions(o, obj) for o, obj in zip(outputs, part["object"])],
        }))  # fmt: skip
    baselines = base_store.load()

    probe_store = run.store("probe.csv", ["task"])
    for task in run.pending(probe_store, tasks, key=lambda task: [task]):
        part = rows[rows["task"] == task]
        if not part["test"].any():
            continue
        h = collect(model, list(part["source"]), "resid_post", "all", "last", batch_size=32, remote=run.remote)
        train, held = part["test"].values == False, part["test"].values  # noqa: E712
        # The second probe never sees the test subjects (only other subjects' rows): it can only
        # answer with an object some other subject has, as a classifier has a closed label set.
        unseen = ~part["subject"].isin(set(part.loc[held, "subject"])).values
        labels = list(part.loc[held, "object"])
        records = []
        for layer in range(n_layers):
            probe = fit_probe(h[layer][torch.tensor(train)], list(part.loc[train, "object"]))
            record = {
                "task": task, "layer": layer, "accuracy": probe.accuracy(h[layer][torch.tensor(held)], labels),
                "train_rows": int(train.sum()), "test_rows": int(held.sum()), "classes": len(probe.classes),
                "accuracy_unseen_subjects": 0.0, "train_rows_unseen_subjects": int(unseen.sum()),
            }  # fmt: skip
            if unseen.any():
                other = fit_probe(h[layer][torch.tensor(unseen)], list(part.loc[unseen, "object"]))
                record["accuracy_unseen_subjects"] = other.accuracy(h[layer][torch.tensor(held)], labels)
            records.append(record)
        probe_store.append(pd.DataFrame(records))
    probes = probe_store.load()

    # Scores.
    model_label = str(model_name_of(model))
    per_cell = cells.groupby(["task", "layer", "target_layer"])["success"].mean().rename("accuracy").reset_index()
    pooled = cells.groupby(["layer", "target_layer"])["success"].mean().rename("accuracy").reset_index()
    best_pooled = pooled.loc[pooled["accuracy"].idxmax()] if not pooled.empty else None
    summary = []
    for task in tasks:
        k = known[known["task"] == task]
        part = rows[rows["task"] == task]
        record = {
            "task": task, "subjects_checked": len(k), "subjects_known": int(k["known"].sum()),
            "known_rows": len(part), "test_rows": int(part["test"].sum()), "classes": part["object"].nunique(),
        }  # fmt: skip
        c = per_cell[per_cell["task"] == task]
        if not c.empty:
            best = c.loc[c["accuracy"].idxmax()]
            rows_any = cells[cells["task"] == task].groupby("source")["success"].any()
            fixed = c[(c["layer"] == best_pooled["layer"]) & (c["target_layer"] == best_pooled["target_layer"])]
            record |= {"patchscopes_best": best["accuracy"], "best_layer": int(best["layer"]),
                       "best_target_layer": int(best["target_layer"]), "patchscopes_fixed_cell": fixed["accuracy"].iloc[0],
                       "patchscopes_any_cell": rows_any.mean()}  # fmt: skip
            pr = probes[probes["task"] == task]
            bp = pr.loc[pr["accuracy"].idxmax()]
            record |= {"probe_best": bp["accuracy"], "probe_best_layer": int(bp["layer"])}
            bu = pr.loc[pr["accuracy_unseen_subjects"].idxmax()]
            record |= {"probe_unseen_best": bu["accuracy_unseen_subjects"], "probe_unseen_best_layer": int(bu["layer"])}
            record["zero_shot"] = baselines.loc[baselines["task"] == task, "success"].mean()
        summary.append(record)
    summary = pd.DataFrame(summary)
    evaluated = summary.dropna(subset=["patchscopes_best"]) if "patchscopes_best" in summary else summary.iloc[0:0]
    summary.to_csv(run.out / "summary.csv", index=False)

    # Figures.
    figures = []
    title_settings = f"resid_post, {len(test)} held-out rows, 10 greedy tokens"
    if not cells.empty:
        panels = [t for t in tasks if t in set(per_cell["task"])]
        fig, axes = plots.figure(len(panels) + 1, cols=min(4, len(panels) + 1), size=(4.6, 3.8))
        for ax, task in zip(axes, [*panels, "all tasks"]):
            table = pooled if task == "all tasks" else per_cell[per_cell["task"] == task]
            wide = table.pivot(index="target_layer", columns="layer", values="accuracy").sort_index(ascending=False)
            n = len(test) if task == "all tasks" else int((test["task"] == task).sum())
            plots.heatmap(wide, ax=ax, vmin=0, vmax=1, label="accuracy", annot=wide.size <= 100,
                          title=f"{task} ({n} rows)", xlabel="source layer l", ylabel="target layer l*")  # fmt: skip
        figures.append("accuracy_heatmap.png")
        plots.save(fig, run.out / figures[-1], title=f"{model_label}: attribute-extraction Patchscope accuracy over (l, l*), {title_settings}")

        methods = {"patchscopes_best": PATCHSCOPES, "patchscopes_fixed_cell": FIXED, "probe_best": PROBE,
                   "probe_unseen_best": PROBE_UNSEEN, "zero_shot": ZERO_SHOT}  # fmt: skip
        long = evaluated.melt(id_vars=["task"], value_vars=list(methods), var_name="method", value_name="accuracy")
        long["method"] = long["method"].map(methods)
        long["accuracy"] = long["accuracy"].astype(float).round(2)
        fig, (ax,) = plots.figure(1, size=(max(7.0, 2.2 * len(evaluated) + 3), 4.8))
        plots.bars(long, x="task", y="accuracy", hue="method", ax=ax, annotate=True,
                   title="best accuracy per method on the held-out rows the model answers in plain form",
                   xlabel="task", ylabel="accuracy")  # fmt: skip
        ax.set_ylim(0, 1.1)
        ax.tick_params(axis="x", labelrotation=15)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figures.append("best_accuracy.png")
        plots.save(fig, run.out / figures[-1], title=f"{model_label}: Patchscopes vs linear probe vs input-only verbaliser")

        per_layer = pd.concat([
            per_cell.groupby(["task", "layer"])["accuracy"].max().reset_index().assign(method="Patchscopes (best l*)"),
            probes[["task", "layer", "accuracy"]].assign(method="linear probe"),
        ])  # fmt: skip
        fig, axes = plots.figure(len(panels), cols=min(3, len(panels)), size=(4.6, 3.6))
        for ax, task in zip(axes, panels):
            plots.lines(per_layer[per_layer["task"] == task], x="layer", y="accuracy", hue="method", ax=ax,
                        title=task, xlabel="source layer l", ylabel="held-out accuracy", ylim=(-0.05, 1.05))  # fmt: skip
        figures.append("accuracy_per_layer.png")
        plots.save(fig, run.out / figures[-1], title=f"{model_label}: accuracy per source layer, {title_settings}")

    # Summary.
    def count(a: str, b: str, op) -> int:
        return int(op(evaluated[a], evaluated[b]).sum()) if len(evaluated) else 0

    import operator

    wins, ties = count("patchscopes_best", "probe_best", operator.gt), count("patchscopes_best", "probe_best", operator.eq)
    wins_unseen = count("patchscopes_best", "probe_unseen_best", operator.gt)
    zs_wins = count("zero_shot", "patchscopes_best", operator.gt)
    zs_wins_fixed = count("zero_shot", "patchscopes_fixed_cell", operator.gt)
    means = {m: float(evaluated[c].mean()) if len(evaluated) else float("nan")
             for m, c in [(PATCHSCOPES, "patchscopes_best"), (FIXED, "patchscopes_fixed_cell"), (PROBE, "probe_best"),
                          (PROBE_UNSEEN, "probe_unseen_best"), (ZERO_SHOT, "zero_shot")]}  # fmt: skip
    cell = "" if best_pooled is None else f"l={int(best_pooled['layer'])}, l*={int(best_pooled['target_layer'])}"
    findings = [
        f"Patchscopes (best (l, l*) cell per task) beats the probe (best layer, held-out snippets) on {wins} of "
        f"{len(evaluated)} tasks ({ties} ties), and the probe that never saw the test subjects on {wins_unseen}. "
        "Mean accuracy: " + ", ".join(f"{m} {v:.3f}" for m, v in means.items()) + ".",
        f"The input-only verbaliser (snippet + question as text, no activations) beats the best Patchscopes cell on "
        f"{zs_wins} of {len(evaluated)} tasks and the single pooled cell ({cell}) on {zs_wins_fixed} (Li et al.'s "
        "control: what the readout adds beyond the input).",
        f"The best cell pooled over tasks is {cell}. At l = 0 the vector is little more than the subject's last "
        "token, so for one-token subjects (France, Japan) the patched prompt is close to the plain question, which "
        "the model answers by construction; multi-token subjects (people, 'United States') need later layers. "
        "Pooled accuracy per source layer (best l*): "
        + ", ".join(f"l={int(k)} {v:.2f}" for k, v in pooled.groupby("layer")["accuracy"].max().items())
        + "; per target layer (best l): "
        + ", ".join(f"l*={int(k)} {v:.2f}" for k, v in pooled.groupby("target_layer")["accuracy"].max().items())
        + ". 'patchscopes_any_cell' is the share of rows some cell answers.",
        "Both 'best' numbers pick the best of many cells / layers on the same held-out rows, so both are optimistic; "
        f"with {max_test} rows per task one row moves a task's accuracy by {1 / max_test:.2f}.",
        "The paper's probe is trained on other snippets of the same subjects (the class is the object, so a test "
        "subject must be seen): it only has to recognise the subject, which h_l encodes from layer 0, hence ~1.0. "
        "The unseen-subject probe can only answer with an object other subjects share (a closed label set): it "
        "scores 0 on tasks whose objects are unique (capitals, largest cities).",
        f"Tasks kept: subjects the model answers in plain form; {dropped} rows were dropped because the tokenizer "
        "splits the subject differently when the snippet is cut after it.",
    ]
    write_summary(
        run,
        title=f"Attribute extraction Patchscope vs probe vs input-only verbaliser on {model_label}",
        ours=(f"Patchscopes beats the probe on {wins} of {len(evaluated)} tasks ({ties} ties; vs the unseen-subject "
              f"probe: {wins_unseen}); mean accuracy Patchscopes best cell {means[PATCHSCOPES]:.3f}, one pooled cell "
              f"{means[FIXED]:.3f}, probe {means[PROBE]:.3f}, unseen-subject probe {means[PROBE_UNSEEN]:.3f}, "
              f"zero-shot input-only {means[ZERO_SHOT]:.3f}"),  # fmt: skip
        paper=PAPER,
        settings={
            "model": f"{model_label} ({n_layers} layers)",
            "data": f"Patchscopes factual TSVs (recipes/data/patchscopes, Apache-2.0), tasks {', '.join(tasks)}",
            "rows": f"{len(rows)} known rows ({len(test)} held out and patched, at most {max_test} per task)",
            "source": "last subject token of the snippet (cropped after the subject), site resid_post",
            "layers l": layers,
            "target layers l*": targets,
            "target": "the task's prompt_target ('The capital city of x'), residual output at 'x' overwritten, alpha 1",
            "generation": f"greedy, {MAX_NEW_TOKENS} new tokens; success = object string in the output (case-insensitive)",
            "knowledge filter": "the plain question (template with the subject) answered correctly, same rule",
            "probe": "multinomial logistic regression (L2 1e-2, standardised h_l, L-BFGS), trained on the other known rows "
                     "(paper's) or on the rows of the other subjects only (unseen subjects)",
            "zero-shot": "'<cropped snippet>\\n<question>', no activations",
            "seed": args.seed,
            "cells": len(cells),
        },
        findings=findings,
        tables={"Per task": summary, "Knowledge check (plain question)": known.groupby("task").agg(
            checked=("subject", "size"), known=("known", "sum")).reset_index()},
        figures=figures,
    )


def model_name_of(model) -> str:
    from superscopes.models import model_name

    return model_name(model)


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
