"""Resumable result stores: an interrupted run loses and duplicates nothing."""

from __future__ import annotations

import pandas as pd

from superscopes.results import ResultStore


def unit(prompt: str, n: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"source": [prompt] * n, "alpha": list(range(n)), "output": ["a, b", "", "x\ny"][:n],
                         "output_ids": [[1, 2], [], [3]][:n]})  # fmt: skip


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
