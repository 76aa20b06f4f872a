"""The amplify-and-patch graph: batching, back-patching, remote-safety, schema, validation."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import superscopes
from superscopes import Scope, ScopeError, ops, run
from superscopes.prompts import ENTITY_DESCRIPTION
from superscopes.scope import RESULT_COLUMNS

# Different lengths, so batches are left-padded.
PROMPTS = ["Diana, Princess of Wales", "Red Hot Chili Peppers played a concert in the park", "Back to the Future"]


# A grid of every feature at once (sites, layers, target layers, alphas), top-k readout.
TOPK_GRID = dict(
    prompts=PROMPTS,
    sites=["mlp_out", "resid_post"],
    layers=[0, 2],
    alphas=[1, 4],
    target_layers=["same", 1],
    output="topk",
    top_k=5,
)


def topk_grid(**overrides) -> Scope:
    return Scope(**{**TOPK_GRID, **overrides})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_batched_grid_equals_one_cell_at_a_time(tiny_models, arch):
    model = tiny_models[arch]
    batched = run(model, topk_grid(batch_size=64), progress=False)
    looped = run(model, topk_grid(batch_size=1), progress=False)
    assert batched["output_ids"].tolist() == looped["output_ids"].tolist()
    torch.testing.assert_close(
        torch.tensor(batched["output_probs"].tolist()), torch.tensor(looped["output_probs"].tolist()), atol=1e-4, rtol=0
    )


def test_batched_generation_equals_looped_on_smollm2(smollm2):
    grid = dict(
        prompts=PROMPTS[:2],
        token=None,
        sites=["mlp_out", "resid_post"],
        layers=[1, 3],
        alphas=[1, 6],
        target_layers=["same"],
        max_new_tokens=6,
    )
    batched = run(smollm2, Scope(**grid, batch_size=64), progress=False)
    looped = run(smollm2, Scope(**grid, batch_size=1), progress=False)
    assert batched["output_ids"].tolist() == looped["output_ids"].tolist()
    assert batched["output"].tolist() == looped["output"].tolist()


def reference_cell(model, source: str, site: str, layer: int, alpha: float, target_layer: int, new_tokens: int):
    """One cell written out by hand: read, scale, write at the placeholder, generate."""
    with model.trace(source):
        v = ops.read(model, site, layer, -1).save()
    with model.generate(ENTITY_DESCRIPTION, max_new_tokens=new_tokens, do_sample=False) as tracer:
        model.model.layers[target_layer].output[:, -1] = alpha * v
        ids = tracer.result[:, -new_tokens:].save()
    return ids[0].tolist()


def test_grid_matches_hand_written_cells(smollm2):
    frame = run(
        smollm2,
        Scope(PROMPTS[0], sites=["mlp_out"], layers=[2], alphas=[1, 9], target_layers=["same", 0], max_new_tokens=5),
        progress=False,
    )
    eos = smollm2.tokenizer.eos_token_id
    for row in frame.itertuples():
        ids = reference_cell(smollm2, PROMPTS[0], row.site, row.layer, row.alpha, row.target_layer, 5)
        expected = ids[: ids.index(eos)] if eos in ids else ids
        assert list(row.output_ids) == expected, row


def test_back_patching_equals_two_pass_reference(tiny_models):
    """Target layer below the source layer, written into the source prompt itself."""
    model = tiny_models["llama"]
    frame = run(
        model,
        Scope(
            PROMPTS,
            token=None,
            sites=["resid_post"],
            layers=[2],
            alphas=[1.0, 3.0],
            target="source",
            target_layers=[0],
            output="topk",
            top_k=5,
        ),
        progress=False,
    )
    for row in frame.itertuples():
        with model.trace(row.source):
            late = ops.read(model, "resid_post", 2, -1).save()
        with model.trace(row.source):
            model.model.layers[0].output[:, -1] = row.alpha * late
            probs = model.lm_head.output[:, -1].softmax(-1).save()
        top = probs[0].topk(5)
        assert list(row.output_ids) == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(row.output_probs), top.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("output", ["topk", "generate"])
def test_graph_under_remote_local_equals_local(tiny_models, output):
    model = tiny_models["llama"]
    grid = topk_grid(output=output, max_new_tokens=4, transforms=["norm"])
    local = run(model, grid, progress=False)
    remote = run(model, grid, remote="local", progress=False)
    assert local["output_ids"].tolist() == remote["output_ids"].tolist()
    if output == "topk":
        torch.testing.assert_close(
            torch.tensor(remote["output_probs"].tolist()),
            torch.tensor(local["output_probs"].tolist()),
            atol=1e-4,
            rtol=0,
        )


def test_a_remote_grid_is_one_request(tiny_models, monkeypatch):
    """Reads and all patch passes travel as one nnsight session (one request)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    calls = []
    original = LocalSimulationBackend.__call__
    monkeypatch.setattr(
        LocalSimulationBackend, "__call__", lambda self, tracer: calls.append(1) or original(self, tracer)
    )
    frame = run(tiny_models["llama"], topk_grid(batch_size=4), remote="local", progress=False)
    assert len(frame) == 48  # 3 prompts x 2 sites x 2 layers x 2 alphas x 2 target layers, 12 passes of 4
    assert len(calls) == 1


