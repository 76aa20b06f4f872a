"""Lenses and affine maps: least squares recovers known maps, the logit lens at the last layer
is the model's own output, the affine lens and cross-model helpers are consistent."""

from __future__ import annotations

import pytest
import torch

from superscopes import Scope, lens, run
from superscopes.sites import num_layers

# Different lengths, so batches are left-padded.
PROMPTS = ["ancestors came to the United States with William", "The capital city of France is", "Hello there"]


def own_distribution(model, prompts, pairs) -> torch.Tensor:
    """The model's next-token probabilities at (prompt, position) pairs, from one plain trace."""
    with model.trace(prompts):
        logits = model.lm_head.output.save()
    width = logits.shape[1]
    rows = []
    for p, i in pairs:
        n = len(model.tokenizer(prompts[p])["input_ids"])
        rows.append(logits[p, width - n + i].float().softmax(-1))
    return torch.stack(rows)


def test_fit_affine_recovers_a_known_map():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(400, 12, generator=generator)
    W, b = torch.randn(5, 12, generator=generator), torch.randn(5, generator=generator)
    W_fit, b_fit = lens.fit_affine(X, X @ W.T + b)
    torch.testing.assert_close(W_fit, W, atol=1e-4, rtol=0)
    torch.testing.assert_close(b_fit, b, atol=1e-4, rtol=0)
    # With noise the fit is still close and explains most of the variance.
    Y = X @ W.T + b + 0.01 * torch.randn(400, 5, generator=generator)
    W_noisy, b_noisy = lens.fit_affine(X, Y)
    assert (W_noisy - W).abs().max() < 0.01
    assert lens.r_squared(lens.apply_affine(X, W_noisy, b_noisy), Y) > 0.999


def test_fit_affine_ridge_shrinks_and_handles_few_rows():
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(30, 40, generator=generator)  # fewer rows than dimensions
    Y = torch.randn(30, 3, generator=generator)
    W0, _ = lens.fit_affine(X, Y)
    W1, b1 = lens.fit_affine(X, Y, ridge=10.0)
    assert torch.isfinite(W0).all() and torch.isfinite(W1).all()
    assert W1.norm() < W0.norm()
    assert W1.shape == (3, 40) and b1.shape == (3,)
    with pytest.raises(ValueError):
        lens.fit_affine(X, Y[:10])


def test_fitted_map_runs_as_a_scope_affine_transform(tiny_models):
    """The (W, b) convention matches Scope(transforms=['affine']): identity map = plain patch."""
    model = tiny_models["llama"]
    d = model.config.hidden_size
    W, b = torch.eye(d), torch.zeros(d)
    common = dict(
        prompts=PROMPTS,
        sites=["resid_post"],
        layers=[1],
        alphas=[1],
        target="identity",
        target_layers=["same"],
        output="topk",
        top_k=3,
    )
    affine = run(model, Scope(**common, transforms=["affine"], affine_weight=W, affine_bias=b), progress=False)
    plain = run(model, Scope(**common, transforms=["scale"]), progress=False)
    assert affine["output_ids"].tolist() == plain["output_ids"].tolist()


def test_collect_matches_hidden_states(tiny_models):
    model = tiny_models["llama"]
    acts = lens.collect(model, PROMPTS, "resid_post", [0, 2], positions="all", batch_size=2)
    pairs = lens.token_positions(model.tokenizer, PROMPTS, "all")
    assert acts[0].shape == (len(pairs), model.config.hidden_size)
    for p, prompt in enumerate(PROMPTS):
        ids = model.tokenizer(prompt, return_tensors="pt")
        hidden = model._module(**ids, output_hidden_states=True).hidden_states
        rows = [j for j, (q, _) in enumerate(pairs) if q == p]
        torch.testing.assert_close(acts[0][rows], hidden[1][0], atol=1e-5, rtol=1e-5)
        # hidden_states[-1] has the final norm applied; resid_post of the last block does not.
        assert not torch.allclose(acts[2][rows], hidden[3][0])


