"""Quick runs of the lens recipes (token_identity, cross_model, inverse_scope): outputs, schema,
sanity checks that hold by construction, and resume without lost or duplicated rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from superscopes.results import ResultStore


def _outputs(out, figure: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    for name in ("cells.csv", "summary.csv", "summary.md", figure):
        assert (out / name).stat().st_size > 0, name
    summary_md = (out / "summary.md").read_text()
    assert "**Ours:**" in summary_md and "**Paper:**" in summary_md and "Command: `python -m recipes." in summary_md
    assert "nan" not in summary_md.split("## Settings")[0]
    return ResultStore.read(out / "cells.csv"), pd.read_csv(out / "summary.csv"), summary_md


@pytest.fixture(scope="module")
def token_identity(tmp_path_factory):
    from recipes import token_identity

    out = tmp_path_factory.mktemp("token_identity")
    token_identity.main(["--quick", "--out", str(out)])
    return out


def test_token_identity_quick(token_identity):
    from recipes.token_identity import CELL_COLUMNS, METHODS

    cells, summary, text = _outputs(token_identity, "token_identity.png")
    assert list(cells.columns) == CELL_COLUMNS
    assert set(cells["method"]) == set(METHODS)
    assert not cells.duplicated(["method", "source", "layer"]).any()
    assert cells.groupby("method")["source"].nunique().eq(8).all()
    assert cells["precision_at_1"].isin([0, 1]).all() and (cells["surprisal"] >= -1e-6).all()
    assert cells["output_ids"].map(len).eq(5).all()
    # By construction: at the last layer the logit lens is the model's output, and patching the
    # last layer's state over "?" at the last layer reads out the same token.
    last = cells["layer"].max()
    at_last = cells[cells["layer"] == last].groupby("method")["precision_at_1"].mean()
    assert at_last["logit_lens"] == 1.0 and at_last["patchscope"] >= 0.9
    assert set(summary.columns) >= {"method", "layer", "precision_at_1", "ci95", "surprisal", "n"}
    assert summary["precision_at_1"].between(0, 1).all()
    assert "smollm2-135m" in text


def test_token_identity_resumes_without_duplicates(token_identity):
    from recipes import token_identity as recipe

    before = ResultStore.read(token_identity / "cells.csv")
    # Unrecord the logit-lens units, as if the run had been killed after writing their rows
    # but before recording them: their rows are dropped and recomputed, not kept twice.
    meta_path = token_identity / "cells.csv.meta.json"
    meta = json.loads(meta_path.read_text())
    meta["units"] = [u for u in meta["units"] if u[0] != "logit_lens"]
    meta_path.write_text(json.dumps(meta))
    recipe.main(["--quick", "--out", str(token_identity)])
    after = ResultStore.read(token_identity / "cells.csv")
    assert len(after) == len(before)
    assert not after.duplicated(["method", "source", "layer"]).any()
    merged = before.merge(after, on=["method", "source", "layer"], suffixes=("", "_again"))
    assert (merged["pred_id"] == merged["pred_id_again"]).all()


def test_cross_model_quick(tmp_path):
    from recipes import cross_model

    cross_model.main(["--quick", "--out", str(tmp_path)])
    cells, summary, _ = _outputs(tmp_path, "cross_model.png")
    assert list(cells.columns) == cross_model.CELL_COLUMNS
    # --quick runs one direction and its same-model heatmap; the full run adds the reverse.
    assert set(cells["direction"]) == {"smollm2-135m -> gemma3-270m", "smollm2-135m -> smollm2-135m"}
    assert not cells.duplicated(["direction", "source", "layer", "target_layer"]).any()
    cross = cells[cells["model"] != cells["target_model"]]
    assert set(cross["transform"]) == {"affine"} and len(cross) > 0
    assert cells["precision_at_1"].isin([0, 1]).all() and cells["source_match"].isin([0, 1]).all()
    # Same model, last layer to last layer: the readout is the model's own prediction.
    same = cells[cells["model"] == cells["target_model"]]
    assert same["precision_at_1"].mean() >= 0.9
    assert summary["precision_at_1"].between(0, 1).all()
    assert (tmp_path / "map_fit.csv").exists()
    # Rerun: every unit is done, nothing is added.
    cross_model.main(["--quick", "--out", str(tmp_path)])
    assert len(ResultStore.read(tmp_path / "cells.csv")) == len(cells)


def test_inverse_scope_quick(tmp_path):
    from recipes import inverse_scope

    inverse_scope.main(["--quick", "--out", str(tmp_path)])
    cells, summary, _ = _outputs(tmp_path, "inverse_scope.png")
    assert list(cells.columns) == inverse_scope.CELL_COLUMNS
    assert set(cells["sampler"]) == {"nearest", "random", "ceiling"}
    # The ceiling is the most any k corpus inputs can reach: no sampler exceeds it.
    wide = cells.pivot_table(index=["query", "layer", "hypothesis"], columns="sampler", values="consistency")
    assert (wide["nearest"] <= wide["ceiling"] + 1e-9).all() and (wide["random"] <= wide["ceiling"] + 1e-9).all()
    assert set(cells["hypothesis"]) <= set(inverse_scope.HYPOTHESES)
    assert {"same_subject", "same_relation", "same_token"} <= set(cells["hypothesis"])
    assert cells["consistency"].between(0, 1).all() and cells["f_query"].eq(1).all()
    assert not cells.duplicated(["query", "layer", "sampler", "hypothesis"]).any()
    # Nearest inputs share the query's relation more often than random inputs do (a weak, robust effect).
    rel = summary[summary["hypothesis"] == "same_relation"].pivot(index="layer", columns="sampler", values="consistency")
    assert (rel["nearest"] >= rel["random"]).any()
    # The trained generator (a tiny one in --quick) at the middle layer, beside the stand-in.
    generated = ResultStore.read(tmp_path / "generator.csv")
    assert list(generated.columns) == inverse_scope.CELL_COLUMNS and set(generated["sampler"]) == {"generator"}
    assert {"same_subject", "same_token"} <= set(generated["hypothesis"]) <= set(inverse_scope.GENERATOR_HYPOTHESES)
    assert generated["layer"].nunique() == 1 and generated["consistency"].between(0, 1).all()
    assert generated.groupby("hypothesis")["query"].nunique()["same_token"] == 16
    layer = int(generated["layer"].iloc[0])
    assert (tmp_path / "generators" / f"L{layer}" / "generator.pt").exists()
    distances = ResultStore.read(tmp_path / "distances.csv")
    assert set(distances["sampler"]) == {"generator", "nearest", "random"} and (distances["distance"] > 0).all()
    # The stand-in takes the k inputs nearest by cosine: no k random inputs are closer on average.
    by_cosine = distances.pivot_table(index="query", columns="sampler", values="cosine")
    assert (by_cosine["nearest"] <= by_cosine["random"] + 1e-6).all()
    assert {"generator", "nearest", "random", "ceiling"} <= set(summary["sampler"])
    assert (summary["ci_low"] <= summary["consistency"] + 1e-9).all()
    assert (summary["consistency"] <= summary["ci_high"] + 1e-9).all()
    comparisons = pd.read_csv(tmp_path / "comparisons.csv")
    pairs = set(zip(comparisons["a"], comparisons["b"]))
    assert {("generator", "nearest"), ("generator", "random"), ("nearest", "random")} <= pairs
    assert comparisons["p_holm"].between(0, 1).all() and (comparisons["p_holm"] >= comparisons["p"] - 1e-12).all()
    inverse_scope.main(["--quick", "--out", str(tmp_path)])
    assert len(ResultStore.read(tmp_path / "cells.csv")) == len(cells)
    assert len(ResultStore.read(tmp_path / "generator.csv")) == len(generated)


def test_snippets_and_prefixes_are_deterministic():
    from recipes.token_identity import load_snippets, random_prefixes

    a, b = load_snippets(0), load_snippets(0)
    assert a["text"].head(50).tolist() == b["text"].head(50).tolist()
    assert a["relation"].head(14).nunique() == 14  # round-robin over the relations
    assert not a["text"].duplicated().any()
    prefixes = random_prefixes(a["text"].head(20).tolist(), seed=3)
    assert prefixes == random_prefixes(a["text"].head(20).tolist(), seed=3)
    assert all(t.startswith(p) and len(p.split()) >= 2 for p, t in zip(prefixes, a["text"].head(20)))
    assert (ResultStore.key([1, "x"])) == ("1", "x")


def test_distinct_prefixes_skip_repeats():
    from recipes.token_identity import distinct_prefixes, random_prefixes

    texts = ["the cat sat down", "the cat sat down", "a dog ran off", "one more text here"]
    used, prefixes, consumed = distinct_prefixes(texts, 3, seed=0)
    assert len(set(prefixes)) == len(prefixes) and consumed <= len(texts)
    assert all(texts[i].startswith(p) for i, p in zip(used, prefixes))
    unique = ["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]
    assert distinct_prefixes(unique, 3, seed=1)[1] == random_prefixes(unique, seed=1)
