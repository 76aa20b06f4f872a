"""recipes.scale: the headlines across models, read from the committed runs and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from recipes import scale

RESULTS = Path(__file__).resolve().parent.parent / "results"


def test_the_table_reads_each_models_own_runs_and_marks_the_missing(tmp_path):
    # SmolLM2's committed runs, and the same evaluation copied in as if another model had made it.
    for recipe in ("superscopes_evaluation", "token_identity"):
        shutil.copytree(RESULTS / recipe, tmp_path / recipe)
    shutil.copytree(RESULTS / "superscopes_evaluation", tmp_path / "gemma3-270m" / "superscopes_evaluation")
    table = scale.scale_table(tmp_path)
    assert list(table.columns) == list(scale.MODELS.values())
    judge_row = "judge: own vs mismatched prompt (mean of 3 draws; difference), own prompt's rank"
    d = pd.read_csv(RESULTS / "superscopes_evaluation" / "judge_discrimination.csv").iloc[0]
    assert (
        table.loc[judge_row, "SmolLM2-135M"].startswith(
            f"{d['mean_a']:.3f} vs {d['mean_b']:.3f}: {d['difference']:+.3f}"
        )
        and f"(single draws {d['draw_low']:+.3f} to {d['draw_high']:+.3f})" in table.loc[judge_row, "SmolLM2-135M"]
    )
    assert table.loc[judge_row, "Gemma-3-270m"] == table.loc[judge_row, "SmolLM2-135M"]
    assert set(table["Qwen2.5-Coder-1.5B"]) == {"not run"}
    assert table.loc["entity description: RougeL of α=1 readouts", "SmolLM2-135M"] == "not run"
    equal_tries = table.loc[
        "Superscopes vs Patchscopes at equal tries (cross-fitted α), per-prompt success", "SmolLM2-135M"
    ]
    row = (
        pd.read_csv(RESULTS / "superscopes_evaluation" / "comparisons.csv")
        .set_index("comparison")
        .loc["Superscopes (cross-fitted) vs Patchscopes"]
    )
    assert f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" in equal_tries and "(above)" not in equal_tries


def test_the_committed_doc_is_what_the_command_writes_now(tmp_path):
    out = scale.main(["--results", str(RESULTS), "--out", str(tmp_path / "scale.md")])
    assert out.read_text() == (RESULTS.parent / "docs" / "scale.md").read_text()