def test_result_schema_one_row_per_cell(tiny_models):
    model = tiny_models["llama"]
    frame = run(
        model,
        Scope(
            PROMPTS[0],
            all_tokens=True,
            sites=["mlp_in", "resid_post"],
            layers=[0, 1],
            alphas=[1, 2, 3],
            max_new_tokens=3,
        ),
        progress=False,
    )
    n_tokens = len(model.tokenizer(PROMPTS[0])["input_ids"])
    assert len(frame) == n_tokens * 2 * 2 * 3
    assert list(frame.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert frame["target"].unique().tolist() == [ENTITY_DESCRIPTION]
    assert sorted(frame["position"].unique()) == list(range(n_tokens))
    assert frame.duplicated(["position", "site", "layer", "alpha"]).sum() == 0
    assert all(isinstance(ids, list) and len(ids) <= 3 for ids in frame["output_ids"])


def test_token_choice_is_the_last_token_of_the_first_match(smollm2):
    frame = run(
        smollm2,
        Scope("Red Hot Chili Peppers", token="Peppers", sites=["resid_post"], layers=[1], alphas=[1], output="topk"),
        progress=False,
    )
    tokens = smollm2.tokenizer.convert_ids_to_tokens(smollm2.tokenizer("Red Hot Chili Peppers")["input_ids"])
    assert frame["position"].item() == len(tokens) - 1
    assert "ppers" in frame["token"].item()


def test_seeded_sampling_is_reproducible_and_tries_differ(tiny_models):
    model = tiny_models["llama"]
    grid = Scope(
        PROMPTS[0], sites=["resid_post"], layers=[1], alphas=[1], max_new_tokens=8, do_sample=True, samples=4, seed=7
    )
    first, second = run(model, grid, progress=False), run(model, grid, progress=False)
    assert first["output_ids"].tolist() == second["output_ids"].tolist()
    assert first["sample"].tolist() == [0, 1, 2, 3]
    assert len({tuple(ids) for ids in first["output_ids"]}) > 1  # a random tiny model samples widely


def test_affine_identity_equals_scale_and_random_control_is_seeded(tiny_models):
    model = tiny_models["llama"]
    scale = run(model, topk_grid(), progress=False)
    affine = run(model, topk_grid(transforms=["affine"], affine_weight=torch.eye(64)), progress=False)
    assert scale["output_ids"].tolist() == affine["output_ids"].tolist()
    random_a = run(model, topk_grid(transforms=["random"], seed=1), progress=False)
    random_b = run(model, topk_grid(transforms=["random"], seed=1), progress=False)
    assert random_a["output_ids"].tolist() == random_b["output_ids"].tolist()
    assert random_a["output_ids"].tolist() != scale["output_ids"].tolist()


def test_cross_model_patch_through_affine_map(tiny_models):
    source, target = tiny_models["llama"], tiny_models["gpt2"]
    frame = run(
        source,
        topk_grid(transforms=["affine"], affine_weight=torch.eye(64), target_layers=[0]),
        target_model=target,
        progress=False,
    )
    assert set(frame["target_model"]) == {superscopes.models.model_name(target)}
    assert len(frame) == len(PROMPTS) * 2 * 2 * 2


# ------------------------------------------------------------------ bad input

BAD_INPUTS = [
    (dict(layers=[3]), r"layer 3 is out of range: .* has layers 0-2"),
    (dict(layers=[-1]), r"layer -1 is out of range"),
    (dict(target_layers=[7]), r"target_layer 7 is out of range"),
    (dict(sites=["mlp"]), r"site 'mlp' is not valid; choose from resid_pre, attn_out, mlp_in, mlp_out, resid_post"),
    (dict(target_site="embed"), r"target_site 'embed' is not valid"),
    (dict(token="Elvis"), r"token 'Elvis' is not in the prompt 'Diana, Princess of Wales'; its tokens are \['D'"),
    (dict(prompts=["  "]), r"prompt 0 is empty"),
    (dict(prompts=[]), r"no prompts given"),
    (dict(alphas=[1, math.nan]), r"alpha nan is not a finite number"),
    (dict(alphas=[math.inf]), r"alpha inf is not a finite number"),
    (dict(target="Tell me about it:"), r"has no placeholder 'x'"),
    (dict(transforms=["double"]), r"transform 'double' is not valid; choose from scale, cfg, norm, affine, random"),
    (dict(transforms=["affine"]), r"transform 'affine' needs affine_weight"),
    (dict(max_cells=10, all_tokens=True), r"the grid has \d+ cells .* over max_cells=10"),
    (dict(samples=3), r"more than one try per cell needs do_sample=True"),
    (dict(position=40), r"position 40 is outside prompt"),
    (dict(token="Wales", position=2), r"at most one of token, position and all_tokens"),
    (dict(output="logits"), r"output 'logits' is not valid"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_named_before_any_forward_pass(tiny_models, overrides, message, monkeypatch):
    model = tiny_models["llama"]
    settings = dict(prompts=["Diana, Princess of Wales"], sites=["mlp_out"], layers=[1], alphas=[1, 3])

    def forbidden(*args, **kwargs):
        raise AssertionError("a forward pass ran before validation")

    monkeypatch.setattr(type(model), "trace", forbidden)
    monkeypatch.setattr(type(model), "generate", forbidden)
    with pytest.raises(ScopeError, match=message):
        run(model, Scope(**{**settings, **overrides}), progress=False)


def test_results_round_trip_through_csv_and_parquet(tiny_models, tmp_path):
    from superscopes.cli import read_table, save_table

    frame = run(tiny_models["llama"], topk_grid(layers=[0]), progress=False)
    for name in ("out.csv", "out.parquet"):
        save_table(frame, tmp_path / name)
        back = read_table(str(tmp_path / name))
        assert list(back.columns) == list(frame.columns) and len(back) == len(frame)
        pd.testing.assert_series_equal(back["output"], frame["output"], check_names=False)
