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
    assert (
        "**Ours:**" in summary_md
        and "**Paper:**" in summary_md
        and "Command: `python -m superscopes.recipes." in summary_md
    )
    assert "nan" not in summary_md.split("## Settings")[0]
    return ResultStore.read(out / "cells.csv"), pd.read_csv(out / "summary.csv"), summary_md


@pytest.fixture(scope="module")
def token_identity(tmp_path_factory):
    from recipes import token_identity

    out = tmp_path_factory.mktemp("token_identity")
    token_identity.main(["--quick", "--out", str(out)])
    return out


def test_token_identity_quick(token_identity, smollm2):
    from recipes.token_identity import CELL_COLUMNS, METHODS

    cells, summary, text = _outputs(token_identity, "token_identity.png")
    assert list(cells.columns) == CELL_COLUMNS
    assert set(cells["method"]) == set(METHODS)
    assert not cells.duplicated(["method", "source", "layer"]).any()
    assert cells.groupby("method")["source"].nunique().eq(8).all()
    assert cells.groupby("method")["layer"].nunique().eq(30).all()  # every layer, as in the paper
    assert cells["precision_at_1"].isin([0, 1]).all() and (cells["surprisal"] >= -1e-6).all()
    assert cells["output_ids"].map(len).eq(5).all()
    # The source prompt ends at the source position: its last token is the position read.
    assert (cells["position"] == cells["source"].map(lambda s: len(smollm2.tokenizer(s)["input_ids"]) - 1)).all()
    # By construction: at the last layer the logit lens is the model's output, and patching the
    # last layer's state over "?" at the last layer reads out the same token.
    last = cells["layer"].max()
    at_last = cells[cells["layer"] == last].groupby("method")["precision_at_1"].mean()
    assert at_last["logit_lens"] == 1.0 and at_last["patchscope"] >= 0.9
    # The logit lens from the graph's read pass equals lens.logit_lens on the same positions.
    from superscopes import lens

    sources = sorted(cells["source"].unique())
    direct = lens.logit_lens(smollm2, sources, [0, 15], "last", top_k=1)
    logit = cells[cells["method"] == "logit_lens"].set_index(["source", "layer"])["pred_id"]
    for j, layer in enumerate((0, 15)):
        assert [logit[(s, layer)] for s in sources] == direct.ids[j, :, 0].tolist()
    assert set(summary.columns) >= {"method", "layer", "precision_at_1", "ci_low", "ci_high", "surprisal", "n"}
    assert summary["precision_at_1"].between(0, 1).all()
    assert ((summary["ci_low"] <= summary["precision_at_1"]) & (summary["precision_at_1"] <= summary["ci_high"])).all()
    comparisons = pd.read_csv(token_identity / "comparisons.csv")
    assert set(zip(comparisons["a"], comparisons["b"])) == {("patchscope", "logit_lens"), ("patchscope", "affine_lens")}
    assert len(comparisons) == 2 * 30 and (comparisons["p_holm"] >= comparisons["p"] - 1e-12).all()
    assert "smollm2-135m" in text and "LLaMA2-13B" in text  # the paper's figures name the paper's models


def test_token_identity_resumes_without_duplicates(token_identity):
    from recipes import token_identity as recipe

    before = ResultStore.read(token_identity / "cells.csv")
    # Unrecord the logit-lens units of the CSV store without its journal (as committed in
    # results/), as if the run had been killed after writing their rows but before recording
    # them: their rows are dropped and recomputed, not kept twice.
    (token_identity / "cells.csv.journal").unlink()
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
    # --quick runs one direction; no same-model grid (its diagonal holds by construction).
    assert set(cells["direction"]) == {"smollm2-135m -> gemma3-270m"}
    assert set(cells["condition"]) == set(cross_model.CONDITIONS)
    assert not cells.duplicated(["direction", "condition", "source", "layer", "target_layer", "transform"]).any()
    assert set(cells["transform"]) == {"affine", "none"}
    # The main condition writes into the same text: the target is each source prompt itself.
    assert cells["precision_at_1"].isin([0, 1]).all() and cells["target_match"].isin([0, 1]).all()
    # The no-write control on the same text is the target model's own next token.
    control = cells[(cells["transform"] == "none") & (cells["condition"] == "same_text")]
    assert (control["pred_token"] == control["target_top1"]).all() and control["target_match"].eq(1).all()
    assert summary["precision_at_1"].between(0, 1).all()
    comparisons = pd.read_csv(tmp_path / "comparisons.csv")
    assert set(zip(comparisons["a"], comparisons["b"])) == {("affine", "none")}
    assert (tmp_path / "map_fit.csv").exists()
    # Rerun: every unit is done, nothing is added.
    cross_model.main(["--quick", "--out", str(tmp_path)])
    assert len(ResultStore.read(tmp_path / "cells.csv")) == len(cells)


