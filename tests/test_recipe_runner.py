"""The shared recipe runner: threads, settings-keyed resume, the expected-rows check, types."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from recipes._common import Run, depth_layers, parser, run_recipe

UNITS = ["Diana", "Back to the Future", "Saturday Night Live"]


def build_parser():
    p = parser("toy", "a toy recipe")
    p.add_argument("--alphas", default="1,6")
    return p


def toy(run: Run, computed: list[str]) -> pd.DataFrame:
    """Two rows per unit; remembers which units it computed."""
    assert torch.get_num_threads() == run.args.threads
    alphas = [float(a) for a in run.args.alphas.split(",")]
    store = run.store("cells.csv", ["source"])
    for source in run.pending(store, UNITS, key=lambda s: [s]):
        computed.append(source)
        store.append(pd.DataFrame({"source": source, "alpha": alphas, "echo": [True, False][: len(alphas)]}))
    return run.cells(store, len(UNITS) * len(alphas), unique=["source", "alpha"])


def go(tmp_path, *argv: str) -> tuple[pd.DataFrame, list[str]]:
    computed: list[str] = []
    tables: list[pd.DataFrame] = []
    out = run_recipe(
        "toy", build_parser, lambda run: tables.append(toy(run, computed)), ["--out", str(tmp_path), *argv]
    )
    assert out == tmp_path
    return tables[0], computed


def test_threads_default_to_one_and_are_restored(tmp_path):
    before = torch.get_num_threads()
    go(tmp_path)
    assert torch.get_num_threads() == before
    assert build_parser().parse_args([]).threads == 1


def test_same_settings_resume_and_booleans_come_back(tmp_path):
    cells, computed = go(tmp_path)
    assert computed == UNITS and cells["echo"].dtype == bool
    cells, computed = go(tmp_path, "--threads", "2", "--batch-size", "8")  # how fast, not what: same rows
    assert computed == [] and len(cells) == 6


def test_other_settings_are_refused_or_go_to_a_new_file(tmp_path):
    go(tmp_path)
    with pytest.raises(SystemExit, match=r"toy: .*cells.csv was made with other settings \(seed: on disk 0, now 1\)"):
        go(tmp_path, "--seed", "1")
    with pytest.raises(SystemExit, match=r"alphas: on disk '1,6', now '1,9'"):
        go(tmp_path, "--alphas", "1,9")
    cells, computed = go(tmp_path, "--alphas", "1,9", "--new-file")
    assert computed == UNITS and set(cells["alpha"]) == {1.0, 9.0}
    assert len(list(tmp_path.glob("cells-*.csv"))) == 1


def test_edited_recipe_data_is_other_settings(tmp_path, monkeypatch):
    from recipes import _common

    go(tmp_path)
    monkeypatch.setattr(_common, "data_fingerprint", lambda: "edited")
    with pytest.raises(SystemExit, match=r"data: on disk '[0-9a-f]{16}', now 'edited'"):
        go(tmp_path)


def test_a_table_short_of_the_grid_stops_the_summary(tmp_path):
    computed: list[str] = []

    def short(run: Run) -> pd.DataFrame:
        toy(run, computed)
        return run.cells(run.store("cells.csv", ["source"]), 7)

    with pytest.raises(SystemExit, match="has 6 rows but this grid has 7"):
        run_recipe("toy", build_parser, short, ["--out", str(tmp_path)])


def test_depth_layers():
    assert depth_layers([0, 0.5, 1], 30) == [0, 14, 29]
    assert depth_layers([0, 0.5, 1], 12) == [0, 6, 11]


@pytest.mark.parametrize("model,noted", [("smollm2-135m", True), ("some/hub-model", False)])
def test_summaries_say_the_embedded_weights_are_dequantised_gguf(tmp_path, model, noted):
    from recipes._common import write_summary

    args = parser("x", "x").parse_args(["--model", model])
    path = write_summary(Run("x", args, tmp_path, "python -m recipes.x"), "T", "ours", "paper", {"a": 1}, [])
    assert ("4-bit GGUF checkpoints de-quantised to float32" in path.read_text()) is noted


def test_record_time_logs_each_invocation_and_counts_those_that_added_units(tmp_path):
    import time

    from recipes._common import record_time, setup, write_summary

    args = build_parser().parse_args(["--out", str(tmp_path)])

    def invocation(filename: str, units: list[str], seconds: float) -> Run:
        run = setup("toy", args, [])
        run.started = time.time() - seconds
        store = run.store(filename, ["source"])
        for source in units:
            store.append(pd.DataFrame({"source": [source], "alpha": [1.0]}))
        return run

    invocation("cells.csv", UNITS[:1], 10)  # killed before its summary: its finished unit logged its time
    log = pd.read_csv(tmp_path / "timings.csv")
    assert list(log["added"]) == [1] and log["seconds"].iloc[0] == pytest.approx(10, abs=0.5)
    assert record_time(invocation("cells.csv", UNITS[1:], 4)) == pytest.approx(14, abs=1)  # a resume adds 2
    run = invocation("cells.csv", [], 2)  # nothing to do: logged, not counted
    write_summary(run, "toy", "ours", "paper", {}, [])
    assert run.seconds == pytest.approx(14, abs=1)
    assert "- wall time: 14 s over the invocations that added results" in (tmp_path / "summary.md").read_text()
    log = pd.read_csv(tmp_path / "timings.csv")
    assert list(log["added"]) == [1, 2, 0] and set(log["threads"]) == {1} and set(log["model"]) == {args.model}
    assert log["started"].is_unique  # each invocation one row, however often it logged
    # A table made again from nothing: the earlier invocations no longer count.
    assert record_time(invocation("other.csv", UNITS, 3)) == pytest.approx(3, abs=0.5)
    assert len(pd.read_csv(tmp_path / "timings.csv")) == 1
    # Results made before the log: their time is not known, and the summary says so.
    (tmp_path / "timings.csv").unlink()
    write_summary(invocation("other.csv", [], 5), "toy", "ours", "paper", {}, [])
    assert "- wall time: not logged: the results were made before timings.csv" in (tmp_path / "summary.md").read_text()


def test_every_committed_run_was_made_with_the_recipes_data_as_it_is():
    """A run records a hash of the data the recipes read; a committed run whose hash is not the
    current one would be refused on resume (and its numbers may not be the data's). Formatting a
    file under recipes/data changed the hash once: recipes/data is outside ruff's reach since."""
    import json
    from pathlib import Path

    from recipes._common import data_fingerprint

    metas = sorted(Path(__file__).resolve().parents[1].glob("results/**/*.meta.json"))
    stale = [
        str(p)
        for p in metas
        if json.loads(p.read_text()).get("settings", {}).get("data", data_fingerprint()) != data_fingerprint()
    ]
    assert metas and not stale, f"made with other recipe data: {stale}"
