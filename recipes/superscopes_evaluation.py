"""Superscopes' full evaluation: amplified vs plain MLP-output Patchscopes on the authors' 48 prompts.

Protocol of the authors' notebook (GalNivs/Superscopes, code/superscopes_mlp_outputs_full_evaluation.ipynb:
the ``test_pairs`` cells, ``patchscope_interpret`` and the two MiniLM scoring cells): the 48 source prompts of
``test_pairs``; the source token is the prompt's last token (``find_last_token``, located by
``find_token_id``: its first occurrence, which is the last position for all 48 prompts here); the MLP
output of layers 1-7 (``range(1, 8)``) at that token; written over the residual output of the same
layer (``target_layer=layer``) at the last token ("x") of the entity-description prompt, on the prompt
pass only (``generation_mode=True``); 10 new tokens. Superscopes multiplies the vector by
alpha in 3, 6, 9, 12, 15 (``range(3, 18, 3)``; no alpha 1); Patchscopes is alpha 1, one try. The judge
is the cosine of mean-pooled all-MiniLM-L6-v2 embeddings of the source prompt and the readout; a
(prompt, layer) succeeds when any of its readouts scores > 0.3 (``already_seen``: best of 5 alphas for
Superscopes). Published (Llama-2-13b-chat): Patchscopes [13, 3, 1, 1, 5, 4, 2] = 29/336, Superscopes
[29, 36, 32, 27, 25, 23, 24] = 196/336.

Deviations: SmolLM2 (30 layers) for Llama-2-13b-chat (40): the same layer indices, not depth-mapped;
greedy decoding, where the notebook's ``generate`` sampled with Llama-2-chat's generation config
(temperature 0.6, top-p 0.9, no seed); no BOS token (SmolLM2's tokenizer adds none).

Added here: the judge's discrimination on the run (``superscopes.judge.discrimination``: similarity of
the greedy readouts to their own prompt vs a mismatched one, and the rank of the own prompt among all 48),
written to ``judge_discrimination.csv``; the headline compares at equal tries. Readouts that
only echo (the target's few-shot examples, or the source token alone: ``metrics.is_echo``)
never succeed and are counted apart; every comparison is made per prompt (a prompt's success rate over its layers), with a 95% bootstrap interval over prompts and a paired
sign-flip test. Controls, Holm-corrected as one family: a norm-matched patch (v rescaled to the norm of
the vector it replaces, one try), a random direction with v's norm at the same alphas (3 seeds), and
chance (the same readouts judged against a mismatched prompt: another prompt drawn for each prompt,
3 draws with seeds seed, seed + 1, seed + 2; a (prompt, layer)'s chance is its mean over the draws, and
each draw's successes are reported with their spread). Each is compared
under the paper's best-of-5 selection and under a cross-fitted one (alpha chosen per layer on one half
of the prompts by the mean judge similarity, scored on the other half, swapped; averaged over 3 splits),
which has no best-of-K inflation.
``--prompts ours`` runs our own 48-entity list (recipes/data/superscopes_entities.csv) instead.
"""

from __future__ import annotations

import pandas as pd

from superscopes.parsing import parse_floats, parse_layers

from ._common import DATA, Run, parser, recipe_main, write_summary
from ._facts import other_sources

NAME = "superscopes_evaluation"
DESCRIPTION = __doc__.splitlines()[0]

NOTEBOOK_PROMPTS = [
    "Pink Floyd",
    "Led Zeppelin",
    "Arctic Monkeys",
    "Daft Punk",
    "Iron Maiden",
    "Green Day",
    "Pearl Jam",
    "Maroon 5",
    "Joy Division",
    "Deep Purple",
    "Depeche Mode",
    "Black Sabbath",
    "Judas Priest",
    "Arcade Fire",
    "Tame Impala",
    "Pulp Fiction",
    "Fight Club",
    "Top Gun",
    "King Kong",
    "Mad Max",
    "Die Hard",
    "Mean Girls",
    "Home Alone",
    "Dirty Dancing",
    "Black Panther",
    "Kill Bill",
    "Forrest Gump",
    "Finding Nemo",
    "Independence Day",
    "Pitch Perfect",
    "Shutter Island",
    "The Shining",
    "Reservoir Dogs",
    "Star Wars",
    "Baby Driver",
    "American Psycho",
    "Pretty Woman",
    "Fatal Attraction",
    "Black Swan",
    "Taxi Driver",
    "Diana, Princess of Wales",
    "Back to the Future",
    "Alexander the Great",
    "Saturday Night Live",
    "Red Hot Chili Peppers",
    "Will Smith",
    "Titanic",
    "George Washington",
]
ALPHAS = [3, 6, 9, 12, 15]  # range(3, 18, 3)
LAYERS = [1, 2, 3, 4, 5, 6, 7]  # range(1, 8)
THRESHOLD, STRICT = 0.3, 0.5
PAPER = {"Patchscopes": [13, 3, 1, 1, 5, 4, 2], "Superscopes": [29, 36, 32, 27, 25, 23, 24]}
PAPER_SINGLE_ALPHA = {3: 111, 6: 121, 9: 114, 12: 107, 15: 87}

