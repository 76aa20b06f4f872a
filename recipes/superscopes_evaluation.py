"""Superscopes' full evaluation: amplified vs plain MLP-output Patchscopes on 48 entities, with controls.

Jacobi & Niv (2025): 48 multi-word entity names, last token, MLP outputs of layers 1-7,
patched into the entity-description prompt at the same layer; a (prompt, layer) succeeds
when the judged similarity of the readout to the prompt exceeds 0.3. Patchscopes is one
try at alpha = 1; Superscopes is the best of alphas {3, 6, 9, 12, 15}. Published
(Llama-2-13b-chat): Patchscopes [13, 3, 1, 1, 5, 4, 2] = 29/336, Superscopes
[29, 36, 32, 27, 25, 23, 24] = 196/336.

Because that compares a best-of-5 with one try, the recipe also runs, on the control
layers: (a) alpha = 1 with five seeded sampled tries, best of 5; (b) each single alpha
alone; (c) a norm-matched patch (v rescaled to the norm of the vector it replaces, then
times alpha); (d) a random direction with v's norm, same alphas; (e) thresholds 0.3 and
0.5; (f) the same best-of-5 readouts judged against a mismatched source prompt (the
judge's chance rate under best-of-5 selection).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from superscopes.parsing import parse_floats, parse_layers

from ._common import DATA, Run, parser, recipe_main, write_summary

NAME = "superscopes_evaluation"
DESCRIPTION = __doc__.splitlines()[0]

ALPHAS = [3, 6, 9, 12, 15]
LAYERS = [1, 2, 3, 4, 5, 6, 7]
CONTROL_LAYERS = [1, 4, 7]
CONTROLS = ("sampled", "norm", "random")
THRESHOLDS = (0.3, 0.5)
PAPER_PATCHSCOPES = [13, 3, 1, 1, 5, 4, 2]
PAPER_SUPERSCOPES = [29, 36, 32, 27, 25, 23, 24]
PAPER_SINGLE_ALPHA = {3: 111, 6: 121, 9: 114, 12: 107, 15: 87}
PAPER_AT_05 = (4, 61)
PAPER_PROMPTS = 48
KEY = ["source", "site", "layer"]

PATCHSCOPES = "Patchscopes (α=1)"
NORM_ONE = "norm-matched α=1"
MISMATCH = "Superscopes judged vs a mismatched prompt"
MISMATCH_ONE = "Patchscopes judged vs a mismatched prompt"


def verdict(wins: int, losses: int, p: float, better: str, worse: str, unclear: str) -> str:
    """Plain words for a paired sign test at the 5% level."""
    if wins > losses and p < 0.05:
        return better
    if losses > wins and p < 0.05:
        return worse
    return unclear


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--layers", type=parse_layers, default=None, help="source = target layers (default 1-7; 'all')")
    p.add_argument("--control-layers", default=None,
                   help="layers for the controls: 'same' (= --layers) or a list (default 1,4,7)")  # fmt: skip
    p.add_argument("--sites", default="mlp_out", help="comma list, e.g. mlp_out,resid_post (default mlp_out)")
    p.add_argument("--alphas", type=parse_floats, default=None, help="amplified alphas (default 3,6,9,12,15)")
    p.add_argument("--controls", default=",".join(CONTROLS), help="comma list of sampled,norm,random ('' for none)")
    p.add_argument("--samples", type=int, default=5, help="sampled tries at alpha 1 (control a)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of control a")
    p.add_argument("--limit", type=int, default=None, help="use the first N entities")
    p.add_argument("--prompts-per-call", type=int, default=None,
                   help="source prompts per run() call (default 1 per prompt and condition; --quick: all)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=10)
    return p


def conditions(args, layers, control_layers, alphas, controls, samples) -> dict[str, dict]:
    """Scope settings of each condition (one ``run`` call per source prompt and condition)."""
    out = {"greedy": dict(layers=layers, alphas=[1, *alphas], transforms=["scale"])}
    if "sampled" in controls:
        out["sampled"] = dict(layers=control_layers, alphas=[1], transforms=["scale"], do_sample=True,
                              samples=samples, temperature=args.temperature)  # fmt: skip
    if "norm" in controls:
        out["norm"] = dict(layers=control_layers, alphas=[1, *alphas], transforms=["norm"])
    if "random" in controls:
        out["random"] = dict(layers=control_layers, alphas=list(alphas), transforms=["random"])
    return out


def best_per_key(frame: pd.DataFrame, method: str, score: str = "similarity") -> pd.DataFrame:
    """Best row per (source, site, layer): the method's best similarity and its readout."""
    if frame.empty:
        return pd.DataFrame(columns=[*KEY, "token", "method", "alpha", "similarity", "output"])
    index = frame.groupby(KEY, sort=False)[score].idxmax()
    winners = frame.loc[index.values, [*KEY, "token", "alpha", score, "output"]].rename(columns={score: "similarity"})
    return winners.assign(method=method).reset_index(drop=True)


