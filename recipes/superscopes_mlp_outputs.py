"""Superscopes' MLP-output examples: amplified early-layer MLP inputs/outputs and hidden states.

Jacobi & Niv (2025) read "Wales" in "Diana, Princess of Wales" (and "Future" in "Back to the
Future", "Live" in "Saturday Night Live") at the MLP input, MLP output and block output of
layers 1-4 of Llama-2-13b-chat (40 layers), amplified by alpha in {1, 3, 6, 9, 12, 15} and
patched into the entity-description prompt at the same layer. The judge (MiniLM similarity
to the source prompt) picks the best alpha per (layer, site), as in the paper's app.

Paper layers are mapped to this model's depth: l -> round(l * (n - 1) / 39).
"""

from __future__ import annotations

import pandas as pd

from superscopes.parsing import parse_floats, parse_layers

from ._common import Run, parser, recipe_main, resolve_layers, write_summary

NAME = "superscopes_mlp_outputs"
DESCRIPTION = __doc__.splitlines()[0]

PAPER_LAYERS = 40  # Llama-2-13b-chat
# (source prompt, source token, the paper's layer range on 40 layers)
EXAMPLES = [
    ("Diana, Princess of Wales", "Wales", (1, 4)),
    ("Back to the Future", "Future", (1, 4)),  # range not given in our notes: the MLP runs' 1-4
    ("Saturday Night Live", "Live", (1, 4)),
]
SITES = ["mlp_in", "mlp_out", "resid_post"]
SITE_LABELS = {"mlp_in": "MLP input", "mlp_out": "MLP output", "resid_post": "Hidden state"}
ALPHAS = [1, 3, 6, 9, 12, 15]
GROUP = ["source", "token", "site", "layer"]


def map_layer(layer: int, n_layers: int, paper_layers: int = PAPER_LAYERS) -> int:
    """A layer of the paper's model at the same relative depth in a model with ``n_layers``."""
    return min(n_layers - 1, max(0, round(layer * (n_layers - 1) / (paper_layers - 1))))


