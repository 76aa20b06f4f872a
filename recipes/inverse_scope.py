"""InverseScope (2025): read an activation z by the inputs whose activations are close to it, and
test a hypothesis f by its feature consistency rate FCR = E_{x ~ P(x|z)}[1{f(x) = f(x_original)}].

Samplers of P(x | z) at the same layer and site: ``generator`` (the paper's conditional generator,
``superscopes.inverse``, trained on the corpus inputs at ``--generator-layers``); ``nearest`` (the
training-free stand-in: the k corpus inputs nearest z by cosine); ``random`` (k uniform corpus
inputs); ``ceiling`` (the most any k corpus inputs could reach). Corpus: every text position of
Patchscopes factual snippets; queries: held-out snippets at their subject's last token; the
hypotheses and their features: ``recipes/_hypotheses.py``.

Statistics per query: FCR with 95% bootstrap intervals over queries, and paired comparisons
generator vs nearest vs random per (hypothesis, layer) (bootstrap interval of the difference,
sign-flip p, Holm over the table). A hypothesis already at its level at layer 0 (and above random
there) is labelled lexical (the token embedding carries it) and not headlined: its rise is not
significant, or layer 0 already has 90% of its best layer's lift over random
(``inverse.lexical_labels``); one never above random is not headlined either.
``distances.csv``: how far each sampler's inputs land from z.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from superscopes import inverse
from superscopes.metrics import compare_conditions, prompt_means
from superscopes.parsing import parse_layers

from ._common import Run, parser, recipe_main, resolve_layers, write_summary
from ._hypotheses import GENERATOR_HYPOTHESES, HYPOTHESES, Inputs, countries, generated_features, subject_queries
from ._snippets import load_snippets, log

NAME = "inverse_scope"
DESCRIPTION = "InverseScope: feature consistency of generated, nearest-activation and random inputs per layer"
PAPER = (
    "InverseScope (2025) samples inputs from a trained conditional generator and reports that feature "
    "consistency rates of true hypotheses exceed those of random inputs, with no number we can compare with, "
    "and the training-free corpus version here has no published counterpart"
)
CELL_COLUMNS = [
    "model",
    "query",
    "subject",
    "relation",
    "position",
    "token",
    "layer",
    "sampler",
    "k",
    "hypothesis",
    "f_query",
    "consistency",
    "neighbours",
]
DISTANCE_COLUMNS = ["model", "query", "layer", "sampler", "k", "distance", "cosine"]
PAIRS = [("generator", "nearest"), ("generator", "random"), ("nearest", "random")]


def _layers_or_none(text: str) -> str:
    """``none`` or a --layers value: checked (bounded) as the line is read, kept as written."""
    if text != "none":
        parse_layers(text)
    return text


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--corpus", type=int, help="corpus snippets; default 1200, quick 60")
    p.add_argument("--queries", type=int, help="query snippets; default 200, quick 16")
    p.add_argument("--k", type=int, default=10, help="nearest inputs (and random inputs) per query")
    p.add_argument(
        "--layers",
        type=parse_layers,
        help="layers: 'all', '0,4,8', '0-5'; default every 3rd + last (quick: 0, middle, last)",
    )
    p.add_argument("--site", default="resid_post", help="activation site (same for queries and corpus)")
    p.add_argument(
        "--generator-layers",
        type=_layers_or_none,
        help="layers with a trained generator: 'none', or as --layers; default the middle one",
    )
    p.add_argument("--generator-steps", type=int, help="generator training steps; default 3000, quick 150")
    p.add_argument(
        "--generator-texts",
        type=int,
        help="snippets the generator trains on: the corpus's, then others that are not queries; default "
        "all of them (about 11,600), quick the corpus's",
    )
    return p


def cell(
    name: str,
    query: tuple,
    token: str,
    layer: int,
    sampler: str,
    k: int,
    hypothesis: str,
    consistency: float,
    shown: list[str],
) -> dict:
    text, subject, relation, position = query
    return {
        "model": name,
        "query": text,
        "subject": subject,
        "relation": relation,
        "position": position,
        "token": token,
        "layer": layer,
        "sampler": sampler,
        "k": k,
        "hypothesis": hypothesis,
        "f_query": 1,
        "consistency": consistency,
        "neighbours": json.dumps(shown),
    }


def layer_cells(
    name: str,
    layer: int,
    queries: list[tuple],
    corpus: Inputs,
    query: Inputs,
    nearest: np.ndarray,
    random_rows: np.ndarray,
    ceilings: list[dict],
    k: int,
) -> pd.DataFrame:
    """Nearest, random and ceiling FCR of every query and hypothesis at one layer."""
    rows = []
    for qi, q in enumerate(queries):
        for sampler, chosen in (("nearest", nearest[qi]), ("random", random_rows[qi])):
            for hypothesis, (f_query, f_inputs) in corpus.features(query, qi, q[1], q[2], chosen).items():
                if f_query:  # each hypothesis is asked of the queries for which it holds
                    rows.append(
                        cell(
                            name,
                            q,
                            query.token[qi],
                            layer,
                            sampler,
                            k,
                            hypothesis,
                            float(np.mean(f_inputs == f_query)),
                            [corpus.prefix[r] for r in chosen[:3]],
                        )
                    )
        rows += [cell(name, q, query.token[qi], layer, "ceiling", k, h, c, []) for h, c in ceilings[qi].items()]
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def generator_cells(
    run: Run,
    model,
    layer: int,
    generator_texts: list[str],
    acts: torch.Tensor,
    queries: list[tuple],
    query: tuple,
    random_rows: np.ndarray,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train (or resume) a generator at ``layer`` on ``generator_texts``, sample k inputs per
    query: its FCR cells, and every sampler's distances to the query's activation (``acts``: the
    corpus's at ``layer``, which the nearest and random samplers draw from)."""
    from superscopes import lens
    from superscopes.models import model_name

    table, z = query
    args, tokenizer, name, names = run.args, model.tokenizer, model_name(model), countries()
    sizes = dict(d_model=64, n_layers=2, n_heads=4, max_vocab=2048, batch_size=32) if args.quick else {}
    config = inverse.GeneratorConfig(
        model=name,
        site=args.site,
        layer=layer,
        seed=args.seed,
        steps=args.generator_steps or (150 if args.quick else 3000),
        **sizes,
    )
    pairs = inverse.collect_pairs(model, generator_texts, args.site, layer, config.max_tokens, args.batch_size)
    generator = inverse.train(pairs, config, run.out / "generators" / f"L{layer}", progress=not args.quick)
    (run.out / f"generator_L{layer}_history.json").write_text(json.dumps(generator.history, indent=1))  # committed
    samples = generator.sample_texts(tokenizer, z, args.k, args.seed)
    flat = [x for row in samples for x in row]
    generated = inverse.last_token_activations(model, flat, args.site, layer, args.batch_size).view(
        len(queries), args.k, -1
    )
    predicted = lens.next_tokens(model, flat, "last", args.batch_size, run.remote).numpy().reshape(len(queries), args.k)
    std, nearest = acts.std(0).clamp_min(1e-4), inverse.nearest(acts, z, args.k)  # std: the distance's unit
    cells, distances = [], []
    for qi, q in enumerate(queries):
        found = [generated_features(tokenizer, x, q[1], names, p) for x, p in zip(samples[qi], predicted[qi])]
        original = {
            "country": bool(table.country[qi]),
            "same_subject": True,
            "same_token": table.token[qi],
            "same_prediction": table.prediction[qi],
        }
        cells += [
            cell(
                name,
                q,
                table.token[qi],
                layer,
                "generator",
                args.k,
                h,
                inverse.fcr(original[h], [f[h] for f in found]),
                samples[qi][:3],
            )
            for h in GENERATOR_HYPOTHESES
            if original[h] is not False
        ]
        for sampler, near in (
            ("generator", generated[qi]),
            ("nearest", acts[nearest[qi]]),
            ("random", acts[random_rows[qi]]),
        ):
            distances.append(
                {
                    "model": name,
                    "query": q[0],
                    "layer": layer,
                    "sampler": sampler,
                    "k": args.k,
                    "distance": float(inverse.distance(near, z[qi], std).mean()),
                    "cosine": float(inverse.cosine_distance(near, z[qi][None]).mean()),
                }
            )
    return pd.DataFrame(cells, columns=CELL_COLUMNS), pd.DataFrame(distances, columns=DISTANCE_COLUMNS)


