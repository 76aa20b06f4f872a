"""Resumable result stores: an interrupted run loses and duplicates nothing."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from superscopes.results import ResultStore, SettingsMismatchError, read_table, save_table


def unit(prompt: str, n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source": [prompt] * n,
            "alpha": list(range(n)),
            "output": ["a, b", "", "x\ny"][:n],
            "output_ids": [[1, 2], [], [3]][:n],
        }
    )


def run_units(store: ResultStore, prompts: list[str], crash_after: int | None = None) -> None:
    done = store.done()
    for i, prompt in enumerate(prompts):
        if store.key([prompt]) in done:
            continue
        if crash_after is not None and i >= crash_after:
            raise KeyboardInterrupt
        store.append(unit(prompt))


def test_resume_after_interruption_has_every_row_once(tmp_path):
    prompts = ["Diana", "Back to the Future", "Saturday Night Live", "Alexander the Great"]
    store = ResultStore(tmp_path / "cells.csv", ["source"])
    try:
        run_units(store, prompts, crash_after=2)
    except KeyboardInterrupt:
        pass
    assert store.done() == {("Diana",), ("Back to the Future",)}
    run_units(ResultStore(tmp_path / "cells.csv", ["source"]), prompts)
    frame = ResultStore(tmp_path / "cells.csv", ["source"]).load()
    assert len(frame) == 12 and not frame.duplicated(["source", "alpha"]).any()
    assert frame["source"].drop_duplicates().tolist() == prompts
    assert frame["output"].tolist()[:3] == ["a, b", "", "x\ny"]  # empty strings and newlines survive
    assert frame["output_ids"].tolist()[:3] == [[1, 2], [], [3]]


def test_a_half_written_last_line_is_dropped(tmp_path):
    path = tmp_path / "cells.csv"
    store = ResultStore(path, ["source"])
    store.append(unit("Diana"))
    with open(path, "a") as f:
        f.write("Back to the Fu")  # the process died mid-write
    store = ResultStore(path, ["source"])
    assert store.done() == {("Diana",)}
    store.append(unit("Back to the Future"))
    assert len(store.load()) == 6


SETTINGS = {"model": "smollm2-135m", "alphas": [1, 3, 6], "prompts": ["Diana"], "seed": 0}


def test_same_settings_resume(tmp_path):
    ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS).append(unit("Diana"))
    again = ResultStore(tmp_path / "cells.csv", ["source"], settings=dict(SETTINGS, alphas=(1, 3, 6)))
    assert again.done() == {("Diana",)}


def test_other_settings_are_refused_naming_what_differs(tmp_path):
    ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS).append(unit("Diana"))
    with pytest.raises(SettingsMismatchError, match=r"alphas: on disk \[1, 3, 6\], now \[1, 9\]") as error:
        ResultStore(tmp_path / "cells.csv", ["source"], settings=dict(SETTINGS, alphas=[1, 9]))
    assert "model" not in str(error.value)  # only what differs is named


def test_other_settings_can_go_to_a_new_file(tmp_path):
    ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS).append(unit("Diana"))
    other = ResultStore(tmp_path / "cells.csv", ["source"], settings=dict(SETTINGS, seed=1), on_mismatch="new")
    assert other.path != tmp_path / "cells.csv" and other.done() == set()
    other.append(unit("Diana"))
    again = ResultStore(tmp_path / "cells.csv", ["source"], settings=dict(SETTINGS, seed=1), on_mismatch="new")
    assert again.path == other.path and again.done() == {("Diana",)}
    assert len(ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS).load()) == 3


def test_a_store_without_recorded_settings_is_refused(tmp_path):
    unit("Diana").to_csv(tmp_path / "cells.csv", index=False)  # an old-style store: rows, no record
    with pytest.raises(SettingsMismatchError, match="no settings are recorded"):
        ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS)


def test_a_unit_cut_off_part_way_is_redone(tmp_path):
    """Complete lines of a unit without its record (killed between rows and record) are not done."""
    path = tmp_path / "cells.csv"
    store = ResultStore(path, ["source"], settings=SETTINGS)
    store.append(unit("Diana"))
    with open(path, "a") as f:  # two of the three rows of the next unit made it to disk
        f.write('Back to the Future,0,"a, b",[1]\nBack to the Future,1,,[]\n')
    store = ResultStore(path, ["source"], settings=SETTINGS)
    assert store.done() == {("Diana",)}
    assert len(store.load()) == 3  # the partial rows are gone, so the redo does not duplicate them
    store.append(unit("Back to the Future"))
    assert len(store.load()) == 6 and not store.load().duplicated(["source", "alpha"]).any()


def test_a_unit_missing_rows_is_rebuilt_from_the_journal_or_redone_without_it(tmp_path):
    path = tmp_path / "cells.csv"
    store = ResultStore(path, ["source"], settings=SETTINGS)
    store.append(unit("Diana", n=2))  # no newline inside a value: the file's lines are its rows
    whole = path.read_bytes()
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # one row of the recorded unit lost
    assert ResultStore(path, ["source"], settings=SETTINGS).done() == {("Diana",)}
    assert path.read_bytes() == whole  # the CSV is rebuilt from the journal
    path.write_text("".join(lines[:-1]))
    store.journal_path.unlink()  # a CSV and its record without the journal (a commit of results/)
    assert ResultStore(path, ["source"], settings=SETTINGS).done() == set()


def test_a_deleted_table_is_redone_even_if_its_record_stays(tmp_path):
    ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS).append(unit("Diana"))
    (tmp_path / "cells.csv").unlink()
    assert ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS).done() == set()


def test_new_columns_are_kept_on_append(tmp_path):
    store = ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS)
    store.append(unit("Diana"))
    store.append(unit("Back to the Future").assign(similarity=0.5))
    frame = ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS).load()
    assert frame["similarity"].tolist()[3:] == [0.5] * 3 and frame["similarity"][:3].isna().all()


def test_csv_store_round_trip_keeps_types(tmp_path):
    frame = pd.DataFrame(
        {
            "source": ["Diana", "Diana"],
            "layer": [1, 2],
            "alpha": [1.0, 6.0],
            "output": ["1135", "12"],
            "success": [True, False],
            "output_ids": [[5, 7], []],
            "output_probs": [[0.5, 0.25], []],
        }
    )
    store = ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS)
    store.append(frame)
    back = ResultStore(tmp_path / "cells.csv", ["source"], settings=SETTINGS).load()
    assert back["output"].tolist() == ["1135", "12"]  # text that looks like numbers stays text
    assert back["success"].tolist() == [True, False] and back["success"].dtype == bool
    assert back["output_ids"].tolist() == [[5, 7], []] and all(isinstance(i, int) for i in back["output_ids"][0])
    assert back["layer"].tolist() == [1, 2] and back["layer"].dtype == "int64"
    assert back["output_probs"].tolist() == [[0.5, 0.25], []]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_save_and_read_table_keep_values_and_types(tmp_path, suffix):
    frame = pd.DataFrame(
        {
            "source": ["Diana"],
            "layer": [3],
            "alpha": [1.5],
            "output": ["1135"],
            "best": ["*"],
            "output_ids": [[9, 10, 11]],
            "success": [True],
        }
    )
    save_table(frame, tmp_path / f"t{suffix}")
    back = read_table(tmp_path / f"t{suffix}")
    assert back.to_dict("records") == frame.to_dict("records")
    assert [type(i) for i in back["output_ids"][0]] == [int, int, int]
    assert back["success"].dtype == bool and back["output"][0] == "1135"


@pytest.mark.parametrize(
    "name,message",
    [("t.xlsx", "extension '.xlsx'; use one of .csv, .parquet"), ("t", "extension ''; use one of .csv, .parquet")],
)
def test_save_table_refuses_unknown_extensions(tmp_path, name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        save_table(pd.DataFrame({"a": [1]}), tmp_path / name)


def test_reading_a_table_without_a_record_leaves_it_alone(tmp_path):
    unit("Diana").to_csv(tmp_path / "cells.csv", index=False)
    before = (tmp_path / "cells.csv").read_bytes()
    assert len(ResultStore(tmp_path / "cells.csv", ["source"]).load()) == 3
    assert (tmp_path / "cells.csv").read_bytes() == before


def test_a_carriage_return_in_a_field_stays_inside_its_row(tmp_path):
    """Tokenizers decode some tokens to a lone "\r" (Qwen2.5's top-1 at a line end): Python's CSV
    writer leaves such a field unquoted, which split the row for every reader."""
    frame = pd.DataFrame({"source": ["a", "b"], "pred_token": ["\r", "x\r\ny"], "ids": [[13], [1, 2]]})
    store = ResultStore(tmp_path / "cells.csv", ["source"])
    store.append(frame.iloc[:1])
    store.append(frame.iloc[1:])  # one unit appended to the CSV, the other written whole
    for loaded in (
        store.load(),
        ResultStore(tmp_path / "cells.csv", ["source"]).load(),
        pd.read_csv(tmp_path / "cells.csv", keep_default_na=False),
    ):
        assert loaded["pred_token"].tolist() == ["\r", "x\r\ny"] and len(loaded) == 2
    save_table(frame, tmp_path / "table.csv")
    assert read_table(tmp_path / "table.csv")["pred_token"].tolist() == ["\r", "x\r\ny"]
