"""The factual / multi-hop recipes: their helpers, and --quick runs (schema, sanity, resume).

Each quick run patches a handful of cells of SmolLM2 (and Gemma-3-270m for the
verbalisation controls); the checks are about shape and consistency, not values."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch

import superscopes
from recipes import attribute_extraction as ae
from recipes import multihop as mh
from superscopes.probe import fit_probe
from superscopes.scope import read_vectors

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- helpers


def test_question_mentions_unescape():
    assert ae.question("The capital city of x", "France") == "The capital city of France"
    assert ae.question("The company which developed x", "Xbox") == "The company which developed Xbox"
    assert ae.mentions(" , Paris, is a city", "paris") and not ae.mentions("Lyon", "Paris")
    assert ae.unescape("Bras\\u00edlia") == "Brasília"


def test_alias_match_is_whole_word():
    assert mh.correct(" the South Korean won.", "won|KRW")
    assert not mh.correct(" a wonderful currency", "won|KRW")
    assert mh.correct("It is the U.S. dollar", "U.S. dollar|USD")
    assert not mh.correct("anything", "")


def test_first_hop_span():
    q, h = "The currency of the country whose capital is Lima is", "The country whose capital is Lima is"
    assert mh.first_hop_span(q, h) == "the country whose capital is Lima"
    q2 = "The country whose capital is Paris is located on the continent of"
    assert mh.first_hop_span(q2, "The country whose capital is Paris is") == "The country whose capital is Paris"


def test_load_task_crops_after_the_subject():
    rows = ae.load_task("country_currency", limit_subjects=3)
    assert set(rows.columns) >= {"task", "subject", "object", "template", "question", "snippet", "source"}
    assert rows["subject"].nunique() <= 3
    for subject, snippet, source in zip(rows["subject"], rows["snippet"], rows["source"]):
        assert source.endswith(subject) and snippet.startswith(source)
    assert not rows.duplicated(["subject", "source"]).any()


def test_cropped_source_has_the_snippets_hidden_state(smollm2):
    """The recipes read the last token of the snippet cut after the subject: in a causal
    model that is the same vector as the last subject token of the full snippet."""
    rows = ae.load_task("country_capital_city", limit_subjects=2)
    rows = rows[[ae.crop_is_exact(smollm2.tokenizer, s, su, so)
                 for s, su, so in zip(rows["snippet"], rows["subject"], rows["source"])]].head(2)  # fmt: skip
    assert len(rows) == 2
    from superscopes.prompts import find_token, num_tokens

    prompts = list(rows["snippet"]) + list(rows["source"])
    reads = [(i, find_token(smollm2.tokenizer, s, su), "resid_post", 6) for i, (s, su) in enumerate(zip(rows["snippet"], rows["subject"]))]
    reads += [(2 + i, num_tokens(smollm2.tokenizer, s) - 1, "resid_post", 6) for i, s in enumerate(rows["source"])]
    v = read_vectors(smollm2, prompts, reads)
    torch.testing.assert_close(v[:2], v[2:], atol=1e-4, rtol=1e-4)


def test_split_keeps_a_training_row_per_tested_class():
    rows = pd.DataFrame({
        "task": "t", "subject": ["a", "a", "b", "b", "b", "c", "d", "d"],
        "object": ["X", "X", "Y", "Y", "Y", "Z", "X", "X"],
    })  # fmt: skip
    test = ae.split(rows, max_test=10, seed=0)
    train = rows[~test]
    assert test.sum() > 0
    for obj in rows.loc[test, "object"]:
        assert obj in set(train["object"])
    assert "c" not in set(rows.loc[test, "subject"])  # a single row of a unique class is never held out
    assert (ae.split(rows, max_test=10, seed=0) == test).all()  # seeded


def test_probe_learns_separable_classes_in_inference_mode():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 4
    labels = [i % 4 for i in range(120)]
    X = centres[labels] + torch.randn(120, 32, generator=g)
    names = [f"class {y}" for y in labels]
    probe = fit_probe(X[:90], names[:90])
    assert probe.accuracy(X[90:], names[90:]) > 0.9
    assert probe.predict(X[:2]) == names[:2]
    assert probe.accuracy(X[:1], ["never seen"]) == 0.0
    single = fit_probe(X[:5], ["only"] * 5)  # one class: predicts it
    assert single.predict(X[5:7]) == ["only", "only"]


# ---------------------------------------------------------------- quick runs


@pytest.fixture
def shared_models(smollm2, monkeypatch):
    """Recipes call ``superscopes.load``: hand them the session's SmolLM2 (and load Gemma once)."""
    cache = {"smollm2-135m": smollm2}

    def load(name=None, remote=False, **kwargs):
        name = name or "smollm2-135m"
        if name not in cache:
            cache[name] = superscopes.models.load(name, remote=remote, **kwargs)
        return cache[name]

    monkeypatch.setattr(superscopes, "load", load)
    return cache


