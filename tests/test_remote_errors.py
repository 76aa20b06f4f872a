"""Remote mistakes get one-line errors that say what to do: a locally loaded model run with
``remote=True``, and ``load(..., remote=True)`` failures (which name NDIF and what to check)."""

from __future__ import annotations

import pytest

import superscopes
from superscopes import Scope, ScopeError
from superscopes.models import ModelNotFoundError


def test_a_local_model_run_remotely_says_to_load_it_remotely(tiny_models, tmp_path):
    checkpoint = tmp_path / "grid.jsonl"
    with pytest.raises(ScopeError) as raised:
        superscopes.run(tiny_models["llama"], Scope("Hello world", layers=[0]), remote=True, checkpoint=checkpoint)
    message = str(raised.value)
    assert "\n" not in message and "load it with superscopes.load(NAME, remote=True)" in message
    assert not checkpoint.exists()  # refused before any file is written


def test_remote_local_still_runs_a_local_model(tiny_models):
    frame = superscopes.run(
        tiny_models["llama"],
        Scope("Hello world", layers=[0], alphas=[1], max_new_tokens=2, sites=["resid_post"]),
        remote="local",
        progress=False,
    )
    assert len(frame) == 1


@pytest.mark.parametrize("where", ["empty directory", "offline hub id"])
def test_remote_load_failures_mention_ndif(where, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = str(tmp_path) if where == "empty directory" else "nobody/no-such-model"
    with pytest.raises(ModelNotFoundError) as raised:
        superscopes.load(name, remote=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "runs on NDIF" in message and "superscopes remote status" in message and "NDIF_HOST" in message
    with pytest.raises(ModelNotFoundError) as local:
        superscopes.load(name)
    assert "NDIF" not in str(local.value)
