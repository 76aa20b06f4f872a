"""SAEs: encode/decode on hand-built SAEs, the SAELens folder format, fit checks, training and
its metrics on a tiny random model, decomposition, and latents as Scope sources."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from superscopes import ops
from superscopes import sae as S
from superscopes.corpus import load as load_corpus
from superscopes.scope import Scope, ScopeError, plan, run

D = 64  # the tiny models' hidden size


def identity_sae(d: int = D, site: str = "resid_post", layer: int = 1) -> S.SAE:
    """ReLU SAE with latents +x_i and -x_i: reconstructs every vector exactly."""
    eye = torch.eye(d)
    return S.SAE(
        torch.cat([eye, -eye], 1),
        torch.zeros(2 * d),
        torch.cat([eye, -eye]),
        torch.zeros(d),
        "standard",
        site=site,
        layer=layer,
        model="tiny",
    )


def orthonormal_sae(architecture: str = "standard", k: int | None = None, d_sae: int = 48) -> S.SAE:
    """Decoder rows orthonormal and encoder = decoder transpose: encode(decode(a)) = a for a >= 0."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    W_dec = q[:, :d_sae].T.contiguous()
    threshold = torch.full((d_sae,), 0.1) if architecture == "jumprelu" else None
    return S.SAE(
        W_dec.T.contiguous(),
        torch.zeros(d_sae),
        W_dec,
        torch.zeros(D),
        architecture,
        k=k,
        threshold=threshold,
        site="resid_post",
        layer=1,
        model="tiny",
        mean_activation=torch.linspace(1, 2, d_sae),
        frequency=torch.full((d_sae,), 0.01),
    )


# ---------------------------------------------------------------- encode / decode


def test_identity_sae_reconstructs_exactly():
    x = torch.randn(5, 7, D)
    sae = identity_sae()
    assert torch.equal(sae(x), x)
    assert torch.equal(sae.encode(x)[..., :D], x.relu())


def test_activations_of_each_architecture_by_hand():
    W = torch.eye(4)
    pre = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    make = lambda arch, **kw: S.SAE(W, torch.zeros(4), W, torch.zeros(4), arch, **kw)  # noqa: E731
    assert make("standard").encode(pre).tolist() == [[3.0, 0.0, 0.5, 2.0]]
    assert make("topk", k=2).encode(pre).tolist() == [[3.0, 0.0, 0.0, 2.0]]
    assert make("topk", k=4).encode(pre).tolist() == [[3.0, 0.0, 0.5, 2.0]]  # negatives still ReLU'd
    jump = make("jumprelu", threshold=torch.tensor([1.0, 0.0, 1.0, 2.5]))
    assert jump.encode(pre).tolist() == [[3.0, 0.0, 0.0, 0.0]]
    # b_dec is subtracted from the input (apply_b_dec_to_input) and added back on decode.
    shifted = S.SAE(W, torch.zeros(4), W, torch.ones(4), "standard")
    assert shifted.encode(pre).tolist() == [[2.0, 0.0, 0.0, 1.0]]
    assert shifted(pre).tolist() == [[3.0, 1.0, 1.0, 2.0]]


@pytest.mark.parametrize("arch,k", [("standard", None), ("topk", 3), ("jumprelu", None)])
def test_decompose_recovers_the_latents_a_vector_was_built_from(arch, k):
    sae = orthonormal_sae(arch, k)
    chosen = {5: 3.0, 17: 1.5, 30: 0.7}
    vector = sum(a * sae.W_dec[i] for i, a in chosen.items())
    found = sae.decompose(vector, k=3)
    assert [i for i, _ in found] == list(chosen)
    assert [a for _, a in found] == pytest.approx(list(chosen.values()), abs=1e-5)
    both = sae.decompose(torch.stack([vector, 2 * sae.W_dec[9]]), k=5)  # [n, d]: one list per vector
    assert both[1][0][0] == 9 and both[1][0][1] == pytest.approx(2.0, abs=1e-5)
    assert all(a < 1e-5 for _, a in both[1][1:])  # the rest: rounding only


