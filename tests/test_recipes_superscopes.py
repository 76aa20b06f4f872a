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
    assert "**Ours:**" in text and "**Paper:**" in text and "Command: `python -m superscopes.recipes." in text
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
    assert set(cells["token"].str.strip()) == {"Wales"} and set(cells["condition"]) == {"plain", "amplified"}
    plain, amplified = cells[cells["condition"] == "plain"], cells[cells["condition"] == "amplified"]
    assert set(plain["site"]) == {"mlp_in", "mlp_out", "resid_post"} and set(plain["target_layer"]) == {0}
    assert set(plain["alpha"]) == {1.0} and set(amplified["site"]) == {"mlp_out"} and 1.0 not in set(amplified["alpha"])
    assert (amplified["target_layer"] == amplified["layer"]).all()  # "Wales": written at the same layer
    assert not cells.duplicated(["condition", "site", "layer", "alpha"]).any()
    summary = read(out / "summary.csv")
    assert summary["readouts"].sum() == len(cells)
    assert {"name_the_entity", "echoes", "judge_above_threshold"} <= set(summary.columns)
    assert "name the entity" in (out / "summary.md").read_text().split("**Paper:**")[0]  # the headline counts texts
    assert len(read(out / "table.csv")) == len(cells.drop_duplicates(["condition", "site", "layer"]))

    run_recipe("superscopes_mlp_outputs", out)  # resume: everything is done, nothing is added
    assert len(read(out / "cells.csv")) == len(cells)


def test_superscopes_hidden_states_quick(shared_model, tmp_path):
    out = tmp_path / "hidden"
    run_recipe("superscopes_hidden_states", out)
    cells = check_common(out, ["similarity_heatmap.png"])
    assert set(cells["site"]) == {"resid_post"} and set(cells["target_layer"]) == {0}
    assert (
        set(cells["source"]) == {"Alexander the Great"} and not cells.duplicated(["condition", "layer", "alpha"]).any()
    )
    assert set(cells[cells["condition"] == "amplified"]["alpha"]) == {2.0, 3.0}  # the notebook's range(2, 7), quick
    run_recipe("superscopes_hidden_states", out)
    assert len(read(out / "cells.csv")) == len(cells)


def test_superscopes_evaluation_quick_and_resume(shared_model, tmp_path):
    from recipes import superscopes_evaluation as evaluation

    out = tmp_path / "evaluation"
    run_recipe("superscopes_evaluation", out)
    cells = check_common(out, ["successes_per_layer.png"])
    assert set(cells["condition"]) == {"greedy", "norm", "random0", "random1", "random2"}
    key = ["source", "condition", "site", "layer", "alpha"]
    assert not cells.duplicated(key).any() and cells["source"].tolist()[0] == "Pink Floyd"
    assert set(cells[cells["condition"] == "norm"]["transform"]) == {"norm"}
    assert set(cells[cells["condition"] == "random0"]["transform"]) == {"random"}
    assert 1.0 not in set(cells[cells["condition"] == "random0"]["alpha"])
    tests = read(out / "comparisons.csv")
    assert tests["comparison"].tolist() == list(evaluation.PAIRS)
    assert (tests["p_holm"] >= tests["p"] - 1e-12).all() and (tests["ci_low"] <= tests["difference"] + 1e-12).all()
    per_prompt = read(out / "per_prompt.csv")
    assert (
        len(per_prompt) == cells["source"].nunique() and per_prompt.drop(columns="source").stack().between(0, 1).all()
    )
    # Chance: three mismatched-prompt draws (seeds 0, 1, 2), the control their mean, each draw reported.
    draws = [f"{evaluation.CHANCE_BEST} (seed {s})" for s in (0, 1, 2)]
    assert (per_prompt[evaluation.CHANCE_BEST] == per_prompt[draws].astype(float).mean(axis=1)).all()
    assert "Chance, per mismatched-prompt draw (seeds [0, 1, 2])" in (out / "summary.md").read_text()
    headline = (out / "summary.md").read_text().split("**Paper:**")[0]
    assert "95% CI" in headline  # the headline is the interval
    # Equal tries first, best-of-K after; the judge's discrimination beside them.
    assert headline.index("at equal tries") < headline.index("against chance") < headline.index("Best of K=2")
    assert "the true prompt ranks" in headline
    discrimination = read(out / "judge_discrimination.csv").iloc[0]
    assert discrimination["n_candidates"] == 3 and 1 <= discrimination["mean_rank"] <= 3
    assert discrimination["n_readouts"] == (cells["condition"] == "greedy").sum()

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
    scores = pd.read_csv(out / "scores.csv")  # cross-fitted rows have no single readout: NaN where it has none
    assert scores["rougeL"].between(0, 1).all() and scores["rougeL_raw"].dropna().between(0, 1).all()
    assert {"Patchscopes (α=1)", "amplified, α by judge", "amplified, cross-fitted α"} <= set(scores["method"])
    by_method = {m: f.set_index(["source", "layer"])["rougeL"] for m, f in scores.groupby("method")}
    oracle = by_method["amplified, α by RougeL (oracle)"]
    for method in ("amplified, α by judge", "amplified, cross-fitted α"):  # the oracle bounds any amplified pick
        assert (oracle >= by_method[method].reindex(oracle.index) - 1e-12).all()
    tests = read(out / "comparisons.csv")
    assert "amplified, α by judge vs α=1" in set(tests["comparison"]) and (tests["p_holm"] >= tests["p"] - 1e-12).all()
    summary = read(out / "summary.csv")
    assert summary["entities"].eq(cells["source"].nunique()).all()

    run_recipe("entity_description", out)
    assert len(read(out / "cells.csv")) == len(cells)


