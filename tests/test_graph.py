"""The graph's fast paths equal the plain ones: shared target prefixes, early-stopping reads,
the model's own logits for top-k, and sampling seeded per cell."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from superscopes import Scope, ops, run
from superscopes.prompts import IDENTITY
from superscopes.scope import read_vectors
from tests.conftest import ARCHITECTURES
from tests.test_scope import PROMPTS, TOPK_GRID


def grid(**overrides) -> dict:
    return {**TOPK_GRID, "batch_size": 16, **overrides}


def assert_same_results(shared, plain) -> None:
    assert shared["output_ids"].tolist() == plain["output_ids"].tolist()
    if "output_probs" in plain:
        torch.testing.assert_close(
            torch.tensor(shared["output_probs"].tolist()),
            torch.tensor(plain["output_probs"].tolist()),
            atol=1e-4,
            rtol=0,
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("output", ["topk", "generate"])
def test_shared_prefix_equals_whole_prompt_per_row(tiny_models, arch, output):
    settings = grid(output=output, max_new_tokens=4, transforms=["scale", "norm"])
    shared = run(tiny_models[arch], Scope(**settings, share_prefix=True), progress=False)
    plain = run(tiny_models[arch], Scope(**settings, share_prefix=False), progress=False)
    assert_same_results(shared, plain)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(target="source", target_layers=[0]),  # back-patching: a prefix per source prompt
        dict(target="source", target_layers=[0], all_tokens=True, prompts=PROMPTS[:1]),  # several positions per prompt
        dict(
            target="identity", target_position=3
        ),  # the patch in the middle of the target: tokens after it run per row
        dict(target="identity", target_position=0),  # nothing to share
    ],
)
@pytest.mark.parametrize("output", ["topk", "generate"])
def test_shared_prefix_equals_plain_for_every_target_shape(tiny_models, overrides, output):
    settings = grid(output=output, max_new_tokens=3, **overrides)
    shared = run(tiny_models["llama"], Scope(**settings, share_prefix=True), progress=False)
    plain = run(tiny_models["llama"], Scope(**settings, share_prefix=False), progress=False)
    assert_same_results(shared, plain)


def test_shared_prefix_equals_plain_on_smollm2_paper_grid(smollm2):
    """Paper settings (entity prompt, same-layer and layer-0 targets, 10 greedy tokens)."""
    settings = dict(
        prompts=["Diana, Princess of Wales"],
        token="Wales",
        sites=["mlp_out", "resid_post"],
        layers=[1, 4],
        alphas=[1, 6, 15],
        target_layers=["same", 0],
        max_new_tokens=10,
    )
    shared = run(smollm2, Scope(**settings, share_prefix=True), progress=False)
    plain = run(smollm2, Scope(**settings, share_prefix=False), progress=False)
    assert shared["output"].tolist() == plain["output"].tolist()
    assert_same_results(shared, plain)


@pytest.mark.parametrize("output", ["topk", "generate"])
def test_shared_prefix_under_remote_local_equals_local(tiny_models, output):
    settings = grid(output=output, max_new_tokens=3, target="identity")
    local = run(tiny_models["qwen2"], Scope(**settings), progress=False)
    remote = run(tiny_models["qwen2"], Scope(**settings), remote="local", progress=False)
    assert_same_results(remote, local)


@pytest.fixture(scope="module")
def capped_gemma2(tokenizer):
    """A tiny Gemma-2 whose logits lie far beyond its final soft-cap, where capping matters."""
    from nnsight.modeling.transformers import TransformersModel

    torch.manual_seed(0)
    config = T.Gemma2Config(
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=49152,
        final_logit_softcapping=2.0,
    )
    hf = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(200)
    return TransformersModel(hf, tokenizer=tokenizer)


def test_topk_reads_the_models_own_soft_capped_logits(capped_gemma2):
    """Gemma-2 soft-caps its final logits; top-k must report the model's own probabilities."""
    model = capped_gemma2
    frame = run(
        model,
        Scope(PROMPTS[0], sites=["resid_post"], layers=[1], alphas=[1], target="identity", output="topk", top_k=3),
        progress=False,
    )
    with model.trace(PROMPTS[0]):
        v = ops.read(model, "resid_post", 1, -1).save()
    with model.trace(IDENTITY):
        model.model.layers[1].output[:, -1] = v  # the identity prompt's placeholder is its last token
        probs = model.output.logits[:, -1].softmax(-1).save()
    top = probs[0].topk(3)
    assert frame["output_ids"].item() == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(frame["output_probs"].item()), top.values, atol=1e-5, rtol=0)
    assert top.values[0] < 0.99  # the cap is what keeps the top token from taking all the mass


