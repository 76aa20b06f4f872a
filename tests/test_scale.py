"""The larger embedded model, qwen2.5-coder-1.5b (7 GB in float32): `make test-scale`, not the default suite.

Every site of every one of its 28 layers reads what HF computes (hidden states and plain torch
hooks, as tests/test_sites.py does for the tiny models), and the grid's shared-prefix path equals
the whole-prompt path on it. The first run fetches and converts the model (~2-4 min)."""

from __future__ import annotations

import nnsight
import pytest
import torch

import superscopes
from superscopes import ops
from superscopes.sites import SITE_NAMES, num_layers

from .test_sites import PROMPTS, hf_reference

pytestmark = pytest.mark.scale
NAME = "qwen2.5-coder-1.5b"


@pytest.fixture(scope="module")
def qwen():
    return superscopes.load(NAME)


def test_every_site_of_every_layer_matches_hf(qwen):
    assert qwen.config.model_type == "qwen2" and num_layers(qwen) == 28
    mask = qwen.tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()
    for layer in range(num_layers(qwen) - 1):  # HF's last hidden state has the final norm applied
        with qwen.trace(PROMPTS):
            values = nnsight.save({site: ops.activation(qwen, site, layer).clone() for site in SITE_NAMES})
        reference = hf_reference(qwen, layer, PROMPTS)
        for site in SITE_NAMES:
            scale = float(reference[site][mask].abs().max())
            torch.testing.assert_close(
                values[site][mask], reference[site][mask], atol=1e-5 * scale, rtol=1e-4, msg=f"{site} at layer {layer}"
            )


def test_the_paper_grid_shares_its_prefix_exactly(qwen):
    grid = dict(
        prompts=["Diana, Princess of Wales"],
        token="Wales",
        sites=["mlp_out", "resid_post"],
        layers=[1, 4],
        alphas=[1, 6],
        target="entity",
        target_layers=["same"],
        max_new_tokens=6,
    )
    shared = superscopes.run(qwen, superscopes.Scope(**grid), progress=False)
    whole = superscopes.run(qwen, superscopes.Scope(**grid, share_prefix=False), progress=False)
    assert shared["output"].tolist() == whole["output"].tolist()