def consistency_rows(
    run: Run,
    model,
    corpus: pd.DataFrame,
    queries: list[tuple],
    pending: list[int],
    generator_pending: list[int],
    generator_texts: list[str],
    stores: tuple,
) -> None:
    """Per pending layer (a unit) the nearest, random and ceiling cells; per pending generator
    layer the generator's cells and distances."""
    from superscopes import lens
    from superscopes.models import model_name

    store, generator_store, distance_store = stores
    args, tokenizer, texts = run.args, model.tokenizer, corpus["text"].tolist()
    read = sorted(set(pending) | set(generator_pending))
    pairs = lens.token_positions(tokenizer, texts, "text")
    table = Inputs(
        tokenizer,
        corpus,
        pairs,
        countries(),
        lens.next_tokens(model, texts, "text", args.batch_size, run.remote).numpy(),
    )
    corpus_acts = lens.collect(model, texts, args.site, read, "text", args.batch_size, run.remote)
    query_frame = pd.DataFrame(queries, columns=["text", "subject", "relation", "position"])
    query_positions = [[q[3]] for q in queries]
    query_acts = lens.collect(
        model, query_frame["text"].tolist(), args.site, read, query_positions, args.batch_size, run.remote
    )
    query_table = Inputs(
        tokenizer,
        query_frame,
        [(i, q[3]) for i, q in enumerate(queries)],
        countries(),
        lens.next_tokens(model, query_frame["text"].tolist(), query_positions, args.batch_size, run.remote).numpy(),
    )
    rng = np.random.default_rng(args.seed)
    random_rows = np.stack([rng.choice(len(pairs), args.k, replace=False) for _ in queries])
    ceilings = table.ceilings(query_table, queries, args.k)
    for layer in pending:
        nearest = inverse.nearest(corpus_acts[layer], query_acts[layer], args.k)
        store.append(
            layer_cells(model_name(model), layer, queries, table, query_table, nearest, random_rows, ceilings, args.k)
        )
        log(f"layer {layer} done")
    for layer in generator_pending:
        generated, distances = generator_cells(
            run,
            model,
            layer,
            generator_texts,
            corpus_acts[layer],
            queries,
            (query_table, query_acts[layer]),
            random_rows,
        )
        distance_store.append(distances)
        generator_store.append(generated)  # last: a layer counts as done once both are written
        log(f"layer {layer}: generator done")