def test_read_pass_stops_after_its_last_layer(tiny_models):
    model = tiny_models["llama"]
    calls = []
    handle = model._module.model.layers[2].register_forward_hook(lambda *args: calls.append(1))
    try:
        low = read_vectors(model, PROMPTS, [(0, 1, "resid_post", 0), (1, 2, "mlp_out", 1)])
    finally:
        handle.remove()
    assert calls == []  # layer 2 never ran
    with model.trace(PROMPTS[1]):
        expected = model.model.layers[1].mlp.output[0, 2].save()
    torch.testing.assert_close(low[1], expected)


def sampled(model, batch_size: int, **overrides):
    settings = dict(
        prompts=PROMPTS[:2],
        sites=["resid_post"],
        layers=[0, 1],
        alphas=[1, 3],
        max_new_tokens=6,
        do_sample=True,
        samples=3,
        seed=11,
        batch_size=batch_size,
    )
    return run(model, Scope(**{**settings, **overrides}), progress=False)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_sampled_cell_does_not_depend_on_batch_size(tiny_models, share_prefix):
    model = tiny_models["llama"]
    whole = sampled(model, 64, share_prefix=share_prefix)
    for batch_size in (1, 5):
        assert (
            sampled(model, batch_size, share_prefix=share_prefix)["output_ids"].tolist() == whole["output_ids"].tolist()
        )
    fewer = sampled(model, 64, layers=[1], share_prefix=share_prefix)  # the same cells in a smaller grid
    assert fewer["output_ids"].tolist() == whole[whole["layer"] == 1]["output_ids"].tolist()
    assert sampled(model, 64, seed=12)["output_ids"].tolist() != whole["output_ids"].tolist()


def test_cell_sampler_draws_from_the_tempered_softmax():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    picks = ops.CellSampler(torch.arange(4000), temperature=2.0)(None, scores).argmax(-1)
    frequencies = torch.bincount(picks, minlength=4).float() / 4000
    torch.testing.assert_close(frequencies, (scores[0] / 2.0).softmax(-1), atol=0.03, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "capped_gemma2"])
def test_logit_lens_readout_at_the_last_layer_is_the_models_own_prediction(tiny_models, capped_gemma2, arch):
    """In the read pass: final norm + unembedding (+ soft-cap) of resid_post at the last layer
    equals the model's own next-token distribution there."""
    model = capped_gemma2 if arch == "capped_gemma2" else tiny_models[arch]
    last = model.config.num_hidden_layers - 1
    frame = run(
        model,
        Scope(
            PROMPTS[:2],
            sites=["resid_post", "mlp_out"],
            layers=[1, last],
            alphas=[1, 3],
            logit_lens=True,
            top_k=4,
            max_new_tokens=2,
        ),
        progress=False,
    )
    for row in frame[(frame.layer == last) & (frame.site == "resid_post")].itertuples():
        with model.trace(row.source):
            probs = model.output.logits[0, -1].softmax(-1).save()
        top = probs.topk(4)
        assert list(row.lens_ids) == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(row.lens_probs), top.values, atol=1e-5, rtol=0)
    assert frame.groupby(["source", "site", "layer"])["lens"].nunique().eq(1).all()  # alpha does not change a lens


def test_logit_lens_readout_under_remote_local_equals_local(tiny_models):
    settings = Scope(PROMPTS, sites=["resid_post"], layers=[0, 2], alphas=[1], logit_lens=True, output="topk")
    local = run(tiny_models["llama"], settings, progress=False)
    remote = run(tiny_models["llama"], settings, remote="local", progress=False)
    assert local["lens_ids"].tolist() == remote["lens_ids"].tolist()


# ------------------------------------------------------------------ explicit cells, per-prompt settings, maps


def ids_by(frame, columns=("source", "site", "layer", "target_layer", "alpha")) -> dict:
    return {tuple(row[c] for c in columns): list(row["output_ids"]) for _, row in frame.iterrows()}


def test_layer_pairs_and_where_equal_the_matching_cells_of_the_rectangle(tiny_models):
    model = tiny_models["llama"]
    full = run(model, Scope(**grid(layers=[0, 1, 2], target_layers=[0, 1, 2])), progress=False)
    pairs = run(model, Scope(**grid(layer_pairs=[(2, 0), (1, 1), (0, 2)])), progress=False)
    assert len(pairs) == 3 * 2 * 3 * 2  # prompts x sites x pairs x alphas
    expected = ids_by(full)
    assert all(expected[key] == ids for key, ids in ids_by(pairs).items())
    below = run(
        model,
        Scope(**grid(layers=[0, 1, 2], target_layers=[0, 1, 2], where=lambda c: c.target_layer <= c.layer)),
        progress=False,
    )
    assert (below["target_layer"] <= below["layer"]).all() and len(below) == 3 * 2 * 6 * 2
    assert all(expected[key] == ids for key, ids in ids_by(below).items())


