"""InverseScope (2025): read an activation by the inputs whose activations are closest to it
(nearest corpus inputs, and the paper's trained generator), and test hypotheses by their
feature-consistency rate.

InverseScope interprets an activation z by P(x | z), proportional to k(d(z(x), z)), and scores
a hypothesis f by the feature consistency rate FCR = E_{x ~ P(x|z)}[1{f(x) = f(x_original)}].
The paper trains a conditional generator for P(x | z); this recipe samples from it (see below)
and from a corpus, training-free: the k nearest (snippet, position) inputs by cosine similarity of ``resid_post`` at
the same layer, against k inputs drawn uniformly from the same corpus (the random baseline).

Corpus: every text position (``superscopes.lens`` "text" positions) of snippets of the
Patchscopes factual data. Queries: held-out snippets, at the last token of the first
whole-word mention of their subject. An input x is a snippet read up to and including one token. Hypotheses:

- ``country``: the token ends the name of a country (country names: the subjects of the
  three country_* relations).
- ``same_subject``: x's text up to the token contains the query's subject string.
- ``subject_end``: the token is the last token of its own snippet's subject mention.
- ``same_relation``: x's snippet comes from the query's relation (a topical hypothesis).
- ``same_token``: x's token is the query's token (a lexical control).

Beside the random baseline, a ``ceiling`` row per query and hypothesis: the most any k inputs
of this corpus could reach, min(1, corpus inputs for which the hypothesis holds / k) (the
corpus may hold fewer than k inputs with the query's subject, say).

Each hypothesis is asked of the queries for which it holds (f(x_original) = 1), so its FCR is
the share of sampled inputs for which it holds too.

The paper's own sampler (``superscopes.inverse``): at ``--generator-layers`` (default: the
middle evaluated layer) a conditional generator is trained on the same corpus inputs (those of at
most 16 tokens) and samples k inputs per query (sampler ``generator``, in ``generator.csv``). A
generated input has no source snippet, so only ``country``, ``same_subject`` and ``same_token`` are
asked of it. ``distances.csv``: per query and sampler, the mean distance from the k inputs'
activations to the query's (standardised RMS, the generator's kernel distance; and cosine), so a
reader sees whether each sampler lands near z at all. Intervals are 95% bootstraps over queries;
``comparisons.csv`` pairs samplers by query (sign-flip p, Holm over the family).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from superscopes import inverse
from superscopes.metrics import holm
from superscopes.parsing import parse_layers

from ._common import Run, parser, recipe_main, resolve_layers, write_summary
from .token_identity import PATCHSCOPES_DATA, load_snippets, log, record_time

NAME = "inverse_scope"
DESCRIPTION = "InverseScope: feature consistency of generated, nearest-activation and random inputs per layer"
PAPER = (
    "InverseScope (2025) samples inputs from a trained conditional generator and reports that feature "
    "consistency rates of true hypotheses exceed those of random inputs, with no number we can compare with, "
    "and the training-free corpus version here has no published counterpart"
)
HYPOTHESES = ("country", "same_subject", "subject_end", "same_relation", "same_token")
CELL_COLUMNS = ["model", "query", "subject", "relation", "position", "token", "layer", "sampler", "k", "hypothesis",
                "f_query", "consistency", "neighbours"]  # fmt: skip
# A generated input has no source snippet: subject_end and same_relation cannot be asked of it.
GENERATOR_HYPOTHESES = ("country", "same_subject", "same_token")
DISTANCE_COLUMNS = ["model", "query", "layer", "sampler", "k", "distance", "cosine"]


def countries() -> list[str]:
    """Country names: the subjects of the country_* relations of the Patchscopes factual data."""
    names = set()
    for path in sorted((PATCHSCOPES_DATA / "factual").glob("country_*.tsv")):
        names |= set(pd.read_csv(path, sep="\t", index_col=0)["subject"].astype(str))
    return sorted(names, key=len, reverse=True)


def mention_ends(tokenizer, text: str, names: list[str]) -> set[int]:
    """Indices of tokens that end a whole-word mention of any of ``names`` in ``text``."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    ends = set()
    for name in names:
        for match in re.finditer(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text):
            overlapping = [i for i, (s, e) in enumerate(offsets) if e > s and s < match.end() and e > match.start()]
            if overlapping:
                ends.add(overlapping[-1])
    return ends


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--corpus", type=int, help="corpus snippets; default 1200, quick 60")
    p.add_argument("--queries", type=int, help="query snippets; default 200, quick 16")
    p.add_argument("--k", type=int, default=10, help="nearest inputs (and random inputs) per query")
    p.add_argument("--layers", type=parse_layers,
                   help="layers: 'all', '0,4,8', '0-5'; default every 3rd + last (quick: middle and last)")  # fmt: skip
    p.add_argument("--site", default="resid_post", help="activation site (same for queries and corpus)")
    p.add_argument("--generator-layers",
                   help="layers with a trained generator: 'none', or as --layers; default the middle one")  # fmt: skip
    p.add_argument("--generator-steps", type=int, help="generator training steps; default 3000, quick 150")
    return p


