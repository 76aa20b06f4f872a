"""SAEs as other libraries write them: Gemma Scope's params.npz, EleutherAI sparsify folders,
dictionary_learning checkpoints, SAELens release ids through the Hugging Face cache, and the
checks every load makes (finite weights, shapes, no pickled code, unknown fields refused).

Each folder is built here to the format's published layout, and each expected encode is that
library's own encode written out in torch (the comments name the code it follows)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from superscopes import sae as S

D, L = 16, 40


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, L, generator=g),
        "b_enc": torch.randn(L, generator=g) * 0.3,
        "W_dec": torch.randn(L, D, generator=g),
        "b_dec": torch.randn(D, generator=g) * 0.3,
        "threshold": torch.rand(L, generator=g) + 0.1,
    }


X = torch.randn(12, D, generator=torch.Generator().manual_seed(7)) * 2


def write_npz(path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{n: t.numpy() for n, t in arrays.items()})


# ---------------------------------------------------------------- Gemma Scope


def test_gemma_scope_params_npz_is_a_jumprelu_without_b_dec_on_the_input(tmp_path):
    """google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz; Gemma Scope's
    tutorial: pre = x @ W_enc + b_enc; acts = (pre > threshold) * ReLU(pre)."""
    w = weights()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    write_npz(folder / "params.npz", w)
    sae = S.load(folder)
    pre = X @ w["W_enc"] + w["b_enc"]
    assert torch.allclose(sae.encode(X), (pre > w["threshold"]) * pre.relu())
    assert torch.allclose(sae(X), sae.encode(X) @ w["W_dec"] + w["b_dec"], atol=1e-5)
    assert (sae.architecture, sae.site, sae.layer, sae.apply_b_dec_to_input) == ("jumprelu", "resid_post", 20, False)
    assert sae.model == "gemma-2-2b"
    assert S.load(folder / "params.npz").layer == 20  # the file itself too
    mlp = tmp_path / "models--google--gemma-scope-9b-pt-mlp" / "snapshots" / "abc" / "layer_3" / "width_16k" / "x"
    write_npz(mlp / "params.npz", w)
    assert (S.load(mlp).site, S.load(mlp).layer, S.load(mlp).model) == ("mlp_out", 3, "gemma-2-9b")
    att = tmp_path / "gemma-scope-2b-pt-att" / "layer_3" / "width_16k" / "x"
    write_npz(att / "params.npz", w)
    with pytest.raises(S.SAEError, match=r"attention \(hook_z\) SAEs do not read a site"):
        S.load(att)
    elsewhere = tmp_path / "mine"
    write_npz(elsewhere / "params.npz", w)
    with pytest.raises(S.SAEError, match="does not say which site and layer it reads: give site= and layer="):
        S.load(elsewhere)
    assert S.load(elsewhere, site="resid_post", layer=4).layer == 4
    with pytest.raises(S.SAEError, match="reads resid_post layer 20, not the given site='resid_post' layer=4"):
        S.load(folder, site="resid_post", layer=4)


def test_npz_with_pickled_objects_or_nan_is_refused(tmp_path):
    w = weights()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "w" / "a"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{n: t.numpy() for n, t in w.items()}, extra=np.array([{"x": 1}], dtype=object))
    with pytest.raises(S.SAEError, match="params.npz cannot be read as plain arrays \\(pickled objects are refused\\)"):
        S.load(folder)
    w["W_dec"][3, 2] = float("nan")
    write_npz(folder / "params.npz", w)
    with pytest.raises(S.SAEError, match="params.npz: W_dec has 1 NaN or inf value\\(s\\) of 640"):
        S.load(folder)


# ---------------------------------------------------------------- sparsify


def write_sparsify(run, hookpoint: str, w: dict, k: int = 5, **cfg) -> None:
    """sparsify's SparseCoder.save_to_disk: RUN/<hookpoint>/cfg.json ({**SparseCoderConfig, d_in})
    and sae.safetensors (encoder.weight [latents, d_in], encoder.bias, W_dec [latents, d_in], b_dec)."""
    folder = run / hookpoint
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 32,
                "normalize_decoder": True,
                "num_latents": L,
                "k": k,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": D,
            }
            | cfg
        )
    )
    save_file(
        {
            "encoder.weight": w["W_enc"].T.contiguous(),
            "encoder.bias": w["b_enc"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
        },
        folder / "sae.safetensors",
    )


def test_sparsify_folder_is_topk_of_relu_on_x_minus_b_dec(tmp_path):
    """sparsify/sparse_coder.py: x - b_dec, then fused_encoder: ReLU(x W^T + b), topk(k)."""
    w = weights(1)
    write_sparsify(tmp_path / "run", "layers.2", w)
    write_sparsify(tmp_path / "run", "layers.1.mlp", w)
    sae = S.load(tmp_path / "run" / "layers.2")
    pre = ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    top = pre.topk(5, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert torch.allclose(sae.encode(X), expected, atol=1e-6)
    assert torch.allclose(sae(X), expected @ w["W_dec"] + w["b_dec"], atol=1e-5)
    assert (sae.architecture, sae.k, sae.site, sae.layer) == ("topk", 5, "resid_post", 2)
    assert (S.load(tmp_path / "run" / "layers.1.mlp").site, S.load(tmp_path / "run" / "layers.1.mlp").layer) == (
        "mlp_out",
        1,
    )
    with pytest.raises(S.SAEError, match="it holds sparsify hookpoints layers.1.mlp, layers.2: give one"):
        S.load(tmp_path / "run")
    write_sparsify(tmp_path / "skip", "layers.0", w, skip_connection=True)
    with pytest.raises(S.SAEError, match="skip_connection=True is not supported"):
        S.load(tmp_path / "skip" / "layers.0")
    write_sparsify(tmp_path / "group", "layers.0", w, activation="groupmax")
    with pytest.raises(S.SAEError, match="activation='groupmax' is not supported"):
        S.load(tmp_path / "group" / "layers.0")


# ---------------------------------------------------------------- dictionary_learning


def write_dictionary_learning(folder, dict_class: str, state: dict, **trainer) -> None:
    """dictionary_learning's training.py: save_dir/trainer_i/ae.pt (state_dict) + config.json ({"trainer": ...})."""
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "trainer": {
                    "dict_class": dict_class,
                    "activation_dim": D,
                    "dict_size": L,
                    "layer": 3,
                    "lm_name": "org/tiny",
                    "submodule_name": "resid_post_layer_3",
                }
                | trainer,
                "buffer": {"ctx_len": 128},
            }
        )
    )