PATCH, BEST, XFIT = "Patchscopes (α=1)", "Superscopes best-of-K α", "Superscopes cross-fitted α"
NORM, RANDOM_BEST, RANDOM_XFIT = "norm-matched", "random direction best-of-K α", "random direction cross-fitted α"
CHANCE_ONE, CHANCE_BEST, CHANCE_XFIT = "chance α=1", "chance best-of-K α", "chance cross-fitted α"
MISMATCH_DRAWS = 3  # mismatched-prompt draws of the chance control
PAIRS = {
    "Superscopes (best-of-K) vs Patchscopes": (BEST, PATCH),
    "Superscopes (cross-fitted) vs Patchscopes": (XFIT, PATCH),
    f"threshold {STRICT}: Superscopes (best-of-K) vs Patchscopes": (f"{BEST} @{STRICT}", f"{PATCH} @{STRICT}"),
    "Patchscopes vs chance": (PATCH, CHANCE_ONE),
    "best-of-K vs norm-matched": (BEST, NORM),
    "best-of-K vs random direction": (BEST, RANDOM_BEST),
    "best-of-K vs chance": (BEST, CHANCE_BEST),
    "cross-fitted vs norm-matched": (XFIT, NORM),
    "cross-fitted vs random direction": (XFIT, RANDOM_XFIT),
    "cross-fitted vs chance": (XFIT, CHANCE_XFIT),
}
CONTROLS = [name for name in PAIRS if name.startswith(("best-of-K vs", "cross-fitted vs"))]


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument(
        "--prompts",
        choices=["notebook", "ours"],
        default="notebook",
        help="the authors' 48 prompts, or our own list of 48 entities",
    )
    p.add_argument("--layers", type=parse_layers, default=None, help="source = target layers (default 1-7)")
    p.add_argument("--alphas", type=parse_floats, default=None, help="Superscopes alphas (default 3,6,9,12,15)")
    p.add_argument("--random-seeds", type=int, default=3, help="random-direction draws (at least 3)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=10)
    return p


def conditions(alphas: list[float], seeds: int) -> dict[str, dict]:
    """Scope settings per condition; the random direction is drawn once per seed."""
    grid = {"greedy": dict(alphas=[1, *alphas], transforms=["scale"]), "norm": dict(alphas=[1], transforms=["norm"])}
    return grid | {f"random{s}": dict(alphas=list(alphas), transforms=["random"], seed=s) for s in range(seeds)}


def experiment(run: Run) -> None:
    import superscopes
    from superscopes import judge
    from superscopes.metrics import compare_all
    from superscopes.sites import num_layers

    args = run.args
    if args.random_seeds < 3:
        raise SystemExit(f"--random-seeds {args.random_seeds}: a random control needs at least 3 draws")
    prompts = (
        NOTEBOOK_PROMPTS
        if args.prompts == "notebook"
        else pd.read_csv(DATA / "superscopes_entities.csv", keep_default_na=False)["prompt"].tolist()
    )
    prompts = prompts[: args.limit or (3 if args.quick else None)]
    alphas = args.alphas or ([3, 9] if args.quick else ALPHAS)
    model = run.load_model()
    layers = args.layers or ([1, 4] if args.quick else LAYERS)
    layers = list(range(num_layers(model))) if layers == "all" else layers
    grid = conditions(alphas, args.random_seeds)
    store = run.store("cells.csv", ["source", "condition"], layers=layers, alphas=alphas, prompt_list=prompts)
    scorer = judge.default_judge()
    for condition, settings in grid.items():
        seeded = {**settings, "seed": args.seed + settings.get("seed", 0)}
        for prompt in run.pending(store, prompts, key=lambda p: [p, condition]):
            scope = superscopes.Scope(
                prompt,
                sites=["mlp_out"],
                layers=layers,
                target="entity",
                target_layers=["same"],
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                **seeded,
            )
            frame = judge.score(run.scope(model, scope), judge=scorer).drop(columns=["output_ids"])
            store.append(frame.assign(condition=condition))
    expected = len(prompts) * len(layers) * sum(len(s["alphas"]) for s in grid.values())
    cells = run.cells(store, expected, unique=["source", "condition", "layer", "alpha"])
    draws = [args.seed + k for k in range(MISMATCH_DRAWS)]
    cells = successes(mismatched(cells, prompts, draws, scorer), draws)
    table = method_cells(cells, args.random_seeds, splits=[args.seed + s for s in range(3)], draws=draws)
    per_prompt = table.groupby(level="source").mean()
    tests = compare_all(per_prompt, PAIRS, family=CONTROLS, seed=args.seed)
    per_prompt.to_csv(run.out / "per_prompt.csv")
    tests.to_csv(run.out / "comparisons.csv", index=False)
    per_layer = table.groupby(level="layer").sum()
    per_layer.to_csv(run.out / "summary.csv")
    greedy = cells[cells["condition"] == "greedy"]
    discrimination = judge.discrimination(greedy, judge=scorer, seed=args.seed)
    pd.DataFrame([discrimination]).to_csv(run.out / "judge_discrimination.csv", index=False)
    report(
        run,
        cells,
        table,
        per_layer,
        tests,
        layers,
        alphas,
        plot(run, per_layer, tests, len(prompts)),
        discrimination,
        draws,
    )


def mismatched(cells: pd.DataFrame, prompts: list[str], draws: list[int], scorer) -> pd.DataFrame:
    """Per draw (its seed), the greedy readouts' judge similarity to a mismatched prompt: for each
    prompt, another one drawn with that seed (``_facts.other_sources``: never its own)."""
    greedy = cells["condition"] == "greedy"
    outputs, sources = cells.loc[greedy, "output"].fillna("").tolist(), cells.loc[greedy, "source"]
    for seed in draws:
        partner = {p: prompts[j] for p, j in zip(prompts, other_sources(prompts, seed))}
        cells.loc[greedy, f"mismatch_similarity (seed {seed})"] = scorer.similarity(list(sources.map(partner)), outputs)
    return cells


def successes(cells: pd.DataFrame, draws: list[int]) -> pd.DataFrame:
    """Echo flags, then success (judge > 0.3), chance per draw (> 0.3 against that draw's mismatched
    prompt), strict (> 0.5): never an echo."""
    from superscopes import judge

    cells = judge.flag_echoes(cells)
    scored = [("success", "similarity", THRESHOLD), ("strict", "similarity", STRICT)]
    scored += [(f"chance (seed {s})", f"mismatch_similarity (seed {s})", THRESHOLD) for s in draws]
    for column, similarity, threshold in scored:
        cells[column] = (cells[similarity] > threshold) & ~cells["echo"].astype(bool)
    return cells


def method_cells(cells: pd.DataFrame, seeds: int, splits: list[int], draws: list[int]) -> pd.DataFrame:
    """Success of every method per (prompt, layer): best of its alphas, or cross-fitted (averaged over
    splits); the random direction per seed and chance per mismatched-prompt draw, then their means."""
    from superscopes.metrics import cross_fitted_mean

    def best(frame: pd.DataFrame, column: str) -> pd.Series:
        return frame.groupby(["source", "layer"])[column].max().astype(float)

    def xfit(frame: pd.DataFrame, column: str, score: str = "similarity") -> pd.Series:
        return cross_fitted_mean(frame, "alpha", score, column, seeds=splits)

    greedy = cells[cells["condition"] == "greedy"]
    one, amplified = greedy[greedy["alpha"] == 1], greedy[greedy["alpha"] != 1]
    columns = {
        PATCH: best(one, "success"),
        BEST: best(amplified, "success"),
        XFIT: xfit(amplified, "success"),
        f"{PATCH} @{STRICT}": best(one, "strict"),
        f"{BEST} @{STRICT}": best(amplified, "strict"),
        NORM: best(cells[cells["condition"] == "norm"], "success"),
    }
    for s in draws:
        chance, similarity = f"chance (seed {s})", f"mismatch_similarity (seed {s})"
        columns[f"{CHANCE_ONE} (seed {s})"] = best(one, chance)
        columns[f"{CHANCE_BEST} (seed {s})"] = best(amplified, chance)
        columns[f"{CHANCE_XFIT} (seed {s})"] = xfit(amplified, chance, similarity)
    for s in range(seeds):
        drawn = cells[cells["condition"] == f"random{s}"]
        columns[f"{RANDOM_BEST} (seed {s})"], columns[f"{RANDOM_XFIT} (seed {s})"] = (
            best(drawn, "success"),
            xfit(drawn, "success"),
        )
    table = pd.DataFrame(columns)
    for name in (RANDOM_BEST, RANDOM_XFIT):
        table[name] = table[[f"{name} (seed {s})" for s in range(seeds)]].mean(axis=1)
    for name in (CHANCE_ONE, CHANCE_BEST, CHANCE_XFIT):
        table[name] = table[[f"{name} (seed {s})" for s in draws]].mean(axis=1)
    return table.rename_axis(["source", "layer"])


def plot(run: Run, per_layer: pd.DataFrame, tests: pd.DataFrame, n: int) -> str:
    """Successes per layer (the paper's dashed), and every prompt-level difference with its 95% interval."""
    from superscopes import plots

    fig, axes = plots.figure(2, cols=2, size=(6.5, 4.8))
    shown = [PATCH, BEST, XFIT, NORM, RANDOM_BEST, CHANCE_BEST]
    for i, name in enumerate(shown):
        axes[0].plot(per_layer.index, per_layer[name] / n, marker="o", color=f"C{i}", label=name)
    for (name, values), colour in zip(PAPER.items(), ("C0", "C1")):
        axes[0].plot(LAYERS, [v / 48 for v in values], ls="--", color=colour, label=f"paper {name} (Llama-2-13b)")
    axes[0].set(
        xlabel="layer (source = target)",
        ylabel="successes / prompts",
        ylim=(0, 1),
        title=f"Successes per layer, threshold {THRESHOLD}, echoes excluded",
    )
    axes[0].legend(fontsize=7)
    ys = range(len(tests))
    axes[1].errorbar(
        tests["difference"],
        ys,
        xerr=[tests["difference"] - tests["ci_low"], tests["ci_high"] - tests["difference"]],
        fmt="o",
        capsize=3,
    )
    axes[1].axvline(0, color="black", lw=0.8)
    axes[1].set_yticks(list(ys), tests["comparison"], fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set(xlabel="A - B, per-prompt success rate (95% bootstrap CI)", title="Prompt-level tests")
    figure = "successes_per_layer.png"
    plots.save(fig, run.out / figure, title=f"Superscopes evaluation: {n} prompts, MLP output, last token")
    return figure


def report(
    run: Run,
    cells: pd.DataFrame,
    table: pd.DataFrame,
    per_layer: pd.DataFrame,
    tests: pd.DataFrame,
    layers: list[int],
    alphas: list[float],
    figure: str,
    discrimination: dict,
    draws: list[int],
) -> None:
    """summary.md: the headline at equal tries (cross-fitted α against Patchscopes and against chance under
    the same selection), the judge's discrimination, every test in words, per-layer counts, echoes, each
    alpha alone. Best-of-K is reported, never first: it has K tries to Patchscopes' one."""
    from superscopes.judge import describe_discrimination
    from superscopes.metrics import describe, names_entity

    args, n, model_label = run.args, cells["source"].nunique(), cells["model"].iloc[0]
    rows = {r["comparison"]: r for _, r in tests.iterrows()}
    greedy = cells[cells["condition"] == "greedy"]
    wins = greedy[greedy["success"]]
    named = sum(names_entity(s, t, o, ignore=g) for s, t, o, g in wins[["source", "token", "output", "target"]].values)
    echo_passes = int(((greedy["similarity"] > THRESHOLD) & greedy["echo"].astype(bool)).sum())
    spread = {
        name: [table[f"{name} (seed {s})"].sum() for s in range(args.random_seeds)]
        for name in (RANDOM_BEST, RANDOM_XFIT)
    }
    chance = {k: [table[f"{k} (seed {s})"].sum() for s in draws] for k in (CHANCE_ONE, CHANCE_BEST, CHANCE_XFIT)}
    singles = greedy.groupby("alpha")["success"].sum().astype(int).rename("successes").reset_index()
    singles["paper (48 prompts, layers 1-7)"] = singles["alpha"].map({1: 29, **PAPER_SINGLE_ALPHA}).fillna("")
    counts = {name: [int(v) for v in per_layer[name]] for name in (PATCH, BEST)}
    beaten = [c for c in CONTROLS if rows[c]["p_holm"] < 0.05 and rows[c]["difference"] > 0]
    findings = [f"{name}: {describe(rows[name])}." for name in PAIRS]
    findings += [
        f"Controls ({', '.join(CONTROLS)}) are one family, Holm-corrected; a control is beaten only where its Holm "
        "p < 0.05 and A > B.",
        "Random direction, per seed, (prompt, layer) successes: "
        + "; ".join(
            f"{k} {[round(float(x), 2) for x in v]} (mean {pd.Series(v).mean():.1f}, sd {pd.Series(v).std():.1f})"
            for k, v in spread.items()
        ),
        f"Chance, per mismatched-prompt draw (seeds {draws}), (prompt, layer) successes: "
        + "; ".join(
            f"{k} {[round(float(x), 2) for x in v]} (min {min(v):.1f}, max {max(v):.1f}, sd {pd.Series(v).std():.1f})"
            for k, v in chance.items()
        ),
        f"Echoes: {int(greedy['echo'].astype(bool).sum())} of {len(greedy)} greedy readouts copy the target's few-shot "
        f"examples or only repeat the source token; {echo_passes} of them pass the judge's {THRESHOLD} and are not "
        "counted as successes.",
        f"Of the {len(wins)} successful greedy readouts, {named} name another word of the entity (e.g. 'Chili' for "
        "'Peppers'); the rest pass the judge without naming it.",
    ]
    write_summary(
        run,
        title=f"Superscopes evaluation on {model_label}",
        ours=f"at equal tries (α cross-fitted on the other half of the prompts): "
        f"{describe(rows['Superscopes (cross-fitted) vs Patchscopes'])}; against chance under the same "
        f"selection: {describe(rows['cross-fitted vs chance'])}. Judge: {describe_discrimination(discrimination)}. "
        f"Best of K={len(alphas)} alphas against one try (inflated by the selection): "
        f"{describe(rows['Superscopes (best-of-K) vs Patchscopes'])}. Per layer {layers}: Patchscopes "
        f"{counts[PATCH]} = {sum(counts[PATCH])}/{n * len(layers)}, Superscopes best-of-K {counts[BEST]} = "
        f"{sum(counts[BEST])}/{n * len(layers)}. Controls beaten at the prompt level (Holm p < 0.05): "
        f"{', '.join(beaten) or 'none'}; not beaten: {', '.join(c for c in CONTROLS if c not in beaten) or 'none'}",
        paper=f"Llama-2-13b-chat, 48 prompts, layers 1-7: Patchscopes {PAPER['Patchscopes']} = 29/336, Superscopes "
        f"(best of 5 alphas) {PAPER['Superscopes']} = 196/336 (threshold 0.5: 4 vs 61); counted per (prompt, "
        "layer), no interval or test",
        settings={
            "model": model_label,
            "prompts": f"{args.prompts} ({n})",
            "source": "MLP output at the last token",
            "layers (source = target)": layers,
            "alphas": f"1 (Patchscopes) vs {alphas} (Superscopes)",
            "random-direction seeds": args.random_seeds,
            "mismatched-prompt draws (chance)": draws,
            "cross-fitting splits": 3,
            "generation": f"greedy, {args.max_new_tokens} new tokens",
            "judge": f"all-MiniLM-L6-v2 cosine(source prompt, readout) > {THRESHOLD}, echoes excluded",
            "statistics": "per-prompt success rate over layers; 95% bootstrap CI over prompts (10,000 "
            "resamples); paired sign-flip test",
            "cells": len(cells),
        },
        findings=findings,
        tables={
            "Successes per layer": per_layer[[PATCH, BEST, XFIT, NORM, RANDOM_BEST, CHANCE_BEST]].reset_index(),
            "Each alpha alone, one greedy try (successes over prompts x layers)": singles,
            "Prompt-level comparisons (a vs b: per-prompt success rates)": tests.drop(columns=["a", "b"]),
        },
        figures=[figure],
    )


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
