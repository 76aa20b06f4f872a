"""The MiniLM judge and best-alpha selection."""

from __future__ import annotations

import pandas as pd
import pytest

from superscopes import judge


def test_identical_strings_score_one_and_unrelated_ones_low():
    scores = judge.default_judge().similarity(
        ["Diana, Princess of Wales", "Back to the Future", "Red Hot Chili Peppers"],
        ["Diana, Princess of Wales", "a recipe for lentil soup with cumin", "Quarterly tax filing deadlines"],
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] < 0.2 and scores[2] < 0.2


def test_related_text_scores_above_unrelated_text():
    related, unrelated = judge.default_judge().similarity(
        ["Diana, Princess of Wales"] * 2, ["the British royal family and the Prince of Wales", "a bowl of soup"]
    )
    assert related > 0.3 > unrelated


def test_best_picks_the_maximum_per_group_and_applies_the_threshold():
    frame = pd.DataFrame({
        "source": ["a"] * 3 + ["b"] * 3,
        "layer": [1, 1, 1, 1, 1, 1],
        "alpha": [1, 3, 6, 1, 3, 6],
        "similarity": [0.1, 0.5, 0.2, 0.05, 0.25, 0.29],
    })  # fmt: skip
    best = judge.best(frame, ["source", "layer"], threshold=0.3)
    assert best["alpha"].tolist() == [3, 6]
    assert best["success"].tolist() == [True, False]
    assert judge.best(frame, ["source", "layer"], threshold=0.2)["success"].tolist() == [True, True]


def test_missing_columns_are_named():
    frame = pd.DataFrame({"source": ["a"], "text": ["b"]})
    with pytest.raises(KeyError, match="column 'output' is not in the table; its columns are \\['source', 'text'\\]"):
        judge.score(frame, "source", "output")
    with pytest.raises(KeyError, match=r"columns \['similarity'\] are not in the table"):
        judge.best(frame, ["source"])
