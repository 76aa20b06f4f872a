"""A readout is one file plus one registry line: a toy readout, registered in this test only,
shows up in a ``superscopes.run`` frame, through the command line and in the list the explorer
reads; the grid and the command line know readouts only through the registry."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch

import superscopes
from superscopes import ops, readouts
from superscopes.cli import main
from superscopes.readouts import Context, Readout, register
from superscopes.sites import ScopeError, num_layers
from superscopes.spec import plan


class FinalNorm(Readout):
    """The norm of the final hidden state (the last block's ``resid_post``) at the last position."""

    name = "final_norm"
    columns = ("final_norm",)
    description = "norm of the last block's output at the last position"

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        return (ops.read(model, "resid_post", num_layers(model) - 1).float().norm(dim=-1),)

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        return {"final_norm": float(values[0][row])}


@pytest.fixture
def registry():
    """The registry as it was before the test, restored after it."""
    saved = dict(readouts.REGISTRY)
    yield readouts.REGISTRY
    readouts.REGISTRY.clear()
    readouts.REGISTRY.update(saved)


@pytest.fixture
def toy(registry):
    """The toy readout registered for this test only."""
    register(FinalNorm())


def grid(**settings) -> superscopes.Scope:
    return superscopes.Scope(
        prompts=["Diana, Princess of Wales"], sites=["resid_post"], layers=[0], alphas=[1, 15], **settings
    )


@pytest.mark.parametrize("output", ["topk", "generate"])
@pytest.mark.parametrize("remote", [False, "local"])
def test_a_registered_readout_is_a_column_of_the_frame(tiny_models, toy, output, remote):
    model = tiny_models["llama"]
    frame = superscopes.run(
        model, grid(output=output, max_new_tokens=2, readouts=["final_norm"]), remote=remote, progress=False
    )
    assert "final_norm" in frame.columns and len(frame) == 2
    norms = frame.sort_values("alpha")["final_norm"].tolist()
    assert all(math.isfinite(n) and n > 0 for n in norms)
    assert norms[0] != norms[1]  # it reads the patched pass: alpha 15 at layer 0 changes the last block
    assert frame["output"].notna().all()  # beside the primary readout's own columns


def test_a_readout_that_is_not_registered_is_refused_with_the_choices(tiny_models):
    with pytest.raises(ScopeError, match=r"readout 'final_norm' is not valid; choose from lens, affine_lens, sae,"):
        superscopes.run(tiny_models["llama"], grid(output="topk", readouts=["final_norm"]), progress=False)


def test_available_lists_the_readouts_with_their_columns(toy):
    listed = {r["name"]: r for r in readouts.available()}
    assert listed["final_norm"]["columns"] == ["final_norm"] and listed["final_norm"]["stage"] == "patch"
    assert listed["topk"]["primary"] and listed["topk"]["columns"] == ["output", "output_ids", "output_probs"]
    assert listed["lens"]["columns"] == ["lens", "lens_ids", "lens_probs"]


def test_the_command_line_reads_the_registry(tiny_models, toy, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(superscopes, "load", lambda *args, **kwargs: tiny_models["llama"])
    out = tmp_path / "cells.csv"
    argv = ["scope", "Diana, Princess of Wales", "--sites", "resid_post", "--layers", "0", "--alphas", "1,15"]
    code = main([*argv, "--max-new-tokens", "2", "--readout", "topk,final_norm", "--out", str(out)])
    assert code == 0
    frame = pd.read_csv(out)
    assert "final_norm" in frame.columns and "output_probs" in frame.columns and len(frame) == 2
    assert "final_norm" in capsys.readouterr().out


@pytest.mark.parametrize(
    "value,message",
    [
        ("nope", r"--readout 'nope' is not a readout; choose from generate, topk, lens, affine_lens, .*, final_norm"),
        ("generate,topk", r"--readout generate and topk: give at most one of generate, topk"),
    ],
)
def test_the_command_line_names_a_bad_readout_before_the_model_loads(toy, monkeypatch, capsys, value, message):
    monkeypatch.setattr(superscopes, "load", lambda *args, **kwargs: pytest.fail("the model loaded"))
    assert main(["scope", "Diana", "--readout", value]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_explorer_offers_a_registered_readout_and_serves_its_column(toy, tmp_path):
    from superscopes.app import App
    from superscopes.app.store import RunStore
    from superscopes.app.testing import fake_similarity, tiny_model
    from tests.test_app import NAME, Client, start

    app = App(
        default_model=NAME,
        models={NAME: tiny_model(name=NAME)},
        offer_embedded=False,
        judge=fake_similarity,
        store=RunStore(tmp_path / "runs.sqlite"),
    )
    server = start(app)
    try:
        api = Client(server.url.rstrip("/"), app)
        status, config = api.json("GET", "/api/config")
        offered = "lens, affine_lens, sae, self_similarity, relevancy, final_norm"  # not judge: the explorer judges
        assert status == 200 and [r["name"] for r in config["readouts"]] == offered.split(", ")
        status, refused = api.run(readouts=["nope"])
        assert status == 400 and f"readout 'nope' is not offered here; choose from {offered}" in refused["error"]
        status, job = api.run(sites=["resid_post"], readouts=["final_norm"], controls=False)
        assert status == 202, job
        state = api.wait(job["job"])
        assert state["status"] == "done" and state["rows"]
        assert all(isinstance(row["final_norm"], float) and row["final_norm"] > 0 for row in state["rows"])
    finally:
        server.shutdown()


# ---------------------------------------------------------------- the shipped readouts, each against a reference


def two_prompts(**settings) -> superscopes.Scope:
    """Two prompts of different lengths, so a batched pass pads one of them."""
    settings = {"sites": ["resid_post"], "layers": [0, 1], "alphas": [1, 4], "output": "topk"} | settings
    return superscopes.Scope(prompts=["Diana, Princess of Wales", "the Eiffel Tower"], **settings)


def source_vectors(model, frame: pd.DataFrame, scope: superscopes.Scope) -> torch.Tensor:
    """Each row's read source vector, read again independently of the grid."""
    prompts = list(scope.prompts)
    reads = [(prompts.index(r.source), r.position, r.site, r.layer) for r in frame.itertuples(index=False)]
    return superscopes.scope.read_vectors(model, prompts, reads)


def test_the_affine_lens_applies_each_layer_map_then_the_unembedding(tiny_models, registry):
    from superscopes import lens

    model = tiny_models["llama"]
    d = superscopes.sites.hidden_size(model)
    generator = torch.Generator().manual_seed(0)
    maps = {0: (torch.eye(d), torch.zeros(d)), 1: (torch.randn(d, d, generator=generator) / d**0.5, torch.ones(d))}
    register(readouts.AffineLens(maps))
    scope = two_prompts(readouts=["lens", "affine_lens"], top_k=3)
    frame = superscopes.run(model, scope, progress=False)
    at0, at1 = frame[frame["layer"] == 0], frame[frame["layer"] == 1]
    assert at0["affine_lens_ids"].tolist() == at0["lens_ids"].tolist()  # the identity map is the logit lens
    vectors = source_vectors(model, at1, scope)
    expected = lens.decode(model, lens.apply_affine(vectors, *maps[1]), 3)
    assert at1["affine_lens_ids"].tolist() == expected["ids"].tolist()
    torch.testing.assert_close(torch.tensor(at1["affine_lens_probs"].tolist()), expected["probs"].float())
    assert at1["affine_lens_ids"].tolist() != at1["lens_ids"].tolist()
    local = superscopes.run(model, scope, remote="local", progress=False)
    assert local["affine_lens_ids"].tolist() == frame["affine_lens_ids"].tolist()


def test_the_affine_lens_fits_its_maps_once_per_model_and_layers(tiny_models, registry, monkeypatch):
    from superscopes import lens

    model = tiny_models["llama"]
    fitted = []
    fit = lens.fit_affine_lens
    monkeypatch.setattr(lens, "fit_affine_lens", lambda *args, **kwargs: fitted.append(args[2]) or fit(*args, **kwargs))
    register(readouts.AffineLens(fit_texts=12))
    scope = two_prompts(readouts=["affine_lens"])
    first = superscopes.run(model, scope, progress=False)
    again = superscopes.run(model, scope, progress=False)
    assert fitted == [[0, 1]] and again["affine_lens_ids"].tolist() == first["affine_lens_ids"].tolist()
    prepared = plan(model, two_prompts(layers=[1], readouts=["affine_lens"])).readouts[-1]
    assert fitted == [[0, 1], [1]] and list(prepared.maps) == [1]
    with pytest.raises(ScopeError, match=r"readout 'affine_lens' maps resid_post .* reads 'mlp_out' too"):
        plan(model, two_prompts(sites=["resid_post", "mlp_out"], readouts=["affine_lens"]))
    assert len(fitted) == 2  # refused before any fit


def test_self_similarity_reads_the_last_block_where_each_row_was_written(tiny_models):
    model = tiny_models["llama"]
    last = num_layers(model) - 1
    # Written at the last layer's resid_post (replace), that site holds the vector: cosine 1,
    # at every position of padded rows too.
    settings = {"layers": [last], "target_layers": ["same"], "target": "source", "all_tokens": True}
    scope = two_prompts(**settings, readouts=["self_similarity"], alphas=[1, 3])
    frame = superscopes.run(model, scope, progress=False)
    assert frame["self_similarity"].tolist() == pytest.approx([1.0] * len(frame), abs=1e-5)
    # Written lower, it is the teacher-forced value of sae.explanation_scores; batched = looped.
    scope = two_prompts(target="identity", readouts=["self_similarity"], output="generate", max_new_tokens=2)
    batched = superscopes.run(model, scope, progress=False)
    looped = superscopes.run(model, scope, cells_per_request=1, progress=False)
    assert batched["self_similarity"].tolist() == pytest.approx(looped["self_similarity"].tolist(), abs=1e-5)
    assert batched["self_similarity"].max() < 1 - 1e-4
    from superscopes.batching import teacher_forced

    vectors = source_vectors(model, batched, scope)
    finals = [final for *_, final in teacher_forced(model, batched, list(vectors))]
    expected = [float(torch.nn.functional.cosine_similarity(f, v, dim=0)) for f, v in zip(finals, vectors)]
    assert batched["self_similarity"].tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("remote", [False, "local"])
def test_relevancy_is_zero_for_a_self_patch_at_alpha_1(tiny_models, remote):
    model = tiny_models["llama"]
    # Its own vector written back where it was read: the clean run, so every relevancy is 0.
    settings = {"target": "source", "target_layers": ["same"], "layers": [1], "output": "generate"}
    scope = two_prompts(**settings, max_new_tokens=3, readouts=["relevancy"], alphas=[1, 50])
    frame = superscopes.run(model, scope, remote=remote, progress=False)
    at1, at50 = frame[frame["alpha"] == 1], frame[frame["alpha"] == 50]
    assert [r for r in at1["relevancy"]] == [[0.0] * 3] * 2
    # Amplified, the tiny model's near-uniform probabilities (about 2e-5) move.
    assert all(max(map(abs, r)) > 1e-7 for r in at50["relevancy"])
    assert frame["relevancy_mean"].tolist() == pytest.approx([sum(r) / 3 for r in frame["relevancy"]])


def test_relevancy_needs_generated_text_and_a_plain_transform(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ScopeError, match=r"readout 'relevancy' scores generated tokens: use output='generate'"):
        plan(model, two_prompts(readouts=["relevancy"]))
    with pytest.raises(ScopeError, match=r"for transforms scale, .*; not 'random'"):
        plan(model, two_prompts(readouts=["relevancy"], output="generate", transforms=["random"]))


@pytest.mark.parametrize("remote", [False, "local"])
def test_the_sae_readout_lists_each_source_vectors_latents(tiny_models, registry, remote):
    from tests.test_sae import orthonormal_sae

    model = tiny_models["llama"]
    sae = orthonormal_sae()  # resid_post, layer 1
    register(readouts.SAEDecomposition(sae, latents=4))
    scope = two_prompts(layers=[1], readouts=["sae"])
    frame = superscopes.run(model, scope, remote=remote, progress=False)
    expected = sae.decompose(source_vectors(model, frame, scope), k=4)
    assert frame["sae_latents"].tolist() == [[i for i, _ in pairs] for pairs in expected]
    for found, pairs in zip(frame["sae_activations"], expected):
        assert found == pytest.approx([a for _, a in pairs], rel=1e-5)
    with pytest.raises(ScopeError, match=r"reads resid_post at layer 1; the grid reads resid_post at layers \[0, 1\]"):
        plan(model, two_prompts(readouts=["sae"]))


def test_the_sae_readout_without_an_sae_needs_an_embedded_one(tiny_models):
    with pytest.raises(
        ScopeError, match=r"readout 'sae' needs an SAE: .* has no embedded one \(those of smollm2-135m\)"
    ):
        plan(tiny_models["llama"], two_prompts(layers=[1], readouts=["sae"]))


def test_the_judge_readout_scores_each_row_against_its_source(tiny_models, registry):
    from superscopes import judge

    class Lengths:
        """A judge by text lengths: a reference simple enough to compute here."""

        def similarity(self, sources, outputs):
            return [len(o) / (1 + len(s)) for s, o in zip(sources, outputs)]

    model = tiny_models["llama"]
    register(readouts.JudgeScores(Lengths()))
    scope = two_prompts(output="generate", max_new_tokens=3, target="source", readouts=["judge"])
    frame = superscopes.run(model, scope, progress=False)
    assert frame["similarity"].tolist() == [len(o) / (1 + len(s)) for s, o in zip(frame["source"], frame["output"])]
    # target "source": an echo is one of the source prompt (the text the vector was written into)
    expected = judge.flag_echoes(frame.assign(target=frame["source"]))["echo"].tolist()
    assert frame["echo"].tolist() == expected


def test_frame_readouts_run_after_a_grid_in_your_own_session(tiny_models):
    model = tiny_models["llama"]
    scope = two_prompts(output="generate", max_new_tokens=2, readouts=["self_similarity", "relevancy"], layers=[1])
    grid = superscopes.Grid(model, scope)
    with model.session(remote="local"):
        outputs = grid.run()
    frame = grid.frame(outputs)
    expected = superscopes.run(model, scope, progress=False)
    columns = ["output", "self_similarity", "relevancy_mean"]
    pd.testing.assert_frame_equal(frame[columns], expected[columns], atol=1e-5)


def test_the_command_line_decomposes_with_the_sae_it_is_given(smollm2, registry, monkeypatch, tmp_path, capsys):
    from superscopes import sae as S

    monkeypatch.setattr(superscopes, "load", lambda *args, **kwargs: smollm2)
    folder = S.EMBEDDED_DIR / S.EMBEDDED["smollm2-135m"]
    out = tmp_path / "cells.csv"
    argv = ["scope", "Diana, Princess of Wales", "--sites", "resid_post", "--layers", "15", "--alphas", "1"]
    assert main([*argv, "--max-new-tokens", "2", "--readout", "sae", "--sae", str(folder), "--out", str(out)]) == 0
    assert readouts.REGISTRY["sae"].sae is not None and readouts.REGISTRY["sae"].sae.layer == 15  # --sae's SAE
    frame = pd.read_csv(out)
    vector = superscopes.scope.read_vectors(smollm2, ["Diana, Princess of Wales"], [(0, 5, "resid_post", 15)])[0]
    expected = [i for i, _ in S.load(folder, model=smollm2).decompose(vector, k=10)]
    assert frame["sae_latents"].map(json.loads).tolist() == [expected]
