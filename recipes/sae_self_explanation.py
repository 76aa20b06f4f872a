"""Self-explaining SAE latents (Kharlapenko et al., 2024) against their top-activating contexts.

Each chosen latent's decoder direction, scaled to its mean activation when active and times
each alpha, is patched into the entity-description prompt at the SAE's layer
(``sae.latent_scope``); the model's generated text is the latent's self-explanation. Every
cell gets the scale-selection columns of ``sae.explanation_scores`` (self-similarity,
SelfIE relevancy), and per latent the alpha with the highest mean relevancy is its chosen
explanation.

Agreement: the MiniLM judge's similarity between an explanation and the latent's
top-activating contexts (windows of held-out corpus text ending at the token where the
latent is most active), against a shuffled-latent control (the same explanation against
another latent's contexts). Latents are the prompts of the statistics: a paired bootstrap
interval and sign-flip p over latents (``superscopes.metrics.compare``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from superscopes import corpus, metrics
from superscopes import sae as S
from superscopes.judge import default_judge
from superscopes.lens import collect, token_positions

from ._common import Run, parser, recipe_main, write_summary

NAME = "sae_self_explanation"
DESCRIPTION = "Self-explanations of SAE latents vs their top-activating contexts, against a shuffled-latent control"
PAPER = (
    "Kharlapenko et al., 2024 (Gemma-2B, JumpReLU SAEs): self-explanations comparable to Neuronpedia's "
    "GPT-3.5 auto-interp labels; the scale matters and is chosen by self-similarity and entropy"
)
WINDOW = 10  # tokens of context up to and including the most active token


def top_contexts(model, sae: S.SAE, texts: list[str], n_contexts: int, batch_size: int) -> dict[int, list[str]]:
    """Per latent active on at least ``n_contexts`` tokens of ``texts``: the text windows
    ending at its ``n_contexts`` most active tokens (one per passage)."""
    acts = collect(model, texts, sae.site, [sae.layer], "text", batch_size)[sae.layer]
    pairs = token_positions(model.tokenizer, texts, "text")
    best = torch.zeros(len(texts), sae.d_sae)  # per passage, each latent's largest activation ...
    where = torch.zeros(len(texts), sae.d_sae, dtype=torch.long)  # ... and its token
    passage = torch.tensor([p for p, _ in pairs])
    for start in range(0, len(acts), 2048):
        latents = sae.encode(acts[start : start + 2048].float())
        for row, p in enumerate(passage[start : start + 2048].tolist()):
            better = latents[row] > best[p]
            best[p] = torch.where(better, latents[row], best[p])
            where[p] = torch.where(better, pairs[start + row][1], where[p])
    ids = [model.tokenizer(text)["input_ids"] for text in texts]
    contexts = {}
    for latent in ((best > 0).sum(0) >= n_contexts).nonzero()[:, 0].tolist():
        top = best[:, latent].topk(n_contexts).indices.tolist()
        contexts[latent] = [model.tokenizer.decode(ids[p][max(0, int(where[p, latent]) - WINDOW + 1) : int(where[p, latent]) + 1])
                            for p in top]  # fmt: skip
    return contexts


def build_parser():
    p = parser(NAME, DESCRIPTION)
    p.add_argument("--sae", help="SAE folder (default: the model's embedded SAE)")
    p.add_argument("--latents", type=int, default=200, help="latents explained (sampled among those with contexts)")
    p.add_argument("--alphas", default="1,2,4,8", help="multiples of each latent's mean activation")
    p.add_argument("--texts", type=int, default=1000, help="held-out corpus passages scanned for contexts")
    p.add_argument("--contexts", type=int, default=5, help="top-activating contexts per latent")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--corpus", help="built corpus folder (default: $SUPERSCOPES_CACHE/corpus)")
    return p


def experiment(run: Run) -> None:
    args = run.args
    if args.quick:
        args.latents, args.alphas, args.texts, args.contexts, args.max_new_tokens = 6, "1,4", 24, 2, 8
    model = run.load_model()
    sae = S.load(args.sae or args.model, model=model)
    texts = corpus.load("heldout", args.corpus, fallback=args.quick)[: args.texts]

    contexts = top_contexts(model, sae, texts, args.contexts, args.batch_size)
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(sorted(contexts), size=min(args.latents, len(contexts)), replace=False).tolist())
    if len(chosen) < 2:
        raise SystemExit(f"only {len(chosen)} latent(s) have {args.contexts} contexts in {len(texts)} passages: scan more --texts")
    alphas = [float(a) for a in args.alphas.split(",")]
    scope = S.latent_scope(sae, chosen, model=model, alphas=alphas, target="entity", max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size)  # fmt: skip
    cells = S.explanation_scores(model, scope, run.scope(model, scope))
    cells["latent"] = [int(name.split()[-1]) for name in cells["source"]]
    # Shuffled-latent control: each latent's contexts go to the next latent in a seeded cycle.
    order = rng.permutation(len(chosen))
    other = {chosen[order[i]]: chosen[order[(i + 1) % len(chosen)]] for i in range(len(chosen))}
    judge = default_judge()

    def agreement(explanation: str, latent: int) -> float:
        return float(np.mean(judge.similarity(contexts[latent], [explanation] * len(contexts[latent]))))

    cells["agreement"] = [agreement(o, latent) for o, latent in zip(cells["output"], cells["latent"])]
    cells["control"] = [agreement(o, other[latent]) for o, latent in zip(cells["output"], cells["latent"])]
    cells["contexts"] = [" | ".join(contexts[latent]) for latent in cells["latent"]]
    columns = ["latent", "alpha", "output", "self_similarity", "relevancy_mean", "agreement", "control", "contexts"]
    cells[columns].to_csv(run.out / "cells.csv", index=False)

    picked = cells.loc[cells.groupby("latent")["relevancy_mean"].idxmax()]
    chosen_stats = metrics.compare(picked["agreement"], picked["control"], seed=args.seed)
    per_alpha = pd.DataFrame([{"alpha": alpha, **metrics.compare(g["agreement"], g["control"], seed=args.seed),
                               "self_similarity": g["self_similarity"].mean(), "relevancy_mean": g["relevancy_mean"].mean()}
                              for alpha, g in cells.groupby("alpha")])  # fmt: skip
    per_alpha.to_csv(run.out / "per_alpha.csv", index=False)
    verdict = "above" if chosen_stats["ci_low"] > 0 else "not distinguishable from"
    ours = (f"{len(chosen)} latents, alpha chosen by relevancy: agreement with own contexts {chosen_stats['mean_a']:.3f} vs "
            f"shuffled {chosen_stats['mean_b']:.3f} (difference {chosen_stats['difference']:+.3f}, 95% CI "
            f"[{chosen_stats['ci_low']:+.3f}, {chosen_stats['ci_high']:+.3f}], p={chosen_stats['p']:.3g})")  # fmt: skip
    findings = [
        f"Self-explanations are {verdict} the shuffled-latent control (intervals over latents).",
        "What they capture is topical or lexical overlap with the contexts (MiniLM similarity); they do not "
        "capture the position-specific or single-token role a latent plays (the windows end at the token, the "
        "explanation never sees it), and a judge similarity near the control means the text is generic.",
        "Mean self-similarity by alpha: "
        + ", ".join(f"{a:g}: {v:.2f}" for a, v in zip(per_alpha["alpha"], per_alpha["self_similarity"]))
        + "; relevancy picks, per latent, the alpha whose text depends most on the latent.",
    ]  # fmt: skip
    write_summary(run, "Self-explaining SAE latents", ours, PAPER,
                  {"model": args.model, "sae": repr(sae), "alphas": alphas, "passages scanned": len(texts),
                   "contexts per latent": args.contexts, "max_new_tokens": args.max_new_tokens},
                  findings, {"Agreement by alpha (all latents)": per_alpha.round(4),
                             "Examples": picked[["latent", "alpha", "output", "agreement", "control"]].head(10)})  # fmt: skip
    print((run.out / "summary.md").read_text())


main = recipe_main(NAME, build_parser, experiment)

if __name__ == "__main__":
    main()
