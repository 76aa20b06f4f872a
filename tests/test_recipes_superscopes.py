"""The Superscopes recipes' --quick runs (outputs' schema and sanity, resume without duplicates),
plus the text metrics and plot helpers they use."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch

import superscopes
from superscopes import metrics, plots

RUN_COLUMNS = ["model", "source", "token", "site", "layer", "target_layer", "transform", "alpha", "output"]


@pytest.fixture
def shared_model(smollm2, monkeypatch):
    """Recipes call ``superscopes.load``; hand them the session's SmolLM2 instead of reloading it.

    One torch thread while a recipe runs: its batches are tiny, and on a busy 2-core machine two
    OpenMP threads spin against each other (measured: the four quick runs take 45 s on one thread
    and 220 s on two under a load of 4)."""
    monkeypatch.setattr(superscopes, "load", lambda name=None, remote=False, **kw: smollm2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield smollm2
    torch.set_num_threads(threads)


def run_recipe(name: str, out, *extra: str) -> None:
    importlib.import_module(f"recipes.{name}").main(["--quick", "--out", str(out), *extra])


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


def check_common(out, figures: list[str]) -> pd.DataFrame:
    for name in ["cells.csv", "summary.csv", "summary.md", *figures]:
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    text = (out / "summary.md").read_text()
    assert "**Ours:**" in text and "**Paper:**" in text and "Command: `python -m recipes." in text
    for figure in figures:
        assert f"]({figure})" in text
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = read(out / "cells.csv")
    assert set(RUN_COLUMNS + ["similarity"]) <= set(cells.columns)
    assert cells["similarity"].between(-1, 1).all()
    assert (cells["model"] == "smollm2-135m").all()
    return cells


def grid_size(cells: pd.DataFrame, columns: list[str]) -> int:
    size = 1
    for column in columns:
        size *= cells[column].nunique()
    return size


def test_superscopes_mlp_outputs_quick(shared_model, tmp_path):
    out = tmp_path / "mlp"
    run_recipe("superscopes_mlp_outputs", out)
    cells = check_common(out, ["similarity_heatmap.png"])
    key = ["source", "site", "layer", "alpha"]
    assert set(cells["site"]) == {"mlp_in", "mlp_out", "resid_post"}
    assert (cells["target_layer"] == cells["layer"]).all()  # target layer = source layer
    assert len(cells) == grid_size(cells, key) and not cells.duplicated(key).any()
    assert set(cells["token"].str.strip()) == {"Wales"}
    summary = read(out / "summary.csv")
    assert len(summary) == grid_size(cells, ["source", "site", "layer"])
    assert {"best_alpha", "best_similarity", "alpha1_similarity", "best_amplified_similarity"} <= set(summary.columns)
    assert summary["best_alpha"].isin(cells["alpha"]).all()
    table = read(out / "table.csv")
    assert len(table) == len(summary) and table.filter(like="alpha=").apply(lambda c: c.str.startswith("★")).sum(
        axis=1
    ).eq(1).all()  # exactly one best alpha starred per (layer, site)

    run_recipe("superscopes_mlp_outputs", out)  # resume: everything is done, nothing is added
    assert len(read(out / "cells.csv")) == len(cells)


def test_superscopes_hidden_states_quick(shared_model, tmp_path):
    out = tmp_path / "hidden"
    run_recipe("superscopes_hidden_states", out)
    cells = check_common(out, ["similarity_per_alpha.png"])
    assert set(cells["site"]) == {"resid_post"} and set(cells["target_layer"]) == {0}
    per_source = cells.groupby("source")[["layer", "alpha"]].nunique().prod(axis=1)
    assert len(cells) == per_source.sum() and not cells.duplicated(["source", "layer", "alpha"]).any()
    summary = read(out / "summary.csv")
    assert len(summary) == len(cells.drop_duplicates(["source", "layer"]))
    assert {"alpha1_similarity", "paper_range_alpha", "amplified_alpha"} <= set(summary.columns)

    run_recipe("superscopes_hidden_states", out)
    assert len(read(out / "cells.csv")) == len(cells)


def test_superscopes_evaluation_quick_and_resume(shared_model, tmp_path):
    out = tmp_path / "evaluation"
    run_recipe("superscopes_evaluation", out)
    cells = check_common(out, ["successes_per_layer.png"])
    assert set(cells["condition"]) == {"greedy", "sampled", "norm", "random"}
    key = ["source", "condition", "site", "layer", "alpha", "sample"]
    assert not cells.duplicated(key).any()
    for condition, frame in cells.groupby("condition"):
        assert len(frame) == grid_size(frame, ["source", "site", "layer", "alpha", "sample"]), condition
    assert set(cells[cells["condition"] == "greedy"]["alpha"]) >= {1.0}
    assert set(cells[cells["condition"] == "norm"]["transform"]) == {"norm"}
    assert set(cells[cells["condition"] == "random"]["transform"]) == {"random"}
    assert cells[cells["condition"] == "sampled"]["sample"].nunique() > 1
    successes = read(out / "successes.csv")
    assert {"method", "similarity", "success@0.3", "success@0.5"} <= set(successes.columns)
    # a stricter threshold never passes more cells
    assert (successes["success@0.5"].astype(bool) <= successes["success@0.3"].astype(bool)).all()
    n_keys = len(cells.drop_duplicates(["source", "site", "layer"]))
    assert (successes.groupby("method").size() == n_keys).all()
    summary = read(out / "summary.csv")
    assert summary["successes@0.3"].le(summary["prompts"]).all()
    text = (out / "summary.md").read_text()
    for control in ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]:
        assert control in text

    # Interrupted run: drop the last unit's rows, rerun, and every row is there exactly once.
    last = cells.iloc[-1][["source", "condition"]]
    partial = cells[~((cells["source"] == last["source"]) & (cells["condition"] == last["condition"]))]
    partial.to_csv(out / "cells.csv", index=False)
    run_recipe("superscopes_evaluation", out)
    again = read(out / "cells.csv")
    assert len(again) == len(cells) and not again.duplicated(key).any()


def test_entity_description_quick(shared_model, tmp_path):
    out = tmp_path / "entity"
    run_recipe("entity_description", out)
    cells = check_common(out, ["rougeL_per_layer.png"])
    key = ["source", "layer", "alpha"]
    assert len(cells) == grid_size(cells, key) and not cells.duplicated(key).any()
    assert (cells["target_layer"] == cells["layer"]).all() and "reference" in cells.columns
    scores = read(out / "scores.csv")
    assert scores["rougeL"].between(0, 1).all() and scores["rougeL_raw"].between(0, 1).all()
    methods = set(scores["method"])
    assert {"Patchscopes (α=1)", "amplified, best α by judge"} <= methods
    oracle = scores[scores["method"].str.contains("oracle")].set_index(["source", "layer"])["rougeL"]
    judged = scores[scores["method"] == "amplified, best α by judge"].set_index(["source", "layer"])["rougeL"]
    assert (oracle >= judged - 1e-12).all()  # the oracle is an upper bound of any amplified pick
    summary = read(out / "summary.csv")
    assert summary["entities"].eq(cells["source"].nunique()).all()

    run_recipe("entity_description", out)
    assert len(read(out / "cells.csv")) == len(cells)


# ---------------------------------------------------------------- metrics and plots


def test_rouge_l_is_the_lcs_f_measure_on_lowercased_words():
    assert metrics.words("Hello, World! it's 2024") == ["hello", "world", "it", "s", "2024"]
    assert metrics.lcs_length("a b c d".split(), "a c d b".split()) == 3
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 5/5
    assert metrics.rouge_l("The cat sat on the mat", "the cat on the mat") == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    assert metrics.rouge_l("American actor", "american ACTOR.") == 1.0
    assert metrics.rouge_l("", "anything") == 0.0 and metrics.rouge_l("x y", "z") == 0.0


def test_first_item_and_sign_test():
    assert metrics.first_item(": Italian artist, Alibaba: Chinese") == "Italian artist"
    assert metrics.first_item(", Leonardo DiCaprio, Leonardo") == "Leonardo DiCaprio"
    assert metrics.first_item("\n\nBritish band\nmore") == "British band"
    assert metrics.sign_test(0, 0) == 1.0 and metrics.sign_test(3, 3) == 1.0
    assert metrics.sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert metrics.sign_test(2, 8) == metrics.sign_test(8, 2)


def test_echo_and_entity_naming_checks():
    assert metrics.echoes(" Great", "-great-great-great") and not metrics.echoes(" of", "of course")
    assert not metrics.echoes("ppers", "American band")
    target = "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, x"
    assert metrics.names_entity("Diana, Princess of Wales", " Wales", ": Princess Diana of Wales")
    assert not metrics.names_entity("Diana, Princess of Wales", " Wales", ": Country in Wales, England")
    assert not metrics.names_entity("Red Hot Chili Peppers", "ppers", "Peppers: a spice")  # the token's own word
    assert metrics.names_entity("Red Hot Chili Peppers", "ppers", "a chili sauce")
    assert not metrics.names_entity("Leonardo da Vinci", "ci", ", Leonardo DiCaprio,", ignore=target)


def test_plot_helpers_write_pngs(tmp_path):
    frame = pd.DataFrame({"layer": [1, 2, 1, 2], "score": [0.1, 0.4, 0.3, 0.2], "method": ["a", "a", "b", "b"]})
    fig, axes = plots.figure(3, cols=2)
    plots.lines(frame, x="layer", y="score", hue="method", ax=axes[0], title="lines", legend_out=True)
    plots.bars(frame, x="layer", y="score", hue="method", ax=axes[1], title="bars", annotate=True)
    plots.heatmap(frame.pivot(index="method", columns="layer", values="score"), title="heat", ax=axes[2], label="s")
    assert axes[0].get_xlabel() == "layer" and axes[1].get_ylabel() == "score"
    path = plots.save(fig, tmp_path / "sub" / "fig.png", title="a long overall title " * 10)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert plots.save(plots.lines(frame, x="layer", y="score"), tmp_path / "one.png").exists()
