"""Patchscopes token identity / next-token (Ghandeharioun et al., 2024, Fig. 2) against the
logit lens and an affine lens.

Source positions are random word ends of real text snippets (the ``prompt_source`` column of
the Patchscopes factual data): each source prompt is a snippet cut after a random word, and
the source position is its last token. Per layer l, the hidden state h_l (``resid_post``) at
that position is patched over the "?" of the identity prompt
"cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?" at the same layer, and the patched model's
next token is read (``Scope(target="identity", target_layers=["same"], output="topk")``).

- precision@1 = 1[argmax patched == argmax of the source model's own next-token
  distribution at the source position]
- surprisal = -log p_source(argmax patched), in nats
Baselines on the same positions: the logit lens (final norm + unembedding of h_l) and an
affine lens (least squares h_l -> h_last, fitted on all text positions of held-out snippets).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from superscopes.parsing import parse_layers

from ._common import DATA, Run, depth_layers, parser, recipe_main, resolve_layers, write_summary

NAME = "token_identity"
DESCRIPTION = "Patchscopes token identity: precision@1 and surprisal per layer vs logit lens and affine lens"
PATCHSCOPES_DATA = DATA / "patchscopes"
PAPER = (
    "SmolLM2-135M, 100 sentences: Patchscope precision@1 0.05 (early layers) -> 0.57 (layer 19) -> 0.84 "
    "(layer 26); logit lens at or below 0.19 until layer 22 (Patchscopes Fig. 2 shape: below the lenses "
    "in the first layers, clearly above them from mid-depth on)"
)
METHODS = ("patchscope", "logit_lens", "affine_lens")
CELL_COLUMNS = [
    "model", "method", "source", "snippet", "relation", "position", "token", "layer", "pred_id", "pred_token",
    "output_ids", "output_probs", "source_top1_id", "source_top1", "precision_at_1", "surprisal",
]  # fmt: skip


# ---------------------------------------------------------------- data shared by the lens recipes


@functools.lru_cache(maxsize=1)
def _all_snippets() -> pd.DataFrame:
    frames = []
    for path in sorted((PATCHSCOPES_DATA / "factual").glob("*.tsv")):
        # Only the two columns used (the files hold long generation columns too).
        frame = pd.read_csv(path, sep="\t", usecols=["subject", "prompt_source"], dtype=str, keep_default_na=False)
        frames.append(pd.DataFrame({"text": frame["prompt_source"].str.strip(), "subject": frame["subject"],
                                    "relation": path.stem}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def load_snippets(seed: int = 0, min_words: int = 4) -> pd.DataFrame:
    """Every distinct ``prompt_source`` snippet of the factual Patchscopes data, with its
    ``subject`` and ``relation`` (file name), shuffled with ``seed`` and ordered round-robin
    over relations (so the first n rows mix all relations evenly)."""
    snippets = _all_snippets().copy()
    snippets = snippets[snippets["text"].str.split().str.len() >= min_words]
    snippets = snippets.drop_duplicates("text").sample(frac=1.0, random_state=seed)
    snippets["rank"] = snippets.groupby("relation").cumcount()
    rng = np.random.default_rng(seed)
    snippets["tie"] = rng.random(len(snippets))
    return snippets.sort_values(["rank", "tie"]).drop(columns=["rank", "tie"]).reset_index(drop=True)


def random_prefixes(texts: list[str], seed: int, min_words: int = 2) -> list[str]:
    """Each text cut after a random word (at least ``min_words`` words): the source prompts
    whose last token is a random position of real text that ends a word."""
    from superscopes.lens import word_ends

    rng = np.random.default_rng(seed)
    prefixes = []
    for text in texts:
        ends = word_ends(text)
        candidates = ends[min(min_words, len(ends)) - 1 :]
        prefixes.append(text[: candidates[rng.integers(len(candidates))]])
    return prefixes


def distinct_prefixes(texts: list[str], n: int, seed: int, min_words: int = 2) -> tuple[list[int], list[str], int]:
    """Like ``random_prefixes`` over ``texts`` in order, skipping a prefix already drawn, until
    ``n`` distinct ones: (indices of the texts used, prefixes, number of texts consumed)."""
    from superscopes.lens import word_ends

    rng = np.random.default_rng(seed)
    used, prefixes, seen = [], [], set()
    for i, text in enumerate(texts):
        if len(prefixes) == n:
            return used, prefixes, i
        ends = word_ends(text)
        prefix = text[: ends[min(min_words, len(ends)) - 1 :][rng.integers(len(ends[min(min_words, len(ends)) - 1 :]))]]
        if prefix not in seen:
            seen.add(prefix)
            used.append(i)
            prefixes.append(prefix)
    return used, prefixes, len(texts)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def record_time(out: Path, started: float, cells_before: int, cells_after: int) -> float:
    """Log this invocation in ``timings.csv``; returns the seconds spent by invocations that
    added cells (the cost of the results, whatever the number of resumes)."""
    path = out / "timings.csv"
    row = pd.DataFrame([{"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - started, 1),
                         "cells_added": cells_after - cells_before}])  # fmt: skip
    row.to_csv(path, mode="a", header=not path.exists(), index=False)
    log_ = pd.read_csv(path)
    return float(log_.loc[log_["cells_added"] > 0, "seconds"].sum())


def binomial_ci(p: float, n: int) -> float:
    """Half-width of a normal-approximation 95% interval for a proportion."""
    return float(1.96 * np.sqrt(max(p * (1 - p), 0.0) / n)) if n else float("nan")


# ---------------------------------------------------------------- the recipe


# The reference run's layers 19 and 26 of SmolLM2's 30 (see PAPER), and its "until layer 22",
# as fractions of the depth, so that another model is compared at the same relative depth.
REFERENCE_DEPTHS = (19 / 29, 26 / 29)
LOGIT_LENS_DEPTH = 22 / 29


def default_patch_layers(n_layers: int) -> list[int]:
    """About 8 layers over the depth, plus the reference depths and the last layer."""
    step = max(1, n_layers // 8)
    return sorted(set(range(0, n_layers, step)) | set(depth_layers(REFERENCE_DEPTHS, n_layers)) | {n_layers - 1})


def nearest(series: pd.Series, layer: int) -> tuple[int, float]:
    """(layer, value) of the entry of a per-layer series closest to ``layer``."""
    best = min(series.index, key=lambda l: (abs(l - layer), l))
    return int(best), float(series.loc[best])


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--positions", type=int, help="source positions (snippets); default 200, quick 8")
    p.add_argument("--fit-snippets", type=int, help="held-out snippets for the affine lens; default 300, quick 20")
    p.add_argument("--layers", type=parse_layers,
                   help="Patchscope layers: 'all', '0,4,8', '0-29'; default about 8 over the depth + the reference "
                        "depths (layers 19, 26 of 30) + the last")  # fmt: skip
    p.add_argument("--lens-layers", type=parse_layers, help="lens layers (cheap); default all (quick: the Patchscope layers)")
    p.add_argument("--ridge", type=float, help="ridge of the affine-lens fit; default 10 (quick 100: fewer rows than dimensions)")
    p.add_argument("--min-words", type=int, default=2, help="shortest source prefix in words")
    p.add_argument("--top-k", type=int, default=5, help="top-k stored per cell")
    return p


def _cells(model_name, method, sources, pairs_layer, pred_ids, pred_probs, own_lp, tokenizer):
    """Tidy rows for one method: pred_ids/pred_probs [n_layers, n_sources, k]."""
    rows = []
    own_top = own_lp.argmax(-1)
    for j, layer in enumerate(pairs_layer):
        for i, src in enumerate(sources):
            ids = pred_ids[j][i]
            top1 = int(ids[0])
            rows.append({
                "model": model_name, "method": method, "source": src.prompt, "snippet": src.snippet,
                "relation": src.relation, "position": src.position, "token": src.token, "layer": layer,
                "pred_id": top1, "pred_token": tokenizer.decode([top1]), "output_ids": [int(x) for x in ids],
                "output_probs": [round(float(x), 6) for x in pred_probs[j][i]],
                "source_top1_id": int(own_top[i]), "source_top1": tokenizer.decode([int(own_top[i])]),
                "precision_at_1": int(top1 == int(own_top[i])), "surprisal": float(-own_lp[i, top1]),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


class _Source:
    def __init__(self, prompt, snippet, relation, position, token):
        self.prompt, self.snippet, self.relation, self.position, self.token = prompt, snippet, relation, position, token


def _crossing(difference: pd.Series) -> str:
    """Where a per-layer difference turns positive for good: ' (below up to layer a, above from layer b on)'."""
    negative = [int(l) for l in difference.index if difference.loc[l] <= 0 and l < difference.index.max()]
    if not negative:
        return " (above at every layer before the last)"
    after = [int(l) for l in difference.index if l > negative[-1] and difference.loc[l] > 0]
    return f" (at or below it up to layer {negative[-1]}" + (f", above from layer {after[0]} on)" if after else ")")


def summarise(cells: pd.DataFrame) -> pd.DataFrame:
    table = (
        cells.groupby(["method", "layer"])
        .agg(precision_at_1=("precision_at_1", "mean"), surprisal=("surprisal", "mean"), n=("precision_at_1", "size"))
        .reset_index()
    )
    table["ci95"] = [binomial_ci(p, n) for p, n in zip(table["precision_at_1"], table["n"])]
    return table[["method", "layer", "precision_at_1", "ci95", "surprisal", "n"]]


def plot(summary: pd.DataFrame, path: Path, title: str) -> Path:
    from superscopes import plots

    fig, (left, right) = plots.figure(2)
    plots.lines(summary, "layer", "precision_at_1", hue="method", ax=left, ylim=(-0.02, 1.02),
                ylabel="precision@1 (vs the model's own next token)", title="precision@1")  # fmt: skip
    plots.lines(summary, "layer", "surprisal", hue="method", ax=right, ylabel="surprisal -log p_source (nats)",
                title="surprisal of the decoded token")  # fmt: skip
    return plots.save(fig, path, title)


def experiment(run: Run) -> None:
    args = run.args
    quick = args.quick
    n_sources = args.positions or (8 if quick else 200)
    n_fit = args.fit_snippets or (20 if quick else 300)
    ridge = args.ridge if args.ridge is not None else (100.0 if quick else 10.0)

    from superscopes import Scope, lens
    from superscopes.models import model_name
    from superscopes.prompts import IDENTITY, tokens
    from superscopes.sites import num_layers

    t0 = time.time()
    model = run.load_model()
    name = model_name(model)
    n_layers = num_layers(model)
    quick_layers = sorted({0, (2 * n_layers) // 3, n_layers - 1})
    layers = resolve_layers(args.layers, n_layers, quick_layers if quick else default_patch_layers(n_layers))
    lens_layers = resolve_layers(args.lens_layers, n_layers, layers if quick else list(range(n_layers)))
    log(f"{name}: {n_layers} layers; Patchscope layers {layers}; lens layers {lens_layers}")

    snippets = load_snippets(args.seed)
    used, prefixes, consumed = distinct_prefixes(snippets["text"].tolist(), n_sources, args.seed, args.min_words)
    evaluation = snippets.iloc[used]
    held_out = snippets.iloc[consumed : consumed + n_fit]
    sources = []
    for prefix, (_, row) in zip(prefixes, evaluation.iterrows()):
        pieces = tokens(model.tokenizer, prefix)
        sources.append(_Source(prefix, row["text"], row["relation"], len(pieces) - 1, pieces[-1]))

    store = run.store("cells.csv", ["method", "source"], layers=layers, lens_layers=lens_layers)
    rows_before = len(store.load())
    pending = {m: list(run.pending(store, sources, key=lambda s: [m, s.prompt])) for m in METHODS}
    remote = run.remote

    # The source model's own next-token log-probabilities at every source position still needed.
    needed = [s for s in sources if any(s in pending[m] for m in METHODS)]
    own_all = lens.final_logprobs(model, [s.prompt for s in needed], "last", args.batch_size, remote) if needed else None
    own_row = {s.prompt: i for i, s in enumerate(needed)}

    def own_logprobs(chosen):
        return own_all[[own_row[s.prompt] for s in chosen]]

    # Baselines: logit lens and affine lens on the same positions.
    lens_pending = sorted({s.prompt for m in ("logit_lens", "affine_lens") for s in pending[m]})
    fit_r2 = {}
    if lens_pending:
        chosen = [s for s in sources if s.prompt in set(lens_pending)]
        own = own_logprobs(chosen)
        acts = lens.collect(model, [s.prompt for s in chosen], "resid_post", lens_layers, "last", args.batch_size, remote)
        log(f"lenses on {len(chosen)} positions x {len(lens_layers)} layers")
        if pending["logit_lens"]:
            out = lens.logit_lens(model, [s.prompt for s in chosen], lens_layers, "last", args.top_k, acts,
                                  args.batch_size, remote)  # fmt: skip
            frame = _cells(name, "logit_lens", chosen, lens_layers, out.ids, out.probs, own, model.tokenizer)
            store.append(frame[frame["source"].isin({s.prompt for s in pending["logit_lens"]})])
        if pending["affine_lens"]:
            log(f"affine lens: fitting on {len(held_out)} held-out snippets (all text positions), ridge {ridge}")
            maps = lens.fit_affine_lens(model, held_out["text"].tolist(), lens_layers, "text", ridge,
                                        batch_size=args.batch_size, remote=remote)  # fmt: skip
            out = lens.affine_lens(model, [s.prompt for s in chosen], lens_layers, "last", maps=maps, top_k=args.top_k,
                                   activations=acts, batch_size=args.batch_size, remote=remote)  # fmt: skip
            last = n_layers - 1
            target = acts[last] if last in acts else lens.collect(model, [s.prompt for s in chosen], "resid_post",
                                                                  [last], "last", args.batch_size, remote)[last]  # fmt: skip
            fit_r2 = {l: lens.r_squared(lens.apply_affine(acts[l], *maps[l]), target) for l in lens_layers}
            pd.DataFrame({"layer": list(fit_r2), "r2_eval": list(fit_r2.values())}).to_csv(
                run.out / "affine_fit.csv", index=False)
            frame = _cells(name, "affine_lens", chosen, lens_layers, out.ids, out.probs, own, model.tokenizer)
            store.append(frame[frame["source"].isin({s.prompt for s in pending["affine_lens"]})])

    # Patchscope: the identity prompt, same layer, next-token top-k; one unit per chunk of sources.
    todo = pending["patchscope"]
    chunk = max(1, 4 * args.batch_size // len(layers))  # about 4 patched passes per unit
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        scope = Scope([s.prompt for s in part], sites=["resid_post"], layers=layers, alphas=[1], transforms=["scale"],
                      target="identity", target_layers=["same"], output="topk", top_k=args.top_k,
                      batch_size=args.batch_size)  # fmt: skip
        frame = run.scope(model, scope)
        own = own_logprobs(part)
        by_prompt = {s.prompt: i for i, s in enumerate(part)}
        ids = [[None] * len(part) for _ in layers]
        probs = [[None] * len(part) for _ in layers]
        for row in frame.itertuples():
            ids[layers.index(row.layer)][by_prompt[row.source]] = row.output_ids
            probs[layers.index(row.layer)][by_prompt[row.source]] = row.output_probs
        store.append(_cells(name, "patchscope", part, layers, ids, probs, own, model.tokenizer))
        log(f"patchscope: {min(start + chunk, len(todo))}/{len(todo)} sources ({time.time() - t0:.0f} s)")

    expected = len(sources) * (len(layers) + 2 * len(lens_layers))
    cells = run.cells(store, expected, unique=["method", "source", "layer"])
    seconds = record_time(run.out, t0, rows_before, len(cells))
    summary = summarise(cells)
    summary.insert(0, "model", name)
    summary.to_csv(run.out / "summary.csv", index=False)
    settings_text = f"{len(sources)} positions, identity prompt, l*=l"
    figure = plot(summary, run.out / "token_identity.png",
                  f"Token identity on {name}: {settings_text}; lenses fitted on {len(held_out)} held-out snippets")  # fmt: skip

    patch = summary[summary["method"] == "patchscope"].set_index("layer")["precision_at_1"]
    logit = summary[summary["method"] == "logit_lens"].set_index("layer")["precision_at_1"]
    affine = summary[summary["method"] == "affine_lens"].set_index("layer")["precision_at_1"]
    early = [l for l in patch.index if l <= 2] or list(patch.index[:1])
    mid, late = depth_layers(REFERENCE_DEPTHS[:1], n_layers)[0], depth_layers(REFERENCE_DEPTHS[1:], n_layers)[0]
    lens_limit = depth_layers([LOGIT_LENS_DEPTH], n_layers)[0]
    (l_mid, p_mid), (l_late, p_late) = nearest(patch, mid), nearest(patch, late)
    before = logit[logit.index < lens_limit]
    ours = (
        f"Patchscope precision@1 {patch.loc[early].mean():.2f} (layers {early}) -> {p_mid:.2f} (layer {l_mid}) -> "
        f"{p_late:.2f} (layer {l_late}); logit lens max {before.max() if len(before) else float('nan'):.2f} before "
        f"layer {lens_limit}, {nearest(logit, mid)[1]:.2f} at layer {nearest(logit, mid)[0]}; affine lens "
        f"{nearest(affine, mid)[1]:.2f} at layer {nearest(affine, mid)[0]} ({len(sources)} positions)"
    )
    both = pd.DataFrame({"patchscope": patch, "logit_lens": logit, "affine_lens": affine}).dropna()
    crossing = [int(l) for l in both.index if both.loc[l, "patchscope"] > both.loc[l, "logit_lens"]]
    findings = [
        f"Patchscope beats the logit lens at {len(crossing)} of {len(both)} shared layers"
        + (f" (first at layer {crossing[0]})" if crossing else "") + ".",
        f"Patchscope beats the affine lens at {int((both['patchscope'] > both['affine_lens']).sum())} of "
        f"{len(both)} shared layers" + _crossing(both["patchscope"] - both["affine_lens"]) + ".",
        "At the last layer the logit lens is the model's own output, so its precision@1 is 1 by construction "
        f"(here {logit.iloc[-1]:.2f}).",
    ]
    if (run.out / "affine_fit.csv").exists():
        fit_r2 = pd.read_csv(run.out / "affine_fit.csv").set_index("layer")["r2_eval"].to_dict()
        findings.append("Affine-lens fit, R^2 of h_last on the evaluated positions: "
                        + ", ".join(f"layer {l}: {r:.2f}" for l, r in list(fit_r2.items())[:: max(1, len(fit_r2) // 6)]))
    if patch.max() < 0.5:
        findings.append("The Patchscope stays below 0.5 at every layer: this model does not show the paper's "
                        "mid-depth rise at this data size.")
    wide = summary.pivot(index="layer", columns="method", values="precision_at_1").reset_index()
    wide = wide.astype(object).where(wide.notna(), "-")  # lens-only layers have no Patchscope cell
    write_summary(
        run, f"Token identity Patchscope ({name})", ours, PAPER,
        {"model": name, "source positions": f"{len(sources)} (random word ends of distinct snippets, >= "
         f"{args.min_words} words, round-robin over the 14 factual relations, seed {args.seed})",
         "target": f"identity prompt {IDENTITY!r}, patched on '?', resid_post, target layer = source layer, alpha 1",
         "Patchscope layers": layers, "lens layers": f"{lens_layers[0]}-{lens_layers[-1]} ({len(lens_layers)})",
         "affine lens": f"least squares h_l -> h_{n_layers - 1} (resid_post) on all text positions of {len(held_out)} "
         f"held-out snippets, ridge {ridge}",
         "precision@1": "argmax patched == argmax of the source model's own next-token distribution",
         "surprisal": "-log p_source(argmax patched), nats",
         "wall time": f"{seconds:.0f} s (invocations that computed cells; see timings.csv), 2-core CPU"},
        findings, {"precision@1 per layer": wide, "per layer and method": summary.drop(columns=["model"])},
        [figure.name],
    )  # fmt: skip


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
