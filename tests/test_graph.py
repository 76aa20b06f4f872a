"""The graph's fast paths equal the plain ones: shared target prefixes, early-stopping reads,
the model's own logits for top-k, and sampling seeded per cell."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from superscopes import Scope, ops, run
from superscopes.prompts import IDENTITY
from superscopes.scope import read_vectors
from tests.conftest import ARCHITECTURES, build_tiny

PROMPTS = ["Diana, Princess of Wales", "Red Hot Chili Peppers played a concert in the park", "Back to the Future"]


def grid(**overrides) -> dict:
    settings = dict(prompts=PROMPTS, sites=["mlp_out", "resid_post"], layers=[0, 2], alphas=[1, 4],
                    target_layers=["same", 1], output="topk", top_k=5, batch_size=16)  # fmt: skip
    return {**settings, **overrides}


def assert_same_results(shared, plain) -> None:
    assert shared["output_ids"].tolist() == plain["output_ids"].tolist()
    if "output_probs" in plain:
        torch.testing.assert_close(torch.tensor(shared["output_probs"].tolist()),
                                   torch.tensor(plain["output_probs"].tolist()), atol=1e-4, rtol=0)  # fmt: skip


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("output", ["topk", "generate"])
def test_shared_prefix_equals_whole_prompt_per_row(tiny_models, arch, output):
    settings = grid(output=output, max_new_tokens=4, transforms=["scale", "norm"])
    shared = run(tiny_models[arch], Scope(**settings, share_prefix=True), progress=False)
    plain = run(tiny_models[arch], Scope(**settings, share_prefix=False), progress=False)
    assert_same_results(shared, plain)


@pytest.mark.parametrize("overrides", [
    dict(target="source", target_layers=[0]),  # back-patching: a prefix per source prompt
    dict(target="source", target_layers=[0], all_tokens=True, prompts=PROMPTS[:1]),  # several positions per prompt
    dict(target="identity", target_position=3),  # the patch in the middle of the target: tokens after it run per row
    dict(target="identity", target_position=0),  # nothing to share
])  # fmt: skip
@pytest.mark.parametrize("output", ["topk", "generate"])
def test_shared_prefix_equals_plain_for_every_target_shape(tiny_models, overrides, output):
    settings = grid(output=output, max_new_tokens=3, **overrides)
    shared = run(tiny_models["llama"], Scope(**settings, share_prefix=True), progress=False)
    plain = run(tiny_models["llama"], Scope(**settings, share_prefix=False), progress=False)
    assert_same_results(shared, plain)


def test_shared_prefix_equals_plain_on_smollm2_paper_grid(smollm2):
    """Paper settings (entity prompt, same-layer and layer-0 targets, 10 greedy tokens)."""
    settings = dict(prompts=["Diana, Princess of Wales"], token="Wales", sites=["mlp_out", "resid_post"],
                    layers=[1, 4], alphas=[1, 6, 15], target_layers=["same", 0], max_new_tokens=10)  # fmt: skip
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
    config = T.Gemma2Config(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, hidden_size=64,
                            intermediate_size=128, num_attention_heads=4, vocab_size=49152, final_logit_softcapping=2.0)  # fmt: skip
    hf = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(200)
    return TransformersModel(hf, tokenizer=tokenizer)


def test_topk_reads_the_models_own_soft_capped_logits(capped_gemma2):
    """Gemma-2 soft-caps its final logits; top-k must report the model's own probabilities."""
    model = capped_gemma2
    frame = run(model, Scope(PROMPTS[0], sites=["resid_post"], layers=[1], alphas=[1], target="identity",
                             output="topk", top_k=3), progress=False)  # fmt: skip
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
    settings = dict(prompts=PROMPTS[:2], sites=["resid_post"], layers=[0, 1], alphas=[1, 3], max_new_tokens=6,
                    do_sample=True, samples=3, seed=11, batch_size=batch_size)  # fmt: skip
    return run(model, Scope(**{**settings, **overrides}), progress=False)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_sampled_cell_does_not_depend_on_batch_size(tiny_models, share_prefix):
    model = tiny_models["llama"]
    whole = sampled(model, 64, share_prefix=share_prefix)
    for batch_size in (1, 5):
        assert sampled(model, batch_size, share_prefix=share_prefix)["output_ids"].tolist() == whole["output_ids"].tolist()
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
    frame = run(model, Scope(PROMPTS[:2], sites=["resid_post", "mlp_out"], layers=[1, last], alphas=[1, 3],
                             logit_lens=True, top_k=4, max_new_tokens=2), progress=False)  # fmt: skip
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
