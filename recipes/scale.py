"""The papers' headlines across model scale: one table from the committed full runs of each model.

Reads each recipe's committed outputs for SmolLM2-135M (``results/<recipe>``) and the other
embedded models (``results/<model>/<recipe>``, written by ``python -m recipes.<recipe> --model
<model> --out results/<model>/<recipe>``) and writes ``docs/scale.md``. It runs no model: every
number is read from a run's own files, each with its interval over prompts, and a run that is not
committed (or not finished) is shown as missing, never filled in. The rows:

- judge: MiniLM similarity of the evaluation's greedy readouts to their own prompt minus a
  mismatched prompt (``judge_discrimination.csv``), and the own prompt's rank among the 48;
- Superscopes vs Patchscopes at equal tries (alpha cross-fitted), vs chance under the same
  selection, and vs the norm-matched patch, which tells amplification from norm repair
  (``comparisons.csv`` of ``superscopes_evaluation``);
- best of 5 alphas vs one try, reported last: it has five tries to Patchscopes' one;
- token identity: the Patchscope's precision@1 at two thirds of the depth (``summary.csv``);
- entity description: mean RougeL of the alpha = 1 readouts per entity (``scores.csv``);
- attribute extraction: the Patchscope's accuracy on the rows the model knows (``per_row.csv``).

A second table gives each committed run's wall time, from its ``timings.csv`` (the seconds of
the invocations that added results, with their thread count); a run made before that log
says ``not logged``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from superscopes.metrics import bootstrap_ci
from superscopes.parsing import CommandParser

MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270m", "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B"}
DEFAULT_MODEL = "smollm2-135m"  # its runs sit at results/<recipe>, the others' at results/<model>/<recipe>


def run_dir(results: Path, model: str, recipe: str) -> Path:
    return results / recipe if model == DEFAULT_MODEL else results / model / recipe


def _interval(mean: float, low: float, high: float, digits: int = 3, sign: str = "") -> str:
    return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def _comparison(name: str) -> Callable[[Path], str]:
    def read(folder: Path) -> str:
        rows = pd.read_csv(folder / "comparisons.csv").set_index("comparison")
        row = rows.loc[name]
        # A claim needs both: the interval clear of 0 and the (Holm-adjusted, in a family) paired test.
        clear = not row["ci_low"] <= 0 <= row["ci_high"] and row["p_holm"] < 0.05
        verdict = (" (above)" if row["difference"] > 0 else " (below)") if clear else ""
        p_text = f"Holm p = {row['p_holm']:.2g}" if row["p_holm"] != row["p"] else f"p = {row['p']:.2g}"
        return (
            f"{row['mean_a']:.3f} vs {row['mean_b']:.3f}: "
            + _interval(row["difference"], row["ci_low"], row["ci_high"], sign="+")
            + f", {p_text}{verdict}"
        )

    return read


def judge_separation(folder: Path) -> str:
    d = pd.read_csv(folder / "judge_discrimination.csv").iloc[0]
    return (
        f"{d['mean_a']:.3f} vs {d['mean_b']:.3f}: {_interval(d['difference'], d['ci_low'], d['ci_high'], sign='+')}"
        f" (single draws {d['draw_low']:+.3f} to {d['draw_high']:+.3f})"
        f"; rank {d['mean_rank']:.1f} [{d['rank_ci_low']:.1f}, {d['rank_ci_high']:.1f}] of {int(d['n_candidates'])}"
        f" (chance {d['chance_rank']:.1f})"
    )


def token_identity(folder: Path) -> str:
    summary = pd.read_csv(folder / "summary.csv")
    patch = summary[summary["method"] == "patchscope"].set_index("layer")
    layer = round(2 / 3 * patch.index.max())
    row = patch.loc[layer]
    return f"layer {layer} of {patch.index.max() + 1}: " + _interval(
        row["precision_at_1"], row["ci_low"], row["ci_high"], 2
    )


def entity_rouge(folder: Path) -> str:
    scores = pd.read_csv(folder / "scores.csv")
    per_entity = scores[scores["method"] == "Patchscopes (α=1)"].groupby("source")["rougeL"].mean()
    return _interval(per_entity.mean(), *bootstrap_ci(per_entity.to_numpy())) + f" ({len(per_entity)} entities)"


def attribute_accuracy(folder: Path) -> str:
    rows = pd.read_csv(folder / "per_row.csv")
    values = rows["Patchscopes (any l*, mean over l)"].dropna()
    return _interval(values.mean(), *bootstrap_ci(values.to_numpy())) + f" ({len(values)} known rows)"


ROWS: dict[str, tuple[str, str, Callable[[Path], str]]] = {
    "judge: own vs mismatched prompt (mean of 3 draws; difference), own prompt's rank": (
        "superscopes_evaluation",
        "judge_discrimination.csv",
        judge_separation,
    ),
    "Superscopes vs Patchscopes at equal tries (cross-fitted α), per-prompt success": (
        "superscopes_evaluation",
        "comparisons.csv",
        _comparison("Superscopes (cross-fitted) vs Patchscopes"),
    ),
    "Superscopes (cross-fitted α) vs chance under the same selection": (
        "superscopes_evaluation",
        "comparisons.csv",
        _comparison("cross-fitted vs chance"),
    ),
    "Superscopes (cross-fitted α) vs the norm-matched patch (v rescaled to the replaced vector's norm)": (
        "superscopes_evaluation",
        "comparisons.csv",
        _comparison("cross-fitted vs norm-matched"),
    ),
    "best of 5 α vs one try (inflated by the selection)": (
        "superscopes_evaluation",
        "comparisons.csv",
        _comparison("Superscopes (best-of-K) vs Patchscopes"),
    ),
    "token identity: Patchscope precision@1 at 2/3 depth": ("token_identity", "summary.csv", token_identity),
    "entity description: RougeL of α=1 readouts": ("entity_description", "scores.csv", entity_rouge),
    "attribute extraction: Patchscope accuracy (any l*, mean over l)": (
        "attribute_extraction",
        "per_row.csv",
        attribute_accuracy,
    ),
}


def scale_table(results: Path, models: dict[str, str] = MODELS) -> pd.DataFrame:
    """One row per headline, one column per model: the run's number with its 95% interval over
    prompts, or ``not run`` where that model's run of the recipe is not committed."""
    table = {}
    for label, (recipe, needed, read) in ROWS.items():
        cells = {}
        for model, name in models.items():
            folder = run_dir(results, model, recipe)
            cells[name] = read(folder) if (folder / needed).is_file() else "not run"
        table[label] = cells
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("headline (95% CI over prompts)")


