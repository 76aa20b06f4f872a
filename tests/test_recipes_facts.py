"""The factual / multi-hop recipes: their helpers, Li et al.'s input-only prompt, and --quick runs.

Each quick run patches a handful of cells of SmolLM2 (and Gemma-3-270m for the
verbalisation controls); the checks are about shape and consistency, not values."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch

import superscopes
from recipes import _facts as F
from recipes import attribute_extraction as ae
from recipes import multihop as mh
from superscopes.probe import fit_probe
from superscopes.scope import read_vectors

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- helpers


def test_question_mentions_unescape():
    assert F.question("The capital city of x", "France") == "The capital city of France"
    assert F.question("The company which developed x", "Xbox") == "The company which developed Xbox"
    assert F.mentions(" , Paris, is a city", "paris") and not F.mentions("Lyon", "Paris")
    assert F.unescape("Bras\\u00edlia") == "Brasília"


def test_success_is_lis_check_correct():
    """``answer.lower() in completion.lower()``: case folded, whitespace left as it is."""
    assert F.mentions("The capital is WASHINGTON D.C.", "Washington D.C.")
    assert not F.mentions("Washington  D.C.", "Washington D.C.")  # a double space is not normalised
    assert not F.mentions("New York", "New York ")  # nor is a trailing one stripped
    assert F.mentions("the pound sterling", "Pound")


def test_judged_never_counts_an_echo():
    frame = pd.DataFrame(
        {
            "output": ["France France", "Paris, France", "Lyon"],
            "object": ["France", "Paris", "Paris"],
            "subject": ["France"] * 3,
        }
    )
    out = F.judged(frame)
    assert out["echo"].tolist() == [True, False, False]
    assert out["success"].tolist() == [False, True, False]  # the first mentions the object but only echoes


def test_input_only_prompt_is_lis_text(smollm2):
    """SmolLM2 (not a Llama name, has a chat template): [user "", assistant snippet, user
    "Complete the sentence: " + template without its x], with the generation prompt."""
    text = F.input_only_prompt(smollm2.tokenizer, "Paris is lovely in spring.", "The capital city of x")
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\nParis is lovely in spring.<|im_end|>\n"
        "<|im_start|>user\nComplete the sentence: The capital city of<|im_end|>\n<|im_start|>assistant\n"
    )
    # Li's code drops every "x" of the template, not only the placeholder
    assert "Complete the sentence: Leicon of<" in F.input_only_prompt(smollm2.tokenizer, "s", "Lexicon of x")


class _Tokenizer:
    """A tokenizer stand-in: a name, a chat template or none, and whether it adds a BOS."""

    def __init__(self, name: str, template: str | None, adds_bos: bool = False):
        self.name_or_path, self.chat_template, self.bos_token, self.bos_token_id = name, template, "<s>", 1
        self.adds_bos, self.turns = adds_bos, None

    def __call__(self, text):
        return {"input_ids": ([1] if self.adds_bos else []) + [7]}

    def apply_chat_template(self, turns, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        self.turns = turns
        return "<s>" + "".join(f"[{t['role']}]{t['content']}" for t in turns) + "[assistant]"


def test_input_only_prompt_llama_turns_plain_text_and_bos():
    llama = _Tokenizer("meta-llama/Llama-3.1-8B-Instruct", "template", adds_bos=True)
    text = F.input_only_prompt(llama, "A snippet.", "The official currency of x")
    assert [t["role"] for t in llama.turns] == ["assistant", "user"]  # no empty first turn for Llama names
    assert text == "[assistant]A snippet.[user]Complete the sentence: The official currency of[assistant]"  # BOS once
    other = _Tokenizer("org/other", "template")
    assert F.input_only_prompt(other, "A.", "In x").startswith("<s>[user][assistant]A.")  # keeps the template's BOS
    plain = _Tokenizer("google/gemma-3-270m", None)
    assert F.input_only_prompt(plain, "A snippet.", "The largest city in x") == (
        "A snippet.\n\nComplete the sentence: The largest city in"
    )


def test_li_rows_are_unfiltered():
    rows = F.li_rows("country_capital_city")
    raw = pd.read_csv(F.FACTUAL / "country_capital_city.tsv", sep="\t", index_col=0)
    kept = raw["prompt_source"].notna() & ~raw["prompt_source"].fillna("").str.contains("\n")
    assert len(rows) == int(kept.sum())  # no knowledge, crop or duplicate filter
    assert "Brasília" in set(rows["object"])
    assert F.li_rows("country_capital_city", limit_subjects=3)["subject"].nunique() == 3


def test_other_sources_take_another_label():
    for i, j in enumerate(F.other_sources(["a", "a", "b", "c"], seed=3)):
        assert j != i and ["a", "a", "b", "c"][j] != ["a", "a", "b", "c"][i]
    assert F.other_sources(["a", "a"], seed=0) == [1, 0]  # none differs: any other item
    assert F.other_sources(["a"], seed=0) == [0]


def test_alias_match_is_whole_word():
    assert mh.correct(" the South Korean won.", "won|KRW")
    assert not mh.correct(" a wonderful currency", "won|KRW")
    assert mh.correct("It is the U.S. dollar", "U.S. dollar|USD")
    assert not mh.correct("anything", "")


def test_first_hop_span_and_layer_pairs():
    q, h = "The currency of the country whose capital is Lima is", "The country whose capital is Lima is"
    assert mh.first_hop_span(q, h) == "the country whose capital is Lima"
    q2 = "The country whose capital is Paris is located on the continent of"
    assert mh.first_hop_span(q2, "The country whose capital is Paris is") == "The country whose capital is Paris"
    assert mh.layer_pairs(10, 4) == [(4, 0), (8, 0), (8, 4)]


def test_load_task_crops_after_the_subject():
    rows = F.load_task("country_currency", limit_subjects=3)
    assert set(rows.columns) >= {"task", "subject", "object", "template", "question", "snippet", "source"}
    assert rows["subject"].nunique() <= 3
    for subject, snippet, source in zip(rows["subject"], rows["snippet"], rows["source"]):
        assert source.endswith(subject) and snippet.startswith(source)
    assert not rows.duplicated(["subject", "source"]).any()


def test_cropped_source_has_the_snippets_hidden_state(smollm2):
    """The recipes read the last token of the snippet cut after the subject: in a causal
    model that is the same vector as the last subject token of the full snippet."""
    rows = F.load_task("country_capital_city", limit_subjects=2)
    rows = rows[
        [
            F.crop_is_exact(smollm2.tokenizer, s, su, so)
            for s, su, so in zip(rows["snippet"], rows["subject"], rows["source"])
        ]
    ].head(2)
    assert len(rows) == 2
    from superscopes.prompts import find_token, num_tokens

    prompts = list(rows["snippet"]) + list(rows["source"])
    reads = [
        (i, find_token(smollm2.tokenizer, s, su), "resid_post", 6)
        for i, (s, su) in enumerate(zip(rows["snippet"], rows["subject"]))
    ]
    reads += [(2 + i, num_tokens(smollm2.tokenizer, s) - 1, "resid_post", 6) for i, s in enumerate(rows["source"])]
    v = read_vectors(smollm2, prompts, reads)
    torch.testing.assert_close(v[:2], v[2:], atol=1e-4, rtol=1e-4)


def test_split_keeps_a_training_row_per_tested_class():
    rows = pd.DataFrame(
        {
            "task": "t",
            "subject": ["a", "a", "b", "b", "b", "c", "d", "d"],
            "object": ["X", "X", "Y", "Y", "Y", "Z", "X", "X"],
        }
    )
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
    assert "**Ours:**" in text and "**Paper:**" in text and "Command: `python -m superscopes.recipes." in text
    for figure in figures:
        assert f"]({figure})" in text
        assert (out / figure).read_bytes()[:8] == PNG


def as_bool(column: pd.Series) -> pd.Series:
    assert set(column.astype(str)) <= {"True", "False"}
    return column.astype(str) == "True"


def test_attribute_extraction_quick(shared_models, tmp_path):
    out = tmp_path / "ae"
    run_recipe("attribute_extraction", out)
    check_outputs(
        out, ["cells.csv", "knowledge.csv", "probe.csv", "rows.csv", "per_row.csv", "comparisons.csv"], ["accuracy.png"]
    )
    rows, cells, scores = read(out / "rows.csv"), read(out / "cells.csv"), read(out / "per_row.csv")
    test_rows = rows[as_bool(rows["test"])]
    patch = cells[cells["condition"] == "Patchscopes"]
    assert len(patch) == len(test_rows) * patch["layer"].nunique() * patch["target_layer"].nunique()
    assert not patch.duplicated(["row", "layer", "target_layer"]).any()
    assert set(patch["row"]) == set(test_rows["row"]) == set(scores["row"])
    # Li's input-only prompt ran on every unfiltered row of the quick tasks' first six subjects
    li = cells[cells["condition"] == ae.INPUT]
    expected = pd.concat([F.li_rows(t, 6) for t in ae.QUICK_TASKS])
    assert len(li) == len(expected) and set(li["snippet"]) == set(expected["snippet"])
    success = as_bool(cells["success"])
    hit = [o.lower() in str(t).lower() for o, t in zip(cells["object"], cells["output"])]
    assert (success == [h and not e for h, e in zip(hit, as_bool(cells["echo"]))]).all()
    known = read(out / "knowledge.csv")
    assert set(rows["subject"]) <= set(known.loc[as_bool(known["known"]), "subject"])
    for method in (ae.PS, ae.PS1, ae.PROBE, ae.INPUT, ae.NONE, ae.MAJORITY):
        assert scores[method].astype(float).dropna().between(0, 1).all(), method
    comparisons = read(out / "comparisons.csv")
    assert [tuple(p) for p in comparisons[["a", "b"]].values] == ae.PAIRS
    assert (comparisons["p_holm"].astype(float) >= comparisons["p"].astype(float)).all()
    assert "95% CI" in (out / "summary.md").read_text().split("**Ours:**")[1].splitlines()[0]

    run_recipe("attribute_extraction", out)  # resume: nothing is added
    assert len(read(out / "cells.csv")) == len(cells)


def test_multihop_quick(shared_models, tmp_path):
    out = tmp_path / "mh"
    run_recipe("multihop", out)
    check_outputs(
        out, ["cells.csv", "baseline.csv", "queries.csv", "per_query.csv", "comparisons.csv"], ["fixes_heatmap.png"]
    )
    baseline, queries, cells = read(out / "baseline.csv"), read(out / "queries.csv"), read(out / "cells.csv")
    assert len(baseline) == 3 * len(queries)
    evaluated = queries[as_bool(queries["evaluated"])]
    assert not as_bool(evaluated["two_hop_ok"]).any()
    seeds = [0, 1, 2]  # three shuffled-source draws per method
    conditions = [c for m in mh.METHODS for c in (m, *[mh.shuffled(m, s) for s in seeds])]
    assert sorted(cells["condition"].unique()) == sorted(conditions)
    notebook = cells["condition"].str.startswith(mh.NOTEBOOK)
    tries = cells[~notebook].groupby(["condition", "row"]).size()
    assert tries.nunique() == 1  # back-patching, the paper's CoT and their controls: the same (l, l*) pairs
    assert (cells.loc[~notebook, "target_layer"] < cells.loc[~notebook, "layer"]).all()
    pairs = (
        cells[notebook].groupby(["condition", "row"])[["layer", "target_layer"]].apply(lambda f: len(f.value_counts()))
    )
    grid = sorted(set(cells.loc[notebook, "layer"]))
    assert set(pairs) == {len(grid) ** 2} and grid == sorted(set(cells.loc[notebook, "target_layer"]))  # every pair
    back, cot = cells[cells["condition"] == mh.BACK], cells[cells["condition"] == mh.COT]
    assert (back["target"] == "source").all() and (back["position"] == back["target_position"]).all()
    span, prefix = dict(zip(evaluated["row"], evaluated["span"])), dict(zip(evaluated["row"], evaluated["prefix"]))
    assert all(
        s == span[r] and t == prefix[r] for s, t, r in zip(cot["source"], cot["target"], cot["row"])
    )  # pi1 -> pi2
    nb = cells[cells["condition"] == mh.NOTEBOOK]  # the notebook's direction: pi2 -> pi1
    assert all(s == prefix[r] and t == span[r] for s, t, r in zip(nb["source"], nb["target"], nb["row"]))
    for seed in seeds:
        shuffled = cells[cells["condition"] == mh.shuffled(mh.COT, seed)]
        assert all(s != span[r] for s, r in zip(shuffled["source"], shuffled["row"]))  # another query's pi1
    scores = read(out / "per_query.csv").set_index("row")
    fixed = cells.assign(ok=as_bool(cells["correct"])).groupby(["condition", "row"])["ok"].any()
    for name in conditions:
        assert (scores[f"{name}: fixed"].astype(float) == fixed[name].reindex(scores.index).astype(float)).all()
    control = scores[[f"{mh.shuffled(mh.BACK, s)}: fixed" for s in seeds]].astype(float).mean(axis=1)
    assert (scores[f"{mh.BACK}{mh.SHUFFLED}: fixed"].astype(float) == control).all()  # the mean of the draws
    spread = pd.read_csv(out / "shuffled_draws.csv").set_index("control")
    assert list(spread.columns) == ["seed 0", "seed 1", "seed 2", "min", "max", "sd"] and len(spread) == 6
    summary = (out / "summary.md").read_text()
    assert "Shuffled-source draws" in summary and "seeds [0, 1, 2]" in summary and "- wall time: " in summary

    run_recipe("multihop", out)  # resume
    assert len(read(out / "cells.csv")) == len(cells)


def test_verbalization_controls_tasks_are_lis_six_and_li_samples_as_li_draws_them():
    from recipes import verbalization_controls as vc

    people = ["person_plays_position_in_sport", "person_plays_pro_sport"]
    assert vc.TASKS == ["country_currency", "food_from_country", *people, "product_by_company", "star_constellation"]
    assert not set(vc.EXTENSION_TASKS) & set(vc.TASKS)
    frame = pd.read_csv(F.FACTUAL / "star_constellation.tsv", sep="\t")  # Li's get_feature_extraction_datasets
    frame = frame[frame["prompt_source"].notna()]
    frame = frame[~frame["prompt_source"].str.contains("\n")].reset_index(drop=True)
    frame = frame[~frame["prompt_source"].str.contains("service")].reset_index(drop=True)
    frame = frame.sample(n=10, replace=False, random_state=42).reset_index(drop=True)
    assert list(F.li_rows("star_constellation", n_samples=10)["subject"]) == list(frame["subject"].map(F.unescape))


def test_verbalization_controls_quick(shared_models, tmp_path):
    from recipes import verbalization_controls as vc

    out = tmp_path / "vc"
    run_recipe("verbalization_controls", out)
    check_outputs(
        out,
        [
            "cells.csv",
            "knowledge.csv",
            "maps.csv",
            "rows.csv",
            "per_row.csv",
            "comparisons.csv",
            "li_accuracy.csv",
            "li_comparisons.csv",
            "shuffled_draws.csv",
        ],
        ["accuracy_heatmaps.png"],
    )
    cells, rows = read(out / "cells.csv"), read(out / "rows.csv")
    a, b = "smollm2-135m", "gemma3-270m"
    seeds = [0, 1, 2]  # three shuffled-source draws
    draws = {vc.shuffled_name(v, s, seed) for v, s in ((a, b), (b, a)) for seed in seeds}
    li_conditions = {f"{m}: {c}" for m in (a, b) for c in ("input only (Li)", "Patchscope (Li's rows)")}
    assert set(cells["condition"]) == {
        f"{a}: own Patchscope",
        f"{b}: own Patchscope",
        f"{a}: reads {b}",
        f"{b}: reads {a}",
        *li_conditions,
        *draws,
    }
    cross = cells[cells["condition"].str.contains("reads")]
    assert (cross["transform"] == "affine").all() and (cross["source_model"] != cross["verbaliser"]).all()
    own = cells[cells["condition"].str.contains("own")]
    assert (own["transform"] == "scale").all() and (own["source_model"] == own["verbaliser"]).all()
    for name, part in cells[cells["row"].astype(int) >= 0].groupby("condition"):
        assert set(part["row"].astype(int)) == set(rows["row"]), name
    maps = read(out / "maps.csv")
    assert (
        len(maps)
        == cross[~cross["condition"].str.contains("shuffled")]
        .groupby(["source_model", "layer", "target_layer"])
        .ngroups
    )
    # Li's Patchscope: every unfiltered row (the input-only rows), the whole snippet as the source.
    li = F.li_rows("country_currency", 6)
    for m in (a, b):
        patched = cells[cells["condition"] == f"{m}: Patchscope (Li's rows)"]
        inputs = (cells["condition"] == f"{m}: input only (Li)").sum()
        assert patched["li_row"].astype(int).nunique() == len(li) == inputs
        assert set(patched["snippet"]) == set(li["snippet"]) and (patched["transform"] == "scale").all()
        hit = [F.mentions(o, t) for o, t in zip(patched["output"], patched["object"])]  # Li's check_correct
        per_row = patched.assign(hit=hit).groupby(["li_row", "layer"])["hit"].any().groupby("li_row").mean()
        accuracy = read(out / "li_accuracy.csv").set_index(["model", "method"]).loc[(m, "Patchscope (Li's rows)")]
        assert float(accuracy["country_currency"]) == pytest.approx(per_row.mean())
        assert float(accuracy["mean over 1 of Li's tasks"]) == pytest.approx(per_row.mean())
        assert int(accuracy["Li's tasks with rows"]) == 1
        paired = read(out / "li_comparisons.csv").set_index("a").loc[f"{m}: input only (Li)"]
        assert paired["b"] == f"{m}: Patchscope (Li's rows)" and int(paired["n_prompts"]) == len(li)
        assert float(paired["mean_b"]) == pytest.approx(per_row.mean())  # each Li row one prompt
    scores = read(out / "per_row.csv")
    assert len(scores) == len(rows) and scores["majority class"].astype(float).between(0, 1).all()
    control = scores[[vc.shuffled_name(a, b, seed) for seed in seeds]].astype(float).mean(axis=1)
    assert (scores[f"{a}: reads {b}, shuffled source"].astype(float) == control).all()  # the mean of the draws
    spread = pd.read_csv(out / "shuffled_draws.csv")
    assert list(spread.columns) == ["control", "seed 0", "seed 1", "seed 2", "min", "max", "sd"] and len(spread) == 4
    comparisons = read(out / "comparisons.csv")
    assert (f"{a}: own Patchscope", "majority class") in set(map(tuple, comparisons[["a", "b"]].values))
    assert (comparisons["n_prompts"].astype(int) > 0).all()
    summary = (out / "summary.md").read_text()
    assert "Li's comparison (mean over 1 of Li's tasks)" in summary and "- wall time: " in summary

    run_recipe("verbalization_controls", out)  # resume
    assert len(read(out / "cells.csv")) == len(cells)


def test_a_subject_that_ends_inside_a_token_is_not_an_exact_crop(tokenizer):
    """' Paris' + 'ian': the crop ' the Paris' has the snippet's first tokens, but its last token is
    not a whole subject token of the snippet; the row is left out, not an error (Qwen's 'Chilean')."""
    assert not F.crop_is_exact(tokenizer, " the Parisian cafe", "Paris", " the Paris")
    assert F.crop_is_exact(tokenizer, " the Paris cafe", "Paris", " the Paris")