class _Positions:
    """The corpus as one table of inputs (snippet, token) with the features the hypotheses need."""

    def __init__(self, tokenizer, frame: pd.DataFrame, pairs: list[tuple[int, int]], country_names: list[str]):
        self.frame, self.pairs = frame, pairs
        texts, subjects = frame["text"].tolist(), frame["subject"].tolist()
        encodings = [tokenizer(t, return_offsets_mapping=True) for t in texts]
        country_ends = [mention_ends(tokenizer, t, country_names) for t in texts]
        subject_ends = [mention_ends(tokenizer, t, [s]) for t, s in zip(texts, subjects)]
        self.token = [tokenizer.decode([encodings[p]["input_ids"][i]]) for p, i in pairs]
        self.prefix = [texts[p][: encodings[p]["offset_mapping"][i][1]] for p, i in pairs]
        self.country = np.array([i in country_ends[p] for p, i in pairs])
        self.subject_end = np.array([i in subject_ends[p] for p, i in pairs])
        self.relation = np.array([frame["relation"].iloc[p] for p, _ in pairs])

    def contains(self, subject: str, rows: np.ndarray) -> np.ndarray:
        pattern = re.compile(r"(?<!\w)" + re.escape(subject) + r"(?!\w)")
        return np.array([bool(pattern.search(self.prefix[r])) for r in rows])


def nearest_rows(corpus_acts: torch.Tensor, query_acts: torch.Tensor, k: int) -> np.ndarray:
    """The training-free sampler: the k corpus inputs nearest each query by cosine similarity."""
    keys = torch.nn.functional.normalize(corpus_acts, dim=-1)
    values = torch.nn.functional.normalize(query_acts, dim=-1)
    return (values @ keys.T).topk(k, dim=-1).indices.numpy()


# ---------------------------------------------------------------- the trained generator (issue 12)


def generated_features(tokenizer, text: str, subject: str, country_names: list[str]) -> dict:
    """f(x) of a generated input for each of GENERATOR_HYPOTHESES, from its text alone."""
    ids = tokenizer(text)["input_ids"]
    return {
        "country": len(ids) - 1 in mention_ends(tokenizer, text, country_names),
        "same_subject": bool(re.search(r"(?<!\w)" + re.escape(subject) + r"(?!\w)", text)),
        "same_token": tokenizer.decode(ids[-1:]),
    }