def test_per_prompt_targets_and_tokens_equal_one_run_per_prompt(tiny_models):
    model = tiny_models["llama"]
    targets = ["identity", "The capital city of x is", "source"]
    tokens = ["Princess", "Chili", "Future"]
    together = run(model, Scope(**grid(target=targets, token=tokens, target_layers=[0])), progress=False)
    for prompt, target, token in zip(PROMPTS, targets, tokens):
        alone = run(
            model, Scope(**grid(prompts=[prompt], target=target, token=token, target_layers=[0])), progress=False
        )
        part = together[together["source"] == prompt]
        assert part["output_ids"].tolist() == alone["output_ids"].tolist()
        assert part["target"].tolist() == alone["target"].tolist() and part["token"].tolist() == alone["token"].tolist()


def test_affine_maps_per_layer_pair_equal_one_run_per_pair(tiny_models):
    source, target = tiny_models["llama"], tiny_models["gpt2"]
    generator = torch.Generator().manual_seed(0)
    pairs = [(0, 0), (2, 1), (1, 2)]
    weights = {pair: torch.randn(64, 64, generator=generator) / 8 for pair in pairs}
    biases = {pair: torch.randn(64, generator=generator) for pair in pairs}
    settings = grid(transforms=["affine"], target="identity", sites=["resid_post"])
    together = run(
        source,
        Scope(**settings, layer_pairs=pairs, affine_weight=weights, affine_bias=biases),
        target_model=target,
        progress=False,
    )
    for pair in pairs:
        alone = run(
            source,
            Scope(**settings, layer_pairs=[pair], affine_weight=weights[pair], affine_bias=biases[pair]),
            target_model=target,
            progress=False,
        )
        part = together[(together["layer"] == pair[0]) & (together["target_layer"] == pair[1])]
        assert_same_results(part, alone)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_transform_none_is_the_target_prompts_own_output(tiny_models, share_prefix):
    model = tiny_models["llama"]
    frame = run(
        model,
        Scope(
            PROMPTS[0],
            sites=["resid_post"],
            layers=[1],
            alphas=[1],
            transforms=["none"],
            target="identity",
            max_new_tokens=4,
            share_prefix=share_prefix,
        ),
        progress=False,
    )
    with model.generate(IDENTITY, max_new_tokens=4, do_sample=False) as tracer:
        ids = tracer.result[:, -4:].save()
    assert frame["output_ids"].item() == ids[0].tolist()


def test_plan_is_public_and_takes_the_model_first(tiny_models):
    from superscopes.scope import Plan, plan

    the_plan = plan(tiny_models["llama"], Scope(**grid(target=["identity", "source", "entity"])))
    assert isinstance(the_plan, Plan) and len(the_plan.cells) == 3 * 2 * 2 * 2 * 2
    assert the_plan.targets[1].text is None and the_plan.target_of(the_plan.cells[0])[0] == IDENTITY


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(layer_pairs=[(0, 5)]), r"target_layer 5 is out of range"),
        (dict(layer_pairs=[(9, 0)]), r"layer 9 is out of range"),
        (dict(layer_pairs=[(0,)]), r"layer_pairs must be \(layer, target_layer\) pairs"),
        (dict(layer_pairs=[3]), r"layer_pairs must be \(layer, target_layer\) pairs"),
        (dict(target=["identity", "entity"]), r"target has 2 entries for 3 prompts"),
        (dict(token=["Wales"]), r"token has 1 entries for 3 prompts"),
        (
            dict(transforms=["affine"], layer_pairs=[(0, 0), (1, 0)], affine_weight={(0, 0): torch.eye(64)}),
            r"affine_weight has no map for layer pair\(s\) \[\(1, 0\)\]",
        ),
        (dict(where=lambda cell: False), r"`where` kept none of the grid's cells"),
    ],
)
def test_bad_explicit_cells_are_named_before_any_forward_pass(tiny_models, overrides, message, monkeypatch):
    from superscopes import ScopeError

    model = tiny_models["llama"]
    monkeypatch.setattr(type(model), "trace", lambda *a, **k: pytest.fail("a forward pass ran before validation"))
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("a forward pass ran before validation"))
    with pytest.raises(ScopeError, match=message):
        run(model, Scope(**grid(**overrides)), progress=False)


# ------------------------------------------------------------------ grids larger than one request