def experiment(run: Run) -> None:
    args = run.args
    import superscopes
    from superscopes import judge
    from superscopes.sites import num_layers

    entities = pd.read_csv(DATA / "superscopes_entities.csv", keep_default_na=False)
    limit = args.limit or (2 if args.quick else None)
    entities = entities.head(limit) if limit else entities
    prompts = entities["prompt"].tolist()
    sites = [s for s in args.sites.split(",") if s]
    alphas = args.alphas or ([3, 9] if args.quick else ALPHAS)
    samples = 2 if args.quick and args.samples == 5 else args.samples
    controls = [c for c in args.controls.split(",") if c]
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise SystemExit(f"unknown controls {sorted(unknown)}; choose from {', '.join(CONTROLS)}")

    model = run.load_model()
    n_layers = num_layers(model)
    layers = args.layers or ([1, 4] if args.quick else LAYERS)
    layers = list(range(n_layers)) if layers == "all" else layers
    if args.control_layers in (None, ""):
        control_layers = layers if args.quick else [layer for layer in CONTROL_LAYERS if layer in layers] or layers
    elif args.control_layers == "same":
        control_layers = layers
    else:
        control_layers = parse_layers(args.control_layers)
        control_layers = list(range(n_layers)) if control_layers == "all" else control_layers
    grid = conditions(args, layers, control_layers, alphas, controls, samples)

    store = run.store("cells.csv", ["source", "condition"], layers=layers, control_layers=control_layers,
                      alphas=alphas, samples=samples)  # fmt: skip
    scorer = judge.default_judge()
    per_call = args.prompts_per_call or (len(prompts) if args.quick else 1)
    category = dict(zip(entities["prompt"], entities["category"]))
    for condition, settings in grid.items():
        pending = list(run.pending(store, range(len(prompts)), key=lambda i: [prompts[i], condition]))
        for start in range(0, len(pending), per_call):
            chunk = pending[start : start + per_call]
            # Seeded by the first prompt's index: with one prompt per call, a resumed run draws
            # the same samples and random directions as an uninterrupted one.
            seed = args.seed + 1000 * chunk[0]
            scope = superscopes.Scope([prompts[i] for i in chunk], sites=sites, target="entity",
                                      target_layers=["same"], seed=seed, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, **settings)  # fmt: skip
            frame = run.scope(model, scope)
            frame = judge.score(frame, judge=scorer).drop(columns=["output_ids"])
            store.append(frame.assign(condition=condition, category=frame["source"].map(category)))

    expected = len(prompts) * len(sites) * sum(
        len(s["layers"]) * len(s["alphas"]) * s.get("samples", 1) for s in grid.values()
    )
    cells = run.cells(store, expected, unique=["source", "condition", "site", "layer", "alpha", "sample"])

    ev = Evaluation(run, entities, cells, grid, sites, layers, control_layers, alphas, samples, controls, n_layers, scorer)
    score_methods(ev)
    aggregate(ev)
    figure = plot(ev)
    report(ev, figure)