def test_amplify_latent_scales_only_that_component():
    sae = orthonormal_sae()
    extra = torch.randn(D) * 0.01  # an error term, kept as it is
    vector = 3.0 * sae.W_dec[5] + 1.5 * sae.W_dec[17] + extra
    out = sae.amplify_latent(vector, 17, 4.0)
    activation = float(sae.encode(vector)[17])
    assert torch.allclose(out, vector + 3 * activation * sae.W_dec[17], atol=1e-6)
    assert sae.decompose(out, 2)[0][0] == 17  # now the strongest latent


@pytest.mark.parametrize("arch,k", [("standard", None), ("topk", 3), ("jumprelu", None)])
def test_latent_activation_in_the_trace_equals_the_sae(arch, k):
    """``ops.latent_activation`` (plain torch, shipped with a trace) is the SAE's own encoder."""
    sae = orthonormal_sae(arch, k)
    sae.b_dec.data = torch.randn(D) * 0.1  # b_dec subtracted from the input, as SAELens does
    vectors = torch.randn(6, D)
    for latent in range(sae.d_sae):
        expected = sae.encode(vectors)[:, latent : latent + 1]
        encoder = {k: v for k, v in sae.latent_params(latent).items() if k != "decoder_row"}
        got = ops.latent_activation(vectors, **encoder)
        assert torch.allclose(got, expected, atol=1e-6), latent


def test_latent_transform_in_the_graph_equals_amplify_latent_by_hand(tiny_models):
    """Scope(transforms=["latent"]) patches v + (alpha - 1) a(v) d: the same next-token
    probabilities as writing that vector, computed by hand, as an external source; alpha 1 is
    the plain patch; the same under remote="local"."""
    from superscopes.scope import read_vectors

    model = tiny_models["llama"]
    sae = orthonormal_sae("topk", k=8)
    grid = dict(sites=["resid_post"], layers=[1], target_layers=[1], target="a b c x", placeholder="x", output="topk")
    vector = read_vectors(model, ["one two three"], [(0, -1, "resid_post", 1)])[0]
    latent = int(sae.decompose(vector, k=1)[0][0])  # an active latent: amplifying it changes the vector
    activation = float(sae.encode(vector)[latent])
    by_hand = vector + 7.0 * activation * sae.W_dec[latent].detach()
    scope = Scope(
        "one two three", position=-1, alphas=[1.0, 8.0], transforms=["latent"], sae_latent=(sae, latent), **grid
    )
    frame = run(model, scope, progress=False)
    plain = run(model, Scope("one two three", position=-1, alphas=[1.0], **grid), progress=False)
    external = run(model, Scope(["v"], vectors=by_hand[None], alphas=[1.0], **grid), progress=False)
    probs = frame["output_probs"].tolist()
    assert frame["transform"].tolist() == ["latent", "latent"]
    assert probs[0] == pytest.approx(plain["output_probs"].iloc[0], rel=1e-5)
    assert frame["output_ids"].iloc[1] == external["output_ids"].iloc[0]
    assert probs[1] == pytest.approx(external["output_probs"].iloc[0], rel=1e-5)
    assert probs[1] != pytest.approx(probs[0], rel=1e-3)  # the amplified latent moved the prediction
    remote = run(model, scope, remote="local", progress=False)
    assert remote["output_ids"].tolist() == frame["output_ids"].tolist()
    assert remote["output_probs"].iloc[1] == pytest.approx(probs[1], rel=1e-5)


def test_a_latent_inactive_on_every_read_vector_warns(tiny_models):
    """Its alphas would all write the same vector: the grid says so (locally and remotely)."""
    from superscopes.scope import read_vectors

    model = tiny_models["llama"]
    sae = orthonormal_sae("topk", k=8)
    grid = dict(sites=["resid_post"], layers=[1], target_layers=[1], target="a b c x", placeholder="x", output="topk")
    vector = read_vectors(model, ["one two three"], [(0, -1, "resid_post", 1)])[0]
    acts = sae.encode(vector)
    silent, active = int(acts.argmin()), int(acts.argmax())
    assert float(acts[silent]) == 0 and float(acts[active]) > 0
    for remote in (False, "local"):
        scope = Scope(
            "one two three", position=-1, alphas=[1.0, 8.0], transforms=["latent"], sae_latent=(sae, silent), **grid
        )
        with pytest.warns(
            UserWarning, match=f"latent {silent} of SAE\\(topk.* is zero on every read vector of this grid"
        ):
            frame = run(model, scope, remote=remote, progress=False)
        assert frame["output_probs"].iloc[0] == frame["output_probs"].iloc[1]  # identical, as the warning says
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(
                model,
                Scope(
                    "one two three",
                    position=-1,
                    alphas=[1.0, 8.0],
                    transforms=["latent"],
                    sae_latent=(sae, active),
                    **grid,
                ),
                remote=remote,
                progress=False,
            )