@pytest.fixture
def requests(monkeypatch):
    """Counts remote requests (remote="local" sessions); ``fail_at`` makes that request fail."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    state = {"calls": 0, "fail_at": None}
    original = LocalSimulationBackend.__call__

    def call(self, tracer):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise ConnectionError("the server went away")
        return original(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", call)
    return state


def test_a_grid_split_into_requests_equals_one_request(tiny_models, requests):
    model = tiny_models["llama"]
    settings = Scope(**grid(transforms=["scale", "random"], seed=3))  # 96 cells
    whole = run(model, settings, remote="local", progress=False)
    assert requests["calls"] == 1
    split = run(model, settings, remote="local", cells_per_request=25, progress=False)
    assert requests["calls"] == 1 + 4
    assert_same_results(split, whole)


def test_a_cut_off_split_run_resumes_from_its_checkpoint(tiny_models, requests, tmp_path):
    from superscopes.remote import RemoteRunError

    model = tiny_models["llama"]
    settings = Scope(**grid())  # 48 cells, 4 requests of 12
    reference = run(model, settings, progress=False)
    checkpoint = tmp_path / "grid.jsonl"
    requests["fail_at"] = 3
    with pytest.raises(RemoteRunError):
        run(model, settings, remote="local", cells_per_request=12, checkpoint=checkpoint, progress=False)
    requests.update(calls=0, fail_at=None)
    resumed = run(model, settings, remote="local", cells_per_request=12, checkpoint=checkpoint, progress=False)
    assert requests["calls"] == 2  # requests 1 and 2 were kept, only 3 and 4 run again
    assert_same_results(resumed, reference)
    assert len(resumed) == 48 and not resumed.duplicated(["source", "site", "layer", "alpha", "target_layer"]).any()
    requests["calls"] = 0
    again = run(model, settings, remote="local", checkpoint=checkpoint, progress=False)
    assert requests["calls"] == 0 and again["output_ids"].tolist() == reference["output_ids"].tolist()


def test_a_checkpoint_of_another_grid_is_refused_before_any_forward_pass(tiny_models, tmp_path, monkeypatch):
    from superscopes import ScopeError

    model = tiny_models["llama"]
    checkpoint = tmp_path / "grid.jsonl"
    run(model, Scope(**grid(alphas=[1])), checkpoint=checkpoint, progress=False)
    monkeypatch.setattr(type(model), "trace", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(ScopeError, match=r"checkpoint .*grid.jsonl holds another grid"):
        run(model, Scope(**grid(alphas=[1, 2])), checkpoint=checkpoint, progress=False)
    with pytest.raises(ScopeError, match=r"cells_per_request must be a positive integer, got 0"):
        run(model, Scope(**grid()), cells_per_request=0, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])  # gemma2: sliding layers kept as they are
@pytest.mark.parametrize("room", [6, 5])  # 6: the fed token and 5 of the 6 new ones; 5: one short, it concatenates
def test_preallocated_cache_equals_a_concatenating_one(tiny_models, arch, room):
    """The shared prefix's cache with room allocated once gives the same tokens as transformers'
    own DynamicCache, and with enough room every full-attention layer fills it in place."""
    model = tiny_models[arch]
    hf, ids = model._module, model.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    prefix = hf(ids[:, :-1], use_cache=True).cache

    def generate(cache):
        return hf.generate(
            input_ids=ids.repeat(3, 1),
            attention_mask=torch.ones(3, ids.shape[1], dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            cache=cache,
        )

    plain, grown = ops.repeat_cache(model, prefix, 3), ops.repeat_cache(model, prefix, 3, room=room)
    assert generate(grown).tolist() == generate(plain).tolist()
    preallocated = [layer for layer in grown.layers if isinstance(layer, ops.PreallocatedLayer)]
    assert preallocated, "no full-attention layer got room"
    for layer in preallocated:
        assert layer.keys.shape[-2] == ids.shape[1] + 5
        assert (layer.keys.data_ptr() == layer._keys.data_ptr()) == (room == 6)


def test_the_graph_decodes_into_the_preallocated_cache(tiny_models, monkeypatch):
    """Shared-prefix generate passes use the preallocated layers, and never outgrow them."""
    grew = []
    original = ops.PreallocatedLayer.update

    def update(self, key_states, value_states, *args, **kwargs):
        result = original(self, key_states, value_states, *args, **kwargs)
        grew.append(self.keys.data_ptr() != self._keys.data_ptr())
        return result

    monkeypatch.setattr(ops.PreallocatedLayer, "update", update)
    run(tiny_models["llama"], Scope(**grid(output="generate", max_new_tokens=4, target="identity")), progress=False)
    assert grew and not any(grew)
