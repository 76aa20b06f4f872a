"""Cross-model Patchscopes (Ghandeharioun et al., 2024): token identity across two models
through least-squares affine maps, one map per (source layer, target layer) pair.

Default pair: SmolLM2-135M (Llama, 30 layers, d=576) and Gemma-3-270m (Gemma3, 18 layers,
d=640), both directions. The tokenizers differ, so positions are per model and aligned by
text: every source prompt is a snippet cut after a word, both models read exactly that text,
and the source position is its last token in each model. Maps are fitted on all aligned word
ends of held-out snippets (``superscopes.lens.collect_aligned``).

Each cell patches the source model's ``resid_post`` at layer l through the map into the
"?" of the identity prompt in the target model at layer l* and reads the target's next token
(``superscopes.run(source, Scope(transforms=["affine"], layer_pairs=..., affine_weight={pair: W}),
target_model=target)``: one run per direction, a map per layer pair).

- precision@1 (headline) = 1[argmax patched == argmax of the TARGET model's own next-token
  distribution on the same source text]: both tokens come from the target's vocabulary.
- source_match = 1[stripped decoded patched token == stripped decoded argmax of the SOURCE
  model's own next-token distribution]: a vocabulary-free check of the same question.
Beside it, the same-model heatmaps: plain patching (alpha 1, no map) from layer l to l*.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from superscopes.parsing import parse_layers

from ._common import Run, parser, recipe_main, resolve_layers, write_summary
from .token_identity import binomial_ci, distinct_prefixes, load_snippets, log, record_time

NAME = "cross_model"
DESCRIPTION = "Cross-model token identity: affine maps between SmolLM2 and Gemma-3, precision@1 per layer pair"
PAPER = (
    "Patchscopes cross-model patching (smaller -> larger model of one family, affine map per layer pair fitted "
    "by least squares): precision@1 heatmap over (source layer, target layer), high where the two layers sit at "
    "similar relative depth; no number is published for this model pair"
)
CELL_COLUMNS = [
    "direction", "model", "target_model", "source", "position", "token", "layer", "target_layer", "transform",
    "pred_id", "pred_token", "output_ids", "output_probs", "target_top1_id", "target_top1", "source_top1",
    "precision_at_1", "source_match", "surprisal_target",
]  # fmt: skip


def strided(n_layers: int, count: int) -> list[int]:
    """``count`` layers spread evenly from 0 to the last."""
    if count >= n_layers:
        return list(range(n_layers))
    if count == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--other", default="gemma3-270m", help="the second model (target of --model, and the reverse)")
    p.add_argument("--sources", type=int, help="evaluated source texts; default 32, quick 4")
    p.add_argument("--fit-snippets", type=int, help="held-out snippets for the maps; default 300, quick 16")
    p.add_argument("--grid", type=int, help="layers per model on the strided grid; default 4, quick 1 (the last layer)")
    p.add_argument("--layers", type=parse_layers, help="explicit layers of --model ('0,7,14', '0-3', 'all'); overrides --grid")
    p.add_argument("--other-layers", type=parse_layers, help="explicit layers of --other; overrides --grid")
    p.add_argument("--ridge", type=float, help="ridge of the map fits; default 10 (quick 100)")
    p.add_argument("--no-reverse", action="store_true", help="only --model -> --other and --model -> --model (always so with --quick)")
    p.add_argument("--min-words", type=int, default=2, help="shortest source text in words")
    p.add_argument("--top-k", type=int, default=5, help="top-k stored per cell")
    return p


def _rows(direction, source, target, frame, own_target, own_source_tokens, prompts) -> pd.DataFrame:
    """Score Scope rows: precision against the target's own prediction on the same text."""
    from superscopes.models import model_name

    index = {p: i for i, p in enumerate(prompts)}
    rows = []
    for row in frame.itertuples():
        i = index[row.source]
        ids = list(row.output_ids)
        top1 = int(ids[0])
        own = own_target[i]
        own_id = int(own.argmax())
        token = target.tokenizer.decode([top1])
        rows.append({
            "direction": direction, "model": model_name(source), "target_model": model_name(target),
            "source": row.source, "position": row.position, "token": row.token, "layer": row.layer,
            "target_layer": row.target_layer, "transform": row.transform, "pred_id": top1, "pred_token": token,
            "output_ids": ids, "output_probs": [round(float(x), 6) for x in row.output_probs],
            "target_top1_id": own_id, "target_top1": target.tokenizer.decode([own_id]),
            "source_top1": own_source_tokens[i], "precision_at_1": int(top1 == own_id),
            "source_match": int(token.strip() == own_source_tokens[i].strip()),
            "surprisal_target": float(-own[top1]),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def plot(summary: pd.DataFrame, directions: list[str], path: Path, title: str) -> Path:
    from superscopes import plots

    cols = 2 if len(directions) > 1 else 1
    fig, axes = plots.figure(len(directions), cols=cols, size=(5.2, 4.2))
    for ax, direction in zip(axes, directions):
        part = summary[summary["direction"] == direction]
        table = part.pivot(index="layer", columns="target_layer", values="precision_at_1").sort_index(ascending=False)
        source, target = direction.split(" -> ")
        kind = "plain patch" if source == target else "affine map"
        plots.heatmap(table, title=f"{direction} ({kind})", xlabel=f"target layer l* ({target})",
                      ylabel=f"source layer l ({source})", ax=ax, label="precision@1", vmin=0, vmax=1)  # fmt: skip
    return plots.save(fig, path, title)


def experiment(run: Run) -> None:
    args = run.args
    quick = args.quick
    n_sources = args.sources or (4 if quick else 32)
    n_fit = args.fit_snippets or (16 if quick else 300)
    grid = args.grid or (1 if quick else 4)
    ridge = args.ridge if args.ridge is not None else (100.0 if quick else 10.0)
    remote = run.remote

    from superscopes import Scope, lens
    from superscopes.models import model_name
    from superscopes.sites import num_layers

    t0 = time.time()
    a, b = run.load_model(), run.load_model(args.other)
    name = {id(a): model_name(a), id(b): model_name(b)}
    layers = {
        id(a): resolve_layers(args.layers, num_layers(a), strided(num_layers(a), grid)),
        id(b): resolve_layers(args.other_layers, num_layers(b), strided(num_layers(b), grid)),
    }
    reverse = not args.no_reverse and not quick
    pairs = [(a, b), (a, a), (b, b), (b, a)] if reverse else [(a, b), (a, a)]
    directions = [f"{name[id(s)]} -> {name[id(t)]}" for s, t in pairs]
    log(f"{name[id(a)]} layers {layers[id(a)]}; {name[id(b)]} layers {layers[id(b)]}; directions {directions}")

    snippets = load_snippets(args.seed)
    _, prompts, consumed = distinct_prefixes(snippets["text"].tolist(), n_sources, args.seed, args.min_words)
    held_out = snippets.iloc[consumed : consumed + n_fit]["text"].tolist()

    store = run.store("cells.csv", ["direction", "layer", "target_layer"], layers=list(layers.values()))
    rows_before = len(store.load())
    todo = {
        d: list(run.pending(store, [(ls, lt) for ls in layers[id(s)] for lt in layers[id(t)]], lambda p: [d, *p]))
        for d, (s, t) in zip(directions, pairs)
    }

    # Maps: one least-squares fit per (source layer, target layer), both directions, on aligned word ends.
    maps: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    fit_quality = []
    if any(todo[d] for d, (s, t) in zip(directions, pairs) if s is not t):
        X, Y = lens.collect_aligned(a, b, held_out, layers[id(a)], layers[id(b)], batch_size=args.batch_size,
                                    remote=remote)  # fmt: skip
        n_rows = len(next(iter(X.values())))
        log(f"maps: {n_rows} aligned positions from {len(held_out)} held-out snippets, ridge {ridge}")
        src_last, tgt_last = lens.aligned_positions(a.tokenizer, b.tokenizer, prompts, last_only=True)
        keep = [i for i, p in enumerate(src_last) if p]
        EX = lens.collect(a, [prompts[i] for i in keep], "resid_post", layers[id(a)], [src_last[i] for i in keep],
                          args.batch_size, remote)  # fmt: skip
        EY = lens.collect(b, [prompts[i] for i in keep], "resid_post", layers[id(b)], [tgt_last[i] for i in keep],
                          args.batch_size, remote)  # fmt: skip
        for d, (s, t) in zip(directions, pairs):
            if s is t:
                continue
            source_acts, target_acts = (X, Y) if s is a else (Y, X)
            eval_source, eval_target = (EX, EY) if s is a else (EY, EX)
            for ls in layers[id(s)]:
                for lt in layers[id(t)]:
                    W, bias = lens.fit_affine(source_acts[ls], target_acts[lt], ridge)
                    maps[(d, ls, lt)] = (W, bias)
                    fit_quality.append({
                        "direction": d, "layer": ls, "target_layer": lt, "fit_rows": n_rows,
                        "r2_fit": lens.r_squared(lens.apply_affine(source_acts[ls], W, bias), target_acts[lt]),
                        "r2_eval": lens.r_squared(lens.apply_affine(eval_source[ls], W, bias), eval_target[lt]),
                    })  # fmt: skip
        pd.DataFrame(fit_quality).to_csv(run.out / "map_fit.csv", index=False)

    # Each model's own next-token prediction on every source text.
    own = {}
    for model in (a, b):
        logprobs = lens.final_logprobs(model, prompts, "last", args.batch_size, remote)
        own[id(model)] = (logprobs, [model.tokenizer.decode([int(i)]) for i in logprobs.argmax(-1)])

    common = dict(sites=["resid_post"], alphas=[1], target="identity", output="topk", top_k=args.top_k,
                  batch_size=args.batch_size)  # fmt: skip
    for d, (s, t) in zip(directions, pairs):
        if not todo[d]:
            continue
        # One run per direction over every pending (layer, target layer) pair, each pair with its own map.
        if s is t:
            frame = run.scope(s, Scope(prompts, layer_pairs=todo[d], transforms=["scale"], **common))
        else:
            weights = {pair: maps[(d, *pair)][0] for pair in todo[d]}
            biases = {pair: maps[(d, *pair)][1] for pair in todo[d]}
            scope = Scope(prompts, layer_pairs=todo[d], transforms=["affine"], affine_weight=weights,
                          affine_bias=biases, **common)  # fmt: skip
            frame = run.scope(s, scope, target_model=t)
        rows = _rows(d, s, t, frame, own[id(t)][0], own[id(s)][1], prompts)
        for ls, lt in todo[d]:
            store.append(rows[(rows["layer"] == ls) & (rows["target_layer"] == lt)])
        log(f"{d}: {len(todo[d])} layer pairs done ({time.time() - t0:.0f} s)")

    expected = len(prompts) * sum(len(layers[id(s)]) * len(layers[id(t)]) for s, t in pairs)
    cells = run.cells(store, expected, unique=["direction", "source", "layer", "target_layer"])
    seconds = record_time(run.out, t0, rows_before, len(cells))
    summary = (
        cells.groupby(["direction", "layer", "target_layer"])
        .agg(precision_at_1=("precision_at_1", "mean"), source_match=("source_match", "mean"),
             surprisal_target=("surprisal_target", "mean"), n=("precision_at_1", "size"))
        .reset_index()
    )  # fmt: skip
    summary["ci95"] = [binomial_ci(p, n) for p, n in zip(summary["precision_at_1"], summary["n"])]
    if (run.out / "map_fit.csv").exists():
        fit = pd.read_csv(run.out / "map_fit.csv")
        summary = summary.merge(fit[["direction", "layer", "target_layer", "r2_eval"]], how="left",
                                on=["direction", "layer", "target_layer"])  # fmt: skip
    summary.to_csv(run.out / "summary.csv", index=False)
    figure = plot(summary, directions, run.out / "cross_model.png",
                  f"Token identity across models: {len(prompts)} source texts, identity prompt in the target, "
                  f"maps fitted on {len(held_out)} held-out snippets (ridge {ridge})")  # fmt: skip

    best = summary.loc[summary.groupby("direction")["precision_at_1"].idxmax()].set_index("direction")
    agree = [float((own[id(a)][1][i].strip() == own[id(b)][1][i].strip())) for i in range(len(prompts))]
    ours = "; ".join(
        f"{d}: best precision@1 {best.loc[d, 'precision_at_1']:.2f} at (l={best.loc[d, 'layer']}, "
        f"l*={best.loc[d, 'target_layer']}), mean {summary[summary['direction'] == d]['precision_at_1'].mean():.2f}"
        for d in directions
    ) + f" ({len(prompts)} source texts)"
    findings = [
        f"The two models predict the same next word (stripped token text) on {sum(agree) / len(agree):.2f} of the "
        "source texts: an upper bound on how often a perfect cross-model readout can match the source model's "
        "own prediction as text (column source_match).",
    ]
    for d, (s, t) in zip(directions, pairs):
        part = summary[summary["direction"] == d]
        last = part[(part["layer"] == max(layers[id(s)])) & (part["target_layer"] == max(layers[id(t)]))]
        if len(last):
            findings.append(f"{d}: last layer to last layer precision@1 {float(last['precision_at_1'].iloc[0]):.2f}, "
                            f"source_match {float(last['source_match'].iloc[0]):.2f}.")  # fmt: skip
    if (run.out / "map_fit.csv").exists():
        fq = pd.read_csv(run.out / "map_fit.csv")
        findings.append("Map quality (R^2 on the evaluated source texts' last tokens): "
                        + "; ".join(f"{d}: median {g['r2_eval'].median():.2f}, max {g['r2_eval'].max():.2f}"
                                    for d, g in fq.groupby("direction")))  # fmt: skip
    cross = summary[[d.split(" -> ")[0] != d.split(" -> ")[1] for d in summary["direction"]]]
    if len(cross) and cross["precision_at_1"].max() < 0.5:
        findings.append("No cross-model pair reaches precision@1 0.5: with these small models and maps the "
                        "readout is weak; the paper's models are larger and of one family.")  # fmt: skip
    tables = {
        d: summary[summary["direction"] == d].pivot(index="layer", columns="target_layer", values="precision_at_1")
        .reset_index().rename(columns={"layer": "l \\ l*"})
        for d in directions
    }  # fmt: skip
    write_summary(
        run, f"Cross-model token identity ({name[id(a)]} <-> {name[id(b)]})", ours, PAPER,
        {"models": f"{name[id(a)]} (layers {layers[id(a)]}), {name[id(b)]} (layers {layers[id(b)]})",
         "source texts": f"{len(prompts)} snippets of the Patchscopes factual data, each cut after a random word "
         f"(>= {args.min_words} words, seed {args.seed}); source position = last token in each model",
         "target": "identity prompt in the target model, '?' placeholder, resid_post at l*, alpha 1",
         "maps": f"least squares (ridge {ridge}) per (l, l*) pair, resid_post -> resid_post, on every word end both "
         f"tokenizers end a token at, in {len(held_out)} held-out snippets",
         "same-model heatmaps": "plain patch (no map, alpha 1) from l to l* in one model",
         "precision@1": "argmax of the patched target == argmax of the target model's own next-token distribution "
         "on the same text", "wall time": f"{seconds:.0f} s (invocations that computed cells; see timings.csv), 2-core CPU"},
        findings, {f"precision@1, {d}": table for d, table in tables.items()}, [figure.name],
    )  # fmt: skip


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