def test_latent_transform_is_validated_before_any_forward_pass(tiny_models):
    model = tiny_models["llama"]
    sae = orthonormal_sae()
    base = dict(sites=["resid_post"], layers=[1], alphas=[2.0], transforms=["latent"])
    with pytest.raises(ScopeError, match=r"needs sae_latent=\(sae, latent index\)"):
        plan(model, Scope("a b", **base))
    with pytest.raises(
        ScopeError,
        match=r"SAE on resid_post layer 1; the grid reads \[\('mlp_out', 0\), "
        r"\('mlp_out', 1\), \('resid_post', 0\)\] too",
    ):
        plan(model, Scope("a b", **{**base, "sites": ["resid_post", "mlp_out"], "layers": [0, 1]}, sae_latent=(sae, 3)))
    with pytest.raises(S.SAEError, match=r"latent\(s\) \[48\] out of range"):
        plan(model, Scope("a b", **base, sae_latent=(sae, 48)))
    assert len(plan(model, Scope("a b", **base, sae_latent=(sae, 3))).cells) == 1


def test_directions_scales():
    sae = orthonormal_sae()
    assert torch.allclose(sae.directions([3, 4]), sae.W_dec[[3, 4]] * sae.mean_activation[[3, 4], None])
    assert torch.allclose(sae.directions([3], "unit").norm(dim=-1), torch.ones(1))
    assert torch.allclose(sae.directions([3], 2.5), 2.5 * sae.W_dec[[3]])
    with pytest.raises(S.SAEError, match=r"latent\(s\) \[48\] out of range.*0-47"):
        sae.directions([48])
    with pytest.raises(S.SAEError, match="scale 'median' is not valid; choose from 'mean', 'unit'"):
        sae.directions([1], "median")
    sae.mean_activation = None
    with pytest.raises(S.SAEError, match="no recorded mean activations"):
        sae.directions([1])


def test_constructor_errors_name_values_and_choices():
    W = torch.zeros(4, 6)
    with pytest.raises(
        S.SAEError, match="architecture 'abstopk' is not supported; choose from standard, topk, jumprelu, gated"
    ):
        S.SAE(W, torch.zeros(6), W.T, torch.zeros(4), "abstopk")
    with pytest.raises(S.SAEError, match=r"a gated SAE needs r_mag \(one per latent\)"):
        S.SAE(W, torch.zeros(6), W.T, torch.zeros(4), "gated")
    with pytest.raises(S.SAEError, match="normalize_activations 'whiten' is not supported; choose from none, constant"):
        S.SAE(W, torch.zeros(6), W.T, torch.zeros(4), normalize_activations="whiten")
    with pytest.raises(S.SAEError, match=r"W_dec has shape \(4, 6\).*must be \(6, 4\)"):
        S.SAE(W, torch.zeros(6), W, torch.zeros(4))
    with pytest.raises(S.SAEError, match="a topk SAE needs k in 1-6, got 7"):
        S.SAE(W, torch.zeros(6), W.T, torch.zeros(4), "topk", k=7)
    with pytest.raises(S.SAEError, match="site 'mlp_in' has no SAE hook; choose from resid_pre, resid_post, mlp_out"):
        S.SAE(W, torch.zeros(6), W.T, torch.zeros(4), "standard", site="mlp_in")


# ---------------------------------------------------------------- disk


