"""Superscopes' MLP-output examples: plain and amplified readouts of "Wales", "Future" and "Live".

The authors' notebook (GalNivs/Superscopes, code/mlp_outputs_amplification.ipynb, tests 1-3) runs each
example in two steps on Llama-2-13b-chat. Plain: the MLP input (the normalised residual the MLP reads),
MLP output and hidden state (block output) of the example's token at each layer of a range, unamplified,
written over the residual output of layer 0 (``patchscope_interpret``'s default ``target_layer=0``) at
"x" of the entity-description prompt. Amplified: the MLP output alone, times alpha in 3, 6, 9, 12, 15
(``range(3, 18, 3)``), at layers around the layer where the hidden state becomes readable, written at
the same layer for "Wales" (layers 2-4) and "Future" (1-3), and at layer 0 for "Live" (2-4). Plain
ranges: "Wales" 1-4, "Future" 1-3, "Live" 2-4. 10 new tokens; no judge in the notebook (the authors
read the texts).

What the readouts show is counted by ``metrics.names_entity`` (the readout names another word of the
entity, e.g. "Diana" for "Wales") among readouts that are not echoes (``metrics.is_echo``: a copy of
the target's few-shot examples or of the source token alone); the MiniLM judge's similarity is shown
beside it, never alone. Deviations: SmolLM2 (30 layers) at the notebook's layer indices (not
depth-mapped); greedy decoding where the notebook sampled with Llama-2-chat's generation config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd

from ._common import Run, parser, recipe_main, write_summary

NAME = "superscopes_mlp_outputs"
DESCRIPTION = __doc__.splitlines()[0]

SITE_LABELS = {"mlp_in": "MLP input", "mlp_out": "MLP output", "resid_post": "hidden state"}
THREE_SITES, AMPS = ("mlp_in", "mlp_out", "resid_post"), (3, 6, 9, 12, 15)


@dataclass(frozen=True)
class Readout:
    """One notebook cell: an example's vectors at ``sites`` x ``layers``, times ``alphas``,
    written at ``target_layer``."""

    source: str
    token: str
    condition: str
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    alphas: tuple[float, ...]
    target_layer: int | str  # a layer, or "same"

    def quick(self) -> Readout:
        return replace(self, layers=self.layers[:2], alphas=self.alphas[:2])


def notebook_pair(source: str, token: str, plain: range, amplified: range, target_layer: int | str) -> list[Readout]:
    """A test of mlp_outputs_amplification.ipynb: plain readouts of three sites into layer 0,
    then the amplified MLP output."""
    return [
        Readout(source, token, "plain", THREE_SITES, tuple(plain), (1,), 0),
        Readout(source, token, "amplified", ("mlp_out",), tuple(amplified), AMPS, target_layer),
    ]


READOUTS = [
    *notebook_pair("Diana, Princess of Wales", "Wales", range(1, 5), range(2, 5), "same"),
    *notebook_pair("Back to the Future", "Future", range(1, 4), range(1, 4), "same"),
    *notebook_pair("Saturday Night Live", "Live", range(2, 5), range(2, 5), 0),
]
PAPER = (
    "Llama-2-13b-chat, read by eye, no count: plain MLP outputs read nonsense; amplified ones read 'British "
    "prince' ('Wales', layer 2, α 9), '1985 film' ('Future', layer 2, α 9), 'Sketch comedy television series' "
    "('Live', layer 4, α 9, target layer 0)"
)


def build_parser(name: str = NAME, description: str = DESCRIPTION):
    p = parser(name, description)
    p.add_argument("--max-new-tokens", type=int, default=10)
    return p


def collect(run: Run, model, readouts: list[Readout]) -> pd.DataFrame:
    """Every readout, one resumable unit per (example, condition), judged and flagged (echo, names_entity)."""
    import superscopes
    from superscopes import judge

    store = run.store("cells.csv", ["source", "condition"], readouts=[repr(r) for r in readouts])
    for r in run.pending(store, readouts, key=lambda r: [r.source, r.condition]):
        scope = superscopes.Scope(
            r.source,
            token=r.token,
            sites=list(r.sites),
            layers=list(r.layers),
            alphas=list(r.alphas),
            target="entity",
            target_layers=[r.target_layer],
            max_new_tokens=run.args.max_new_tokens,
            batch_size=run.args.batch_size,
        )
        frame = judge.score(run.scope(model, scope), judge=judge.default_judge()).drop(columns=["output_ids"])
        store.append(frame.assign(condition=r.condition))
    return annotate(run.cells(store, sum(len(r.sites) * len(r.layers) * len(r.alphas) for r in readouts)))


def annotate(cells: pd.DataFrame) -> pd.DataFrame:
    """Flags per readout: echo, names the entity (never an echo), on topic by the judge (never an echo)."""
    from superscopes import judge
    from superscopes.metrics import echoes, names_entity

    cells = judge.flag_echoes(cells)
    cells["echo"] = cells["echo"].astype(bool)
    named = [names_entity(s, t, o, ignore=g) for s, t, o, g in cells[["source", "token", "output", "target"]].values]
    cells["names_entity"] = pd.Series(named, index=cells.index) & ~cells["echo"]
    cells["judged_on_topic"] = (cells["similarity"] > judge.DEFAULT_THRESHOLD) & ~cells["echo"]
    # the token's own word inside other text ("Great Britain" for "Great"): the token read out, not the entity
    word = [echoes(t, o) for t, o in zip(cells["token"], cells["output"].fillna(""))]
    cells["token_word"] = pd.Series(word, index=cells.index) & ~cells["echo"]
    return cells


def counts(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (example, condition, site): readouts, how many name the entity, echoes, the judge's count and mean."""
    return (
        cells.groupby(["source", "condition", "site"], sort=False)
        .agg(
            readouts=("output", "size"),
            name_the_entity=("names_entity", "sum"),
            token_word=("token_word", "sum"),
            echoes=("echo", "sum"),
            judge_above_threshold=("judged_on_topic", "sum"),
            mean_similarity=("similarity", "mean"),
        )
        .reset_index()
    )