def plot(summary: pd.DataFrame, path: Path, title: str) -> Path:
    from superscopes import plots

    hypotheses = [h for h in HYPOTHESES if h in set(summary["hypothesis"])]
    fig, axes = plots.figure(len(hypotheses), cols=min(3, len(hypotheses)), size=(4.6, 3.6))
    for ax, hypothesis in zip(axes, hypotheses):
        part = summary[summary["hypothesis"] == hypothesis]
        plots.lines(
            part,
            "layer",
            "consistency",
            hue="sampler",
            ax=ax,
            ylim=(-0.02, 1.02),
            title=f"{hypothesis} (n={int(part['n'].max())}, 95% intervals)",
            ylabel="feature consistency rate",
        )
    return plots.save(fig, path, title)


def generator_training(out: Path, layers: list[int], n_texts: int) -> str:
    """What each trained generator saw and how it fit: its held-out loss at the end and at its
    lowest (a rise after the lowest point means it memorises its training snippets)."""
    fits = []
    for layer in layers:
        path = out / f"generator_L{layer}_history.json"
        history = json.loads(path.read_text()) if path.exists() else []
        if history:
            best, last = min(history, key=lambda r: r["held_out_loss"]), history[-1]
            fits.append(
                f"L{layer} after {last['step']} steps: train loss {last['train_loss']:.2f}, held-out loss "
                f"{last['held_out_loss']:.2f} (lowest {best['held_out_loss']:.2f} at step {best['step']}), "
                f"held-out last-token accuracy {last['held_out_last_token_acc']:.2f}"
            )
    return f"{n_texts} snippets, never a query's" + "".join(f"; {fit}" for fit in fits)


