"""The judge's discrimination: true vs mismatched prompt, and the true prompt's rank among all."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from superscopes import judge


class WordJudge:
    """Embeds a text as the unit vector of its word counts over a fixed vocabulary."""

    VOCAB = ["band", "film", "king", "queen", "city", "noise"]

    def embed(self, texts):
        rows = torch.tensor([[float(t.split().count(w)) for w in self.VOCAB] for t in texts]) + 1e-3
        return torch.nn.functional.normalize(rows, dim=-1)


PROMPTS = ["band", "film", "king", "queen"]


def test_readouts_that_name_their_prompt_rank_first_and_beat_the_mismatched_one():
    frame = pd.DataFrame({"source": PROMPTS * 3, "output": [f"{p} {p}" for p in PROMPTS] * 3})
    d = judge.discrimination(frame, WordJudge())
    assert d["n_prompts"] == 4 and d["n_candidates"] == 4 and d["n_readouts"] == 12
    assert d["mean_rank"] == 1.0 and d["chance_rank"] == 2.5
    assert d["mean_a"] == pytest.approx(1.0, abs=1e-3) and d["mean_b"] < 0.01 and d["ci_low"] > 0.9
    assert "ranks 1.0" in judge.describe_discrimination(d)


def test_readouts_that_ignore_their_prompt_sit_at_chance():
    frame = pd.DataFrame({"source": PROMPTS, "output": ["noise"] * 4})
    d = judge.discrimination(frame, WordJudge())
    assert d["difference"] == pytest.approx(0.0, abs=1e-6)
    assert d["mean_rank"] == pytest.approx(2.5)  # four tied prompts share ranks 1-4


def test_a_readout_closer_to_another_prompt_ranks_below_it():
    frame = pd.DataFrame({"source": ["band", "film", "king", "queen"], "output": ["film", "film", "king", "queen"]})
    d = judge.discrimination(frame, WordJudge())
    # "band"'s readout: "film" above it, "king" and "queen" tied with it (ranks 2-4 shared: 3).
    assert d["mean_rank"] == pytest.approx((3 + 1 + 1 + 1) / 4)


def test_one_prompt_is_refused():
    with pytest.raises(ValueError, match="at least two source prompts"):
        judge.discrimination(pd.DataFrame({"source": ["band"], "output": ["band"]}), WordJudge())
