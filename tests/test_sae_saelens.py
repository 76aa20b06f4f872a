"""superscopes' SAEs equal SAELens' on folders SAELens itself wrote.

Two tiers share one comparison:

- default suite: the fixture folders in ``tests/data/sae/saelens-6/`` (written once by
  ``tests/sae_lens_reference.py`` under sae-lens 6.54.12, d_in 16, d_sae 32, 8 inputs each;
  ``manifest.json`` says which versions) with SAELens' own encodes beside them.
- ``make test-sae`` (marker ``sae_lens``): installs sae-lens into ``.venv-sae``, writes fresh
  SAEs of every kind there (d_in 64, d_sae 256, 200 inputs), and compares; it prints the
  kinds x max differences.

Equal means: the same active latents for every input, and ``encode`` and ``decode`` within
1e-5 of SAELens' relative to the largest value (max |ours - SAELens'| / max |SAELens'|).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from superscopes import sae as S

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "data" / "sae" / "saelens-6"
KINDS = json.loads((FIXTURES / "manifest.json").read_text())["kinds"]
PLACES = {  # kind -> (site, layer) its hook names (tests/sae_lens_reference.py)
    "standard_no_b_dec": ("mlp_out", 2),
    "standard_layer_norm": ("resid_pre", 0),
    "topk_rescale": ("attn_out", 3),
    "jumprelu_no_b_dec": ("resid_post", 2),
    "gated": ("mlp_out", 2),
    "gated_training": ("mlp_out", 2),
    "pre6_jumprelu_no_b_dec": ("resid_post", 2),
}
TOLERANCE = 1e-5


def compare(folder: Path) -> dict[str, float]:
    """Load ``folder`` with superscopes and compare with SAELens' encodes stored beside it."""
    reference = load_file(folder / "reference.safetensors")
    sae = S.load(folder)
    x, acts = reference["x"], reference["acts"]
    ours = sae.encode(x)
    recon = sae.decode(ours, x)
    mismatched = int(((ours != 0) != (acts != 0)).sum())
    scale = lambda t: float(t.abs().max().clamp_min(1e-12))  # noqa: E731
    return {
        "encode": float((ours - acts).abs().max()) / scale(acts),
        "decode": float((recon - reference["recon"]).abs().max()) / scale(reference["recon"]),
        "active_mismatches": mismatched,
        "active": int((acts != 0).sum()),
        "decode_of_theirs": float((sae.decode(acts, x) - reference["recon"]).abs().max()) / scale(reference["recon"]),
    }


def check(kind: str, result: dict[str, float]) -> None:
    assert result["active_mismatches"] == 0, (kind, result)
    assert result["active"] > 0, (kind, result)  # a fixture where nothing fires would prove little
    for name in ("encode", "decode", "decode_of_theirs"):
        assert result[name] <= TOLERANCE, (kind, name, result)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_saelens_written_fixture_equals_saelens(kind):
    check(kind, compare(FIXTURES / kind))
    site, layer = PLACES.get(kind, ("resid_post", 1))
    sae = S.load(FIXTURES / kind)
    assert (sae.site, sae.layer, sae.model) == (site, layer, "tiny")