def run_recipe(name: str, out, *extra: str) -> None:
    importlib.import_module(f"recipes.{name}").main(["--quick", "--out", str(out), *extra])


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


def check_outputs(out, files: list[str], figures: list[str]) -> None:
    for name in [*files, "summary.csv", "summary.md", *figures]:
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    text = (out / "summary.md").read_text()
    assert "**Ours:**" in text and "**Paper:**" in text and "Command: `python -m recipes." in text
    for figure in figures:
        assert f"]({figure})" in text
        assert (out / figure).read_bytes()[:8] == PNG


def as_bool(column: pd.Series) -> pd.Series:
    assert set(column.astype(str)) <= {"True", "False"}
    return column.astype(str) == "True"


def test_attribute_extraction_quick(shared_models, tmp_path):
    out = tmp_path / "ae"
    run_recipe("attribute_extraction", out)
    check_outputs(out, ["cells.csv", "knowledge.csv", "baselines.csv", "probe.csv", "rows.csv"],
                  ["accuracy_heatmap.png", "best_accuracy.png", "accuracy_per_layer.png"])  # fmt: skip
    rows, cells = read(out / "rows.csv"), read(out / "cells.csv")
    test_rows = rows[as_bool(rows["test"])]
    assert len(test_rows) > 0
    key = ["task", "source", "layer", "target_layer"]
    assert len(cells) == len(test_rows) * cells["layer"].nunique() * cells["target_layer"].nunique()
    assert not cells.duplicated(key).any()
    assert set(cells["source"]) == set(test_rows["source"])
    assert (cells["site"] == "resid_post").all() and (cells["alpha"] == 1).all()
    assert (cells["model"] == "smollm2-135m").all()
    success = as_bool(cells["success"])
    assert (success == [o.lower() in t.lower() for o, t in zip(cells["object"], cells["output"])]).all()
    # the evaluated subjects are ones the unpatched model answers
    known = read(out / "knowledge.csv")
    known_subjects = set(known.loc[as_bool(known["known"]), "subject"])
    assert set(rows["subject"]) <= known_subjects
    probe = read(out / "probe.csv")
    assert probe["accuracy"].between(0, 1).all() and probe["accuracy_unseen_subjects"].between(0, 1).all()
    summary = read(out / "summary.csv")
    evaluated = summary[summary["test_rows"] > 0]
    for column in ["patchscopes_best", "patchscopes_fixed_cell", "patchscopes_any_cell", "probe_best", "zero_shot"]:
        assert evaluated[column].astype(float).between(0, 1).all(), column
    assert (evaluated["patchscopes_any_cell"].astype(float) >= evaluated["patchscopes_best"].astype(float)).all()

    run_recipe("attribute_extraction", out)  # resume: nothing is added
    assert len(read(out / "cells.csv")) == len(cells)
    assert len(read(out / "baselines.csv")) == len(test_rows)