def generator_cells(run, model, name: str, layer: int, corpus_texts: list[str], positions: list[tuple[int, int]],
                    corpus_acts: torch.Tensor, queries: list[tuple], query_acts: torch.Tensor, query_table,
                    random_rows: np.ndarray, country_names: list[str],
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Train (or resume) a generator on the corpus inputs at ``layer``, sample k inputs per query,
    and return its FCR cells and every sampler's distances to the query's activation."""
    args, tokenizer = run.args, model.tokenizer
    sizes = dict(d_model=64, n_layers=2, n_heads=4, max_vocab=2048, batch_size=32) if args.quick else {}
    config = inverse.GeneratorConfig(model=name, site=args.site, layer=layer, seed=args.seed,
                                     steps=args.generator_steps or (150 if args.quick else 3000), **sizes)  # fmt: skip
    ids = [tokenizer(t)["input_ids"] for t in corpus_texts]
    keep = [r for r, (_, i) in enumerate(positions) if i < config.max_tokens]
    pairs = inverse.Pairs([ids[p][: i + 1] for p, i in (positions[r] for r in keep)], corpus_acts[keep],
                          [positions[r][0] for r in keep])  # fmt: skip
    generator = inverse.train(pairs, config, run.out / "generators" / f"L{layer}", progress=not args.quick)
    samples = generator.sample_texts(tokenizer, query_acts, args.k, args.seed)
    flat = [text for row in samples for text in row]
    generated_acts = inverse.last_token_activations(model, flat, args.site, layer, args.batch_size).view(
        len(queries), args.k, -1)  # fmt: skip
    std = corpus_acts.std(0).clamp_min(1e-4)  # the corpus's spread per dimension: the distance's unit
    nearest = nearest_rows(corpus_acts, query_acts, args.k)
    cells, distances = [], []
    for qi, (text, subject, relation, position) in enumerate(queries):
        found = [generated_features(tokenizer, x, subject, country_names) for x in samples[qi]]
        original = {"country": bool(query_table.country[qi]), "same_subject": True, "same_token": query_table.token[qi]}
        for hypothesis in GENERATOR_HYPOTHESES:
            if original[hypothesis] is False:
                continue  # each hypothesis is asked of the queries for which it holds
            cells.append({
                "model": name, "query": text, "subject": subject, "relation": relation, "position": position,
                "token": query_table.token[qi], "layer": layer, "sampler": "generator", "k": args.k,
                "hypothesis": hypothesis, "f_query": 1,
                "consistency": inverse.fcr(original[hypothesis], [f[hypothesis] for f in found]),
                "neighbours": json.dumps(samples[qi][:3]),
            })  # fmt: skip
        for sampler, acts in (("generator", generated_acts[qi]), ("nearest", corpus_acts[nearest[qi]]),
                              ("random", corpus_acts[random_rows[qi]])):  # fmt: skip
            distances.append({"model": name, "query": text, "layer": layer, "sampler": sampler, "k": args.k,
                              "distance": float(inverse.distance(acts, query_acts[qi], std).mean()),
                              "cosine": float(inverse.cosine_distance(acts, query_acts[qi][None]).mean())})  # fmt: skip
    return pd.DataFrame(cells, columns=CELL_COLUMNS), pd.DataFrame(distances, columns=DISTANCE_COLUMNS)


def supported(comparisons: pd.DataFrame, a: str, b: str = "random", alpha: float = 0.05) -> list[str]:
    """Hypotheses (at a layer) where sampler ``a`` beats ``b``: positive difference, Holm p < alpha."""
    part = comparisons[(comparisons["a"] == a) & (comparisons["b"] == b)]
    part = part[(part["difference"] > 0) & (part["p_holm"] < alpha)]
    return [f"{r.hypothesis} (L{int(r.layer)}: +{r.difference:.2f})" for r in part.itertuples()]


def plot(summary: pd.DataFrame, path: Path, title: str) -> Path:
    from superscopes import plots

    hypotheses = [h for h in HYPOTHESES if h in set(summary["hypothesis"])]
    fig, axes = plots.figure(len(hypotheses), cols=min(3, len(hypotheses)), size=(4.6, 3.6))
    for ax, hypothesis in zip(axes, hypotheses):
        part = summary[summary["hypothesis"] == hypothesis]
        plots.lines(part, "layer", "consistency", hue="sampler", ax=ax, ylim=(-0.02, 1.02),
                    title=f"{hypothesis} (n={int(part['n'].max())})", ylabel="feature consistency rate")  # fmt: skip
    return plots.save(fig, path, title)


def experiment(run: Run) -> None:
    args = run.args
    quick = args.quick
    n_corpus = args.corpus or (60 if quick else 1200)
    n_queries = args.queries or (16 if quick else 200)

    from superscopes.models import model_name
    from superscopes.sites import num_layers

    t0 = time.time()
    model = run.load_model()
    name = model_name(model)
    n_layers = num_layers(model)
    default = sorted({n_layers // 2, n_layers - 1}) if quick else sorted(
        set(range(0, n_layers, 3)) | {n_layers - 1})  # fmt: skip
    layers = resolve_layers(args.layers, n_layers, default)

    snippets = load_snippets(args.seed)
    tokenizer = model.tokenizer
    # Queries: held-out snippets whose subject is found in the text (position = its last token).
    queries = []
    for row in snippets.iloc[n_corpus:].itertuples():
        ends = sorted(mention_ends(tokenizer, row.text, [row.subject]))  # whole-word mentions only
        if ends and ends[0] > 0:
            queries.append((row.text, row.subject, row.relation, ends[0]))
        if len(queries) == n_queries:
            break
    corpus = snippets.iloc[:n_corpus].reset_index(drop=True)
    store = run.store("cells.csv", ["layer"], layers=layers)
    rows_before = len(store.load())
    pending = list(run.pending(store, layers, key=lambda layer: [layer]))
    middle = min(layers, key=lambda l: abs(l - n_layers // 2))  # the evaluated layer nearest the model's middle
    generator_layers = [] if args.generator_layers == "none" else resolve_layers(
        None if args.generator_layers is None else parse_layers(args.generator_layers), n_layers, [middle])  # fmt: skip
    if set(generator_layers) - set(layers):
        missing = sorted(set(generator_layers) - set(layers))
        raise SystemExit(f"generator layers {missing} are not among the layers {layers}")
    generator_store = run.store("generator.csv", ["layer"], layers=layers, generator_layers=generator_layers)
    distance_store = run.store("distances.csv", ["layer"], layers=layers, generator_layers=generator_layers)
    generator_pending = list(run.pending(generator_store, generator_layers, key=lambda layer: [layer]))
    log(f"{name}: layers {layers} ({len(pending)} to run); generator at {generator_layers} ({len(generator_pending)} "
        f"to run); corpus {len(corpus)} snippets; {len(queries)} queries")  # fmt: skip

    if pending or generator_pending:
        consistency_rows(run, model, corpus, queries, pending, generator_pending, (store, generator_store, distance_store), t0)
    cells = store.load()  # rows per layer depend on the data; the store keeps only layers whose rows are all there
    seconds = record_time(run.out, t0, rows_before, len(cells))
    cells = pd.concat([cells, generator_store.load()], ignore_index=True)
    report(run, name, tokenizer, cells[cells["layer"].isin(layers)], distance_store.load(), corpus, queries, layers,
           generator_layers, seconds)  # fmt: skip


def consistency_rows(run: Run, model, corpus: pd.DataFrame, queries: list[tuple], pending: list[int],
                     generator_pending: list[int], stores: tuple, t0: float) -> None:  # fmt: skip
    """Per pending layer (a unit): each query's nearest, random and ceiling consistency per
    hypothesis; per pending generator layer, the trained generator's samples and distances."""
    from superscopes import lens
    from superscopes.models import model_name

    store, generator_store, distance_store = stores
    args, remote, tokenizer, name = run.args, run.remote, model.tokenizer, model_name(model)
    read = sorted(set(pending) | set(generator_pending))
    country_names = countries()
    pairs = lens.token_positions(tokenizer, corpus["text"].tolist(), "text")
    table = _Positions(tokenizer, corpus, pairs, country_names)
    corpus_acts = lens.collect(model, corpus["text"].tolist(), args.site, read, "text", args.batch_size, remote)
    query_texts = [q[0] for q in queries]
    query_acts = lens.collect(model, query_texts, args.site, read, [[q[3]] for q in queries],
                              args.batch_size, remote)  # fmt: skip
    log(f"activations: {len(pairs)} corpus positions, {len(queries)} queries ({time.time() - t0:.0f} s)")
    query_frame = pd.DataFrame({"text": query_texts, "subject": [q[1] for q in queries],
                                "relation": [q[2] for q in queries]})  # fmt: skip
    query_table = _Positions(tokenizer, query_frame, [(i, q[3]) for i, q in enumerate(queries)], country_names)
    rng = np.random.default_rng(args.seed)
    random_rows = np.stack([rng.choice(len(pairs), args.k, replace=False) for _ in queries])
    every = np.arange(len(pairs))
    tokens = np.array(table.token, dtype=object)

    def features(qi: int, subject: str, relation: str, chosen: np.ndarray) -> dict:
        """hypothesis -> (f(x_original), f over the chosen corpus inputs)."""
        return {
            "country": (bool(query_table.country[qi]), table.country[chosen]),
            "same_subject": (True, table.contains(subject, chosen)),
            "subject_end": (bool(query_table.subject_end[qi]), table.subject_end[chosen]),
            "same_relation": (True, table.relation[chosen] == relation),
            "same_token": (True, tokens[chosen] == query_table.token[qi]),
        }

    # The ceiling: the most any k inputs of this corpus can agree with the query on each
    # hypothesis, min(1, inputs for which it holds / k); the same at every layer.
    ceiling = [
        {h: min(1.0, float(np.sum(f == f_query)) / args.k) for h, (f_query, f) in features(qi, q[1], q[2], every).items()}
        for qi, q in enumerate(queries)
    ]  # fmt: skip
    for layer in pending:
        nearest = nearest_rows(corpus_acts[layer], query_acts[layer], args.k)
        rows = []
        for qi, (text, subject, relation, position) in enumerate(queries):
            for sampler, chosen in (("nearest", nearest[qi]), ("random", random_rows[qi]), ("ceiling", None)):
                found = features(qi, subject, relation, every[:0] if chosen is None else chosen)
                for hypothesis, (f_query, f_inputs) in found.items():
                    if not f_query:
                        continue  # each hypothesis is asked of the queries for which it holds
                    if chosen is None:
                        consistency, shown = ceiling[qi][hypothesis], []
                    else:
                        consistency, shown = float(np.mean(f_inputs == f_query)), chosen[:3]
                    rows.append({
                        "model": name, "query": text, "subject": subject, "relation": relation,
                        "position": position, "token": query_table.token[qi], "layer": layer,
                        "sampler": sampler, "k": args.k, "hypothesis": hypothesis, "f_query": int(f_query),
                        "consistency": consistency, "neighbours": json.dumps([table.prefix[r] for r in shown]),
                    })  # fmt: skip
        store.append(pd.DataFrame(rows, columns=CELL_COLUMNS))
        log(f"layer {layer} done")
    for layer in generator_pending:
        generated, distances = generator_cells(run, model, name, layer, corpus["text"].tolist(), pairs,
                                               corpus_acts[layer], queries, query_acts[layer], query_table,
                                               random_rows, country_names)  # fmt: skip
        distance_store.append(distances)
        generator_store.append(generated)  # last: a layer counts as done once both are written
        log(f"layer {layer}: generator done")


def report(run: Run, name: str, tokenizer, cells: pd.DataFrame, distances: pd.DataFrame, corpus: pd.DataFrame,
           queries: list[tuple], layers: list[int], generator_layers: list[int], seconds: float) -> None:  # fmt: skip
    """summary.csv, comparisons.csv, the figure and summary.md: consistency per hypothesis and
    layer for the generator, nearest and random inputs, with prompt-level comparisons."""
    from superscopes import lens

    args = run.args
    summary = inverse.fcr_table(cells, seed=args.seed)  # mean FCR, 95% bootstrap interval over queries
    summary.insert(0, "model", name)
    comparisons = pd.concat([inverse.compare_samplers(cells, "generator", ("nearest", "random"), seed=args.seed),
                             inverse.compare_samplers(cells, "nearest", ("random",), seed=args.seed)],
                            ignore_index=True)  # fmt: skip
    if not comparisons.empty:  # one Holm family over every comparison of the run
        keys = [f"{r.hypothesis}|{r.layer}|{r.a}|{r.b}" for r in comparisons.itertuples()]
        adjusted = holm(dict(zip(keys, comparisons["p"])))
        comparisons["p_holm"] = [adjusted[k] for k in keys]
    comparisons.to_csv(run.out / "comparisons.csv", index=False)
    distance_summary = (inverse.fcr_table(distances, "distance", by=("layer", "sampler"), seed=args.seed)
                        .merge(distances.groupby(["layer", "sampler"])["cosine"].mean().reset_index()))  # fmt: skip
    summary.to_csv(run.out / "summary.csv", index=False)
    figure = plot(summary, run.out / "inverse_scope.png",
                  f"InverseScope on {name}: {len(queries)} queries (last subject token); k={args.k} generated "
                  f"(layers {generator_layers}), nearest {args.site} by cosine among {len(corpus)} snippets' tokens, "
                  "random")  # fmt: skip

    wide = summary.pivot_table(index=["hypothesis", "layer"], columns="sampler", values="consistency").reset_index()
    wide["lift"] = wide["nearest"] - wide["random"]
    if "generator" not in wide:
        wide["generator"] = np.nan
    best = wide.loc[wide.groupby("hypothesis")["lift"].idxmax()].set_index("hypothesis")
    ours = "; ".join(
        f"{h}: {best.loc[h, 'nearest']:.2f} vs random {best.loc[h, 'random']:.2f}, ceiling {best.loc[h, 'ceiling']:.2f} "
        f"(layer {int(best.loc[h, 'layer'])})"
        for h in HYPOTHESES if h in best.index
    ) + f" (nearest-input FCR at the best layer per hypothesis; {len(queries)} queries, k={args.k})"
    for layer in generator_layers:
        at = wide[wide["layer"] == layer].set_index("hypothesis")
        ours += f"; trained generator at layer {layer}: " + ", ".join(
            f"{h} {at.loc[h, 'generator']:.2f} vs nearest {at.loc[h, 'nearest']:.2f} "
            f"vs random {at.loc[h, 'random']:.2f}"
            for h in GENERATOR_HYPOTHESES if h in at.index and not np.isnan(at.loc[h, "generator"]))  # fmt: skip
    trained = {}
    for layer in generator_layers:
        generator = inverse.Generator.load(run.out / "generators" / f"L{layer}" / "generator.pt")
        c, last = generator.config, generator.history[-1]
        trained[f"generator L{layer}"] = (
            f"{c.n_layers}-layer {c.d_model}-wide transformer, vocabulary {len(generator.vocab)}, {c.steps} steps of "
            f"{c.batch_size}, noise {c.noise}; held-out loss {last.get('held_out_loss', float('nan')):.3f} nats/token, "
            f"held-out last-token accuracy {last.get('held_out_last_token_acc', float('nan')):.2f}, "
            f"{last['seconds_per_step']:.3f} s/step")  # fmt: skip
    findings = []
    for h in HYPOTHESES:
        part = wide[wide["hypothesis"] == h].sort_values("layer")
        if len(part):
            findings.append(f"{h}: nearest-input consistency " + ", ".join(
                f"L{int(r.layer)} {r.nearest:.2f}" for r in part.itertuples()) + f" (random "
                f"{part['random'].mean():.2f}, ceiling {part['ceiling'].mean():.2f}).")  # fmt: skip
    for sampler in ("generator", "nearest"):
        found = supported(comparisons, sampler) if not comparisons.empty else []
        findings.append(f"{sampler} beats random inputs (Holm p < 0.05) on: {', '.join(found) or 'no hypothesis'}.")
    for row in distance_summary.itertuples():
        findings.append(f"L{int(row.layer)} {row.sampler}: distance of the inputs' activations to z {row.distance:.3f} "
                        f"[{row.ci_low:.3f}, {row.ci_high:.3f}], cosine distance {row.cosine:.3f}.")  # fmt: skip
    count = cells[(cells["hypothesis"] == "country") & (cells["sampler"] == "nearest")]["query"].nunique()
    findings.append(f"The country hypothesis is asked of the {count} queries whose subject is a country.")
    mid = layers[len(layers) // 2]
    examples = cells[(cells["layer"] == mid) & (cells["sampler"] == "nearest") & (cells["hypothesis"] == "same_subject")]
    examples = examples.head(5)[["query", "subject", "token", "consistency", "neighbours"]]
    examples["neighbours"] = examples["neighbours"].map(lambda v: " / ".join(json.loads(v)) if isinstance(v, str) else v)
    generated_examples = cells[(cells["sampler"] == "generator") & (cells["hypothesis"] == "same_token")]
    generated_examples = generated_examples.head(5)[["query", "token", "layer", "consistency", "neighbours"]]
    generated_examples["neighbours"] = generated_examples["neighbours"].map(lambda v: " / ".join(json.loads(v)))
    write_summary(
        run, f"InverseScope: trained generator vs nearest corpus inputs ({name})", ours, PAPER,
        {"model": name, "site": args.site, "layers": layers,
         "corpus": f"{len(corpus)} snippets of the Patchscopes factual data, every token but the first "
         f"({sum(1 for _ in lens.token_positions(tokenizer, corpus['text'].tolist(), 'text'))} inputs)",
         "queries": f"{len(queries)} held-out snippets, last token of the first whole-word subject mention (seed {args.seed})",
         "sampling": f"k={args.k} nearest inputs by cosine similarity at the same layer and site; random baseline: "
         f"k inputs drawn uniformly from the corpus (seed {args.seed})",
         **trained,
         "consistency": "FCR = mean over inputs of 1{f(x) = f(x_original)}, over the queries with f(x_original) = 1 "
         "(all queries for same_subject, same_relation, same_token)", "wall time": f"{seconds:.0f} s (invocations that computed cells; see timings.csv), 2-core CPU"},
        findings, {"consistency per layer (generator, nearest, random, ceiling)": wide,
                   "paired comparisons over queries (difference, 95% interval, Holm p)": comparisons,
                   "distance of sampled inputs' activations to z (standardised RMS; cosine)": distance_summary,
                   f"examples at layer {mid}: nearest inputs (first 3)": examples,
                   "examples: generated inputs (first 3)": generated_examples},
        [figure.name],
    )  # fmt: skip


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
