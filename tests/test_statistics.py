"""The shared prompt-level statistics and the echo rule, against hand-computed cases."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from superscopes.metrics import (any_then_mean, bootstrap_ci, compare, compare_family, cross_fitted_best, describe, holm,
                                 is_echo, majority_share, paired_permutation_p,
                                 per_prompt, target_examples)  # fmt: skip
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


def test_target_examples_of_the_entity_prompt():
    assert target_examples(ENTITY_DESCRIPTION) == ["Syria", "Leonardo DiCaprio", "Samsung"]


@pytest.mark.parametrize("text,token,expected", [
    (" Leonardo DiCaprio: American actor, Samsung", "Vinci", True),  # copies a few-shot example
    (": Country in the Middle East, x", "Wales", True),  # copies three words of the target
    (" Wales Wales, Wales", "Wales", True),  # only the source token
    (" -great-great-great", "Great", True),
    (": Princess of Wales, a British royal", "Wales", False),
    (": a Welsh princess, Lady Di", "Wales", False),
    (": South Korean city, Busan", "Seoul", False),  # a word of an example's description is not a copy
])  # fmt: skip
def test_echo_rule(text, token, expected):
    assert is_echo(text, token, ENTITY_DESCRIPTION) is expected


def test_majority_share_uses_the_training_majority():
    assert majority_share(["a", "b", "a"]) == pytest.approx(2 / 3)
    assert majority_share(["b", "b"], train_labels=["a", "a", "b"]) == 0.0  # trained majority is "a"
    assert majority_share(["x", "y"]) == 0.5  # tie: "x" (first in sorted order) is the guess
    assert math.isnan(majority_share([]))


def test_any_then_mean_is_lis_patchscopes_accuracy():
    frame = pd.DataFrame(
        [("p1", 1, 0, False), ("p1", 1, 1, True), ("p1", 2, 0, False), ("p1", 2, 1, False),
         ("p2", 1, 0, True), ("p2", 1, 1, True), ("p2", 2, 0, True), ("p2", 2, 1, False)],
        columns=["prompt", "layer", "target_layer", "success"],
    )  # fmt: skip
    out = any_then_mean(frame, "success", "prompt", any_over="target_layer", mean_over="layer")
    assert out.to_dict() == {"p1": 0.5, "p2": 1.0}


def test_compare_family_holm_adjusts_over_the_pairs_and_drops_missing_prompts():
    nan = float("nan")
    scores = pd.DataFrame({"a": [1, 1, 1], "b": [0, 0, 0], "c": [1, 0, 0], "d": [1, nan, 1], "e": [nan] * 3})
    table = compare_family(scores, [("a", "b"), ("c", "b"), ("d", "b"), ("e", "b")]).set_index("a")
    assert "e" not in table.index  # no prompt to compare: no test, not in the family
    assert table.loc["a", "p"] == pytest.approx(2 / 8) and table.loc["c", "p"] == 1.0
    assert table.loc["d", "p"] == pytest.approx(2 / 4) and table.loc["d", "n_prompts"] == 2
    # Holm over three: 0.25 * 3, then max(0.75, 0.5 * 2), then max(1.0, 1.0 * 1)
    assert table["p_holm"].tolist() == pytest.approx([0.75, 1.0, 1.0])
    assert "not distinguishable" in describe(table.reset_index().iloc[0])
    assert ": distinguishable" in describe({**table.reset_index().iloc[0].to_dict(), "p_holm": 0.01})