def test_multihop_quick(shared_models, tmp_path):
    out = tmp_path / "mh"
    run_recipe("multihop", out)
    check_outputs(out, ["cells.csv", "baseline.csv", "queries.csv", "fixes.csv", "per_relation.csv"],
                  ["fixes_heatmap.png", "baseline_accuracy.png"])  # fmt: skip
    baseline, queries, cells = read(out / "baseline.csv"), read(out / "queries.csv"), read(out / "cells.csv")
    assert sorted(baseline["kind"].unique()) == ["hop1_query", "hop2_query", "query"]
    assert len(baseline) == 3 * len(queries)
    back = cells[cells["method"] == mh.BACK]
    cot = cells[cells["method"] == mh.COT]
    assert len(back) > 0 and len(cot) > 0
    assert (back["target_layer"] < back["layer"]).all()  # back-patching only
    assert (back["position"] == back["target_position"]).all() and (back["target"] == "source").all()
    assert (cot["target_layer"] <= cot["layer"]).all()
    assert (cot["position"] < cot["target_position"]).all()  # a later position
    assert not cells.duplicated(["method", "row", "layer", "target_layer"]).any()
    evaluated = set(cells["row"])
    wrong = queries.loc[~as_bool(queries["two_hop_ok"]), "row"]
    assert evaluated <= set(wrong)
    fixes = read(out / "fixes.csv")
    for method, column in [(mh.BACK, "back_patching_fixed"), (mh.COT, "cot_fixed")]:
        some = cells[cells["method"] == method].groupby("row")["correct"].apply(lambda c: as_bool(c).any())
        assert (as_bool(fixes.set_index("row")[column]).reindex(some.index) == some).all()
    summary = pd.read_csv(out / "summary.csv").set_index("measure")["value"].astype(float)
    assert 0 <= summary["share fixed: back-patching"] <= 1 and 0 <= summary["share fixed: either"] <= 1

    run_recipe("multihop", out)  # resume
    assert len(read(out / "cells.csv")) == len(cells)


def test_verbalization_controls_quick(shared_models, tmp_path):
    out = tmp_path / "vc"
    run_recipe("verbalization_controls", out)
    check_outputs(out, ["cells.csv", "knowledge.csv", "baselines.csv", "maps.csv", "rows.csv", "per_row.csv"],
                  ["accuracy_by_knowledge.png", "accuracy_heatmaps.png"])  # fmt: skip
    cells, rows = read(out / "cells.csv"), read(out / "rows.csv")
    models = {"smollm2-135m", "gemma3-270m"}
    from recipes.verbalization_controls import CROSS, SELF

    own, cross = cells[cells["method"] == SELF], cells[cells["method"] == CROSS]
    assert set(own["verbaliser"]) == models and (own["source_model"] == own["verbaliser"]).all()
    assert set(cross["verbaliser"]) == models and (cross["source_model"] != cross["verbaliser"]).all()
    assert (cross["transform"] == "affine").all() and (own["transform"] == "scale").all()
    for (method, source, verbaliser), part in cells.groupby(["method", "source_model", "verbaliser"]):
        assert set(part["source"]) == set(rows["source"]), (method, source, verbaliser)
    assert not cells.duplicated(["method", "source_model", "verbaliser", "source", "layer", "target_layer"]).any()
    maps = read(out / "maps.csv")
    assert len(maps) == cross.groupby(["source_model", "layer", "target_layer"]).ngroups
    assert maps["r2_heldout"].astype(float).notna().all()
    summary = read(out / "summary.csv")
    assert set(summary["verbaliser"]) == models
    assert summary["accuracy"].astype(float).dropna().between(0, 1).all()
    all_rows = summary[summary["rows"] == "all rows"]
    assert (all_rows["n"] == len(rows)).all()

    run_recipe("verbalization_controls", out)  # resume
    assert len(read(out / "cells.csv")) == len(cells)
