"""The sae_self_explanation recipe's --quick run on SmolLM2 (a random SAE, so it needs no training)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import superscopes
from superscopes import corpus
from superscopes import sae as S


class Killed(Exception):
    """Stands for a run killed mid-way."""


def test_sae_self_explanation_quick(smollm2, monkeypatch, tmp_path):
    monkeypatch.setattr(superscopes, "load", lambda name=None, remote=False, **kw: smollm2)
    W = torch.randn(256, 576, generator=torch.Generator().manual_seed(0))
    W /= W.norm(dim=-1, keepdim=True)
    S.SAE(W.T.clone(), torch.zeros(256), W, torch.zeros(576), "topk", k=16, site="resid_post", layer=15,
          mean_activation=torch.full((256,), 5.0)).save(tmp_path / "sae")  # fmt: skip
    from recipes import sae_self_explanation

    # Killed in its second pass (2 latents x 2 alphas per pass at --batch-size 4), then resumed.
    real, passes, killed = S.explanation_scores, [], []

    def killed_in_pass_two(model, scope, frame):
        passes.append(list(scope.prompts))
        if len(passes) == 2 and not killed:
            killed.append(True)
            raise Killed
        return real(model, scope, frame)

    monkeypatch.setattr(S, "explanation_scores", killed_in_pass_two)
    # The corpus: folder a; b holds the same passages elsewhere; c has one passage changed.
    passages = corpus.FALLBACK
    for folder, texts in (("a", passages), ("b", passages), ("c", [passages[0] + " Changed.", *passages[1:]])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    argv = ["--quick", "--batch-size", "4", "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "out"), "--corpus"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(Killed):
            sae_self_explanation.main([*argv, str(tmp_path / "a")])
        saved = pd.read_csv(tmp_path / "out" / "cells.csv", keep_default_na=False)
        assert len(saved) == 4
        passes.clear()
        sae_self_explanation.main([*argv, str(tmp_path / "b")])  # the same passages in another folder resume
        with pytest.raises(SystemExit, match="corpus"):  # other passages would mix rows of two corpora
            sae_self_explanation.main([*argv, str(tmp_path / "c")])
    finally:
        torch.set_num_threads(threads)
    explained_again = {int(name.split()[-1]) for prompts in passes for name in prompts}
    assert len(passes) == 2 and not explained_again & set(saved["latent"])
    cells = pd.read_csv(tmp_path / "out" / "cells.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(cells.head(4), saved)
    assert not cells.duplicated(["latent", "alpha"]).any()
    assert len(cells) == 6 * 2 and sorted(set(cells["alpha"])) == [1.0, 4.0]
    assert cells[["agreement", "control", "self_similarity"]].abs().le(1 + 1e-6).all().all()
    assert (cells.groupby("latent").size() == 2).all() and cells["contexts"].str.len().gt(0).all()
    assert cells["entropy"].ge(0).all()
    # Each selector takes, per latent, the alpha with the best value of its own column.
    selected = pd.read_csv(tmp_path / "out" / "selected.csv").set_index("selector")
    assert list(selected.index) == ["relevancy", "self-similarity", "entropy"] and selected["n_prompts"].eq(6).all()
    by_similarity = cells.loc[cells.groupby("latent")["self_similarity"].idxmax()]
    by_entropy = cells.loc[cells.groupby("latent")["entropy"].idxmin()]
    assert selected.loc["self-similarity", "mean_a"] == pytest.approx(by_similarity["agreement"].mean(), abs=1e-6)
    assert selected.loc["entropy", "mean_alpha"] == pytest.approx(by_entropy["alpha"].mean())
    assert (selected["p_holm"] >= selected["p"] - 1e-12).all()
    per_alpha = pd.read_csv(tmp_path / "out" / "per_alpha.csv")
    assert list(per_alpha["n_prompts"]) == [6, 6]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "shuffled-latent control" in summary and "95% CI" in summary