def report(
    run: Run,
    name: str,
    cells: pd.DataFrame,
    distances: pd.DataFrame,
    n_corpus: int,
    queries: int,
    layers: list[int],
    generator_layers: list[int],
    n_generator_texts: int,
) -> None:
    """summary.csv, comparisons.csv, lexical.csv, the figure and summary.md."""
    args = run.args
    summary = prompt_means(cells, "consistency", "query", ("hypothesis", "layer", "sampler"), args.seed)
    summary.to_csv(run.out / "summary.csv", index=False)
    comparisons = compare_conditions(
        cells, "sampler", PAIRS, ("hypothesis", "layer"), "consistency", "query", args.seed
    )
    comparisons.to_csv(run.out / "comparisons.csv", index=False)
    lex = inverse.lexical_labels(cells, seed=args.seed)
    lex.to_csv(run.out / "lexical.csv", index=False)
    distance_summary = (
        prompt_means(distances, "distance", "query", ("layer", "sampler"), args.seed)
        if len(distances)
        else pd.DataFrame()
    )
    figure = plot(
        summary,
        run.out / "inverse_scope.png",
        f"InverseScope on {name}: {queries} queries, k={args.k}; "
        f"generator at layers {generator_layers}, nearest {args.site} by cosine, random",
    )
    shown = comparisons[comparisons["p_holm"] < 0.05]
    lexical_names, label = (
        set(lex.loc[lex["label"] != "rises", "hypothesis"]),
        dict(zip(lex["hypothesis"], lex["label"])),
    )
    headline = lex[lex["label"] == "rises"]
    means = summary.set_index(["hypothesis", "layer", "sampler"])["consistency"]
    ours = (
        "; ".join(
            f"{r.hypothesis}: nearest-input FCR {r.fcr_layer0:.2f} at layer 0 -> {r.fcr_best:.2f} at layer "
            f"{r.best_layer} ({r.difference:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}])"
            + "".join(
                f", generator at layer {g} {means[(r.hypothesis, g, 'generator')]:.2f} vs nearest "
                f"{means[(r.hypothesis, g, 'nearest')]:.2f} vs random {means[(r.hypothesis, g, 'random')]:.2f}"
                for g in generator_layers
                if (r.hypothesis, g, "generator") in means.index
            )
            for r in headline.itertuples()
        )
        or "no hypothesis rises above its layer-0 level"
    )
    ours += (
        f" ({queries} queries, k={args.k}; not headlined, lexical or not above random: "
        f"{', '.join(sorted(lexical_names)) or 'none'})"
    )
    findings = [
        f"{r.hypothesis}: {r.label}; nearest-input FCR {r.fcr_layer0:.2f} at layer 0, {r.fcr_best:.2f} at its "
        f"best layer {r.best_layer} (difference {r.difference:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}])."
        for r in lex[lex["label"] != "rises"].itertuples()
    ]
    supported = {
        sampler: sorted(
            {
                f"{r.hypothesis} ({label.get(r.hypothesis, 'unlabelled')})"
                for r in shown[
                    (shown["a"] == sampler) & (shown["b"] == "random") & (shown["difference"] > 0)
                ].itertuples()
            }
        )
        for sampler in ("generator", "nearest")
    }
    findings.append(
        "What each sampler supports (FCR above random inputs at some layer, Holm p < 0.05; label from the "
        "lexical check): "
        + "; ".join(f"{sampler}: {', '.join(names) or 'none'}" for sampler, names in supported.items())
        + "."
    )
    for a, b in PAIRS:
        part = shown[(shown["a"] == a) & (shown["b"] == b) & ~shown["hypothesis"].isin(lexical_names)]
        findings.append(
            f"{a} vs {b} (paired over queries, Holm p < 0.05; only hypotheses that rise): "
            + (
                ", ".join(
                    f"{r.hypothesis} L{r.layer} {r.difference:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
                    for r in part.itertuples()
                )
                or "no difference detected"
            )
            + "."
        )
    wide = summary.pivot_table(index=["hypothesis", "layer"], columns="sampler", values="consistency").reset_index()
    write_summary(
        run,
        f"InverseScope: trained generator vs nearest corpus inputs vs random ({name})",
        ours,
        PAPER,
        {
            "model": name,
            "site": args.site,
            "layers": layers,
            "generator layers": generator_layers,
            "corpus": f"{n_corpus} snippets of the Patchscopes factual data, every token but the first",
            "queries": f"{queries} held-out snippets, last token of the first whole-word subject mention (seed {args.seed})",
            "generator training": generator_training(run.out, generator_layers, n_generator_texts),
            "sampling": f"k={args.k}: generator samples; nearest by cosine at the same layer and site; random uniform",
            "consistency": "FCR = mean over inputs of 1{f(x) = f(x_original)}, over the queries with f(x_original) = 1",
        },
        findings,
        {
            "consistency per layer": wide,
            "lexical check (nearest inputs, best layer vs layer 0)": lex,
            "paired comparisons over queries (difference, 95% interval, Holm p)": comparisons,
            "distance of each sampler's inputs to z (standardised RMS, 95% interval)": distance_summary,
        },
        [figure.name],
    )


