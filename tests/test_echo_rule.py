"""One echo rule on every path that judges readouts: Python (``judge.score`` + ``judge.best``),
``superscopes scope --judge``, ``superscopes judge``, the recipes and the explorer."""

from __future__ import annotations

import pandas as pd
import pytest

import superscopes
from superscopes import judge
from superscopes.cli import main
from superscopes.metrics import is_echo
from superscopes.prompts import ENTITY_DESCRIPTION

OUTPUTS = {  # readout -> a fake similarity that ranks the two echoes above the readout
    "-great-great-great": 0.9,  # only the source token
    ": American actor, Samsung: South": 0.8,  # copies a two-word example description
    ": Macedonian king who conquered Persia": 0.5,
}
ECHO = [True, True, False]
WINNER = ": Macedonian king who conquered Persia"


class FakeJudge:
    def similarity(self, sources, outputs):
        return [OUTPUTS[o] for o in outputs]


def table(**columns) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "model": "tiny-llama",
            "source": "Alexander the Great",
            "token": " Great",
            "position": 3,
            "site": "resid_post",
            "layer": 4,
            "target": ENTITY_DESCRIPTION,
            "target_layer": 0,
            "target_position": 0,
            "transform": "scale",
            "alpha": [3.0, 6.0, 9.0],
            "output": list(OUTPUTS),
        }
    )
    return frame.assign(**columns)


@pytest.fixture
def fake_judge(monkeypatch):
    monkeypatch.setattr(judge, "default_judge", FakeJudge)


def test_the_rule_catches_short_example_descriptions_and_keeps_readouts():
    assert is_echo(": American actor, Samsung", " Great", ENTITY_DESCRIPTION)
    assert is_echo("American actor and producer", "", ENTITY_DESCRIPTION)
    assert not is_echo("Country in the United Kingdom", " Wales", ENTITY_DESCRIPTION)  # a frame, new answer
    assert not is_echo("American president", "", ENTITY_DESCRIPTION)  # one word of a description


def test_python_path_flags_and_never_picks_an_echo(fake_judge):
    scored = judge.score(table())
    assert scored["echo"].tolist() == ECHO
    assert judge.best(scored, ["source", "token", "site", "layer"])["output"].tolist() == [WINNER]


def test_scope_judge_command_marks_no_echo_best(fake_judge, monkeypatch, tmp_path, capsys):
    from superscopes.app.testing import tiny_model

    monkeypatch.setattr(superscopes, "load", lambda *args, **kwargs: tiny_model())

    def run(model, scope, **settings):  # the grid's frame, then its frame readouts: --judge asks for the judge's
        from superscopes import readouts

        assert "judge" in scope.readouts
        return table().assign(**readouts.REGISTRY["judge"].annotate(model, model, scope, table(), False, None))

    monkeypatch.setattr(superscopes, "run", run)
    out = tmp_path / "great.csv"
    assert main(["scope", "Alexander the Great", "--token", "Great", "--judge", "--out", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert frame.loc[frame["best"] == "*", "output"].tolist() == [WINNER]
    assert " echo " in capsys.readouterr().out.splitlines()[0]  # the printed table says which rows echo
    assert frame["echo"].tolist() == ECHO


def test_judge_command_uses_the_same_rule(fake_judge, tmp_path, capsys):
    path, out = tmp_path / "t.csv", tmp_path / "judged.csv"
    table().to_csv(path, index=False)
    argv = ["judge", str(path), "--source-col", "source", "--output-col", "output", "--group-cols", "site,layer"]
    assert main([*argv, "--out", str(out)]) == 0
    judged = pd.read_csv(out)
    assert judged["echo"].tolist() == ECHO
    assert judged.loc[judged["winner"], "output"].tolist() == [WINNER]


def test_judge_command_without_a_target_column(fake_judge, tmp_path, capsys):
    """It says the examples could not be checked, or takes --target / --target-col."""
    path, out = tmp_path / "t.csv", tmp_path / "judged.csv"
    table().drop(columns=["target"]).assign(prompt=ENTITY_DESCRIPTION).to_csv(path, index=False)
    argv = ["judge", str(path), "--source-col", "source", "--output-col", "output", "--out", str(out)]
    assert main(argv) == 0
    assert "echoes of the target prompt's examples could not be checked" in capsys.readouterr().err
    assert pd.read_csv(out)["echo"].tolist() == [True, False, False]  # the token echo only
    for extra in (["--target", ENTITY_DESCRIPTION], ["--target-col", "prompt"]):
        assert main([*argv, *extra]) == 0
        assert "could not be checked" not in capsys.readouterr().err
        assert pd.read_csv(out)["echo"].tolist() == ECHO
    assert main([*argv, "--target-col", "nope"]) == 2
    assert "['nope'] are not in" in capsys.readouterr().err


def test_recipes_and_explorer_use_the_same_rule(fake_judge):
    """The recipes judge through ``judge.score``/``flag_echoes``; the explorer flags each chunk
    with ``flag_echoes(frame, target=...)`` after scoring it."""
    from recipes.entity_description import score as entity_description_score

    assert entity_description_score(table(reference="king of Macedon"))["echo"].tolist() == ECHO
    assert judge.flag_echoes(table().drop(columns=["target"]), target=ENTITY_DESCRIPTION)["echo"].tolist() == ECHO


def explorer_rows() -> list[dict]:
    """The table's rows as the explorer holds them (flagged by its chunk step)."""
    frame = judge.flag_echoes(table(similarity=list(OUTPUTS.values())), target=ENTITY_DESCRIPTION)
    return [{**row, "echo": bool(row["echo"])} for row in frame.to_dict("records")]


def test_explorer_server_picks_no_echo_as_best():
    """The best readout the explorer runs controls beside (``best_rows``)."""
    from superscopes.app.server import best_rows

    (best,) = best_rows(explorer_rows()).values()
    assert best["output"] == WINNER
    all_echo = [r for r in explorer_rows() if r["echo"]]
    assert best_rows(all_echo)[(3, "resid_post", 4)]["output"] == "-great-great-great"  # a group of echoes


def test_explorer_page_picks_no_echo_as_best():
    """The page's own choice of each cell's best readout (``bestOf``), in Node."""
    import json
    import shutil
    import subprocess

    from superscopes.app.server import STATIC

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    rows = json.dumps(explorer_rows())
    code = f"const app = require({json.dumps(str(STATIC / 'app.js'))});\nconsole.log(app.bestOf({rows}).output);"
    done = subprocess.run([node, "-e", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == WINNER