# ---------------------------------------------------------------- the notebooks' protocols and the echo rule

# code/superscopes_mlp_outputs_full_evaluation.ipynb, ``test_pairs`` (GalNivs/Superscopes)
NOTEBOOK_48 = (
    "Pink Floyd; Led Zeppelin; Arctic Monkeys; Daft Punk; Iron Maiden; Green Day; Pearl Jam; Maroon 5; Joy Division; "
    "Deep Purple; Depeche Mode; Black Sabbath; Judas Priest; Arcade Fire; Tame Impala; Pulp Fiction; Fight Club; "
    "Top Gun; King Kong; Mad Max; Die Hard; Mean Girls; Home Alone; Dirty Dancing; Black Panther; Kill Bill; "
    "Forrest Gump; Finding Nemo; Independence Day; Pitch Perfect; Shutter Island; The Shining; Reservoir Dogs; "
    "Star Wars; Baby Driver; American Psycho; Pretty Woman; Fatal Attraction; Black Swan; Taxi Driver; Diana, "
    "Princess of Wales; Back to the Future; Alexander the Great; Saturday Night Live; Red Hot Chili Peppers; "
    "Will Smith; Titanic; George Washington"
)


def test_evaluation_follows_the_notebook(smollm2):
    from recipes import superscopes_evaluation as evaluation
    from superscopes.prompts import tokens

    assert evaluation.NOTEBOOK_PROMPTS == NOTEBOOK_48.split("; ") and len(evaluation.NOTEBOOK_PROMPTS) == 48
    assert evaluation.ALPHAS == [3, 6, 9, 12, 15] and evaluation.LAYERS == list(
        range(1, 8)
    )  # range(3, 18, 3), range(1, 8)
    grid = evaluation.conditions(evaluation.ALPHAS, 3)
    assert grid["greedy"]["alphas"] == [1, 3, 6, 9, 12, 15] and grid["norm"]["alphas"] == [1]
    assert [grid[f"random{s}"]["seed"] for s in range(3)] == [0, 1, 2] and 1 not in grid["random0"]["alphas"]
    for (
        prompt
    ) in evaluation.NOTEBOOK_PROMPTS:  # find_token_id's first occurrence of the last token is the last position
        pieces = tokens(smollm2.tokenizer, prompt)
        assert pieces.index(pieces[-1]) == len(pieces) - 1, prompt


def test_examples_follow_the_notebooks():
    from recipes.superscopes_hidden_states import READOUTS as HIDDEN
    from recipes.superscopes_mlp_outputs import READOUTS as MLP

    amplified = {r.token: r for r in MLP if r.condition == "amplified"}
    assert amplified["Live"].target_layer == 0 and amplified["Live"].layers == (2, 3, 4)  # tl 0, as the authors ran it
    assert amplified["Wales"].target_layer == amplified["Future"].target_layer == "same"
    assert all(r.alphas == (3, 6, 9, 12, 15) and r.sites == ("mlp_out",) for r in amplified.values())
    assert all(r.target_layer == 0 and r.alphas == (1,) for r in MLP if r.condition == "plain")
    assert {r.token: r.layers for r in MLP if r.condition == "plain"} == {
        "Wales": (1, 2, 3, 4),
        "Future": (1, 2, 3),
        "Live": (2, 3, 4),
    }
    assert all(r.target_layer == 0 for r in HIDDEN)
    hidden = {r.token: (r.layers, r.alphas) for r in HIDDEN if r.condition == "amplified"}
    assert hidden == {
        "Great": ((4, 5), (2, 3, 4, 5, 6)),
        "ppers": ((3,), (1.3, 1.5, 1.7, 1.9)),
        "Machine": ((7, 8, 9), tuple(range(3, 24, 3))),
    }


TARGET = "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean multinational major appliance and consumer electronics corporation, x"


