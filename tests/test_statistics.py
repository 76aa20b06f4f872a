"""The shared prompt-level statistics and the echo rule, against hand-computed cases."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from superscopes.metrics import (
    any_then_mean,
    bootstrap_ci,
    compare,
    compare_all,
    compare_conditions,
    cross_fitted_best,
    cross_fitted_mean,
    describe,
    holm,
    holm_intervals,
    is_echo,
    majority_share,
    paired_permutation_p,
    per_prompt,
    prompt_means,
    target_examples,
)
from superscopes.prompts import ENTITY_DESCRIPTION


def test_paired_permutation_p_is_exact_for_few_prompts():
    assert paired_permutation_p([1, 1, 1]) == pytest.approx(2 / 8)  # only all-plus or all-minus reach |3|
    assert paired_permutation_p([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)
    assert paired_permutation_p([1, -1]) == 1.0
    assert paired_permutation_p([0, 0, 0]) == 1.0  # ties carry no information
    assert paired_permutation_p([2, 1, 0, 0]) == pytest.approx(2 / 4)  # zeros dropped: signs of (2, 1)


def test_paired_permutation_p_monte_carlo_is_small_for_a_consistent_effect():
    p = paired_permutation_p([1.0] * 30)
    assert p < 1e-3 and p > 0  # add-one smoothed, never exactly 0


def test_holm_adjusts_in_order_and_stays_monotone():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"x": 0.5}) == {"x": 0.5}
    assert holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})


def test_bootstrap_ci_resamples_prompts():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    low, high = bootstrap_ci([0, 1] * 20)
    assert 0.3 < low < 0.5 < high < 0.7
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_compare_reports_the_prompt_level_difference():
    result = compare([1, 1, 1, 0], [0, 0, 1, 0])
    assert result["n_prompts"] == 4 and result["difference"] == 0.5
    assert result["mean_a"] == 0.75 and result["mean_b"] == 0.25
    assert result["p"] == pytest.approx(0.5)
    assert 0 <= result["ci_low"] <= 0.5 <= result["ci_high"] <= 1
    with pytest.raises(ValueError, match="one value per prompt"):
        compare([1, 0], [1])


def test_compare_all_holm_corrects_only_the_family():
    # per prompt: a beats b on 2 prompts (exact p = 2/4), a beats c on 3 (p = 2/8); Holm over {ab, ac}:
    # ac 2 * 0.25 = 0.5, ab max(0.5, 1 * 0.5) = 0.5; ad is outside the family and keeps its p.
    scores = pd.DataFrame({"a": [1, 1, 1, 0], "b": [0, 0, 1, 0], "c": [0, 0, 0, 0], "d": [1, 1, 1, 0]})
    table = compare_all(scores, {"ab": ("a", "b"), "ac": ("a", "c"), "ad": ("a", "d")}, family=["ab", "ac"])
    rows = table.set_index("comparison")
    assert rows.loc["ab", "p"] == pytest.approx(0.5) and rows.loc["ac", "p"] == pytest.approx(0.25)
    assert rows.loc["ab", "p_holm"] == pytest.approx(0.5) and rows.loc["ac", "p_holm"] == pytest.approx(0.5)
    assert rows.loc["ad", "p_holm"] == rows.loc["ad", "p"] == 1.0
    assert rows.loc["ac", "difference"] == 0.75 and rows.loc["ab", "mean_b"] == 0.25
    assert "no significant prompt-level difference" in describe(rows.loc["ac"].to_dict())


def test_describe_says_a_beats_b_only_when_the_adjusted_p_does():
    row = {
        "a": "x",
        "b": "y",
        "mean_a": 0.5,
        "mean_b": 0.1,
        "difference": 0.4,
        "ci_low": 0.2,
        "ci_high": 0.6,
        "p": 0.001,
        "p_holm": 0.004,
        "n_prompts": 48,
    }
    text = describe(row)
    assert "x > y at the prompt level" in text and "[95% CI +0.200, +0.600]" in text and "Holm p = 0.004" in text
    assert "no significant" in describe(row | {"p_holm": 0.06})
    assert "x < y at the prompt level" in describe(row | {"difference": -0.4})


def test_prompt_means_average_each_prompt_first():
    frame = pd.DataFrame({"source": ["a", "a", "b", "a"], "layer": [0, 0, 0, 1], "score": [1.0, 0.0, 1.0, 1.0]})
    table = prompt_means(frame, "score").set_index("layer")
    assert table.loc[0, "score"] == pytest.approx(0.75)  # prompt a: 0.5, prompt b: 1.0; not 2/3 over cells
    assert table.loc[0, "n"] == 2 and table.loc[1, "n"] == 1
    assert table.loc[0, "ci_low"] == pytest.approx(0.5) and table.loc[0, "ci_high"] == pytest.approx(1.0)


def test_compare_conditions_pairs_by_prompt_per_group_with_one_holm_family():
    frame = pd.DataFrame(
        {
            "source": ["a", "b", "c"] * 4,
            "layer": [0] * 6 + [1] * 6,
            "method": (["x"] * 3 + ["y"] * 3) * 2,
            "score": [1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0],
        }
    )
    table = compare_conditions(frame, "method", [("x", "y")]).set_index("layer")
    assert table.loc[0, "difference"] == 1.0 and table.loc[0, "p"] == pytest.approx(2 / 8)  # 3 of 3 prompts +1
    assert table.loc[1, "difference"] == pytest.approx(1 / 3) and table.loc[1, "p"] == 1.0  # one +1: 2 of 2 signs
    assert table.loc[0, "p_holm"] == pytest.approx(0.5) and table.loc[1, "p_holm"] == 1.0  # 2 x 0.25; then max(.., 1)
    assert (table["n_prompts"] == 3).all() and set(table["a"]) == {"x"} and set(table["b"]) == {"y"}
    # A prompt missing one of the two conditions is left out of that pair.
    partial = compare_conditions(frame[~((frame["source"] == "c") & (frame["method"] == "y"))], "method", [("x", "y")])
    assert (partial["n_prompts"] == 2).all()
    assert compare_conditions(frame, "method", [("x", "z")]).empty


def cells(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["source", "layer", "alpha", "similarity", "success"])


def test_per_prompt_averages_cells_of_each_prompt():
    frame = cells([("a", 1, 3, 0.2, 1), ("a", 2, 3, 0.4, 0), ("b", 1, 3, 0.6, 1), ("b", 2, 3, 0.6, 1)])
    assert per_prompt(frame, "success")["all"].tolist() == [0.5, 1.0]
    assert per_prompt(frame, "success", by="layer").loc["a"].tolist() == [1.0, 0.0]


def test_cross_fitted_choice_is_made_on_the_other_half():
    # Alpha 6 is best on average; prompt p3's own best is alpha 3, but a choice fitted on
    # the other half never sees p3's scores, so p3 is scored at alpha 6.
    rows = []
    for prompt in ["p0", "p1", "p2", "p3"]:
        own_best = 3 if prompt == "p3" else 6
        for alpha in (3, 6):
            good = alpha == own_best
            rows.append((prompt, 1, alpha, 0.9 if good else 0.1, int(good)))
    out = cross_fitted_best(cells(rows), choice="alpha", score="similarity", success="success", seed=1)
    assert sorted(out["source"]) == ["p0", "p1", "p2", "p3"]
    chosen = dict(zip(out["source"], out["alpha"]))
    half_with_p3 = [p for p in chosen if chosen[p] == chosen["p3"]]
    assert len(half_with_p3) >= 2  # everyone in p3's half shares the choice fitted on the other half
    best_of = cells(rows).groupby("source")["success"].max().mean()
    assert out["success"].mean() <= best_of


def test_cross_fitted_mean_averages_splits():
    # Every prompt succeeds only at alpha 6 except p3 (alpha 3). A half fitted without p3 picks 6, so
    # p3 scores 0 under every split; the mean over splits is the mean of each split's cross_fitted_best.
    rows = [
        (p, 1, a, float(a == (3 if p == "p3" else 6)), int(a == (3 if p == "p3" else 6)))
        for p in ["p0", "p1", "p2", "p3"]
        for a in (3, 6)
    ]
    frame = cells(rows)
    mean = cross_fitted_mean(frame, "alpha", "similarity", "success", seeds=[0, 1, 2])
    assert mean.loc[("p3", 1)] == 0
    single = [
        cross_fitted_best(frame, "alpha", "similarity", "success", seed=s).set_index("source")["success"]
        for s in (0, 1, 2)
    ]
    assert mean.droplevel("layer").to_dict() == pytest.approx((sum(single) / 3).to_dict())


def test_target_examples_of_the_entity_prompt():
    assert target_examples(ENTITY_DESCRIPTION) == ["Syria", "Leonardo DiCaprio", "Samsung"]


@pytest.mark.parametrize(
    "text,token,expected",
    [
        (" Leonardo DiCaprio: American actor, Samsung", "Vinci", True),  # copies a few-shot example
        (": Country in the Middle East, x", "Wales", True),  # copies three words of the target
        (" Wales Wales, Wales", "Wales", True),  # only the source token
        (" -great-great-great", "Great", True),
        (": Princess of Wales, a British royal", "Wales", False),
        (": a Welsh princess, Lady Di", "Wales", False),
        (": South Korean city, Busan", "Seoul", False),  # a word of an example's description is not a copy
        (": Country in the United Kingdom, China", "Wales", False),  # an example's frame, a new answer
    ],
)
def test_echo_rule(text, token, expected):
    assert is_echo(text, token, ENTITY_DESCRIPTION) is expected


def test_majority_share_uses_the_training_majority():
    assert majority_share(["a", "b", "a"]) == pytest.approx(2 / 3)
    assert majority_share(["b", "b"], train_labels=["a", "a", "b"]) == 0.0  # trained majority is "a"
    assert majority_share(["x", "y"]) == 0.5  # tie: "x" (first in sorted order) is the guess
    assert math.isnan(majority_share([]))


def test_any_then_mean_is_lis_patchscopes_accuracy():
    frame = pd.DataFrame(
        [
            ("p1", 1, 0, False),
            ("p1", 1, 1, True),
            ("p1", 2, 0, False),
            ("p1", 2, 1, False),
            ("p2", 1, 0, True),
            ("p2", 1, 1, True),
            ("p2", 2, 0, True),
            ("p2", 2, 1, False),
        ],
        columns=["prompt", "layer", "target_layer", "success"],
    )
    out = any_then_mean(frame, "success", "prompt", any_over="target_layer", mean_over="layer")
    assert out.to_dict() == {"p1": 0.5, "p2": 1.0}


def test_compare_all_of_pairs_holm_adjusts_over_all_and_drops_missing_prompts():
    nan = float("nan")
    scores = pd.DataFrame({"a": [1, 1, 1], "b": [0, 0, 0], "c": [1, 0, 0], "d": [1, nan, 1], "e": [nan] * 3})
    table = compare_all(scores, [("a", "b"), ("c", "b"), ("d", "b"), ("e", "b")]).set_index("a")
    assert "e" not in table.index  # no prompt to compare: no test, not in the family
    assert table.loc["a", "p"] == pytest.approx(2 / 8) and table.loc["c", "p"] == 1.0
    assert table.loc["d", "p"] == pytest.approx(2 / 4) and table.loc["d", "n_prompts"] == 2
    # Holm over three: 0.25 * 3, then max(0.75, 0.5 * 2), then max(1.0, 1.0 * 1)
    assert table["p_holm"].tolist() == pytest.approx([0.75, 1.0, 1.0])
    assert table.loc["a", "comparison"] == "a vs b"
    assert "no significant prompt-level difference" in describe(table.reset_index().iloc[0])
    assert "a > b at the prompt level" in describe({**table.reset_index().iloc[0].to_dict(), "p_holm": 0.01})


def test_holm_intervals_widen_with_the_holm_level():
    """The smallest of m p-values gets level 1 - 0.05/m, the largest 0.95: the same differences give a
    wider interval when their test comes first."""
    diffs = [0.1, 0.2, 0.0, 0.3, 0.1, 0.2, 0.1, 0.4, 0.0, 0.2] * 5
    first, last, _ = holm_intervals([diffs, diffs, diffs], [0.001, 0.5, 0.2])
    assert first[0] < last[0] and first[1] > last[1]
    assert last == pytest.approx(bootstrap_ci(diffs))  # the largest p: the plain 95% interval


def test_token_identity_claims_no_layer_whose_holm_interval_reaches_0():
    from recipes.token_identity import findings

    row = {"a": "patchscope", "n_prompts": 500, "mean_a": 0.3, "mean_b": 0.2, "p": 0.001, "p_holm": 0.01}
    ci = ["ci_low", "ci_high", "holm_ci_low", "holm_ci_high"]
    comparisons = pd.DataFrame(
        [
            {**row, "layer": 0, "b": "logit_lens", "difference": 0.1, **dict(zip(ci, [0.05, 0.15, 0.02, 0.18]))},
            # significant with its plain interval, not at its Holm level
            {**row, "layer": 1, "b": "logit_lens", "difference": 0.05, **dict(zip(ci, [0.01, 0.09, -0.01, 0.11]))},
            {**row, "layer": 0, "b": "affine_lens", "difference": -0.05, **dict(zip(ci, [-0.09, -0.01, -0.11, 0.01]))},
        ]
    )
    summary = pd.DataFrame(
        {"layer": [2, 2, 2], "method": ["patchscope", "logit_lens", "affine_lens"], "precision_at_1": [1.0] * 3}
    )
    logit, affine, _ = findings(summary, comparisons, last=2)
    assert "above at layers [0], below at layers none" in logit
    assert "above at layers none, below at layers none" in affine