def test_dictionary_learning_checkpoints_encode_as_their_classes_do(tmp_path):
    """dictionary_learning/dictionary.py and trainers/: each class's encode written out."""
    w = weights(2)
    linear = {
        "encoder.weight": w["W_enc"].T.contiguous(),
        "encoder.bias": w["b_enc"],
        "decoder.weight": w["W_dec"].T.contiguous(),
    }
    relu_pre = ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    top = relu_pre.topk(4, dim=-1)
    cases = {
        # AutoEncoder: ReLU(encoder(x - bias)); decoder(f) + bias
        "AutoEncoder": (linear | {"bias": w["b_dec"]}, relu_pre),
        # AutoEncoderTopK: topk of ReLU(encoder(x - b_dec)) (use_threshold=False by default)
        "AutoEncoderTopK": (
            linear | {"b_dec": w["b_dec"], "k": torch.tensor(4), "threshold": torch.tensor(-1.0)},
            torch.zeros_like(relu_pre).scatter(-1, top.indices, top.values),
        ),
        # BatchTopKSAE: ReLU(encoder(x - b_dec)) * (that > threshold) (use_threshold=True by default)
        "BatchTopKSAE": (
            linear | {"b_dec": w["b_dec"], "k": torch.tensor(4), "threshold": torch.tensor(0.7)},
            relu_pre * (relu_pre > 0.7),
        ),
        "MatryoshkaBatchTopKSAE": (
            {n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
            | {"k": torch.tensor(4), "threshold": torch.tensor(0.7), "group_sizes": torch.tensor([8, 32])},
            relu_pre * (relu_pre > 0.7),
        ),
        # JumpReluAutoEncoder: no b_dec on the input; ReLU(pre * (pre > threshold))
        "JumpReluAutoEncoder": (
            {n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
            ((X @ w["W_enc"] + w["b_enc"]) * ((X @ w["W_enc"] + w["b_enc"]) > w["threshold"])).relu(),
        ),
    }
    gated_in = (X - w["b_dec"]) @ w["W_enc"]
    r_mag, mag_bias = torch.randn(L) * 0.2, torch.randn(L) * 0.2
    # GatedAutoEncoder: x_enc = encoder(x - decoder_bias); (x_enc + gate_bias > 0) * ReLU(exp(r_mag) x_enc + mag_bias)
    cases["GatedAutoEncoder"] = (
        {
            "encoder.weight": w["W_enc"].T.contiguous(),
            "decoder.weight": w["W_dec"].T.contiguous(),
            "decoder_bias": w["b_dec"],
            "r_mag": r_mag,
            "gate_bias": w["b_enc"],
            "mag_bias": mag_bias,
        },
        (gated_in + w["b_enc"] > 0) * (r_mag.exp() * gated_in + mag_bias).relu(),
    )
    for kind, (state, expected) in cases.items():
        write_dictionary_learning(tmp_path / kind, kind, state, k=4)
        sae = S.load(tmp_path / kind)
        assert torch.allclose(sae.encode(X), expected, atol=1e-5), kind
        assert torch.equal(sae.encode(X) != 0, expected != 0), kind
        assert torch.allclose(sae(X), expected @ w["W_dec"] + w["b_dec"], atol=1e-4), kind
        assert (sae.site, sae.layer, sae.model) == ("resid_post", 3, "tiny"), kind
    write_dictionary_learning(tmp_path / "new", "AutoEncoderNew", cases["AutoEncoder"][0])
    with pytest.raises(
        S.SAEError, match="trainer.dict_class='AutoEncoderNew' is not supported; supported: AutoEncoder,"
    ):
        S.load(tmp_path / "new")


def test_a_pickled_object_in_ae_pt_is_not_unpickled(tmp_path):
    folder = tmp_path / "dl"
    write_dictionary_learning(folder, "AutoEncoder", {"bias": torch.zeros(D)})

    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (folder / "ae.pt").write_bytes(pickle.dumps({"bias": Boom()}))
    with pytest.raises(S.SAEError, match="ae.pt cannot be read as plain tensors \\(weights_only=True\\)"):
        S.load(folder)


# ---------------------------------------------------------------- SAELens folders: refusals and checks


def write_saelens(folder, cfg: dict, w: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(
        json.dumps(
            {"d_in": D, "d_sae": L, "architecture": "standard", "metadata": {"hook_name": "blocks.1.hook_resid_post"}}
            | cfg
        )
    )
    save_file(w, folder / "sae_weights.safetensors")


def test_math_changing_fields_not_implemented_are_refused_by_name(tmp_path):
    w = {n: t for n, t in weights().items() if n != "threshold"}
    cases = {
        "whiten": (
            {"normalize_activations": "covariance_whitening"},
            w,
            "normalize_activations='covariance_whitening'",
        ),
        "average": (
            {"normalize_activations": "expected_average_only_in"},
            w,
            "normalize_activations='expected_average_only_in' is not supported \\(its scaling factor is not in ",
        ),
        "hook_z": ({"reshape_activations": "hook_z"}, w, "reshape_activations='hook_z' is not supported"),
        "head": ({"metadata": {"hook_name": "blocks.1.hook_resid_post", "hook_head_index": 3}}, w, "hook_head_index=3"),
        "tanh": ({"activation_fn_str": "tanh-relu"}, w, "activation_fn_str='tanh-relu' is not supported"),
        "abstopk": ({"architecture": "abstopk"}, w, "architecture='abstopk' is not supported"),
        "rescale": ({"rescale_acts_by_decoder_norm": True}, w, "rescale_acts_by_decoder_norm=True is not supported"),
        "scaling": ({}, w | {"scaling_factor": torch.full((L,), 2.0)}, "scaling_factor='not all ones'"),
        "extra": ({}, w | {"W_skip": torch.zeros(D, D)}, "holds W_skip, which a standard SAE does not use"),
        "nan": ({}, w | {"b_enc": torch.full((L,), float("inf"))}, "sae_weights.safetensors: b_enc has 40 NaN or inf"),
        "width": ({"d_in": D + 1}, w, "the config says d_in=17, d_sae=40 but W_enc has shape \\(16, 40\\)"),
        "shape": ({}, w | {"b_dec": torch.zeros(D + 1)}, "sae_weights.safetensors: b_dec has shape \\(17,\\)"),
        "gated": (
            {"architecture": "gated"},
            {n: t for n, t in w.items() if n != "b_enc"} | {"b_gate": w["b_enc"]},
            "sae_weights.safetensors lacks r_mag, b_mag",
        ),
        "hook": (
            {"metadata": {"hook_name": "hook_embed"}},
            w,
            "cfg.json: hook_name 'hook_embed' does not map to a site",
        ),
    }
    for name, (cfg, tensors, message) in cases.items():
        write_saelens(tmp_path / name, cfg, tensors)
        with pytest.raises(S.SAEError, match=message):
            S.load(tmp_path / name)
    write_saelens(tmp_path / "ones", {}, w | {"scaling_factor": torch.ones(L)})  # all ones: SAELens drops it too
    ones = S.load(tmp_path / "ones")
    assert torch.allclose(ones.encode(X), ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu())


def test_hook_names_of_transformerlens_and_hf_module_paths(tiny_models):
    assert S.hook_site("blocks.4.hook_mlp_out") == ("mlp_out", 4)
    assert S.hook_site("model.layers.7") == ("resid_post", 7)
    assert S.hook_site("layers.7.self_attn") == ("attn_out", 7)
    assert S.hook_site("transformer.h.2.mlp") == ("mlp_out", 2)
    assert S.hook_site("gpt_neox.layers.1.attention") == ("attn_out", 1)
    # Gemma's MLP update is its post-feedforward norm's output: the module path of that model.
    assert S.hook_site("model.layers.1.post_feedforward_layernorm", tiny_models["gemma2"]) == ("mlp_out", 1)
    with pytest.raises(S.SAEError, match="hook_name 'model.layers.1.mlp' does not map to a site"):
        S.hook_site("model.layers.1.mlp", tiny_models["gemma2"])
    with pytest.raises(S.SAEError, match="hook_name 'blocks.1.hook_resid_mid' does not map to a site; supported"):
        S.hook_site("blocks.1.hook_resid_mid")


def test_an_sae_that_does_not_fit_names_its_file(tmp_path, tiny_models):
    w = {n: t for n, t in weights().items() if n != "threshold"}
    write_saelens(tmp_path / "narrow", {}, w)
    with pytest.raises(S.SAEError, match="from .*narrow/sae_weights.safetensors\\): width d_in=16 does not fit"):
        S.load(tmp_path / "narrow", model=tiny_models["llama"])


# ---------------------------------------------------------------- by name, offline


def fake_hf_cache(root, repo: str, folder: str, make) -> None:
    """The Hugging Face hub cache layout: models--owner--name/refs/main + snapshots/<commit>/..."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123abcd")
    make(base / "snapshots" / "0123abcd" / folder)


def test_an_hf_repo_folder_loads_from_the_local_cache_and_a_missing_one_says_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    w = weights()
    fake_hf_cache(
        tmp_path,
        "google/gemma-scope-2b-pt-res",
        "layer_20/width_16k/average_l0_71",
        lambda folder: write_npz(folder / "params.npz", w),
    )
    sae = S.load("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    assert (sae.site, sae.layer, sae.architecture) == ("resid_post", 20, "jumprelu")
    try:  # the message depends on whether sae-lens is installed; the default venv has none
        import sae_lens  # noqa: F401
    except ImportError:
        with pytest.raises(
            S.SAEError,
            match="is not in the Hugging Face cache .*huggingface-cli download .*"
            "install sae-lens \\(pip install 'superscopes\\[sae\\]'\\)",
        ):
            S.load("gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical")
    with pytest.raises(S.SAEError, match="no SAE 'nothing-here'.*SAELens release id"):
        S.load("nothing-here")


def fake_registry(monkeypatch, releases: dict) -> None:
    """``sae_lens.loading.pretrained_saes_directory`` as sae-lens 6 has it, holding ``releases``
    (release -> the fields of its PretrainedSAELookup that superscopes reads)."""
    import sys
    import types

    lookups = {name: types.SimpleNamespace(**fields) for name, fields in releases.items()}
    module = types.ModuleType("sae_lens.loading.pretrained_saes_directory")
    module.get_pretrained_saes_directory = lambda: lookups
    for name in ("sae_lens", "sae_lens.loading"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)


GEMMA_SCOPE_RELEASE = {  # as sae-lens 6.54.12's pretrained_saes.yaml has it (one of its SAEs)
    "gemma-scope-2b-pt-res-canonical": {
        "repo_id": "google/gemma-scope-2b-pt-res",
        "conversion_func": "gemma_2",
        "config_overrides": None,
        "saes_map": {"layer_20/width_16k/canonical": "layer_20/width_16k/average_l0_71"},
        "norm_scaling_factor": {},
    },
    "llama_scope_lxr_8x": {
        "repo_id": "fnlp/Llama3_1-8B-Base-LXR-8x",
        "conversion_func": "llama_scope",
        "config_overrides": None,
        "saes_map": {"l0r_8x": "Llama3_1-8B-Base-L0R-8x"},
        "norm_scaling_factor": {},
    },
}


def test_a_release_id_resolves_through_the_saelens_registry_to_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    fake_registry(monkeypatch, GEMMA_SCOPE_RELEASE)
    w = weights()
    name = "gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical"
    with pytest.raises(
        S.SAEError,
        match="google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71 is not in the Hugging Face cache",
    ):
        S.load(name)
    fake_hf_cache(
        tmp_path,
        "google/gemma-scope-2b-pt-res",
        "layer_20/width_16k/average_l0_71",
        lambda folder: write_npz(folder / "params.npz", w),
    )
    sae = S.load(name)
    assert (sae.site, sae.layer, sae.architecture, sae.apply_b_dec_to_input) == ("resid_post", 20, "jumprelu", False)
    with pytest.raises(
        S.SAEError,
        match="'layer_99/width_16k/canonical' is not an SAE of release gemma-scope-2b-pt-res"
        "-canonical; its SAEs: layer_20/width_16k/canonical \\(1\\)",
    ):
        S.load("gemma-scope-2b-pt-res-canonical/layer_99/width_16k/canonical")
    with pytest.raises(S.SAEError, match="release llama_scope_lxr_8x is stored in SAELens' 'llama_scope' conversion"):
        S.load("llama_scope_lxr_8x/l0r_8x")


def test_a_registry_norm_scaling_factor_is_folded_in_as_saelens_does(tmp_path, monkeypatch):
    """normalize_activations='expected_average_only_in' with the registry's norm_scaling_factor f:
    SAELens' fold_activation_norm_scaling_factor (W_enc * f, W_dec / f, b_dec / f), so the SAE
    reads raw activations: encode(x) is the trained SAE's encode of f x, decode divides by f."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    fake_registry(
        monkeypatch,
        {
            "mine": {
                "repo_id": "me/saes",
                "conversion_func": None,
                "config_overrides": None,
                "saes_map": {"a": "a"},
                "norm_scaling_factor": {"a": 2.5},
            }
        },
    )
    w = {n: t for n, t in weights().items() if n != "threshold"}
    fake_hf_cache(
        tmp_path,
        "me/saes",
        "a",
        lambda folder: write_saelens(folder, {"normalize_activations": "expected_average_only_in"}, w),
    )
    sae = S.load("mine/a")
    trained = ((2.5 * X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    assert torch.allclose(sae.encode(X), trained, atol=1e-5)
    assert torch.allclose(sae(X), (trained @ w["W_dec"] + w["b_dec"]) / 2.5, atol=1e-5)


def test_the_app_offers_every_format(tmp_path):
    """The explorer's ``--sae FOLDER``: a SAELens folder is offered from its cfg.json alone (the
    6.x layout too), other formats are read at once."""
    from superscopes.app.panels import _sae_offer

    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "a"
    write_npz(folder / "params.npz", weights())
    offer = _sae_offer(folder, "g")
    assert (offer.site, offer.layer, offer.d_in, offer.size) == ("resid_post", 20, D, L) and offer.loaded is not None
    saelens = _sae_offer(Path(__file__).parent / "data" / "sae" / "saelens-6" / "gated", "s")
    assert (saelens.site, saelens.layer, saelens.model, saelens.loaded) == ("mlp_out", 2, "tiny", None)
