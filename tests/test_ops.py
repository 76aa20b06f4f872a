"""The trace snippets: identity patches, transform arithmetic, remote-safety."""

from __future__ import annotations

import pytest
import torch

from superscopes import ops
from superscopes.remote import configure
from superscopes.scope import ScopeError
from superscopes.sites import SITE_NAMES

from .conftest import ARCHITECTURES

PROMPTS = ["Diana, Princess of Wales", "Back to the Future"]


def clean_logits(model, prompts=PROMPTS):
    with model.trace(prompts):
        logits = model.lm_head.output.save()
    return logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("transform", ["scale", "norm", "cfg"])
def test_alpha_one_self_patch_reproduces_clean_run(tiny_models, arch, transform):
    """Reading a site and writing it back with alpha = 1 leaves the logits untouched,
    at every site (cfg/norm with alpha = 1 are the identity for a vector written onto itself)."""
    model = tiny_models[arch]
    clean = clean_logits(model)
    for site in SITE_NAMES:
        with model.trace(PROMPTS):
            v = ops.read(model, site, 1, -1)
            ops.patch(model, site, 1, v, -1, alpha=1.0, transform=transform)
            patched = model.lm_head.output.save()
        torch.testing.assert_close(patched, clean, atol=1e-5, rtol=0, msg=f"{arch} {site} {transform}")


def test_smollm2_self_patch_every_site(smollm2):
    clean = clean_logits(smollm2)
    for site in SITE_NAMES:
        with smollm2.trace(PROMPTS):
            ops.patch(smollm2, site, 7, ops.read(smollm2, site, 7, -1), -1, alpha=1.0)
            patched = smollm2.lm_head.output.save()
        torch.testing.assert_close(patched, clean, atol=1e-5, rtol=0, msg=site)


def test_patch_changes_only_the_patched_rows(tiny_models):
    model = tiny_models["llama"]
    clean = clean_logits(model)
    with model.trace(PROMPTS):
        v = ops.read(model, "resid_post", 0, -1)
        ops.patch(model, "resid_post", 0, v[1:], -1, rows=torch.tensor([1]), alpha=8.0)
        patched = model.lm_head.output.save()
    torch.testing.assert_close(patched[0], clean[0], atol=1e-6, rtol=0)
    assert (patched[1, -1] - clean[1, -1]).abs().max() > 1e-2


def test_add_mode_adds(tiny_models):
    model = tiny_models["llama"]
    with model.trace(PROMPTS):
        before = ops.read(model, "mlp_out", 1, -1).save()
        ops.write(model, "mlp_out", 1, torch.ones(2, 64), -1, mode="add")
        after = ops.read(model, "mlp_out", 1, -1).save()
    torch.testing.assert_close(after, before + 1)


def test_transform_arithmetic():
    torch.manual_seed(0)
    v, base = torch.randn(4, 8), torch.randn(4, 8)
    alpha = torch.tensor([1.0, 2.0, 3.0, 0.5])
    torch.testing.assert_close(ops.amplify(v, alpha, "scale"), v * alpha[:, None])
    torch.testing.assert_close(ops.amplify(v, 0.0, "cfg", base=base), base)
    torch.testing.assert_close(ops.amplify(v, 1.0, "cfg", base=base), v)
    torch.testing.assert_close(ops.amplify(v, 3.0, "cfg", base=base), base + 3 * (v - base))
    normed = ops.amplify(v, alpha, "norm", base=base)
    torch.testing.assert_close(normed.norm(dim=-1), alpha * base.norm(dim=-1))
    assert torch.allclose(torch.nn.functional.cosine_similarity(normed, v), torch.ones(4))
    weight, bias = torch.randn(5, 8), torch.randn(5)
    torch.testing.assert_close(ops.amplify(v, 2.0, "affine", weight=weight, bias=bias), 2 * (v @ weight.T + bias))
    direction = torch.randn(4, 8)
    random = ops.amplify(v, alpha, "random", direction=direction)
    torch.testing.assert_close(random.norm(dim=-1), alpha * v.norm(dim=-1))
    assert torch.allclose(torch.nn.functional.cosine_similarity(random, direction), torch.ones(4))
    with pytest.raises(
        ScopeError, match="transform 'double' is not valid; choose from scale, cfg, norm, affine, random"
    ):
        ops.amplify(v, 1.0, "double")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("transform", ["cfg", "norm"])
