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


def test_the_mismatched_prompt_is_drawn_three_times_and_the_spread_reported():
    # "band"'s readouts also name "film": its mismatched similarity depends on the draw.
    frame = pd.DataFrame({"source": PROMPTS, "output": ["band film", "film", "king", "queen"]})
    d = judge.discrimination(frame, WordJudge())
    # With four prompts the three draws are the three shifts: every other prompt, once each.
    similarity = WordJudge().embed(list(frame["output"])) @ WordJudge().embed(sorted(PROMPTS)).T
    own = [sorted(PROMPTS).index(p) for p in frame["source"]]
    others = [float(similarity[i, [j for j in range(4) if j != own[i]]].mean()) for i in range(4)]
    assert d["draws"] == 3 and d["mean_b"] == pytest.approx(sum(others) / 4, abs=1e-6)
    singles = [
        float((similarity[range(4), own] - similarity[range(4), [(o + s) % 4 for o in own]]).mean()) for s in (1, 2, 3)
    ]
    assert (d["draw_low"], d["draw_high"]) == pytest.approx((min(singles), max(singles)), abs=1e-6)
    assert d["draw_low"] < d["draw_high"]
    assert "mean of 3 draws" in judge.describe_discrimination(d) and "single draws" in judge.describe_discrimination(d)


def test_the_draws_are_seeded_distinct_shifts():
    prompts = [f"p{i}" for i in range(10)]
    frame = pd.DataFrame({"source": prompts, "output": ["noise"] * 10})
    assert judge.discrimination(frame, WordJudge(), seed=1) == judge.discrimination(frame, WordJudge(), seed=1)
    assert judge.discrimination(frame, WordJudge(), draws=1)["draws"] == 1
    assert judge.discrimination(frame.head(2), WordJudge(), draws=5)["draws"] == 1  # one other prompt only
    with pytest.raises(ValueError, match="draws must be a positive whole number, got 0"):
        judge.discrimination(frame, WordJudge(), draws=0)