def test_positions_forms(tokenizer):
    text = lens.token_positions(tokenizer, PROMPTS, "text")
    assert text == [(p, i) for p, t in enumerate(PROMPTS) for i in range(1, len(tokenizer(t)["input_ids"]))]
    assert lens.token_positions(tokenizer, PROMPTS, "last") == [
        (p, len(tokenizer(t)["input_ids"]) - 1) for p, t in enumerate(PROMPTS)
    ]
    assert lens.token_positions(tokenizer, PROMPTS, [-1, 0, [0, 1]]) == [
        (0, len(tokenizer(PROMPTS[0])["input_ids"]) - 1),
        (1, 0),
        (2, 0),
        (2, 1),
    ]
    with pytest.raises(ValueError):
        lens.token_positions(tokenizer, PROMPTS, [0, 1])
    with pytest.raises(ValueError):
        lens.token_positions(tokenizer, PROMPTS, "middle")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_logit_lens_at_last_layer_is_the_models_output(tiny_models, arch):
    model = tiny_models[arch]
    last = num_layers(model) - 1
    out = lens.logit_lens(model, PROMPTS, layers=[0, last], positions="all", top_k=5, batch_size=2)
    reference = own_distribution(model, PROMPTS, out.positions).topk(5)
    assert out.ids.shape == (2, len(out.positions), 5)
    assert torch.equal(out.ids[1], reference.indices)
    torch.testing.assert_close(out.probs[1], reference.values, atol=1e-4, rtol=0)
    assert not torch.equal(out.ids[0], out.ids[1])  # an early layer decodes to something else
    logprobs = lens.final_logprobs(model, PROMPTS, "all")
    torch.testing.assert_close(logprobs.exp(), own_distribution(model, PROMPTS, out.positions), atol=1e-5, rtol=0)
    assert torch.equal(lens.next_tokens(model, PROMPTS, "all", batch_size=2), reference.indices[:, 0])


def test_logit_lens_on_smollm2(smollm2):
    out = lens.logit_lens(smollm2, PROMPTS, layers=[3, 29], positions="all", top_k=3)
    reference = own_distribution(smollm2, PROMPTS, out.positions).topk(3)
    assert torch.equal(out.top1(29), reference.indices[:, 0])
    assert torch.equal(out.ids[1], reference.indices)
    torch.testing.assert_close(out.probs[1], reference.values, atol=1e-4, rtol=0)
    # "The capital city of France is" -> the model's next token.
    paris = [j for j, (p, i) in enumerate(out.positions) if p == 1][-1]
    assert smollm2.tokenizer.decode(out.ids[1, paris, 0]).strip() == "Paris"


def test_decode_softcaps_like_the_model(tokenizer):
    """Gemma-2 soft-caps its final logits: the lens must too, or its probabilities are off."""
    from tests.conftest import build_tiny

    model = build_tiny("gemma2", tokenizer)
    assert model.config.final_logit_softcapping
    last = num_layers(model) - 1
    out = lens.logit_lens(model, PROMPTS[:2], layers=[last], positions="all", top_k=3)
    with model.trace(PROMPTS[:2]):
        logits = model.output.logits.save()  # soft-capped by the model's forward
    width = logits.shape[1]
    reference = torch.stack(
        [logits[p, width - len(tokenizer(PROMPTS[p])["input_ids"]) + i].softmax(-1) for p, i in out.positions]
    ).topk(3)
    assert torch.equal(out.ids[0], reference.indices)
    torch.testing.assert_close(out.probs[0], reference.values, atol=1e-4, rtol=0)


def test_affine_lens_at_last_layer_is_the_logit_lens(tiny_models):
    model = tiny_models["llama"]
    words = "the weather today was cold and grey but the children played outside in the park until dark".split()
    fit = [" ".join(words[i:] + words[:i]) for i in range(len(words))]  # 17 x 17 positions > 64 dims
    out = lens.affine_lens(model, PROMPTS, layers=[0, 2], positions="all", fit_prompts=fit, top_k=2)
    plain = lens.logit_lens(model, PROMPTS, layers=[2], positions="all", top_k=2)
    W, b = out.maps[2]
    torch.testing.assert_close(W, torch.eye(model.config.hidden_size), atol=1e-3, rtol=0)
    assert torch.equal(out.ids[1], plain.ids[0])
    assert out.ids.shape == (2, len(out.positions), 2)
    with pytest.raises(ValueError):
        lens.affine_lens(model, PROMPTS, layers=[0])