def ordered(cells: pd.DataFrame) -> pd.DataFrame:
    """Plain readouts before amplified ones, then by site and layer (the order of the notebook's printouts)."""
    rank = cells["condition"].map({"plain": 0, "amplified": 1})
    return cells.assign(rank=rank).sort_values(["rank", "site", "layer"], kind="stable").drop(columns="rank")


def text_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Rows (example, condition, site, layer), a column per alpha: the text, ✓ when it names the entity, [echo]."""
    cells = ordered(cells)
    mark = ["✓ " if n else "[echo] " if e else "" for n, e in zip(cells["names_entity"], cells["echo"])]
    shown = cells.assign(
        text=[
            m + f"{o!r}"[1:-1] + f" ({s:.2f})" for m, o, s in zip(mark, cells["output"].fillna(""), cells["similarity"])
        ],
        site=cells["site"].map(SITE_LABELS),
    )
    wide = shown.pivot_table(
        index=["source", "condition", "site", "layer", "target_layer"],
        columns="alpha",
        values="text",
        aggfunc="first",
        sort=False,
    )
    wide.columns = [f"α={a:g}" for a in wide.columns]
    return wide.fillna("").reset_index()


def plot(run: Run, cells: pd.DataFrame, title: str) -> str:
    """Judge similarity per (condition, site, layer) x alpha, one heatmap per example; ✓ names the entity."""
    from superscopes import plots

    examples = list(dict.fromkeys(cells["source"]))
    fig, axes = plots.figure(len(examples), cols=len(examples), size=(4.8, 5.0))
    labels = ordered(cells)
    labels["label"] = [
        f"{s:.2f}" + (" ✓" if n else " E" if e else "")
        for s, n, e in zip(labels["similarity"], labels["names_entity"], labels["echo"])
    ]
    for ax, (source, frame) in zip(axes, labels.groupby("source", sort=False)):
        index = ["condition", "site", "layer"]
        heat = frame.pivot_table(index=index, columns="alpha", values="similarity", sort=False)
        text = frame.pivot_table(index=index, columns="alpha", values="label", aggfunc="first", sort=False)
        heat.index = [f"{c} {SITE_LABELS[s]} L{layer}" for c, s, layer in heat.index]
        heat.columns = [f"{a:g}" for a in heat.columns]
        plots.heatmap(
            heat,
            title=repr(source),
            xlabel="alpha",
            ylabel="",
            ax=ax,
            vmin=-0.1,
            vmax=0.7,
            fmt="",
            annot=text.fillna("").to_numpy(),
            label="MiniLM similarity to the source",
        )
    figure = "similarity_heatmap.png"
    plots.save(fig, run.out / figure, title=f"{cells['model'].iloc[0]}: {title}; ✓ names the entity, E echo")
    return figure


def run_examples(run: Run, readouts: list[Readout], title: str, paper: str) -> None:
    """Collect, count and report a notebook's examples: what the readouts say, not the judge's count alone."""
    from superscopes import judge
    from superscopes.judge import describe_discrimination

    quick = [r.quick() for r in readouts[:2]] if run.args.quick else readouts
    cells = collect(run, run.load_model(), quick)
    table, texts = counts(cells), text_table(cells)
    table.to_csv(run.out / "summary.csv", index=False)
    texts.to_csv(run.out / "table.csv", index=False)
    figure = plot(run, cells, title)
    totals = cells.groupby("condition", sort=False)[["names_entity", "echo", "judged_on_topic"]].sum()
    sizes = cells.groupby("condition", sort=False).size()
    ours = "; ".join(
        f"{c}: {int(totals.loc[c, 'names_entity'])}/{sizes[c]} readouts name the entity, "
        f"{int(totals.loc[c, 'echo'])} echo, {int(totals.loc[c, 'judged_on_topic'])} pass the judge"
        for c in sizes.index
    )
    naming = cells[cells["names_entity"]]
    if cells["source"].nunique() > 1:
        discrimination = judge.discrimination(cells, seed=run.args.seed)
        pd.DataFrame([discrimination]).to_csv(run.out / "judge_discrimination.csv", index=False)
        judged = f"With {discrimination['n_candidates']} examples, {describe_discrimination(discrimination)}."
    else:
        judged = "One example: the judge's discrimination between prompts cannot be measured."
    write_summary(
        run,
        title=f"{title} on {cells['model'].iloc[0]}",
        ours=ours,
        paper=paper,
        settings={
            "examples": [
                f"{r.condition}: {r.source!r} / {r.token!r}, {list(r.sites)}, layers {list(r.layers)},"
                f" α {list(r.alphas)}, target layer {r.target_layer}"
                for r in quick
            ],
            "target": "entity-description prompt, residual output at 'x' overwritten, prompt pass only",
            "generation": f"greedy, {run.args.max_new_tokens} new tokens",
            "cells": len(cells),
            "names the entity": "another word (4+ letters) of the source than the token's, not copied from "
            "the target; echoes never count",
        },
        findings=[
            f"Readouts that name the entity ({len(naming)}): "
            + (
                "; ".join(
                    f"{r.source!r} {r.condition} {r.site} L{r.layer} α={r.alpha:g}: {r.output.strip()!r}"
                    for r in naming.itertuples()
                )
                or "none"
            ),
            f"Readouts that use the token's own word inside other text ({int(cells['token_word'].sum())}, e.g. "
            "'Great Britain' for 'Great'): the token is read out, not the entity.",
            "The judge's count (similarity > 0.3, echoes excluded) is shown beside it: it passes generic "
            "descriptions too, so read the texts in the table below.",
            judged,
            "Greedy decoding: each readout is one deterministic text (the notebook's were sampled).",
        ],
        tables={
            "Per example, condition and site": table,
            "Every readout (✓ names the entity, [echo] an echo; judge similarity in brackets)": texts,
        },
        figures=[figure],
    )


def experiment(run: Run) -> None:
    run_examples(run, READOUTS, "Superscopes MLP-output examples", PAPER)


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