def test_cfg_and_norm_write_the_hand_computed_tensor(tiny_models, arch, transform):
    """The written tensor equals base + alpha (v - base) or alpha v |base| / |v|, with base
    the clean value at the write site in the written row (not v, not another row or site)."""
    model, alpha = tiny_models[arch], 3.0
    with model.trace(PROMPTS):  # clean run: v from row 0's MLP, base from row 1's residual
        v = ops.read(model, "mlp_out", 0, -1)[:1].save()
        base = ops.read(model, "resid_post", 1, -1)[1:].save()
    with model.trace(PROMPTS):
        ops.patch(model, "resid_post", 1, v, -1, rows=torch.tensor([1]), alpha=alpha, transform=transform)
        written = ops.read(model, "resid_post", 1, -1, rows=torch.tensor([1])).save()
    if transform == "cfg":
        expected = base + alpha * (v - base)
    else:
        expected = alpha * v * base.norm() / v.norm()
    torch.testing.assert_close(written, expected, atol=1e-5, rtol=1e-5)


def test_bad_write_mode_is_named(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ScopeError, match="mode 'merge' is not valid; choose from replace, add"):
        with model.trace(PROMPTS):
            ops.write(model, "mlp_out", 1, torch.ones(2, 64), -1, mode="merge")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: ops.read(m, "mlp_outt", 1, -1), "site 'mlp_outt' is not valid; choose from resid_pre, attn_out"),
        (lambda m: ops.read(m, "mlp_out", 3, -1), r"layer 3 is out of range: the model has layers 0-2"),
        (lambda m: ops.read(m, "mlp_out", "1", -1), r"layer '1' is out of range"),
        (lambda m: ops.read(m, "mlp_out", 1, 40), r"position 40 is outside the sequence: it has 6 tokens"),
        (lambda m: ops.patch(m, "resid_post", 1, torch.ones(2, 64), torch.tensor([0, 6])), r"outside the sequence"),
        (lambda m: ops.write(m, "attn", 0, torch.ones(2, 64)), "site 'attn' is not valid"),
        (lambda m: ops.activation(m, "resid_post", -1), "layer -1 is out of range"),
    ],
    ids=["site", "layer", "layer-text", "position", "patch-positions", "write-site", "negative-layer"],
)
def test_snippet_errors_are_the_grids_scope_errors(tiny_models, call, message):
    """A wrong site, layer or position inside a trace raises the ScopeError the grid raises
    (naming the bad value and the valid choices), not a raw KeyError/IndexError/AttributeError."""
    model = tiny_models["llama"]
    with pytest.raises(ScopeError, match=message):
        with model.trace(PROMPTS):
            call(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_snippets_survive_remote_local(tiny_models, arch):
    """The snippets serialise and run under remote="local" with results equal to local."""
    model = tiny_models[arch]
    configure()
    results = {}
    for remote in (False, "local"):
        with model.trace(PROMPTS, remote=remote):
            v = ops.read(model, "mlp_out", 0, -1)
            ops.patch(model, "resid_post", 1, v, -1, alpha=6.0, transform="norm")
            read_back = ops.read(model, "resid_post", 1, -1).save()
            logits = model.lm_head.output[:, -1].save()
        results[remote] = (read_back, logits)
    for local, remote in zip(results[False], results["local"]):
        torch.testing.assert_close(remote, local, atol=1e-6, rtol=0)


def test_registered_modules_ship_by_value(tmp_path):
    """Remote servers do not have superscopes installed: after configure(), a pickled snippet
    loads and runs in a process where importing superscopes fails."""
    import subprocess
    import sys

    import cloudpickle

    configure()
    (tmp_path / "patch.pkl").write_bytes(cloudpickle.dumps(ops.amplify))
    script = (
        "import sys, pickle, torch; sys.modules['superscopes'] = None; "
        f"f = pickle.load(open({str(tmp_path / 'patch.pkl')!r}, 'rb')); "
        "print(f(torch.ones(1, 2), 3.0).sum().item())"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "6.0"


def test_positions_may_be_numpy_integers_but_not_text(tiny_models):
    import numpy as np

    model = tiny_models["llama"]
    with model.trace(PROMPTS):
        v = ops.read(model, "resid_post", 1, np.int64(-1)).save()
        w = ops.read(model, "resid_post", 1, -1).save()
    torch.testing.assert_close(v, w)
    for bad in ("last", 1.5, True):
        with pytest.raises(ScopeError, match="is not a token index"):
            with model.trace(PROMPTS):
                ops.read(model, "resid_post", 1, bad)
