"""Patchscopes token identity (Ghandeharioun et al., 2024, Sec. 4.1, Fig. 2): how well a hidden
state at layer l tells the model's own next token, read by a Patchscope, the logit lens and an
affine lens, at every layer.

The paper's protocol (PAIR-code/interpretability, patchscopes/code/next_token_prediction.ipynb,
scored by ``patchscopes_utils.evaluate_patch_next_token_prediction``):

- source positions: one random token per text, never a BOS and never the text's last token
  (``randint(start, n - 2)``); here the text is cut after that token (``_snippets.sample_prefixes``),
  so the source position is the prefix's last token (a causal model's state there is the same);
- ``patchscope`` ("prompt id"): h_l (``resid_post``, HF ``hidden_states[l + 1]``) written over
  the last token "?" of "cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?" at l* = l, the patched
  model's next token read;
- ``logit_lens`` ("identity"): h_l through the final norm and unembedding (the paper writes h_l
  into the last layer of the source prompt at the source position, the same computation);
- ``affine_lens`` ("affine mapping"): h_l mapped by least squares with a bias to the last layer's
  state, written into the last layer of the source prompt at the source position; one map per
  layer, fitted on one random position (last token allowed) of each held-out text;
- precision@1 = 1[argmax of the patched next-token distribution == argmax of the source model's
  own next-token distribution at the source position]; surprisal = -log p_source(that token).

As configurations of the graph: one ``superscopes.run`` gives the Patchscope and the logit lens
(``target="identity"``, ``target_layers=["same"]``, ``output="topk"``, ``logit_lens=True``);
a second gives the affine lens (``transforms=["affine"]``, ``layer_pairs`` (l, last),
``affine_weight={(l, last): W_l}``, ``target="source"``; maps from ``lens.fit_affine_lens``).
Statistics are per source position (one prompt each): per layer, each method's precision@1 with
a 95% bootstrap interval, and the paired differences patchscope - logit lens and patchscope -
affine lens (bootstrap interval, sign-flip p, Holm over the table). A layer is claimed above or
below a lens only where its Holm p < 0.05 and its interval at its Holm level (``metrics.holm_intervals``)
does not reach 0.

Deviations from the paper's code: the texts are the Patchscopes factual snippets
(``prompt_source``, about 8 words) instead of the Pile (not available offline); 500 evaluated
positions (paper 2000) and maps fitted on 4000 texts (paper 10000); the maps' target is the last
layer's output before the final norm (the paper's ``hidden_states[-1]`` is after it, and its
mapped vector then passes the final norm a second time).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from superscopes.metrics import compare_conditions, holm_intervals, prompt_means

from ._common import Run, parser, recipe_main, write_summary
from ._snippets import evaluated_and_fit, load_snippets, log

if TYPE_CHECKING:
    import torch

NAME = "token_identity"
DESCRIPTION = "Patchscopes token identity: precision@1 per layer of a Patchscope, the logit lens and an affine lens"
PAPER = (
    "Patchscopes Fig. 2 (the paper's models: LLaMA2-13B, Vicuna-13B, GPT-J-6B, Pythia-12B; 2000 Pile positions, "
    "maps fitted on 10000): the token-identity Patchscope is below the logit and affine lenses in the first layers "
    "and above both from mid-depth on; the per-layer values are published as curves only, not as numbers"
)
METHODS = ("patchscope", "logit_lens", "affine_lens")
CELL_COLUMNS = [
    "model",
    "method",
    "source",
    "snippet",
    "relation",
    "position",
    "token",
    "layer",
    "pred_id",
    "pred_token",
    "output_ids",
    "output_probs",
    "source_top1_id",
    "source_top1",
    "precision_at_1",
    "surprisal",
]


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--positions", type=int, help="evaluated source positions (one per text); default 500, quick 8")
    p.add_argument("--fit-texts", type=int, help="held-out texts for the affine maps; default 4000, quick 20")
    p.add_argument("--ridge", type=float, help="ridge of the map fits; default 0 as in the paper (quick 100)")
    p.add_argument("--top-k", type=int, default=5, help="top-k stored per cell")
    return p


def sources(run: Run, tokenizer, n: int, n_fit: int) -> tuple[pd.DataFrame, list[str]]:
    """The evaluated prefixes (one random position per text, the last token excluded) and the
    held-out prefixes the maps are fitted on (the texts after them; the last token allowed)."""
    snippets = load_snippets(run.args.seed)
    chosen, fit = evaluated_and_fit([tokenizer], snippets["text"].tolist(), run.args.seed, n, n_fit)
    rows = snippets.iloc[[i for i, _, _ in chosen]]
    frame = pd.DataFrame(
        {
            "source": [prefix for _, prefix, _ in chosen],
            "snippet": rows["text"].tolist(),
            "relation": rows["relation"].tolist(),
            "position": [pos[0] for _, _, pos in chosen],
        }
    )
    return frame, fit


def score(name: str, method: str, frame: pd.DataFrame, ids: str, probs: str, src: pd.DataFrame, own, tokenizer):
    """Rows of one method from a run's frame (``ids``/``probs``: its top-k columns), scored
    against the source model's own next-token log-probabilities ``own`` (one row per source)."""
    index = {s: i for i, s in enumerate(src["source"])}
    info = src.set_index("source")
    rows = []
    for row in frame.itertuples():
        i, top = index[row.source], [int(x) for x in getattr(row, ids)]
        own_top = int(own[i].argmax())
        rows.append(
            {
                "model": name,
                "method": method,
                "source": row.source,
                "snippet": info.loc[row.source, "snippet"],
                "relation": info.loc[row.source, "relation"],
                "position": row.position,
                "token": row.token,
                "layer": row.layer,
                "pred_id": top[0],
                "pred_token": tokenizer.decode([top[0]]),
                "output_ids": top,
                "output_probs": [round(float(x), 6) for x in getattr(row, probs)],
                "source_top1_id": own_top,
                "source_top1": tokenizer.decode([own_top]),
                "precision_at_1": int(top[0] == own_top),
                "surprisal": float(-own[i, top[0]]),
            }
        )
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def _grid(run: Run, prompts: list[str], n_layers: int) -> dict:
    args = run.args
    return dict(
        sites=["resid_post"],
        alphas=[1],
        output="topk",
        top_k=args.top_k,
        batch_size=args.batch_size,
        max_cells=len(prompts) * n_layers,
    )