@pytest.mark.parametrize("arch,k", [("standard", None), ("topk", 3), ("jumprelu", None)])
def test_save_load_round_trip(tmp_path, arch, k):
    sae = orthonormal_sae(arch, k)
    sae.b_enc.data += torch.randn(sae.d_sae)
    sae.save(tmp_path / "sae")
    loaded = S.load(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "mean_activation", "frequency"):
        assert torch.equal(getattr(loaded, name).detach(), getattr(sae, name).detach()), name
    assert (loaded.architecture, loaded.k, loaded.site, loaded.layer, loaded.model) == (
        arch,
        k,
        "resid_post",
        1,
        "tiny",
    )
    x = torch.randn(10, D)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    S.SAE.save(sae, tmp_path / "half", dtype=torch.float16)
    half = S.load(tmp_path / "half")
    assert torch.allclose(half.W_dec, sae.W_dec, atol=1e-3) and half.W_dec.dtype == torch.float32


def _write_saelens(folder, cfg: dict, weights: dict) -> None:
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae_weights.safetensors")


def test_hand_written_saelens_folders_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {
        "W_enc": torch.randn(D, 32, generator=g),
        "b_enc": torch.randn(32, generator=g),
        "W_dec": torch.randn(32, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    # The pre-6.0 layout: hook fields and activation_fn_kwargs at the top level.
    _write_saelens(
        tmp_path / "old",
        {
            "architecture": "topk",
            "d_in": D,
            "d_sae": 32,
            "dtype": "float32",
            "hook_name": "blocks.2.hook_mlp_out",
            "hook_layer": 2,
            "model_name": "tiny",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 4},
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
        },
        weights,
    )
    old = S.load(tmp_path / "old")
    assert (old.site, old.layer, old.k, old.apply_b_dec_to_input) == ("mlp_out", 2, 4, False)
    x = torch.randn(3, D)
    pre = x @ weights["W_enc"] + weights["b_enc"]  # no b_dec subtracted
    top = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    assert torch.allclose(old.encode(x), expected)
    assert torch.allclose(old(x), expected @ weights["W_dec"] + weights["b_dec"], atol=1e-5)
    # The 6.x layout: k at the top level, hook under meta; JumpReLU with its threshold.
    _write_saelens(
        tmp_path / "new",
        {
            "architecture": "jumprelu",
            "d_in": D,
            "d_sae": 32,
            "meta": {"hook_name": "blocks.0.hook_resid_pre", "model_name": "tiny"},
        },
        weights | {"threshold": torch.full((32,), 0.5)},
    )
    new = S.load(tmp_path / "new")
    assert (new.architecture, new.site, new.layer) == ("jumprelu", "resid_pre", 0)
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    assert torch.allclose(new.encode(x), pre.relu() * (pre > 0.5))


def test_unreadable_folders_say_why(tmp_path):
    weights = {"W_enc": torch.zeros(D, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, D), "b_dec": torch.zeros(D)}
    base = {"architecture": "standard", "d_in": D, "d_sae": 8, "hook_name": "blocks.1.hook_resid_post"}
    cases = {
        "hook": (
            base | {"hook_name": "blocks.1.ln2.hook_normalized"},
            "hook_name 'blocks.1.ln2.hook_normalized' does not map to a site; supported: blocks.<layer>.hook_resid_pre",
        ),
        "arch": (base | {"architecture": "abstopk"}, "architecture='abstopk' is not supported \\(supported: standard"),
        "norm": (
            base | {"normalize_activations": "covariance_whitening"},
            "normalize_activations='covariance_whitening' is not supported",
        ),
        "width": (base | {"d_sae": 9}, r"config says d_in=64, d_sae=9 but W_enc has shape \(64, 8\)"),
        "layer": (base | {"hook_layer": 3}, "hook_layer 3 contradicts hook_name 'blocks.1.hook_resid_post'"),
    }
    for name, (cfg, message) in cases.items():
        _write_saelens(tmp_path / name, cfg, weights)
        with pytest.raises(S.SAEError, match=message):
            S.load(tmp_path / name)
    with pytest.raises(S.SAEError, match="is not an SAE folder: it has arch, hook, .*; expected a SAELens folder"):
        S.load_folder(tmp_path)
    with pytest.raises(S.SAEError, match="no SAE 'gpt9'.*embedded SAEs \\(smollm2-135m\\)"):
        S.load("gpt9")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_an_sae_that_does_not_fit_the_model_is_refused(tiny_models, arch):
    model = tiny_models[arch]
    identity_sae(layer=2).check(model)
    with pytest.raises(S.SAEError, match="layer 3 is out of range: .* has layers 0-2"):
        identity_sae(layer=3).check(model)
    with pytest.raises(S.SAEError, match="width d_in=32 does not fit .* hidden_size=64"):
        identity_sae(d=32).check(model)
    with pytest.raises(S.SAEError, match="layer 5 is out of range"):  # before any forward pass
        S.latent_scope(identity_sae(layer=5), [0], model=model)


# ---------------------------------------------------------------- metrics


def test_metrics_on_constructed_cases():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])  # mean (2, 2), total variance 1+4+1+0+0+4 = 10
    metrics, mean, frequency = S.measure(identity_sae(2, layer=0), x)
    assert metrics == {"fve": 1.0, "l0": pytest.approx(5 / 3), "dead": 2, "tokens": 3}  # +x1, +x2 fire; -x never
    assert mean[:2].tolist() == pytest.approx([2.0, 3.0]) and frequency.tolist() == pytest.approx([1, 2 / 3, 0, 0])
    # Reconstruct only the first coordinate (+x1 latent): residual 0 + 4 + 16 = 20, FVE 1 - 20/10 = -1;
    # a bias of (0, 2) halves it: residual (0-2)^2 + 0 + (4-2)^2 = 8, FVE 0.2.
    first = identity_sae(2, layer=0)
    first.W_dec.data[[1, 3]] = 0
    assert S.measure(first, x)[0]["fve"] == pytest.approx(-1.0)
    first.b_dec.data[:] = torch.tensor([0.0, 2.0])
    first.apply_b_dec_to_input = False
    assert S.measure(first, x, batch_size=2)[0] == {
        "fve": pytest.approx(0.2),
        "l0": pytest.approx(5 / 3),
        "dead": 2,
        "tokens": 3,
    }