def experiment(run: Run) -> None:
    args, quick = run.args, run.args.quick
    from superscopes.models import model_name
    from superscopes.sites import num_layers

    model = run.load_model()
    name, n_layers, tokenizer = model_name(model), num_layers(model), model.tokenizer
    default = sorted({0, n_layers // 2, n_layers - 1}) if quick else sorted(set(range(0, n_layers, 3)) | {n_layers - 1})
    layers = resolve_layers(args.layers, n_layers, default)
    n_corpus, n_queries = args.corpus or (60 if quick else 1200), args.queries or (16 if quick else 200)
    snippets = load_snippets(args.seed)
    queries = subject_queries(tokenizer, snippets.iloc[n_corpus:], n_queries)
    corpus = snippets.iloc[:n_corpus].reset_index(drop=True)
    asked = {q[0] for q in queries}  # the generator never trains on a query's snippet
    generator_texts = (corpus["text"].tolist() + [t for t in snippets["text"].iloc[n_corpus:] if t not in asked])[
        : args.generator_texts or (n_corpus if quick else None)
    ]
    middle = min(layers, key=lambda l: abs(l - n_layers // 2))  # the evaluated layer nearest the model's middle
    generator_layers = (
        []
        if args.generator_layers == "none"
        else resolve_layers(
            None if args.generator_layers is None else parse_layers(args.generator_layers), n_layers, [middle]
        )
    )
    if set(generator_layers) - set(layers):
        raise SystemExit(f"generator layers {sorted(set(generator_layers) - set(layers))} are not among {layers}")
    stores = (
        run.store("cells.csv", ["layer"], layers=layers),
        run.store("generator.csv", ["layer"], layers=layers, generator_layers=generator_layers),
        run.store("distances.csv", ["layer"], layers=layers, generator_layers=generator_layers),
    )
    pending = list(run.pending(stores[0], layers, key=lambda layer: [layer]))
    generator_pending = list(run.pending(stores[1], generator_layers, key=lambda layer: [layer]))
    log(f"{name}: layers {layers} ({len(pending)} to run); generator at {generator_layers}; {len(queries)} queries")
    if pending or generator_pending:
        consistency_rows(run, model, corpus, queries, pending, generator_pending, generator_texts, stores)
    cells = stores[0].load()  # rows per layer depend on the data; the store keeps only layers whose rows are all there
    cells = pd.concat([cells, stores[1].load()], ignore_index=True)
    report(
        run,
        name,
        cells[cells["layer"].isin(layers)],
        stores[2].load(),
        len(corpus),
        len(queries),
        layers,
        generator_layers,
        len(generator_texts),
    )


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