RECIPES = (
    "superscopes_evaluation",
    "superscopes_mlp_outputs",
    "superscopes_hidden_states",
    "token_identity",
    "entity_description",
    "attribute_extraction",
    "multihop",
    "verbalization_controls",
    "cross_model",
    "inverse_scope",
    "sae_self_explanation",
)


def wall_time(folder: Path) -> str:
    """A run's logged wall time: minutes over the invocations that added results, and their threads."""
    if not (folder / "cells.csv").is_file() and not (folder / "summary.md").is_file():
        return "not run"
    if not (folder / "timings.csv").is_file():
        return "not logged"
    log = pd.read_csv(folder / "timings.csv").rename(columns={"cells_added": "added"})
    made = log[log["added"] > 0]
    if made.empty:
        return "not logged"
    threads = sorted({int(t) for t in made["threads"].dropna()}) if "threads" in made else []
    on = f", {'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''}" if threads else ""
    return f"{made['seconds'].sum() / 60:.1f} min{on}"


def timing_table(results: Path, models: dict[str, str] = MODELS) -> pd.DataFrame:
    """One row per recipe, one column per model: the committed run's wall time."""
    table = {
        recipe: {name: wall_time(run_dir(results, model, recipe)) for model, name in models.items()}
        for recipe in RECIPES
    }
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("recipe: full-run wall time")


def write(results: Path, out: Path) -> Path:
    from ._common import markdown_table

    table = scale_table(results).reset_index()
    sources = "; ".join(f"{name}: `{run_dir(Path('results'), model, '<recipe>')}`" for model, name in MODELS.items())
    text = "\n".join(
        [
            "# The papers' headlines across scale",
            "",
            "Generated by `python -m recipes.scale` from the committed full runs (" + sources + "). Each cell is "
            "that run's own number with its 95% bootstrap interval over prompts (entities, positions or rows); "
            "`not run` marks a run not committed yet. A difference is marked above or below only where its interval "
            "excludes 0 and its paired sign-flip p (Holm-adjusted within the run's family of controls) is below 0.05.",
            "",
            markdown_table(table),
            "",
            "## Wall time of the full runs",
            "",
            "From each run's `timings.csv`: the minutes of the invocations that added results, on this 2-core CPU, "
            "and their torch threads (runs shared the machine with other jobs, so these are upper bounds). Runs made "
            "before the log existed say `not logged`; [recipes.md](recipes.md) gives the 1.5B ones' wall time as "
            "measured outside the log.",
            "",
            markdown_table(timing_table(results).reset_index()),
            "",
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m recipes.scale", description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="folder of the committed runs (default results)")
    p.add_argument("--out", default="docs/scale.md", help="the table's file (default docs/scale.md)")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    path = write(Path(args.results), Path(args.out))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