def test_spliced_loss_of_an_exact_sae_is_the_clean_loss(tiny_models):
    model = tiny_models["llama"]
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    exact = S.next_token_losses(model, identity_sae(layer=1), ids, batch_size=2)
    assert exact["spliced"] == pytest.approx(exact["clean"], abs=1e-4)
    assert abs(exact["zero"] - exact["clean"]) > 1e-3
    assert exact["recovered"] == pytest.approx(1.0, abs=1e-2)
    # Clean loss by hand; an SAE that reconstructs nothing but b_dec = 0 is the zero-ablation.
    logits = model._module(ids).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert exact["clean"] == pytest.approx(float(by_hand), abs=1e-4)
    dead = identity_sae(layer=1)
    dead.W_dec.data.zero_()
    blank = S.next_token_losses(model, dead, ids)
    assert blank["spliced"] == pytest.approx(blank["zero"], abs=1e-4) and blank["recovered"] == pytest.approx(
        0.0, abs=1e-3
    )


# ---------------------------------------------------------------- training


def test_training_a_tiny_sae_improves_and_resumes(tiny_models, tmp_path):
    model = tiny_models["llama"]
    texts = load_corpus("train", tmp_path / "none", fallback=True)
    acts = S.cache_activations(model, "resid_post", 1, texts, 1000, tmp_path / "cache", progress=False)
    assert len(acts) >= 1000 and acts.dtype == torch.float16
    again = S.cache_activations(model, "resid_post", 1, texts, 1000, tmp_path / "cache", progress=False)
    assert torch.equal(acts, again)  # read back from the shards
    with pytest.raises(S.SAEError, match="holds activations of .*layer.: 1.*give a new folder"):
        S.cache_activations(model, "resid_post", 2, texts, 1000, tmp_path / "cache", progress=False)
    short = S.train_sae(acts, 128, 8, "resid_post", 1, batch_size=256, epochs=1, progress=False)
    long = S.train_sae(acts, 128, 8, "resid_post", 1, batch_size=256, epochs=15, progress=False)
    fve_short, fve_long = S.measure(short, acts)[0]["fve"], S.measure(long, acts)[0]["fve"]
    assert fve_long > fve_short + 0.05 and fve_long > 0.6, (fve_short, fve_long)
    assert S.measure(long, acts)[0]["l0"] <= 8
    # A finished checkpoint resumes to the same SAE; another run's checkpoint is refused.
    first = S.train_sae(
        acts, 128, 8, "resid_post", 1, batch_size=256, epochs=2, checkpoint=tmp_path / "c.pt", progress=False
    )
    resumed = S.train_sae(
        acts, 128, 8, "resid_post", 1, batch_size=256, epochs=2, checkpoint=tmp_path / "c.pt", progress=False
    )
    assert torch.equal(first.W_dec, resumed.W_dec) and torch.equal(first.b_dec, resumed.b_dec)
    with pytest.raises(S.SAEError, match="checkpoint .* is of another run"):
        S.train_sae(acts, 64, 8, "resid_post", 1, batch_size=256, checkpoint=tmp_path / "c.pt", progress=False)