def evaluation_cells(rows) -> pd.DataFrame:
    """Constructed judged cells: (source, layer, alpha, similarity, output); token "Floyd", greedy."""
    frame = pd.DataFrame(rows, columns=["source", "layer", "alpha", "similarity", "output"])
    return frame.assign(condition="greedy", token="Floyd", target=TARGET, **{"mismatch_similarity (seed 0)": 0.0})


def test_evaluation_never_counts_an_echo_or_alpha_1_as_superscopes():
    from recipes import superscopes_evaluation as evaluation

    cells = evaluation_cells(
        [
            ("Pink Floyd", 1, 1.0, 0.9, ": British rock band"),  # alpha 1 succeeds: Patchscopes only
            ("Pink Floyd", 1, 3.0, 0.8, " Leonardo DiCaprio: American actor"),  # echo of the few-shot example
            ("Pink Floyd", 1, 6.0, 0.7, " Floyd Floyd Floyd"),  # echo of the source token
            ("Deep Purple", 1, 1.0, 0.1, ": colour"),
            ("Deep Purple", 1, 3.0, 0.5, ": British rock band"),  # a real success
            ("Deep Purple", 1, 6.0, 0.2, ": colour"),
        ]
    )
    cells = evaluation.successes(cells, draws=[0])
    assert cells["echo"].tolist() == [False, True, True, False, False, False]
    assert cells["success"].tolist() == [True, False, False, False, True, False]  # echoes above 0.3 never succeed
    table = evaluation.method_cells(cells, seeds=0, splits=[0], draws=[0])
    assert table.loc[("Pink Floyd", 1), evaluation.PATCH] == 1 and table.loc[("Pink Floyd", 1), evaluation.BEST] == 0
    assert table.loc[("Deep Purple", 1), evaluation.PATCH] == 0 and table.loc[("Deep Purple", 1), evaluation.BEST] == 1


def test_examples_never_count_an_echo_as_naming_the_entity():
    from recipes.superscopes_mlp_outputs import annotate

    cells = pd.DataFrame(
        {
            "output": [
                ": Princess Diana of Wales",
                " Diana: Princess Diana, Leonardo DiCaprio",
                " Leonardo DiCaprio: Princess Diana",
                ": Country in the Middle East, x",
            ],
            "similarity": [0.6, 0.6, 0.6, 0.6],
        }
    )
    cells = annotate(cells.assign(source="Diana, Princess of Wales", token=" Wales", target=TARGET))
    assert cells["echo"].tolist() == [False, False, True, True]
    assert cells["names_entity"].tolist() == [True, True, False, False]
    assert cells["judged_on_topic"].tolist() == [True, True, False, False]
    assert cells["token_word"].tolist() == [True, False, False, False]  # "Wales" inside a readout that is no echo


def test_entity_description_scores_an_echo_zero():
    from recipes.entity_description import score

    outputs = [" Leonardo DiCaprio: American actor", ": American film actor, x", " Hanks", ": American actor, x"]
    cells = pd.DataFrame(
        {
            "output": outputs,
            "token": [" Hanks"] * 4,
            "target": [TARGET] * 4,
            "reference": ["American actor and filmmaker"] * 4,
        }
    )
    scored = score(cells)
    # The last copies an example's whole description ("American actor"): an echo even where it fits.
    assert scored["echo"].tolist() == [True, False, True, True]
    assert scored["rougeL"].tolist()[0] == scored["rougeL_raw"].tolist()[0] == 0  # copies the example: 0, not 0.67
    assert scored["rougeL"].iloc[1] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


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


def test_entity_description_picks_break_ties_by_the_lowest_alpha_whatever_the_order():
    from recipes.entity_description import JUDGE_BEST, ORACLE, picks

    scores = {"similarity": [0.2, 0.5, 0.5, 0.1], "rougeL": [0.1, 0.4, 0.4, 0.0], "rougeL_raw": 0.0, "echo": False}
    cells = pd.DataFrame({"source": "Diana", "layer": 3, "alpha": [1.0, 9.0, 6.0, 3.0], **scores, "description": "d"})
    cells["reference"] = "r"
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        chosen = picks(cells.iloc[order], [1.0, 3.0, 6.0, 9.0], seed=0).set_index("method")["alpha"]
        assert chosen[ORACLE] == 6.0 and chosen[JUDGE_BEST] == 6.0


def test_evaluation_draws_mismatched_prompts_never_the_own_one():
    from recipes import superscopes_evaluation as evaluation

    class Judge:  # similarity 1 when the readout names the reference
        def similarity(self, references, outputs):
            return [float(r in o) for r, o in zip(references, outputs)]

    prompts = ["Pink Floyd", "Deep Purple", "Green Day", "Daft Punk"]
    cells = pd.DataFrame({"source": prompts, "condition": "greedy", "output": prompts})  # each names its own prompt
    cells = evaluation.mismatched(cells, prompts, [0, 1, 2], Judge())
    assert (cells[[f"mismatch_similarity (seed {s})" for s in (0, 1, 2)]] == 0).all().all()
