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
    frame = pd.DataFrame(
        {
            "source": ["a"] * 3 + ["b"] * 3,
            "layer": [1, 1, 1, 1, 1, 1],
            "alpha": [1, 3, 6, 1, 3, 6],
            "similarity": [0.1, 0.5, 0.2, 0.05, 0.25, 0.29],
        }
    )
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


def test_echoes_never_win_a_group():
    frame = pd.DataFrame({"source": ["a", "a", "b"], "similarity": [0.9, 0.4, 0.8], "echo": [True, False, True]})
    best = judge.best(frame, ["source"], threshold=0.3)
    assert best["similarity"].tolist() == [0.4, 0.8]  # a: the best non-echo; b: only an echo
    assert best["success"].tolist() == [True, False]


def test_judge_command_counts_successes_per_layer_and_marks_winners(tmp_path, capsys):
    from superscopes.cli import main
    from superscopes.prompts import ENTITY_DESCRIPTION
    from superscopes.results import read_table

    rows = [  # (layer, alpha, readout)
        (1, 1, ": a bowl of soup"),
        (1, 6, ": Princess of Wales, member of the British royal family"),
        (2, 1, " Wales Wales Wales"),
        (2, 6, ": Leonardo DiCaprio: American actor"),
    ]
    table = pd.DataFrame(
        [
            {
                "source": "Diana, Princess of Wales",
                "token": "Wales",
                "target": ENTITY_DESCRIPTION,
                "layer": layer,
                "alpha": alpha,
                "output": text,
            }
            for layer, alpha, text in rows
        ]
    )
    table.to_csv(tmp_path / "cells.csv", index=False)
    out = tmp_path / "judged.csv"
    assert (
        main(
            [
                "judge",
                str(tmp_path / "cells.csv"),
                "--source-col",
                "source",
                "--output-col",
                "output",
                "--group-cols",
                "source,layer",
                "--by",
                "layer",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "1/2 groups above 0.3" in printed and "2 of 4 readouts echo" in printed
    judged = read_table(str(out))
    assert judged["winner"].tolist() == [False, True, True, False]  # layer 2: both echo, the better one is kept
    assert judged.groupby("layer")["winner"].sum().tolist() == [1, 1]
    assert judged["group_success"].tolist() == [True, True, False, False]
    assert judged["echo"].tolist() == [False, False, True, True]


def test_judge_command_names_a_missing_column_before_scoring(tmp_path, capsys, monkeypatch):
    from superscopes.cli import main

    pd.DataFrame({"source": ["a"], "output": ["b"]}).to_csv(tmp_path / "t.csv", index=False)
    monkeypatch.setattr(judge, "default_judge", lambda: pytest.fail("the judge loaded before the columns were checked"))
    assert (
        main(
            [
                "judge",
                str(tmp_path / "t.csv"),
                "--source-col",
                "source",
                "--output-col",
                "output",
                "--group-cols",
                "source,layer",
            ]
        )
        != 0
    )
    assert "column(s) ['layer'] are not in" in capsys.readouterr().err