def test_remote_local_decode_equals_local(tiny_models):
    model = tiny_models["llama"]
    acts = lens.collect(model, PROMPTS, "resid_post", [1], "last")
    local = lens.decode(model, acts[1], top_k=3)
    remote = lens.decode(model, acts[1], top_k=3, remote="local")
    assert torch.equal(local["ids"], remote["ids"])
    torch.testing.assert_close(local["probs"], remote["probs"])
    remote_acts = lens.collect(model, PROMPTS, "resid_post", [1], "last", remote="local")
    torch.testing.assert_close(remote_acts[1], acts[1])


def test_aligned_positions_read_the_same_text(tokenizer):
    """Aligned positions end at the same word end; a tokenizer with BOS shifts indices."""
    import transformers as T

    class WithBos:
        """SmolLM2's tokenizer with a BOS token prepended (stands in for Gemma's)."""

        def __init__(self, tok):
            self.tok = tok
            self.all_special_ids = tok.all_special_ids

        def __call__(self, text, return_offsets_mapping=False):
            enc = self.tok(text, return_offsets_mapping=return_offsets_mapping)
            out = {"input_ids": [self.tok.bos_token_id or 1] + enc["input_ids"]}
            if return_offsets_mapping:
                out["offset_mapping"] = [(0, 0)] + enc["offset_mapping"]
            return out

    assert isinstance(tokenizer, T.PreTrainedTokenizerBase)
    text = "ancestors came to the United States with William"
    src, tgt = lens.aligned_positions(tokenizer, WithBos(tokenizer), [text])
    ids = tokenizer(text)["input_ids"]
    prefixes = [text[:end] for end in lens.word_ends(text)]
    assert prefixes[-1] == text and prefixes[0] == "ancestors"
    # One position per word end, except a word ending at position 0 (the attention sink).
    decoded = [tokenizer.decode(ids[: position + 1]) for position in src[0]]
    assert decoded == [p for p in prefixes if len(tokenizer(p)["input_ids"]) > 1]
    assert len(src[0]) >= len(text.split()) - 1 and min(src[0]) > 0
    assert [t - s for s, t in zip(src[0], tgt[0])] == [1] * len(src[0])
    last_src, _ = lens.aligned_positions(tokenizer, tokenizer, [text, "trailing space "], last_only=True)
    assert last_src[0] == [len(ids) - 1] and len(last_src[1]) == 1  # the last word, before the space


def test_fit_cross_model_maps_between_different_widths(tokenizer):
    """Two tiny models of different hidden sizes: one map per layer pair, usable by Scope."""
    import transformers as T
    from nnsight.modeling.transformers import TransformersModel

    from tests.conftest import build_tiny

    source = build_tiny("llama", tokenizer)
    torch.manual_seed(1)
    config = T.Gemma3TextConfig(
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=4,
        vocab_size=source.config.vocab_size,
    )
    target = TransformersModel(T.AutoModelForCausalLM.from_config(config).eval(), tokenizer=tokenizer)
    fit = ["one two three four five six seven eight nine ten", "the cat sat on the mat and looked around"] * 3
    maps = lens.fit_cross_model(source, target, fit, [0, 2], [1], ridge=1e-3)
    assert set(maps) == {(0, 1), (2, 1)}
    W, b = maps[(2, 1)]
    assert W.shape == (48, 64) and b.shape == (48,)
    frame = run(
        source,
        Scope(
            PROMPTS,
            sites=["resid_post"],
            layers=[2],
            alphas=[1],
            transforms=["affine"],
            affine_weight=W,
            affine_bias=b,
            target="identity",
            target_layers=[1],
            output="topk",
            top_k=3,
        ),
        target_model=target,
        progress=False,
    )
    assert len(frame) == len(PROMPTS) and frame["target_model"].notna().all()