@dataclass
class Evaluation:
    """What scoring, the figure and the summary share; filled in that order."""

    run: Run
    entities: pd.DataFrame
    cells: pd.DataFrame
    grid: dict[str, dict]
    sites: list[str]
    layers: list[int]
    control_layers: list[int]
    alphas: list[float]
    samples: int
    controls: list[str]
    n_layers: int
    scorer: object
    scores: pd.DataFrame | None = None
    per_layer: pd.DataFrame | None = None
    main_totals: pd.DataFrame | None = None
    control_totals: pd.DataFrame | None = None
    single_all: pd.DataFrame | None = None
    on_controls: pd.DataFrame | None = None

    @property
    def prompts(self) -> list[str]:
        return self.entities["prompt"].tolist()

    def names(self) -> tuple[str, str, str, str, str]:
        """alpha text and the alpha-dependent method names: Superscopes, norm best, random best, sampled."""
        alpha_text = ",".join(f"{a:g}" for a in self.alphas)
        return (alpha_text, f"Superscopes (best of α {alpha_text})", f"norm-matched, best of α {alpha_text}",
                f"random direction, best of α {alpha_text}", f"α=1, best of {self.samples} samples")  # fmt: skip


def totals(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.groupby(["label", "method", "site"], sort=False).agg(
        cells=("source", "size"), **{f"successes@{t:g}": (f"success@{t:g}", "sum") for t in THRESHOLDS},
        mean_best_similarity=("similarity", "mean"),
    ).reset_index()  # fmt: skip


def paired(a: str, b: str, site: str, frame: pd.DataFrame, threshold: float = 0.3) -> tuple[int, int, float]:
    """(a wins, b wins, sign-test p) over (prompt, layer) pairs both methods scored."""
    from superscopes.metrics import sign_test

    column = f"success@{threshold:g}"
    left = frame[(frame["method"] == a) & (frame["site"] == site)].set_index(KEY)[column]
    right = frame[(frame["method"] == b) & (frame["site"] == site)].set_index(KEY)[column]
    left, right = left.align(right, join="inner")
    wins, losses = int((left & ~right).sum()), int((~left & right).sum())
    return wins, losses, sign_test(wins, losses)


def score_methods(ev: Evaluation) -> None:
    """Per (prompt, site, layer) and method: the best readout, its echo, entity naming, success per threshold."""
    from superscopes.metrics import echoes, names_entity

    run, cells, grid, alphas, prompts, scorer = ev.run, ev.cells, ev.grid, ev.alphas, ev.prompts, ev.scorer
    _, SUPERSCOPES, NORM_BEST, RANDOM_BEST, sampled_name = ev.names()
    greedy = cells[cells["condition"] == "greedy"]
    amplified = greedy[greedy["alpha"] != 1]
    methods = [best_per_key(greedy[greedy["alpha"] == 1], PATCHSCOPES), best_per_key(amplified, SUPERSCOPES)]
    methods += [best_per_key(greedy[greedy["alpha"] == a], f"single α={a:g}") for a in alphas]
    by_condition = {c: cells[cells["condition"] == c] for c in grid}
    if "sampled" in grid:
        methods.append(best_per_key(by_condition["sampled"], sampled_name))
    if "norm" in grid:
        norm = by_condition["norm"]
        methods += [best_per_key(norm[norm["alpha"] == 1], NORM_ONE), best_per_key(norm[norm["alpha"] != 1], NORM_BEST)]
    if "random" in grid:
        methods.append(best_per_key(by_condition["random"], RANDOM_BEST))
    # (f) the judge's chance rate: each prompt's readouts judged against the prompt half the list away
    # (bands vs films, mostly), selected the same way
    partner = {p: prompts[(i + len(prompts) // 2) % len(prompts)] for i, p in enumerate(prompts)}
    if len(prompts) > 1:
        mismatch = greedy.assign(
            similarity=scorer.similarity(greedy["source"].map(partner).tolist(), greedy["output"].tolist())
        )
        methods.append(best_per_key(mismatch[mismatch["alpha"] == 1], MISMATCH_ONE))
        methods.append(best_per_key(mismatch[mismatch["alpha"] != 1], MISMATCH))
    scores = pd.concat(methods, ignore_index=True)
    scores["echo"] = [echoes(t, o) for t, o in zip(scores["token"], scores["output"])]
    target_text = cells["target"].iloc[0]
    scores["names_entity"] = [
        names_entity(s, t, o, ignore=target_text)
        for s, t, o in zip(scores["source"], scores["token"], scores["output"])
    ]
    for threshold in THRESHOLDS:
        scores[f"success@{threshold:g}"] = scores["similarity"] > threshold
    scores.to_csv(run.out / "successes.csv", index=False)
    ev.scores = scores


def aggregate(ev: Evaluation) -> None:
    """Successes per layer (summary.csv), totals (main, controls, each alpha alone)."""
    run, scores, sites, control_layers = ev.run, ev.scores, ev.sites, ev.control_layers
    SUPERSCOPES = ev.names()[1]

    multi_site = len(sites) > 1
    label = (lambda m, s: f"{m} [{s}]") if multi_site else (lambda m, s: m)
    scores["label"] = [label(m, s) for m, s in zip(scores["method"], scores["site"])]
    per_layer = scores.groupby(["label", "method", "site", "layer"], sort=False).agg(
        prompts=("source", "size"), **{f"successes@{t:g}": (f"success@{t:g}", "sum") for t in THRESHOLDS},
        mean_similarity=("similarity", "mean"),
    ).reset_index()  # fmt: skip
    per_layer.to_csv(run.out / "summary.csv", index=False)

    on_controls = scores[scores["layer"].isin(control_layers)]
    main_totals = totals(scores[scores["method"].isin([PATCHSCOPES, SUPERSCOPES, MISMATCH_ONE, MISMATCH])])
    control_totals = totals(on_controls)
    single_all = totals(scores[scores["method"].str.startswith("single α") | (scores["method"] == PATCHSCOPES)])
    single_all["rate"] = single_all["successes@0.3"] / single_all["cells"]
    single_all["alpha"] = single_all["method"].str.extract(r"α=([\d.]+)")[0]
    ev.per_layer, ev.main_totals, ev.control_totals = per_layer, main_totals, control_totals
    ev.single_all, ev.on_controls = single_all, on_controls


def plot(ev: Evaluation) -> str:
    """Successes per layer against the paper's, the controls, totals at two thresholds, each alpha alone."""
    from superscopes import plots

    run, cells, sites, layers, control_layers = ev.run, ev.cells, ev.sites, ev.layers, ev.control_layers
    per_layer, control_totals, single_all, prompts = ev.per_layer, ev.control_totals, ev.single_all, ev.prompts
    _, SUPERSCOPES, NORM_BEST, RANDOM_BEST, sampled_name = ev.names()
    multi_site = len(sites) > 1
    model_label = cells["model"].iloc[0]
    n = len(prompts)
    fig, axes = plots.figure(4, cols=2, size=(7.0, 5.2))
    main = per_layer[per_layer["method"].isin([PATCHSCOPES, SUPERSCOPES])].copy()
    chance = per_layer[per_layer["method"].isin([MISMATCH_ONE, MISMATCH]) & (per_layer["site"] == sites[0])].copy()
    main["rate"] = main["successes@0.3"] / main["prompts"]
    plots.bars(main, x="layer", y="rate", hue="label", ax=axes[0],
               title=f"Successes per layer (threshold 0.3), {n} prompts; dashed: paper (Llama-2-13b, 48 prompts)",
               xlabel="layer (source = target)", ylabel="successes / prompts")  # fmt: skip
    paper_layers = [layer for layer in layers if 1 <= layer <= 7]
    positions = {layer: i for i, layer in enumerate(sorted(main["layer"].unique()))}
    for values, colour, name in ((PAPER_PATCHSCOPES, "C0", "paper Patchscopes"),
                                 (PAPER_SUPERSCOPES, "C1", "paper Superscopes")):  # fmt: skip
        xs = [positions[layer] for layer in paper_layers if layer in positions]
        ys = [values[layer - 1] / PAPER_PROMPTS for layer in paper_layers if layer in positions]
        axes[0].plot(xs, ys, ls="--", marker="o", color=colour, label=name)
    for (method, frame), colour in zip(chance.groupby("label", sort=False), ("C0", "C1")):
        xs = [positions[layer] for layer in frame["layer"]]
        axes[0].plot(xs, frame["successes@0.3"] / frame["prompts"], ls=":", marker="x", color=colour,
                     label=f"{method} (chance)")  # fmt: skip
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    axes[0].set_ylim(0, 1)

    shown = [PATCHSCOPES, SUPERSCOPES, sampled_name, NORM_ONE, NORM_BEST, RANDOM_BEST, MISMATCH]
    controls_layer = per_layer[per_layer["method"].isin(shown) & per_layer["layer"].isin(control_layers)].copy()
    controls_layer["rate"] = controls_layer["successes@0.3"] / controls_layer["prompts"]
    plots.bars(controls_layer, x="layer", y="rate", hue="label", ax=axes[1],
               title="Controls per layer (threshold 0.3)", xlabel="layer (source = target)",
               ylabel="successes / prompts")  # fmt: skip
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=6)

    tall = control_totals[control_totals["method"].isin(shown)].melt(
        id_vars=["label", "cells"], value_vars=[f"successes@{t:g}" for t in THRESHOLDS], var_name="threshold",
        value_name="successes",
    )  # fmt: skip
    tall["rate"] = tall["successes"] / tall["cells"]
    tall["threshold"] = tall["threshold"].str.replace("successes@", "threshold ")
    plots.bars(tall, x="rate", y="label", hue="threshold", ax=axes[2], annotate=False,
               title=f"Totals on the control layers {control_layers}: thresholds 0.3 and 0.5",
               xlabel="successes / (prompt, layer) cells", ylabel="")  # fmt: skip
    axes[2].set_xlim(0, 1)

    plots.bars(single_all, x="alpha", y="rate", hue="site" if multi_site else None, ax=axes[3],
               title=f"Each alpha alone, one greedy try, layers {layers} (x: paper, 48 prompts x layers 1-7)",
               xlabel="alpha", ylabel="successes / (prompt, layer) cells")  # fmt: skip
    order = list(dict.fromkeys(single_all["alpha"]))
    for alpha, total in {1: sum(PAPER_PATCHSCOPES), **PAPER_SINGLE_ALPHA}.items():
        if f"{alpha:g}" in order:
            axes[3].plot(order.index(f"{alpha:g}"), total / (PAPER_PROMPTS * 7), "kx", ms=9)
    axes[3].set_ylim(0, 1)
    figure = "successes_per_layer.png"
    plots.save(fig, run.out / figure, title=(
        f"{model_label}: Superscopes evaluation, sites {sites}, {n} prompts, last token, target layer = source "
        f"layer, judge all-MiniLM-L6-v2"))  # fmt: skip
    return figure


def report(ev: Evaluation, figure: str) -> None:
    """summary.md: the headline per site, the paired tests behind every control's verdict, the tables."""
    from superscopes.metrics import names_entity

    run, args, cells, grid, sites, layers = ev.run, ev.run.args, ev.cells, ev.grid, ev.sites, ev.layers
    control_layers, alphas, samples, controls, n_layers = ev.control_layers, ev.alphas, ev.samples, ev.controls, ev.n_layers
    scores, per_layer, main_totals, control_totals = ev.scores, ev.per_layer, ev.main_totals, ev.control_totals
    single_all, on_controls, prompts, entities = ev.single_all, ev.on_controls, ev.prompts, ev.entities
    alpha_text, SUPERSCOPES, NORM_BEST, RANDOM_BEST, sampled_name = ev.names()
    model_label, n, multi_site = cells["model"].iloc[0], len(prompts), len(sites) > 1
    greedy, target_text = cells[cells["condition"] == "greedy"], cells["target"].iloc[0]
    findings, verdicts = [], []
    def get(frame: pd.DataFrame, method: str, column: str = "successes@0.3", site: str | None = None) -> int:
        return int(frame[(frame["method"] == method) & (frame["site"] == (site or site0))][column].sum())

    def headline(site: str) -> str:
        cells_ = int(main_totals[(main_totals["method"] == PATCHSCOPES) & (main_totals["site"] == site)]["cells"].sum())
        counts = {
            m: per_layer[(per_layer["method"] == m) & (per_layer["site"] == site)]["successes@0.3"].astype(int).tolist()
            for m in (PATCHSCOPES, SUPERSCOPES)
        }
        return (
            f"{site}, layers {layers}, {n} prompts, threshold 0.3: Patchscopes {counts[PATCHSCOPES]} = "
            f"{get(main_totals, PATCHSCOPES, site=site)}/{cells_}; Superscopes (best of α {alphas}) "
            f"{counts[SUPERSCOPES]} = {get(main_totals, SUPERSCOPES, site=site)}/{cells_}; threshold 0.5: "
            f"{get(main_totals, PATCHSCOPES, 'successes@0.5', site)} vs "
            f"{get(main_totals, SUPERSCOPES, 'successes@0.5', site)}"
            + (f"; chance (the same readouts judged against a mismatched prompt): "
               f"{get(main_totals, MISMATCH_ONE, site=site)} vs {get(main_totals, MISMATCH, site=site)}"
               if len(prompts) > 1 else "")  # fmt: skip
        )

    site0 = sites[0]
    n_main = int(main_totals[(main_totals["method"] == PATCHSCOPES) & (main_totals["site"] == site0)]["cells"].sum())
    ours = " | ".join(headline(site) for site in sites)
    if multi_site:
        findings.append(f"The tests below are for site {site0}; the tables have every site.")
    paper = (
        f"Llama-2-13b-chat, MLP outputs, layers 1-7, 48 prompts: Patchscopes {PAPER_PATCHSCOPES} = "
        f"{sum(PAPER_PATCHSCOPES)}/336; Superscopes {PAPER_SUPERSCOPES} = {sum(PAPER_SUPERSCOPES)}/336; each alpha "
        f"alone {'/'.join(map(str, PAPER_SINGLE_ALPHA.values()))} for α {'/'.join(map(str, PAPER_SINGLE_ALPHA))}; "
        f"threshold 0.5: {PAPER_AT_05[0]} vs {PAPER_AT_05[1]}"
    )

    rows: list[dict] = []  # the paired tests behind every verdict

    def test(name: str, a: str, b: str, frame=None, threshold: float = 0.3, level: float = 0.05) -> tuple:
        w, l_, p = paired(a, b, site0, on_controls if frame is None else frame, threshold)
        outcome = "no significant difference"
        if p < level and w != l_:
            outcome = "A better" if w > l_ else "B better"
        rows.append({"test": name, "A": a, "B": b, "threshold": threshold, "A only": w, "B only": l_, "p": p,
                     "outcome": outcome})  # fmt: skip
        return w, l_, p, outcome == "A better"

    survives: dict[str, bool] = {}
    w, l_, p, main_effect = test("main", SUPERSCOPES, PATCHSCOPES, scores)
    verdicts.append(
        f"Superscopes vs Patchscopes, layers {layers} (paired over (prompt, layer), threshold 0.3): only "
        f"Superscopes succeeds on {w} cells, only Patchscopes on {l_} (sign test p = {p:.3g}): "
        + verdict(w, l_, p, "amplification wins, as in the paper.", "plain Patchscopes wins (paper: the opposite).",
                  "no significant difference.")
    )
    if "sampled" in grid:
        w, l_, p, survives["(a) best-of-k sampling at α=1"] = test("(a)", SUPERSCOPES, sampled_name)
        verdicts.append(
            f"(a) best of {len(alphas)} alphas vs α=1 best of {samples} seeded samples, layers {control_layers}: "
            f"{w} vs {l_} cells (p = {p:.3g}): "
            + verdict(w, l_, p, "the effect SURVIVES the best-of-k control.",
                      "the effect does NOT survive: sampled tries at α=1 do better.",
                      "the effect does NOT survive: no significant difference from sampled tries at α=1.")
        )
    single_rates = {
        row["method"]: (int(row["successes@0.3"]), int(row["cells"]))
        for _, row in single_all[single_all["site"] == site0].iterrows()
    }
    corrected = 0.05 / max(1, len(alphas))
    singles = {a: test("(b)", f"single α={a:g}", PATCHSCOPES, scores, level=corrected) for a in alphas}
    k1, c1 = single_rates.get(PATCHSCOPES, (0, 0))
    parts = [f"α=1 {k1}/{c1}"]
    for a in alphas:
        k, c = single_rates.get(f"single α={a:g}", (0, 0))
        parts.append(f"α={a:g} {k}/{c} (vs α=1: {singles[a][0]} vs {singles[a][1]} cells, p = {singles[a][2]:.3g})")
    winners = [a for a, result in singles.items() if result[3]]
    survives["(b) a single fixed alpha, one try"] = bool(winners)
    verdicts.append(
        f"(b) each alpha alone, one greedy try each, layers {layers}: {', '.join(parts)}. "
        + (f"α {', '.join(f'{a:g}' for a in winners)} beat α=1 on their own (Bonferroni 5%): the effect SURVIVES "
           "without best-of-k selection." if winners else
           "No single alpha beats α=1 significantly (Bonferroni 5%): the effect does NOT survive without best-of-k "
           "selection.")  # fmt: skip
    )
    if "norm" in grid:
        w1, l1, p1, repair_helps = test("(c) norm repair alone", NORM_ONE, PATCHSCOPES)
        w2, l2, p2, beats_repair = test("(c)", SUPERSCOPES, NORM_ONE)
        survives["(c) norm repair (norm-matched α=1 no better than α=1, and below Superscopes)"] = (
            beats_repair and not repair_helps
        )
        w, l_, p, _ = test("(c) same selection", SUPERSCOPES, NORM_BEST)
        verdicts.append(
            f"(c) norm-matched patch, layers {control_layers}: norm-matched α=1 (v rescaled to the norm of the "
            f"vector it replaces, one try) vs plain α=1: {w1} vs {l1} cells (p = {p1:.3g}): "
            + verdict(w1, l1, p1, "restoring a normal residual norm alone helps. ", "norm matching alone hurts. ",
                      "norm matching alone makes no significant difference. ")
            + f"Superscopes vs norm-matched α=1: {w2} vs {l2} (p = {p2:.3g}): "
            + verdict(w2, l2, p2, "amplification does more than repair the norm (SURVIVES). ",
                      "norm repair alone does better (does NOT survive). ",
                      "norm repair alone does as well (does NOT survive). ")
            + f"With the same selection, plain best of α {alpha_text} vs norm-matched best of the same (v at "
            f"alpha times the replaced vector's norm): {w} vs {l_} (p = {p:.3g}): "
            + verdict(w, l_, p, "v's own scale matters.", "norm-relative amplification does better.",
                      "what matters is a large norm plus selection, not v's own scale.")
        )
    if "random" in grid:
        w, l_, p, survives["(d) random direction, same norm"] = test("(d)", SUPERSCOPES, RANDOM_BEST)
        verdicts.append(
            f"(d) a random direction with v's norm, best of the same alphas, layers {control_layers}: only "
            f"Superscopes succeeds on {w} cells, only random on {l_} (p = {p:.3g}): "
            + verdict(w, l_, p, "the readouts depend on the vector's direction: the effect SURVIVES.",
                      "random directions do better: the effect does NOT survive.",
                      "random directions do as well: the effect does NOT survive (the judge rewards something "
                      "other than the source's content).")
        )
    w, l_, p, survives["(e) threshold 0.5"] = test("(e)", SUPERSCOPES, PATCHSCOPES, scores, threshold=0.5)
    verdicts.append(
        f"(e) threshold 0.5: Patchscopes {get(main_totals, PATCHSCOPES, 'successes@0.5')} vs Superscopes "
        f"{get(main_totals, SUPERSCOPES, 'successes@0.5')} of {n_main} (paper: {PAPER_AT_05[0]} vs "
        f"{PAPER_AT_05[1]} of 336); paired {w} vs {l_} (p = {p:.3g}): "
        + verdict(w, l_, p, "SURVIVES.", "reversed.", "does NOT survive.")
    )
    if len(prompts) > 1:
        w, l_, p, survives["(f) judge vs a mismatched prompt"] = test("(f)", SUPERSCOPES, MISMATCH, scores)
        test("(f) alpha 1", PATCHSCOPES, MISMATCH_ONE, scores)
        verdicts.append(
            f"(f) the judge's chance rate: the same readouts judged against a mismatched prompt (half the list "
            f"away), selected the same way, pass 0.3 in {get(main_totals, MISMATCH)}/{n_main} cells for Superscopes' "
            f"best of {len(alphas)} (vs {get(main_totals, SUPERSCOPES)} against the right prompt) and "
            f"{get(main_totals, MISMATCH_ONE)}/{n_main} for Patchscopes (vs {get(main_totals, PATCHSCOPES)}); "
            f"right vs mismatched prompt for Superscopes, paired: {w} vs {l_} cells (p = {p:.3g}): "
            + verdict(w, l_, p, "the judge does tell the right entity apart (SURVIVES).",
                      "mismatched prompts score higher (does NOT survive).",
                      "the judge does NOT tell the right prompt from a mismatched one at this threshold "
                      "(does NOT survive).")
        )
    echo = scores[(scores["site"] == site0) & scores["success@0.3"]].groupby("method", sort=False)["echo"]
    echo = echo.agg(["sum", "size"])
    verdicts.append(
        "(g) token echo: of the successful readouts at 0.3, "
        + "; ".join(f"{m} {int(echo.loc[m, 'sum'])}/{int(echo.loc[m, 'size'])}"
                    for m in (PATCHSCOPES, SUPERSCOPES, RANDOM_BEST) if m in echo.index)  # fmt: skip
        + " merely repeat the source's last token (e.g. 'Peppers' -> '...Peppers...'); the judge, which embeds "
        "the source prompt, rewards such echoes whether or not the entity was described."
    )
    named = scores[(scores["site"] == site0) & scores["success@0.3"]].groupby("method", sort=False)["names_entity"]
    named = named.agg(["sum", "size"])
    greedy_named = greedy[greedy["site"] == site0]
    greedy_named = sum(names_entity(s, t, o, ignore=target_text) for s, t, o in
                       zip(greedy_named["source"], greedy_named["token"], greedy_named["output"]))  # fmt: skip
    verdicts.append(
        "(h) naming the entity: of the successful readouts at 0.3, "
        + "; ".join(f"{m} {int(named.loc[m, 'sum'])}/{int(named.loc[m, 'size'])}"
                    for m in (PATCHSCOPES, SUPERSCOPES) if m in named.index)  # fmt: skip
        + " contain another word of the entity's name (e.g. 'Chili' for 'Peppers'; words of the target prompt "
        "such as 'Leonardo' do not count); over all "
        f"{n_main * (1 + len(alphas))} greedy readouts at any alpha, {greedy_named}."
    )
    kept = [name for name, ok in survives.items() if ok]
    lost = [name for name, ok in survives.items() if not ok]
    findings.append(
        f"Bottom line ({site0}, sign tests at 5%): the main effect (Superscopes > Patchscopes) is "
        + ("significant" if main_effect else "NOT significant")
        + f". Survives: {', '.join(kept) or 'none'}. Does not survive: {', '.join(lost) or 'none'}."
    )
    if survives.get("(d) random direction, same norm") and not survives.get("(f) judge vs a mismatched prompt", True):
        findings.append(
            "Reading (d) and (f) together: amplified real vectors give text the judge scores higher than text from "
            "random directions, but no higher against the right prompt than against a mismatched one, so the "
            "successes are generic entity-like descriptions, not descriptions of this entity."
        )
    tests_table = pd.DataFrame(rows)
    tests_table.to_csv(run.out / "paired_tests.csv", index=False)
    findings += verdicts
    findings.append(
        "All generation is greedy except control (a), which is seeded; the paper's generation was sampled "
        "without a seed."
    )
    write_summary(
        run,
        title=f"Superscopes evaluation on {model_label}",
        ours=ours,
        paper=paper,
        settings={
            "model": f"{model_label} ({n_layers} layers)",
            "data": f"recipes/data/superscopes_entities.csv, {n} prompts "
                    f"({', '.join(f'{k} {v}' for k, v in entities['category'].value_counts().items())}); our own "
                    "list (the paper names only some of its 48)",
            "source": "last token of the prompt",
            "sites": sites,
            "layers (source = target)": f"{layers} (paper: 1-7 of 40; same indices here, not depth-mapped)",
            "control layers": control_layers,
            "alphas": f"α=1 (Patchscopes) vs best of {alphas} (Superscopes)",
            "controls": controls,
            "samples (control a)": f"{samples}, temperature {args.temperature}, seed {args.seed} + 1000 x prompt index",
            "random directions (control d)": f"seed {args.seed} + 1000 x prompt index, one per (prompt, site, layer)",
            "target": "entity-description prompt, residual output of the same layer at 'x' overwritten",
            "generation": f"{args.max_new_tokens} new tokens",
            "judge": "all-MiniLM-L6-v2 cosine(source prompt, readout); success = best > threshold",
            "cells": len(cells),
        },
        findings=findings,
        tables={
            f"Paired sign tests ({site0}; A only / B only = (prompt, layer) cells where only A / only B succeeds)":
                tests_table.assign(p=tests_table["p"].map(lambda v: f"{v:.3g}")),
            "Successes per layer": per_layer.drop(columns=["label"]),
            f"Totals on the control layers {control_layers}": control_totals.drop(columns=["label"]),
            f"Each alpha alone, layers {layers}": single_all.drop(columns=["label", "rate", "alpha"]),
        },
        figures=[figure],
    )


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
