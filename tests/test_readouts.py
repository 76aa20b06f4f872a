"""A readout is one file plus one registry line: a toy readout, registered in this test only,
shows up in a ``superscopes.run`` frame, through the command line and in the list the explorer
reads; the grid and the command line know readouts only through the registry."""

from __future__ import annotations

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
def toy(monkeypatch):
    """The toy readout registered for this test only (the registry is restored after it)."""
    monkeypatch.setattr(readouts, "REGISTRY", dict(readouts.REGISTRY))
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


def test_a_readout_that_is_not_registered_is_refused_with_the_choices(tiny_models, monkeypatch):
    monkeypatch.setattr(readouts, "REGISTRY", dict(readouts.REGISTRY))
    with pytest.raises(ScopeError, match=r"readout 'final_norm' is not valid; choose from lens"):
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
        ("nope", r"--readout 'nope' is not a readout; choose from generate, topk, lens, final_norm"),
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
        assert status == 200 and {r["name"] for r in config["readouts"]} == {"lens", "final_norm"}
        status, refused = api.run(readouts=["nope"])
        assert status == 400 and "readout 'nope' is not offered here; choose from lens, final_norm" in refused["error"]
        status, job = api.run(sites=["resid_post"], readouts=["final_norm"], controls=False)
        assert status == 202, job
        state = api.wait(job["job"])
        assert state["status"] == "done" and state["rows"]
        assert all(isinstance(row["final_norm"], float) and row["final_norm"] > 0 for row in state["rows"])
    finally:
        server.shutdown()
