"""Cross-model Patchscopes (Ghandeharioun et al., 2024, Sec. 4.4): a hidden state of one model
read out by another through an affine map fitted per (source layer, target layer) pair.

The paper's protocol (PAIR-code/interpretability, patchscopes/code/patch_cross_model.ipynb,
scored by ``patchscopes_utils.evaluate_patch_next_token_prediction_x_model``): one random position
per text where both tokenizers agree, the text cut after it (``_snippets.sample_prefixes``); maps
by least squares with a bias from h_l (``resid_post``) of the source to h_l* of the target at the
same position, one position per training text, layers 0, 5, 10, ... of each model. Conditions:
``same_text`` (the paper's, the main one: the mapped h_l written into the target model at l* on
the same text at the same, last, token) and ``identity_prompt`` (a variant: over the "?" of the
identity prompt). precision@1 = 1[the patched target's top token == the source model's own next token].

One ``superscopes.run`` per direction and condition covers every layer pair (``layer_pairs``,
``affine_weight={(l, l*): W}``, ``target_model=``) plus a control (``transforms=["affine", "none"]``,
the ``none`` cells at one pair via ``where``): the target's own next token with nothing written.
On the same text that control is how often the two models simply agree; a map earns credit only
above it (per pair, the paired difference over texts: bootstrap interval, sign-flip p, Holm).
Same-model grids are not run: writing h_l at l* = l into the same text changes nothing.

Deviations: SmolLM2-135M <-> Gemma-3-270m (other families and tokenizers) instead of Vicuna-7B ->
Vicuna-13B, so tokens are compared as stripped text and positions aligned by character; Patchscopes
factual snippets instead of the Pile; 200 evaluated texts (paper 2000), maps fitted on 4000 (paper
100000); the identity-prompt variant goes through the maps (the hidden sizes differ).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from superscopes.metrics import compare_conditions, prompt_means
from superscopes.parsing import parse_layers

from ._common import Run, parser, recipe_main, resolve_layers, write_summary
from ._snippets import evaluated_and_fit, load_snippets, log

NAME = "cross_model"
DESCRIPTION = "Cross-model Patchscopes: affine maps between SmolLM2 and Gemma-3 per layer pair, precision@1"
PAPER = (
    "Patchscopes Sec. 4.4 (the paper's models: Vicuna-7B -> Vicuna-13B; same Pile text, affine map per layer pair): "
    "a precision@1 heatmap over (source layer, target layer), high where the layers sit at similar relative depth; "
    "values published as a figure only; no number exists for this model pair"
)
CONDITIONS = ("same_text", "identity_prompt")
CELL_COLUMNS = [
    "direction",
    "condition",
    "model",
    "target_model",
    "source",
    "token",
    "layer",
    "target_layer",
    "transform",
    "pred_token",
    "output_ids",
    "output_probs",
    "source_top1",
    "target_top1",
    "precision_at_1",
    "target_match",
]


def same_text(a: str, b: str) -> bool:
    """Two tokens (of different vocabularies) as the same text: stripped, or as is when blank."""
    return a.strip() == b.strip() if a.strip() or b.strip() else a == b


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--other", default="gemma3-270m", help="the second model (target of --model, and the reverse)")
    p.add_argument("--sources", type=int, help="evaluated source texts; default 200, quick 4")
    p.add_argument("--fit-texts", type=int, help="held-out texts for the maps; default 4000, quick 16")
    p.add_argument("--stride", type=int, default=5, help="layers 0, stride, 2*stride... of each model (the paper: 5)")
    p.add_argument("--layers", type=parse_layers, help="explicit layers of --model; overrides --stride")
    p.add_argument("--other-layers", type=parse_layers, help="explicit layers of --other; overrides --stride")
    p.add_argument("--ridge", type=float, help="ridge of the map fits; default 0 as in the paper (quick 100)")
    p.add_argument("--top-k", type=int, default=5, help="top-k stored per cell")
    return p


def fit_maps(run: Run, s, t, fit: list[str], src_layers, tgt_layers, ridge: float, prompts: list[str]):
    """One map per (l, l*): least squares on the last token of every fit prefix; R^2 on the prompts."""
    from superscopes import lens

    def collect(m, texts, layers):
        return lens.collect(m, texts, "resid_post", layers, "last", run.args.batch_size, run.remote)

    X, Y = collect(s, fit, src_layers), collect(t, fit, tgt_layers)
    EX, EY = collect(s, prompts, src_layers), collect(t, prompts, tgt_layers)
    maps, quality = {}, []
    for ls in src_layers:
        for lt in tgt_layers:
            maps[(ls, lt)] = lens.fit_affine(X[ls], Y[lt], ridge)
            quality.append(
                {
                    "layer": ls,
                    "target_layer": lt,
                    "r2_eval": lens.r_squared(lens.apply_affine(EX[ls], *maps[(ls, lt)]), EY[lt]),
                }
            )
    return maps, pd.DataFrame(quality)


def grid(run: Run, s, t, condition: str, prompts: list[str], maps: dict, own: dict) -> pd.DataFrame:
    """One run of the graph: every layer pair through its map, plus the no-write control."""
    from superscopes import Scope
    from superscopes.models import model_name

    pairs = list(maps)
    target = prompts if condition == "same_text" else "identity"
    scope = Scope(
        prompts,
        sites=["resid_post"],
        layer_pairs=pairs,
        transforms=["affine", "none"],
        alphas=[1],
        affine_weight={p: w for p, (w, _) in maps.items()},
        affine_bias={p: b for p, (_, b) in maps.items()},
        target=target,
        target_position="last" if condition == "same_text" else "placeholder",
        where=lambda c: c.transform == "affine" or (c.layer, c.target_layer) == pairs[0],
        output="topk",
        top_k=run.args.top_k,
        batch_size=run.args.batch_size,
    )
    frame = run.scope(s, scope, target_model=t)
    frame["pred_token"] = [t.tokenizer.decode([ids[0]]) for ids in frame["output_ids"]]
    frame["source_top1"] = frame["source"].map(own[id(s)])
    frame["target_top1"] = frame["source"].map(own[id(t)])
    frame["precision_at_1"] = [int(same_text(a, b)) for a, b in zip(frame["pred_token"], frame["source_top1"])]
    frame["target_match"] = [int(same_text(a, b)) for a, b in zip(frame["pred_token"], frame["target_top1"])]
    frame["output_probs"] = [[round(float(x), 6) for x in row] for row in frame["output_probs"]]
    return frame.assign(
        direction=f"{model_name(s)} -> {model_name(t)}",
        condition=condition,
        model=model_name(s),
        target_model=model_name(t),
    )[CELL_COLUMNS]


def statistics(cells: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """precision@1 per cell of the grid (95% bootstrap over texts), and each pair minus the control."""
    keys = ["direction", "condition", "layer", "target_layer", "transform"]
    summary = prompt_means(cells, "precision_at_1", "source", keys, seed)
    mapped = cells[cells["transform"] == "affine"]
    control = cells[cells["transform"] == "none"][["direction", "condition", "source", "precision_at_1"]]
    at_pairs = mapped[keys[:-1]].drop_duplicates().merge(control, on=["direction", "condition"])
    paired = pd.concat([mapped, at_pairs.assign(transform="none")], ignore_index=True)
    return summary, compare_conditions(
        paired, "transform", [("affine", "none")], keys[:-1], "precision_at_1", "source", seed
    )


def plot(summary: pd.DataFrame, path: Path, title: str) -> Path:
    from superscopes import plots

    panels = summary[["direction", "condition"]].drop_duplicates().values.tolist()
    fig, axes = plots.figure(len(panels), cols=2, size=(5.2, 4.2))
    for ax, (direction, condition) in zip(axes, panels):
        part = summary[(summary["direction"] == direction) & (summary["condition"] == condition)]
        control = part[part["transform"] == "none"]["precision_at_1"].iloc[0]
        table = (
            part[part["transform"] == "affine"]
            .pivot(index="layer", columns="target_layer", values="precision_at_1")
            .sort_index(ascending=False)
        )
        source, target = direction.split(" -> ")
        plots.heatmap(
            table,
            title=f"{direction}, {condition} (no-write control {control:.2f})",
            xlabel=f"target layer l* ({target})",
            ylabel=f"source layer l ({source})",
            ax=ax,
            label="precision@1",
            vmin=0,
            vmax=1,
        )
    return plots.save(fig, path, title)


def findings(comparisons: pd.DataFrame, quality: pd.DataFrame) -> list[str]:
    """Per grid: its best pair (chosen on these texts) and how many pairs beat the control."""
    out = []
    for (direction, condition), part in comparisons.groupby(["direction", "condition"], sort=False):
        # The best pair; a tie goes to the lowest (l, l*), whatever the table's order.
        best = part.sort_values(["mean_a", "layer", "target_layer"], ascending=[False, True, True]).iloc[0]
        above = part[(part["ci_low"] > 0) & (part["p_holm"] < 0.05)]
        below = part[(part["ci_high"] < 0) & (part["p_holm"] < 0.05)]
        out.append(
            f"{direction}, {condition}: best pair (l={best['layer']}, l*={best['target_layer']}; chosen on "
            f"these texts) precision@1 "
            f"{best['mean_a']:.2f} vs the no-write control {best['mean_b']:.2f} (difference "
            f"{best['difference']:+.2f} [{best['ci_low']:+.2f}, {best['ci_high']:+.2f}]); above the control "
            f"at {len(above)} of {len(part)} pairs, below at {len(below)} (Holm p < 0.05)."
        )
    if not quality.empty:
        out.append(
            "Map quality, R^2 on the evaluated texts' positions: "
            + "; ".join(
                f"{d}: median {g['r2_eval'].median():.2f}, max {g['r2_eval'].max():.2f}"
                for d, g in quality.groupby("direction")
            )
        )
    return out


def compute(run: Run, store, directions: list, layers: dict, prompts: list[str], fit: list[str], ridge: float) -> None:
    """Every pending (direction, condition) grid; the maps of a direction are fitted once."""
    from superscopes import lens
    from superscopes.models import model_name

    models = {id(m): m for pair in directions for m in pair}.values()
    own = {
        id(m): dict(
            zip(
                prompts,
                (
                    m.tokenizer.decode([int(i)])
                    for i in lens.next_tokens(m, prompts, "last", run.args.batch_size, run.remote)
                ),
            )
        )
        for m in models
    }
    for s, t in directions:
        direction = f"{model_name(s)} -> {model_name(t)}"
        todo = list(run.pending(store, CONDITIONS, lambda c, d=direction: [d, c]))
        if not todo:
            continue
        maps, quality = fit_maps(run, s, t, fit, layers[id(s)], layers[id(t)], ridge, prompts)
        path = run.out / "map_fit.csv"
        quality.assign(direction=direction).to_csv(path, mode="a", header=not path.exists(), index=False)
        for condition in todo:
            store.append(grid(run, s, t, condition, prompts, maps, own))
            log(f"{direction}, {condition}: done")


def experiment(run: Run) -> None:
    args, quick = run.args, run.args.quick
    n_fit = args.fit_texts or (16 if quick else 4000)
    ridge = args.ridge if args.ridge is not None else (100.0 if quick else 0.0)

    from superscopes.models import model_name
    from superscopes.sites import num_layers

    a, b = run.load_model(), run.load_model(args.other)
    layers = {}
    for m, given in ((a, args.layers), (b, args.other_layers)):
        n = num_layers(m)
        layers[id(m)] = resolve_layers(given, n, [n - 1] if quick else list(range(0, n, args.stride)))
    chosen, fit = evaluated_and_fit(
        [a.tokenizer, b.tokenizer],
        load_snippets(args.seed)["text"].tolist(),
        args.seed,
        args.sources or (4 if quick else 200),
        n_fit,
        include_last=True,
    )
    prompts = [prefix for _, prefix, _ in chosen]
    directions = [(a, b)] if quick else [(a, b), (b, a)]
    store = run.store(
        "cells.csv", ["direction", "condition"], layers=list(layers.values()), fit_texts=len(fit), ridge=ridge
    )
    compute(run, store, directions, layers, prompts, fit, ridge)
    per_grid = sum(len(layers[id(s)]) * len(layers[id(t)]) + 1 for s, t in directions)  # + the control
    cells = run.cells(
        store,
        len(prompts) * len(CONDITIONS) * per_grid,
        unique=["direction", "condition", "source", "layer", "target_layer", "transform"],
    )
    agree = cells.drop_duplicates("source")
    agree = float(sum(map(same_text, agree["source_top1"], agree["target_top1"])) / len(agree))
    report(run, [model_name(m) for m in (a, b)], layers.values(), cells, len(fit), ridge, agree)


def report(run: Run, names: list[str], layers, cells: pd.DataFrame, n_fit: int, ridge: float, agree: float) -> None:
    """summary.csv, comparisons.csv, the heatmaps and summary.md."""
    args, n = run.args, cells["source"].nunique()
    summary, comparisons = statistics(cells, args.seed)
    summary.to_csv(run.out / "summary.csv", index=False)
    comparisons.to_csv(run.out / "comparisons.csv", index=False)
    quality = pd.read_csv(run.out / "map_fit.csv") if (run.out / "map_fit.csv").exists() else pd.DataFrame()
    if not quality.empty:  # a resumed direction refits its maps (the same maps): keep the last fit
        quality = quality.drop_duplicates(["direction", "layer", "target_layer"], keep="last")
    figure = plot(
        summary,
        run.out / "cross_model.png",
        f"Cross-model Patchscopes: {n} texts, maps fitted on {n_fit} (ridge {ridge})",
    )
    main_part = comparisons[comparisons["condition"] == "same_text"]
    ours = "; ".join(
        f"{d}: best pair {g['mean_a'].max():.2f}, no-write control {g['mean_b'].iloc[0]:.2f}, "
        f"{int(((g['ci_low'] > 0) & (g['p_holm'] < 0.05)).sum())} of {len(g)} pairs above it (Holm)"
        for d, g in main_part.groupby("direction", sort=False)
    )
    ours += f" (same-text condition, {n} texts; the two models' own next tokens agree on {agree:.2f})"
    tables = {
        f"precision@1, {d}, {c}": g[g["transform"] == "affine"]
        .pivot(index="layer", columns="target_layer", values="precision_at_1")
        .reset_index()
        .rename(columns={"layer": "l \\ l*"})
        for (d, c), g in summary.groupby(["direction", "condition"], sort=False)
    }
    write_summary(
        run,
        f"Cross-model Patchscopes ({names[0]} <-> {names[1]})",
        ours,
        PAPER,
        {
            "models": ", ".join(f"{m} (layers {l})" for m, l in zip(names, layers)),
            "source texts": f"{n} snippets cut after a random token both tokenizers end at the same character "
            f"(seed {args.seed})",
            "maps": f"least squares with bias (ridge {ridge}) per (l, l*), resid_post -> resid_post, "
            f"last token of {n_fit} held-out prefixes drawn the same way",
            "conditions": "same_text (the paper's: the same text in the target model, last token, layer l*); "
            "identity_prompt (variant: over '?' of the identity prompt); control: nothing written",
            "precision@1": "stripped text of the patched target's top token == the source model's own next token",
        },
        findings(comparisons, quality),
        {**tables, "each pair minus the no-write control, paired over texts": comparisons},
        [figure.name],
    )


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