def test_fixtures_cover_every_kind_and_were_written_by_saelens():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert manifest["sae_lens"].startswith("6.")
    assert set(KINDS) >= {
        "standard",
        "topk",
        "topk_rescale",
        "jumprelu",
        "gated",
        "batchtopk",
        "matryoshka_batchtopk",
        "standard_layer_norm",
        "standard_constant_norm",
        "pre6_topk",
    }
    cfg = json.loads((FIXTURES / "topk_rescale" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_attn_out" and "hook_name" not in cfg  # the 6.x layout
    assert cfg["rescale_acts_by_decoder_norm"] is True


def test_the_folded_topk_rescale_has_unit_decoder_rows():
    """``rescale_acts_by_decoder_norm`` is folded into the weights on load (SAELens'
    fold_W_dec_norm): the decoder rows of the fixture are not unit norm, ours are."""
    raw = load_file(FIXTURES / "topk_rescale" / "sae_weights.safetensors")["W_dec"].norm(dim=-1)
    assert raw.min() < 0.9 and raw.max() > 1.1
    assert torch.allclose(S.load(FIXTURES / "topk_rescale").W_dec.norm(dim=-1), torch.ones(32), atol=1e-5)


def test_a_normalising_sae_needs_the_input_to_decode():
    sae = S.load(FIXTURES / "standard_layer_norm")
    x = load_file(FIXTURES / "standard_layer_norm" / "reference.safetensors")["x"]
    with pytest.raises(S.SAEError, match=r"normalizes its input \(layer_norm\): decode\(latents, x\) needs"):
        sae.decode(sae.encode(x))
    assert torch.allclose(sae(x), sae.decode(sae.encode(x), x))


@pytest.mark.parametrize("kind", ["topk_rescale", "gated", "standard_layer_norm", "batchtopk"])
def test_amplify_latent_of_loaded_saes_scales_that_latents_part(kind):
    """The ``latent`` transform (``ops.latent_activation`` in the trace) agrees with
    ``encode`` and moves the reconstruction by (alpha - 1) x that latent's part of it."""
    from superscopes import ops

    sae = S.load(FIXTURES / kind)
    x = load_file(FIXTURES / kind / "reference.safetensors")["x"]
    acts = sae.encode(x)
    latent = int((acts != 0).sum(0).argmax())
    params = {k: v for k, v in sae.latent_params(latent).items() if k != "decoder_row"}
    assert torch.allclose(ops.latent_activation(x, **params)[:, 0], acts[:, latent], atol=1e-5)
    out = sae.amplify_latent(x, latent, 3.0)
    # The latent's part of the reconstruction: decode with and without it (the same input statistics).
    without = acts.clone()
    without[:, latent] = 0
    part = sae.decode(acts, x) - sae.decode(without, x)
    assert torch.allclose(out - x, 2 * part, atol=1e-4)


# ---------------------------------------------------------------- make test-sae


@pytest.mark.sae_lens
def test_fresh_saes_written_by_installed_saelens_equal_it(tmp_path):
    """Writes fresh SAEs of every kind with the sae-lens of ``.venv-sae`` (or
    ``$SUPERSCOPES_SAE_LENS_PYTHON``) and compares; prints kinds x max differences."""
    python = os.environ.get("SUPERSCOPES_SAE_LENS_PYTHON", str(ROOT / ".venv-sae" / "bin" / "python"))
    if not Path(python).exists():
        pytest.fail(f"{python} does not exist: run `make test-sae` (it makes .venv-sae with sae-lens)")
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}"
        subprocess.run(
            [
                python,
                str(ROOT / "tests" / "sae_lens_reference.py"),
                str(out),
                "--d-in",
                "64",
                "--d-sae",
                "256",
                "--n",
                "200",
                "--seed",
                str(seed),
            ],
            check=True,
            capture_output=True,
        )
        manifest = json.loads((out / "manifest.json").read_text())
        results = {kind: compare(out / kind) for kind in manifest["kinds"]}
        print(
            f"\nsae-lens {manifest['sae_lens']}, torch {manifest['torch']}, seed {seed}, d_in 64, d_sae 256, 200 inputs"
        )
        print(f"{'kind':26} {'active':>7} {'mismatch':>8} {'encode':>9} {'decode':>9}")
        for kind, r in results.items():
            print(f"{kind:26} {r['active']:7d} {r['active_mismatches']:8d} {r['encode']:9.1e} {r['decode']:9.1e}")
        for kind, result in results.items():
            check(kind, result)


@pytest.mark.sae_lens
def test_the_registry_entries_the_default_suite_replays_are_saelens_own():
    """tests/test_sae_formats.py resolves release ids through a stand-in for SAELens' registry:
    its entries must be what the installed sae-lens' registry says."""
    from tests.test_sae_formats import GEMMA_SCOPE_RELEASE

    python = os.environ.get("SUPERSCOPES_SAE_LENS_PYTHON", str(ROOT / ".venv-sae" / "bin" / "python"))
    script = (
        "import json, sys; from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory as g\n"
        "wanted = json.loads(sys.argv[1]); d = g()\n"
        "print(json.dumps({r: {'repo_id': d[r].repo_id, 'conversion_func': d[r].conversion_func, "
        "'config_overrides': d[r].config_overrides, 'saes_map': {i: d[r].saes_map[i] for i in f['saes_map']}, "
        "'norm_scaling_factor': {i: d[r].norm_scaling_factor[i] for i in f['norm_scaling_factor']}} "
        "for r, f in wanted.items()}))"
    )
    done = subprocess.run(
        [python, "-c", script, json.dumps(GEMMA_SCOPE_RELEASE)], check=True, capture_output=True, text=True
    )
    assert json.loads(done.stdout) == GEMMA_SCOPE_RELEASE


@pytest.mark.parametrize("kind", ["gated", "standard_layer_norm", "topk_rescale", "batchtopk"])
def test_saved_again_by_superscopes_it_encodes_the_same(tmp_path, kind):
    sae = S.load(FIXTURES / kind)
    sae.save(tmp_path / kind)
    again = S.load(tmp_path / kind)
    x = load_file(FIXTURES / kind / "reference.safetensors")["x"]
    assert (again.architecture, again.normalize_activations, again.site, again.layer) == (
        sae.architecture,
        sae.normalize_activations,
        sae.site,
        sae.layer,
    )
    assert torch.equal(again.encode(x), sae.encode(x)) and torch.equal(again(x), sae(x))