def patchscope_and_logit_lens(run: Run, model, src: pd.DataFrame, own: torch.Tensor) -> pd.DataFrame:
    """The identity Patchscope and the logit lens on every source at every layer: one run of the graph."""
    from superscopes import Scope
    from superscopes.models import model_name
    from superscopes.sites import num_layers

    prompts, n_layers = src["source"].tolist(), num_layers(model)
    scope = Scope(
        prompts,
        layers=list(range(n_layers)),
        transforms=["scale"],
        target="identity",
        target_layers=["same"],
        logit_lens=True,
        **_grid(run, prompts, n_layers),
    )
    frame = run.scope(model, scope)
    name, tok = model_name(model), model.tokenizer
    return pd.concat(
        [
            score(name, "patchscope", frame, "output_ids", "output_probs", src, own, tok),
            score(name, "logit_lens", frame, "lens_ids", "lens_probs", src, own, tok),
        ],
        ignore_index=True,
    )


def affine_lens(run: Run, model, src: pd.DataFrame, own: torch.Tensor, fit: list[str], ridge: float) -> pd.DataFrame:
    """The affine lens on every source at every layer: maps fitted on ``fit``, applied by the graph."""
    from superscopes import Scope, lens
    from superscopes.models import model_name
    from superscopes.sites import num_layers

    prompts, n_layers = src["source"].tolist(), num_layers(model)
    last, layers = n_layers - 1, list(range(n_layers))
    log(f"affine lens: fitting maps on {len(fit)} texts (ridge {ridge})")
    maps = lens.fit_affine_lens(model, fit, layers, "last", ridge, batch_size=run.args.batch_size, remote=run.remote)
    scope = Scope(
        prompts,
        layer_pairs=[(l, last) for l in layers],
        transforms=["affine"],
        affine_weight={(l, last): maps[l][0] for l in layers},
        affine_bias={(l, last): maps[l][1] for l in layers},
        target="source",
        **_grid(run, prompts, n_layers),
    )
    affine = run.scope(model, scope)
    return score(model_name(model), "affine_lens", affine, "output_ids", "output_probs", src, own, model.tokenizer)