def test_train_writes_a_loadable_sae_with_metrics(tiny_models, tmp_path):
    model = tiny_models["llama"]
    texts, held = (load_corpus(split, tmp_path / "none", fallback=True) for split in ("train", "heldout"))
    sae = S.train(
        model,
        "mlp_out",
        2,
        96,
        6,
        1000,
        tmp_path / "out",
        texts=texts,
        heldout=held,
        loss_texts=4,
        loss_length=8,
        batch_size=128,
        epochs=3,
        progress=False,
    )
    loaded = S.load(tmp_path / "out", model=model)
    assert (loaded.site, loaded.layer, loaded.k, loaded.d_sae) == ("mlp_out", 2, 6, 96)
    assert torch.equal(loaded.W_dec, sae.W_dec)
    assert loaded.mean_activation is not None and (loaded.mean_activation >= 0).all()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["loss"]) == {"clean", "spliced", "zero", "recovered"}
    assert metrics["l0"] <= 6 and 0 <= metrics["dead"] <= 96 and metrics["training"]["tokens"] == 1000


# ---------------------------------------------------------------- latents as sources


def _hand_patched_probs(model, text_and_index, vectors, layer, alpha, top_k):
    text, index = text_and_index
    probs = []
    for vector in vectors:
        with model.trace(text):
            ops.patch(model, "resid_post", layer, vector[None], position=index, alpha=alpha)
            p = model.output.logits[:, -1].float().softmax(-1).topk(top_k).values.save()
        probs.append(p[0].tolist())
    return probs


@pytest.mark.parametrize("remote", [False, "local"])
def test_a_latent_source_equals_its_decoder_direction_patched_by_hand(tiny_models, remote):
    model = tiny_models["llama"]
    sae = orthonormal_sae()
    # Written at the last position, so the read-out probabilities depend on it directly.
    scope = S.latent_scope(
        sae, [3, 40], model=model, alphas=[2.0], target_layers=[0], target_position="last", output="topk", top_k=5
    )
    frame = run(model, scope, remote=remote, progress=False)
    assert frame["source"].tolist() == ["latent 3", "latent 40"] and set(frame["layer"]) == {1}
    the_plan = plan(model, scope)
    expected = _hand_patched_probs(model, the_plan.target_of(the_plan.cells[0]), sae.directions([3, 40]), 0, 2.0, 5)
    for got, want in zip(frame["output_probs"], expected):
        assert got == pytest.approx(want, rel=1e-4)
    # The vector is the decoder row times the latent's mean activation: alpha 1 at 2x the row == alpha 2.
    doubled = S.latent_scope(
        sae,
        [3],
        scale=2 * float(sae.mean_activation[3]),
        alphas=[1.0],
        target_layers=[0],
        target_position="last",
        output="topk",
        top_k=5,
    )
    assert run(model, doubled, progress=False)["output_probs"][0] == pytest.approx(frame["output_probs"][0], abs=1e-5)