def test_same_text_compares_tokens_of_two_vocabularies():
    from recipes.cross_model import same_text

    assert same_text(" Paris", "Paris") and not same_text(" Paris", " London")
    assert same_text("\n", "\n") and not same_text("\n", " ")  # blank tokens compared as they are


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
    assert {"same_subject", "same_relation", "same_token", "same_prediction"} <= set(cells["hypothesis"])
    assert cells["consistency"].between(0, 1).all() and cells["f_query"].eq(1).all()
    assert not cells.duplicated(["query", "layer", "sampler", "hypothesis"]).any()
    # Nearest inputs share the query's relation more often than random inputs do (a weak, robust effect).
    rel = summary[summary["hypothesis"] == "same_relation"].pivot(
        index="layer", columns="sampler", values="consistency"
    )
    assert (rel["nearest"] >= rel["random"]).any()
    # At the last layer, the nearest inputs' next-token prediction is the query's more often than random's.
    pred = summary[summary["hypothesis"] == "same_prediction"].pivot(
        index="layer", columns="sampler", values="consistency"
    )
    assert pred["nearest"].iloc[-1] > pred["random"].iloc[-1]
    # The trained generator (a tiny one in --quick) at the middle layer, beside the stand-in.
    generated = ResultStore.read(tmp_path / "generator.csv")
    assert list(generated.columns) == inverse_scope.CELL_COLUMNS and set(generated["sampler"]) == {"generator"}
    assert (
        {"same_subject", "same_token", "same_prediction"}
        <= set(generated["hypothesis"])
        <= set(inverse_scope.GENERATOR_HYPOTHESES)
    )
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
    settings = (tmp_path / "summary.md").read_text()
    assert f"generator training: 60 snippets, never a query's; L{layer} after 150 steps: train loss" in settings
    assert json.loads((tmp_path / f"generator_L{layer}_history.json").read_text())[-1]["step"] == 150
    lexical = pd.read_csv(tmp_path / "lexical.csv")
    assert set(lexical["label"]) <= {"rises", "lexical", "not above random"}
    headlined = (tmp_path / "summary.md").read_text().split("- **Paper:**")[0]
    for hypothesis in lexical.loc[lexical["label"] != "rises", "hypothesis"]:
        assert f"{hypothesis}: nearest-input FCR" not in headlined
    inverse_scope.main(["--quick", "--out", str(tmp_path)])
    assert len(ResultStore.read(tmp_path / "cells.csv")) == len(cells)
    assert len(ResultStore.read(tmp_path / "generator.csv")) == len(generated)


def test_snippets_and_prefixes_are_deterministic(tokenizer):
    from recipes._snippets import load_snippets, sample_prefixes

    a, b = load_snippets(0), load_snippets(0)
    assert a["text"].head(50).tolist() == b["text"].head(50).tolist()
    assert a["relation"].head(14).nunique() == 14  # round-robin over the relations
    assert not a["text"].duplicated().any()
    assert ResultStore.key([1, "x"]) == ("1", "x")
    texts = a["text"].head(40).tolist()
    drawn = sample_prefixes([tokenizer], texts, seed=3)
    assert drawn == sample_prefixes([tokenizer], texts, seed=3) and len(drawn) >= 38
    for i, prefix, (position,) in drawn:
        ids = tokenizer(texts[i])["input_ids"]
        assert texts[i].startswith(prefix) and tokenizer(prefix)["input_ids"] == ids[: position + 1]
        assert position < len(ids) - 1  # never the text's last token (the paper's randint(start, n - 2))
    assert len({p for _, _, (p,) in drawn}) > 3  # positions spread over the texts


