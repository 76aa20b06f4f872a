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
    S.SAE(
        W.T.clone(),
        torch.zeros(256),
        W,
        torch.zeros(576),
        "topk",
        k=16,
        site="resid_post",
        layer=15,
        mean_activation=torch.full((256,), 5.0),
    ).save(tmp_path / "sae")
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
    assert list(selected.index) == [sae_self_explanation.AUTHORS, "relevancy", "self-similarity", "entropy"]
    assert selected["n_prompts"].eq(6).all()
    # The authors' condition: per latent, 8 scales (--quick) from 0 to 2 x the injection site's
    # median norm; the chosen one is the argmax of self-similarity above scale 0 (index j + 1).
    authors = pd.read_csv(tmp_path / "out" / "authors.csv", keep_default_na=False)
    assert sorted(authors["latent"]) == sorted(cells["latent"].unique())
    for row in authors.itertuples():
        curve = json.loads(row.self_similarity_curve)
        assert len(curve) == 8 and curve[0] == 0 and json.loads(row.entropy_curve)[0] == 0
        best = max(range(1, 8), key=curve.__getitem__)
        assert row.scale_ratio == pytest.approx(2.0 * best / 7) and row.self_similarity == pytest.approx(
            curve[best], abs=1e-5
        )
    assert selected.loc[sae_self_explanation.AUTHORS, "mean_a"] == pytest.approx(authors["agreement"].mean(), abs=1e-6)
    assert (tmp_path / "out" / "scales.png").stat().st_size > 10_000 and "![scales.png](scales.png)" in (
        tmp_path / "out" / "summary.md"
    ).read_text()
    by_similarity = cells.loc[cells.groupby("latent")["self_similarity"].idxmax()]
    by_entropy = cells.loc[cells.groupby("latent")["entropy"].idxmin()]
    assert selected.loc["self-similarity", "mean_a"] == pytest.approx(by_similarity["agreement"].mean(), abs=1e-6)
    assert selected.loc["entropy", "mean_alpha"] == pytest.approx(by_entropy["alpha"].mean())
    assert (selected["p_holm"] >= selected["p"] - 1e-12).all()
    per_alpha = pd.read_csv(tmp_path / "out" / "per_alpha.csv")
    assert list(per_alpha["n_prompts"]) == [6, 6]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "shuffled-latent control" in summary and "95% CI" in summary
    # The control drawn 3 times: the stored cycle and two more; the comparisons use their mean.
    draws = pd.read_csv(tmp_path / "out" / "control_draws.csv").set_index("selector")
    columns = ["control, draw 0", "control, draw 1", "control, draw 2"]
    assert list(draws.columns) == [*columns, "min", "max", "sd"] and len(draws) == 4
    assert draws.loc[sae_self_explanation.AUTHORS, columns[0]] == pytest.approx(authors["control"].mean(), abs=1e-6)
    assert selected["mean_b"].to_numpy() == pytest.approx(draws[columns].mean(axis=1).to_numpy(), abs=1e-6)
    assert "drawn 3 times" in summary


def test_the_authors_layers_scale_with_depth_and_the_replacement_reaches_the_probe(smollm2):
    """2/18 and 16/18 of the layers (Gemma-2B's 2 and 16; SmolLM2's 3 and 27 of 30); the
    replaced residual is what the injection layer receives at every placeholder."""
    from recipes import sae_self_explanation as R

    assert R.depth_layers(18) == (2, 16) and R.depth_layers(30) == (3, 27)
    ids, positions = R.placeholders(smollm2.tokenizer, R.REPEAT)
    assert len(positions) == 4 and all(smollm2.tokenizer.decode([ids[p]]).strip() == "x" for p in positions)
    vectors = torch.randn(2, 576, generator=torch.Generator().manual_seed(0)) * 30
    batch = torch.tensor([ids[: positions[0] + 1]] * 2)  # the last position is the first placeholder
    with torch.inference_mode():
        probed, _ = R.replaced(smollm2, batch, positions[:1], 3, vectors, 3)
    assert torch.allclose(probed, vectors, atol=1e-3)
    similarity, entropy = R.scale_sweep(smollm2, vectors[0], torch.tensor([0.0, 10.0, 200.0]), 3, 27)
    assert similarity[0] == 0 and entropy[0] == 0 and similarity[2] > similarity[1]