def test_vectors_source_is_validated(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ScopeError, match=r"vectors has shape \(2, 32\); give one 64-vector per prompt.*\(2, 64\)"):
        plan(model, Scope(["a", "b"], vectors=torch.zeros(2, 32), sites=["resid_post"], layers=[1]))
    with pytest.raises(ScopeError, match="exactly one site and one source layer"):
        plan(model, Scope(["a"], vectors=torch.zeros(1, D), sites=["resid_post"], layers=[0, 1]))
    with pytest.raises(ScopeError, match="leave them unset"):
        plan(model, Scope(["a"], vectors=torch.zeros(1, D), token="a", sites=["resid_post"], layers=[1]))
    with pytest.raises(ScopeError, match='target "source" and logit_lens need read vectors'):
        plan(model, Scope(["a"], vectors=torch.zeros(1, D), target="source", sites=["resid_post"], layers=[1]))


def test_the_embedded_smollm2_sae_fits_and_decomposes(smollm2):
    sae = S.load("smollm2-135m", model=smollm2)
    assert (sae.site, sae.layer, sae.d_in, sae.architecture) == ("resid_post", 15, 576, "topk")
    assert sae.mean_activation is not None and sae.W_dec.norm(dim=-1).sub(1).abs().max() < 1e-2
    metrics = json.loads((S.EMBEDDED_DIR / S.EMBEDDED["smollm2-135m"] / "metrics.json").read_text())
    assert metrics["fve"] > 0.5
    # A vector built from three latents' directions decomposes into (at least) those latents.
    vector = sae.b_dec + sae.directions([10, 200, 3000]).sum(0)
    assert {10, 200, 3000} <= {i for i, _ in sae.decompose(vector, k=6)}


def test_explanation_scores_self_similarity_and_relevancy(tiny_models):
    model = tiny_models["llama"]
    sae = orthonormal_sae()
    # Written at the last layer's resid_post, the patched vector is what that site holds: cosine 1.
    scope = S.latent_scope(sae, [3, 7], alphas=[2.0], target_layers=[2], max_new_tokens=3)
    scored = S.explanation_scores(model, scope, run(model, scope, progress=False))
    assert scored["self_similarity"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # Written at layer 0 the last layer holds something else; relevancy = p(patched) - p(clean), by hand.
    scope = S.latent_scope(sae, [3], alphas=[6.0], target_layers=[0], max_new_tokens=3)
    row = S.explanation_scores(model, scope, run(model, scope, progress=False)).iloc[0]
    assert row["self_similarity"] < 1 - 1e-5  # the two blocks above add a little
    prompt = model.tokenizer(row["target"])["input_ids"]
    ids = torch.tensor([prompt + row["output_ids"]])
    with model.trace(ids):
        ops.patch(model, "resid_post", 0, sae.directions([3]), position=row["target_position"], alpha=6.0)
        patched = model.output.logits[0].softmax(-1).save()
    clean = model._module(ids).logits[0].softmax(-1)
    steps = range(len(prompt) - 1, ids.shape[1] - 1)
    expected = [float(patched[t, ids[0, t + 1]] - clean[t, ids[0, t + 1]]) for t in steps]
    assert row["relevancy"] == pytest.approx(expected, abs=1e-5) and len(expected) == len(row["output_ids"])
    first = patched[len(prompt) - 1]  # the patched prediction of the first generated token
    assert row["entropy"] == pytest.approx(float(-(first * first.log()).sum()), abs=1e-4)
    # Adding alpha 0 changes nothing: every relevancy is 0.
    zero = S.latent_scope(sae, [3], alphas=[0.0], mode="add", target_layers=[0], max_new_tokens=3)
    assert S.explanation_scores(model, zero, run(model, zero, progress=False))["relevancy_mean"].tolist() == [0.0]
    # A readout that stopped at once (end of text first): no relevancy, the entropy still there.
    stopped = run(model, scope, progress=False).assign(output_ids=[[]], output=[""])
    empty = S.explanation_scores(model, scope, stopped).iloc[0]
    assert empty["relevancy"] == [] and empty["entropy"] == pytest.approx(row["entropy"], abs=1e-5)
    with pytest.raises(S.SAEError, match="needs a Scope with vectors"):
        S.explanation_scores(model, Scope(["a b"]), None)