def statistics(cells: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per method and layer: precision@1 (95% bootstrap over positions) and mean surprisal; per
    layer: the Patchscope's paired differences from each lens."""
    summary = prompt_means(cells, "precision_at_1", "source", ("method", "layer"), seed)
    summary = summary.merge(cells.groupby(["method", "layer"])["surprisal"].mean().reset_index())
    pairs = [("patchscope", "logit_lens"), ("patchscope", "affine_lens")]
    comparisons = compare_conditions(cells, "method", pairs, ("layer",), "precision_at_1", "source", seed)
    wide = cells.pivot_table(index=["layer", "source"], columns="method", values="precision_at_1", aggfunc="mean")
    differences = [
        (wide.loc[layer, a] - wide.loc[layer, b]).to_numpy()
        for layer, a, b in comparisons[["layer", "a", "b"]].itertuples(index=False)
    ]
    intervals = holm_intervals(differences, list(comparisons["p"]), seed=seed)
    comparisons["holm_ci_low"], comparisons["holm_ci_high"] = zip(*intervals)
    return summary, comparisons


def plot(summary: pd.DataFrame, path: Path, title: str) -> Path:
    from superscopes import plots

    fig, (left, right) = plots.figure(2)
    plots.lines(
        summary,
        "layer",
        "precision_at_1",
        hue="method",
        ax=left,
        ylim=(-0.02, 1.02),
        ylabel="precision@1 (vs the model's own next token)",
        title="precision@1 (95% intervals)",
    )
    plots.lines(
        summary,
        "layer",
        "surprisal",
        hue="method",
        ax=right,
        ylabel="surprisal -log p_source (nats)",
        title="surprisal of the decoded token",
        band=None,
    )  # the intervals are precision@1's
    return plots.save(fig, path, title)


def findings(summary: pd.DataFrame, comparisons: pd.DataFrame, last: int) -> list[str]:
    """What the per-layer differences show; the last layer is left out (equal by construction)."""
    out = []
    for lens_name in ("logit_lens", "affine_lens"):
        part = comparisons[(comparisons["b"] == lens_name) & (comparisons["layer"] < last)]
        above = part[(part["holm_ci_low"] > 0) & (part["p_holm"] < 0.05)]["layer"].tolist()
        below = part[(part["holm_ci_high"] < 0) & (part["p_holm"] < 0.05)]["layer"].tolist()
        out.append(
            f"Patchscope vs {lens_name} (paired over positions, Holm p < 0.05 and the Holm-level interval "
            f"clear of 0, layers 0-{last - 1}): above at "
            f"layers {above or 'none'}, below at layers {below or 'none'}, no detectable difference at the "
            f"other {len(part) - len(above) - len(below)}."
        )
    at_last = summary[summary["layer"] == last].set_index("method")["precision_at_1"]
    values = ", ".join(f"{m} {v:.2f}" for m, v in at_last.items())
    out.append(
        f"At the last layer ({last}) all three read the model's own output by construction (the logit lens "
        "is the output, the Patchscope writes h_last at l* = last, an unpenalised least-squares map from the "
        f"last layer to itself is the identity): {values}; not a finding."
    )
    return out


def experiment(run: Run) -> None:
    args = run.args
    n = args.positions or (8 if args.quick else 500)
    n_fit = args.fit_texts or (20 if args.quick else 4000)
    ridge = args.ridge if args.ridge is not None else (100.0 if args.quick else 0.0)

    from superscopes.models import model_name
    from superscopes.prompts import IDENTITY
    from superscopes.sites import num_layers

    model = run.load_model()
    name, last = model_name(model), num_layers(model) - 1
    src, fit = sources(run, model.tokenizer, n, n_fit)
    store = run.store("cells.csv", ["method", "source"], fit_texts=len(fit), ridge=ridge)
    done = store.done()
    pending = {m for m in METHODS for s in src["source"] if store.key([m, s]) not in done}
    if pending:
        # Two phases, each kept as it ends: a run killed in the affine lens's fit (the long part
        # at 1.5B) resumes there, with the Patchscope and logit lens rows already in the store.
        from superscopes import lens

        log(f"{name}: {len(src)} positions x {last + 1} layers x {len(METHODS)} methods")
        own = lens.final_logprobs(model, src["source"].tolist(), "last", args.batch_size, run.remote)
        phases = [
            ({"patchscope", "logit_lens"}, lambda: patchscope_and_logit_lens(run, model, src, own)),
            ({"affine_lens"}, lambda: affine_lens(run, model, src, own, fit, ridge)),
        ]
        for methods, compute in phases:
            if methods & pending:
                cells = compute()
                keep = [store.key([m, s]) not in done for m, s in zip(cells["method"], cells["source"])]
                store.append(cells[keep])
    cells = run.cells(store, len(src) * (last + 1) * len(METHODS), unique=["method", "source", "layer"])
    summary, comparisons = statistics(cells, args.seed)
    summary.insert(0, "model", name)
    summary.to_csv(run.out / "summary.csv", index=False)
    comparisons.to_csv(run.out / "comparisons.csv", index=False)
    figure = plot(
        summary,
        run.out / "token_identity.png",
        f"Token identity on {name}: {len(src)} random positions, every layer; 95% bootstrap intervals",
    )
    wide = summary.pivot(index="layer", columns="method", values="precision_at_1").reset_index()
    mid = last * 2 // 3
    at = wide.set_index("layer")
    ours = (
        f"precision@1 at layer 0 / {mid} / {last - 1}: Patchscope "
        + " / ".join(f"{at.loc[l, 'patchscope']:.2f}" for l in (0, mid, last - 1))
        + ", logit lens "
        + " / ".join(f"{at.loc[l, 'logit_lens']:.2f}" for l in (0, mid, last - 1))
        + ", affine lens "
        + " / ".join(f"{at.loc[l, 'affine_lens']:.2f}" for l in (0, mid, last - 1))
        + f" ({name}, {len(src)} positions; intervals in the tables)"
    )
    columns = ["layer", "b", "difference", "ci_low", "ci_high", "holm_ci_low", "holm_ci_high", "p", "p_holm"]
    shown = comparisons[columns].rename(columns={"b": "patchscope minus"})
    write_summary(
        run,
        f"Token identity: Patchscope vs logit lens vs affine lens ({name})",
        ours,
        PAPER,
        {
            "model": name,
            "source positions": f"{len(src)}: one random token per snippet (no BOS, not the last token), "
            f"snippet cut after it (seed {args.seed})",
            "layers": f"all ({last + 1})",
            "Patchscope": f"target {IDENTITY!r}, written over '?', resid_post, l* = l, alpha 1, next-token top-{args.top_k}",
            "affine lens": f"least squares h_l -> h_{last} (resid_post) with bias, ridge {ridge}, one random position of "
            f"each of {len(fit)} held-out snippets; applied by the graph's affine transform at layer {last} of the source",
            "precision@1": "argmax patched == argmax of the source model's own next-token distribution at the position",
            "surprisal": "-log p_source(argmax patched), nats",
        },
        findings(summary, comparisons, last),
        {
            "precision@1 per layer": wide,
            "per method and layer (95% bootstrap over positions)": summary.drop(columns=["model"]),
            "Patchscope minus each lens, paired over positions": shown,
        },
        [figure.name],
    )


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