def test_sample_prefixes_aligns_two_tokenizers_by_character(tokenizer):
    import transformers

    from recipes._snippets import sample_prefixes
    from superscopes.models import resolve_path

    small, other = tokenizer, transformers.AutoTokenizer.from_pretrained(resolve_path("gemma3-270m"))
    texts = ["The Eiffel Tower is in Paris, France.", "Mount Kilimanjaro rises above Tanzania"]
    drawn = sample_prefixes([small, other], texts, seed=0, include_last=True)
    assert len(drawn) == 2
    for i, prefix, (p_small, p_other) in drawn:
        for tok, p in ((small, p_small), (other, p_other)):
            ids = tok(prefix)["input_ids"]
            assert len(ids) - 1 == p and ids == tok(texts[i])["input_ids"][: p + 1]


class _WordTokenizer:
    """Whitespace words as tokens, except that a text ending in "b" splits its last word into
    characters: a prefix cut after a word ending in "b" re-tokenises differently."""

    all_special_ids: list[int] = []

    def __call__(self, text: str, return_offsets_mapping: bool = False) -> dict:
        import re

        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        if text.endswith("b"):
            start, end = spans.pop()
            spans += [(i, i + 1) for i in range(start, end)]
        out = {"input_ids": [hash(text[s:e]) % 1000 for s, e in spans]}
        return {**out, "offset_mapping": spans} if return_offsets_mapping else out


def test_sample_prefixes_skips_a_prefix_that_retokenises_differently():
    from recipes._snippets import sample_prefixes

    # The only position before the last token ends in "b": its prefix "xb" re-tokenises as x, b.
    assert sample_prefixes([_WordTokenizer()], ["xb yc"], seed=0) == []
    assert sample_prefixes([_WordTokenizer()], ["xa yc"], seed=0) == [(0, "xa", [0])]


def test_inverse_scope_without_a_generator(tmp_path):
    from recipes import inverse_scope

    inverse_scope.main(["--quick", "--generator-layers", "none", "--out", str(tmp_path)])
    cells, _, _ = _outputs(tmp_path, "inverse_scope.png")
    assert set(cells["sampler"]) == {"nearest", "random", "ceiling"}
    generated = tmp_path / "generator.csv"
    assert not generated.exists() or ResultStore.read(generated).empty
    assert set(pd.read_csv(tmp_path / "comparisons.csv")["a"]) == {"nearest"}
    assert (tmp_path / "lexical.csv").stat().st_size > 0


def test_cross_model_best_pair_does_not_depend_on_the_tables_order():
    from recipes.cross_model import findings

    scores = {"mean_a": [0.5, 0.5, 0.1], "mean_b": 0.0, "difference": [0.5, 0.5, 0.1], "p": 0.5, "p_holm": 1.0}
    grid = {"direction": "a -> b", "condition": "same_text", "layer": [4, 2, 2], "target_layer": [1, 3, 1]}
    pairs = pd.DataFrame({**grid, **scores, "ci_low": 0.0, "ci_high": 1.0})
    texts = {findings(pairs.iloc[order], pd.DataFrame())[0] for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2])}
    assert len(texts) == 1 and "best pair (l=2, l*=3;" in texts.pop()


def test_token_identity_killed_in_the_affine_lens_keeps_its_first_phase(tmp_path, monkeypatch):
    """The 1.5B run spends most of its time fitting the affine maps: a run killed there keeps the
    Patchscope and logit-lens rows, and the rerun computes only the affine lens."""
    from recipes import token_identity as recipe

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the kill, inside the affine phase

    monkeypatch.setattr(recipe, "affine_lens", killed)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(["--quick", "--out", str(tmp_path)])
    kept = ResultStore.read(tmp_path / "cells.csv")
    assert set(kept["method"]) == {"patchscope", "logit_lens"}
    monkeypatch.undo()
    monkeypatch.setattr(recipe, "patchscope_and_logit_lens", lambda *a, **k: pytest.fail("the first phase ran again"))
    recipe.main(["--quick", "--out", str(tmp_path)])
    after = ResultStore.read(tmp_path / "cells.csv")
    assert set(after["method"]) == {"patchscope", "logit_lens", "affine_lens"}
    assert not after.duplicated(["method", "source", "layer"]).any()
    first = after[after["method"] != "affine_lens"].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, kept[after.columns].reset_index(drop=True))  # kept as they were