def map_range(low: int, high: int, n_layers: int) -> list[int]:
    return list(range(map_layer(low, n_layers), map_layer(high, n_layers) + 1))


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--layers", type=parse_layers, help="layers to read (default: the paper's 1-4, mapped to depth)")
    p.add_argument("--alphas", type=parse_floats, default=None, help="comma list (default 1,3,6,9,12,15)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    return p


def text_tables(cells: pd.DataFrame, winners: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per example: rows (layer, site), one column per alpha, the best alpha's text starred."""
    best_alpha = {tuple(r[:4]): r[4] for r in winners[GROUP + ["alpha"]].itertuples(index=False)}
    tables = {}
    for source, frame in cells.groupby("source", sort=False):
        frame = frame.assign(
            text=[
                ("★ " if best_alpha.get((r.source, r.token, r.site, r.layer)) == r.alpha else "")
                + f"{r.output!r}"[1:-1] + f" ({r.similarity:.2f})"
                for r in frame.itertuples()
            ],
            site=frame["site"].map(SITE_LABELS).fillna(frame["site"]),
        )  # fmt: skip
        wide = frame.pivot_table(index=["layer", "site"], columns="alpha", values="text", aggfunc="first", sort=False)
        wide.columns = [f"alpha={a:g}" for a in wide.columns]
        tables[source] = wide.reset_index()
    return tables


def app_table(winners: pd.DataFrame) -> pd.DataFrame:
    """The paper's app view: Layer | MLP input | MLP output | Hidden state, best-alpha text each."""
    shown = winners.assign(
        cell=[f"{r.output!r}"[1:-1] + f" (α={r.alpha:g}, {r.similarity:.2f})" for r in winners.itertuples()],
        site=winners["site"].map(SITE_LABELS).fillna(winners["site"]),
    )
    wide = shown.pivot_table(index=["source", "layer"], columns="site", values="cell", aggfunc="first", sort=False)
    return wide[[SITE_LABELS[s] for s in SITES if SITE_LABELS[s] in wide.columns]].reset_index()


def layer_plan(args, examples: list[tuple], n_layers: int, quick_count: int) -> dict[str, list[int]]:
    """Per example (source, token, (paper low, high), ...): --layers, else its paper range mapped to depth."""
    plan = {}
    for source, _, (low, high), *_ in examples:
        layers = resolve_layers(args.layers, n_layers, map_range(low, high, n_layers))
        plan[source] = layers[:quick_count] if args.quick and not args.layers else layers
    return plan


def judged_readouts(run: Run, model, examples: list[tuple], plan: dict[str, list[int]], alphas: list[float],
                    sites: list[str], target_layers: list) -> pd.DataFrame:  # fmt: skip
    """One judged grid per example (a resumable unit), checked complete: the cells of both example recipes."""
    import superscopes
    from superscopes import judge

    store = run.store("cells.csv", ["source"], layers=plan, alphas=alphas)
    for source, token, *_ in run.pending(store, examples, key=lambda example: example[:1]):
        scope = superscopes.Scope(
            source, token=token, sites=sites, layers=plan[source], alphas=alphas, target="entity",
            target_layers=target_layers, max_new_tokens=run.args.max_new_tokens, batch_size=run.args.batch_size,
        )  # fmt: skip
        frame = run.scope(model, scope)
        store.append(judge.score(frame, judge=judge.default_judge()).drop(columns=["output_ids"]))
    return run.cells(store, sum(len(plan[s]) for s, *_ in examples) * len(sites) * len(alphas))


def experiment(run: Run) -> None:
    args = run.args
    from superscopes import judge
    from superscopes.sites import num_layers

    model = run.load_model()
    n_layers = num_layers(model)
    examples = EXAMPLES[:1] if args.quick else EXAMPLES
    alphas = args.alphas or ([1, 6] if args.quick else ALPHAS)
    plan = layer_plan(args, examples, n_layers, quick_count=2)
    cells = judged_readouts(run, model, examples, plan, alphas, SITES, ["same"])
    winners = judge.best(cells, GROUP)
    summary = summarise(cells, winners)
    summary.to_csv(run.out / "summary.csv", index=False)
    tables = text_tables(cells, winners)
    pd.concat([t.assign(source=s) for s, t in tables.items()]).to_csv(run.out / "table.csv", index=False)
    figure = plot(run, cells, examples)
    report(run, cells, summary, winners, tables, examples, plan, alphas, n_layers, figure)


def summarise(cells: pd.DataFrame, winners: pd.DataFrame) -> pd.DataFrame:
    """Per (example, site, layer): the best alpha, alpha=1, and the best amplified alpha, judged."""
    from superscopes import judge
    from superscopes.metrics import echoes

    one = cells[cells["alpha"] == 1].set_index(GROUP)["similarity"]
    amplified = judge.best(cells[cells["alpha"] != 1], GROUP).set_index(GROUP)
    summary = winners.set_index(GROUP)[["alpha", "similarity", "output"]]
    summary.columns = ["best_alpha", "best_similarity", "best_output"]
    summary = summary.join(one.rename("alpha1_similarity"))
    summary = summary.join(amplified["similarity"].rename("best_amplified_similarity"))
    summary = summary.join(amplified["alpha"].rename("best_amplified_alpha"))
    summary = summary.join(amplified["output"].rename("best_amplified_output"))
    summary = summary.reset_index()
    summary["amplified_echo"] = [echoes(t, o) for t, o in zip(summary["token"], summary["best_amplified_output"])]
    summary["alpha1_success"] = summary["alpha1_similarity"] > judge.DEFAULT_THRESHOLD
    summary["amplified_success"] = summary["best_amplified_similarity"] > judge.DEFAULT_THRESHOLD
    return summary


def plot(run: Run, cells: pd.DataFrame, examples: list[tuple]) -> str:
    """Similarity heatmaps, (site, layer) x alpha, one per example."""
    from superscopes import plots

    model_label = cells["model"].iloc[0]
    fig, axes = plots.figure(len(examples), cols=len(examples), size=(4.8, 0.5 + 0.32 * len(SITES) * 4))
    for ax, (source, token, _) in zip(axes, examples):
        frame = cells[cells["source"] == source]
        heat = frame.pivot_table(index=["site", "layer"], columns="alpha", values="similarity", sort=False)
        heat.index = [f"{SITE_LABELS.get(s, s)} L{layer}" for s, layer in heat.index]
        heat.columns = [f"{a:g}" for a in heat.columns]
        plots.heatmap(heat, title=f"{source!r} / token {token!r}", xlabel="alpha", ylabel="site, layer",
                      ax=ax, label="MiniLM similarity to source", vmin=-0.1, vmax=0.7)  # fmt: skip
    figure = "similarity_heatmap.png"
    plots.save(fig, run.out / figure, title=f"{model_label}: MLP-output Superscopes, target layer = source layer, "
                                            f"judge similarity per alpha (best alpha = max)")  # fmt: skip
    return figure


def report(run: Run, cells: pd.DataFrame, summary: pd.DataFrame, winners: pd.DataFrame, tables: dict,
           examples: list[tuple], plan: dict[str, list[int]], alphas: list[float], n_layers: int, figure: str) -> None:  # fmt: skip
    """summary.md: on-topic counts at alpha=1 vs amplified, echoes, entity naming, the tables."""
    from superscopes import judge
    from superscopes.metrics import names_entity

    model_label = cells["model"].iloc[0]
    cells["names_entity"] = [
        names_entity(s, t, o, ignore=g)
        for s, t, o, g in zip(cells["source"], cells["token"], cells["output"], cells["target"])
    ]
    named, named_one = int(cells["names_entity"].sum()), int(cells[cells["alpha"] == 1]["names_entity"].sum())
    n = len(summary)
    s1, sa = int(summary["alpha1_success"].sum()), int(summary["amplified_success"].sum())
    gain = summary["best_amplified_similarity"] - summary["alpha1_similarity"]
    per_example = summary.groupby("source", sort=False).agg(
        alpha1_successes=("alpha1_success", "sum"), amplified_successes=("amplified_success", "sum"),
        mean_alpha1_similarity=("alpha1_similarity", "mean"),
        mean_best_amplified_similarity=("best_amplified_similarity", "mean"),
        cells=("alpha1_success", "size"),
    ).reset_index()  # fmt: skip
    per_site = summary.groupby("site", sort=False).agg(
        alpha1_successes=("alpha1_success", "sum"), amplified_successes=("amplified_success", "sum"),
        mean_alpha1_similarity=("alpha1_similarity", "mean"),
        mean_best_amplified_similarity=("best_amplified_similarity", "mean"),
    ).reset_index()  # fmt: skip
    layers_text = "; ".join(
        f"{s!r}: paper layers {lo}-{hi} -> ours {plan[s]}" for s, _, (lo, hi) in examples
    )
    write_summary(
        run,
        title=f"Superscopes MLP-output examples on {model_label}",
        ours=(
            f"(example, site, layer) readouts judged on-topic (similarity > {judge.DEFAULT_THRESHOLD}): "
            f"alpha=1 {s1}/{n}, best amplified alpha (of {[a for a in alphas if a != 1]}) {sa}/{n}; "
            f"best amplified minus alpha=1 similarity: mean {gain.mean():+.3f}, higher in {(gain > 0).sum()}/{n}"
        ),
        paper=(
            "qualitative examples only (Llama-2-13b-chat, layers 1-4, alphas 1-15): amplified early-layer MLP "
            "outputs of 'Wales', 'Future', 'Live' read out descriptions related to the entity (Diana / the film / "
            "the show) that alpha=1 does not give; no aggregate number"
        ),
        settings={
            "model": f"{model_label} ({n_layers} layers)",
            "examples": ", ".join(f"{s!r} / {t!r}" for s, t, _ in examples),
            "layers (paper 40 layers -> ours, l -> round(l * (n-1) / 39))": layers_text,
            "sites": ", ".join(f"{s} ({SITE_LABELS[s]})" for s in SITES),
            "alphas": alphas,
            "transform": "scale (alpha * v), written over the whole residual output of the same layer",
            "target": "Patchscopes entity-description prompt, placeholder 'x'",
            "generation": f"greedy, {run.args.max_new_tokens} new tokens",
            "judge": "all-MiniLM-L6-v2 cosine(source prompt, readout); best alpha per (example, site, layer)",
            "cells": len(cells),
        },
        findings=[
            "Per site, on-topic readouts at alpha=1 vs best amplified: "
            + "; ".join(f"{r.site}: {r.alpha1_successes} vs {r.amplified_successes}" for r in per_site.itertuples()),
            f"Best-of-{len(alphas) - 1} amplified alphas against a single alpha=1 try favours amplification by "
            "construction; "
            "the evaluation recipe (superscopes_evaluation) runs the controls.",
            f"Of the {sa} on-topic best amplified readouts, "
            f"{int(summary[summary['amplified_success']]['amplified_echo'].sum())} "
            "merely repeat the source token; the judge embeds the source prompt, so echoes score well.",
            f"Readouts that name another word of the entity (e.g. 'Diana' or 'Princess' for 'Wales'): {named} of "
            f"{len(cells)} cells at any alpha ({named_one} of {(cells['alpha'] == 1).sum()} at alpha=1). "
            + ("None does: at this size the model does not show the paper's effect, whatever the judge says."
               if named == 0 else "Read them in the tables below."),
            "The starred texts below are the best alpha by the judge; read them: a similarity above 0.3 can come "
            "from generic text (e.g. country names) rather than the entity.",
        ],
        tables={"Per example": per_example, "Per site": per_site, "Best alpha per layer and site (app view)":
                app_table(winners)} | {f"All alphas: {s!r} (★ = best alpha, judge similarity in brackets)": t
                                        for s, t in tables.items()},  # fmt: skip
        figures=[figure],
    )


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
