"""Against a real NDIF server on loopback (`make test-remote` starts one: scripts/ndif/up.sh).

Every remote result is compared with the same run locally: identical greedy tokens,
probabilities within 1e-4 (the server runs torch on one thread)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pandas as pd
import pytest
import torch

import superscopes
from superscopes import Scope, ops
from superscopes.remote import RemoteRunError, configure

pytestmark = pytest.mark.ndif

HOST = os.environ.get("NDIF_HOST", "http://127.0.0.1:5001")
GRID = dict(
    prompts=["Diana, Princess of Wales", "Back to the Future"],
    sites=["mlp_out", "resid_post"],
    layers=[1, 3],
    alphas=[1, 6],
    target_layers=["same", 0],
)


@pytest.fixture(scope="module")
def remote_model():
    os.environ["NDIF_HOST"] = HOST
    configure()
    try:
        socket.create_connection(("127.0.0.1", int(HOST.rsplit(":", 1)[1])), timeout=5).close()
    except OSError:
        pytest.fail(f"no NDIF server at {HOST}: start one with `make ndif-up`")
    return superscopes.load("smollm2-135m", remote=True)


@pytest.fixture(scope="module")
def local_model():
    return superscopes.load("smollm2-135m")


def test_generated_grid_matches_local(remote_model, local_model):
    scope = Scope(**GRID, max_new_tokens=8)
    remote = superscopes.run(remote_model, scope, remote=True, progress=False)
    local = superscopes.run(local_model, scope, progress=False)
    assert remote["output_ids"].tolist() == local["output_ids"].tolist()


def test_graph_features_split_into_requests_match_local(remote_model, local_model, tmp_path):
    """Per-prompt targets, a cell filter, controls, the logit lens and sampling seeded per cell,
    split into requests of 10 cells with a checkpoint: equal to one local run."""
    scope = Scope(
        **{**GRID, "target_layers": ["same", 0, 2]},
        target=["entity", "identity"],
        logit_lens=True,
        transforms=["scale", "random", "none"],
        where=lambda cell: cell.target_layer <= cell.layer,
        max_new_tokens=5,
        do_sample=True,
        samples=2,
        seed=3,
    )
    remote = superscopes.run(
        remote_model,
        scope,
        remote=True,
        progress=False,
        cells_per_request=10,
        checkpoint=tmp_path / "grid.jsonl",
        timeout=300,
    )
    local = superscopes.run(local_model, scope, progress=False)
    assert remote["output_ids"].tolist() == local["output_ids"].tolist()
    assert remote["lens_ids"].tolist() == local["lens_ids"].tolist()


def test_topk_grid_matches_local(remote_model, local_model):
    scope = Scope(**GRID, output="topk", transforms=["norm"])
    remote = superscopes.run(remote_model, scope, remote=True, progress=False)
    local = superscopes.run(local_model, scope, progress=False)
    assert remote["output_ids"].map(lambda ids: ids[0]).tolist() == local["output_ids"].map(lambda ids: ids[0]).tolist()
    torch.testing.assert_close(
        torch.tensor(remote["output_probs"].tolist()), torch.tensor(local["output_probs"].tolist()), atol=1e-4, rtol=0
    )


def ablate_and_read(model):
    """A user's own intervention in every pass of the grid (SmolLM2 is a Llama)."""
    model.model.layers[0].mlp.output[:] = 0
    return {"attn_norm": model.model.layers[1].self_attn.output[0][:, -1].norm(dim=-1)}


def test_grid_in_the_users_remote_session_matches_local(remote_model, local_model):
    """A Grid and the user's own trace in one NDIF session: the frame equals a local run."""
    scope = Scope(**GRID, max_new_tokens=5, intervene=ablate_and_read)
    grid = superscopes.Grid(remote_model, scope)
    with remote_model.session(remote=True):
        with remote_model.trace("The Eiffel Tower is in"):
            logits = remote_model.lm_head.output[:, -1].save()
        outputs = grid.run()
    frame = grid.frame(outputs)
    local = superscopes.run(local_model, scope, progress=False)
    assert frame["output_ids"].tolist() == local["output_ids"].tolist()
    assert frame["attn_norm"].tolist() == pytest.approx(local["attn_norm"].tolist(), rel=1e-4)
    assert logits.shape[-1] == local_model.config.vocab_size


def test_snippets_in_a_remote_trace_match_local(remote_model, local_model):
    results = {}
    for name, model, remote in (("remote", remote_model, True), ("local", local_model, False)):
        with torch.inference_mode(), model.trace(GRID["prompts"], remote=remote):
            v = ops.read(model, "mlp_out", 2, -1)
            ops.patch(model, "resid_post", 2, v, -1, alpha=9.0, transform="scale")
            logits = model.lm_head.output[:, -1].clone().save()
        results[name] = logits
    torch.testing.assert_close(results["remote"], results["local"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("recipe", ["superscopes_mlp_outputs", "superscopes_hidden_states"])
def test_recipes_run_remotely_like_locally(tmp_path, recipe):
    outputs = {}
    for mode in ("local", "remote"):
        argv = [sys.executable, "-m", f"recipes.{recipe}", "--quick", "--out", str(tmp_path / mode)]
        result = subprocess.run(
            argv + (["--remote"] if mode == "remote" else []),
            capture_output=True,
            text=True,
            env={**os.environ, "NDIF_HOST": HOST},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[mode] = pd.read_csv(tmp_path / mode / "cells.csv", keep_default_na=False)
    assert outputs["remote"]["output"].tolist() == outputs["local"]["output"].tolist()


def test_a_model_that_is_not_deployed_is_named(remote_model, tmp_path):
    served_elsewhere = tmp_path / "other-model"
    served_elsewhere.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (served_elsewhere / name).write_bytes((superscopes.models.cached_model_dir("smollm2-135m") / name).read_bytes())
    model = superscopes.load(str(served_elsewhere), remote=True)
    with pytest.raises(RemoteRunError, match="not deployed"):
        superscopes.run(model, Scope("Diana", layers=[1], alphas=[1], output="topk"), remote=True, progress=False)


class Proxy:
    """A TCP relay to the server that the test can cut, as if the server stopped."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass


def test_a_sweep_cut_off_midway_keeps_its_rows_and_resumes(tmp_path, remote_model):
    """The server goes away after the first finished unit: the recipe fails with a clear
    error, keeps what finished, and a rerun completes without lost or duplicated rows."""
    proxy = Proxy(int(HOST.rsplit(":", 1)[1]))
    out = tmp_path / "evaluation"
    argv = [sys.executable, "-m", "recipes.superscopes_evaluation", "--quick", "--remote", "--out", str(out)]
    env = {**os.environ, "NDIF_HOST": f"http://127.0.0.1:{proxy.port}"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cells = out / "cells.csv"
    deadline = 600
    import time

    start = time.time()
    while time.time() - start < deadline and process.poll() is None:
        if cells.exists() and cells.stat().st_size > 0:
            proxy.open = False  # the server is gone for every new connection
            break
        time.sleep(0.2)
    _, stderr = process.communicate(timeout=deadline)
    kept = pd.read_csv(cells, keep_default_na=False)
    assert process.returncode != 0 and "unreachable" in stderr, stderr[-2000:]
    assert len(kept) > 0

    proxy.open = True
    finished = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    every = pd.read_csv(cells, keep_default_na=False)
    assert len(every) > len(kept)
    assert not every.duplicated(["source", "condition", "site", "layer", "alpha", "transform", "sample"]).any()
    assert every.iloc[: len(kept)].equals(kept)


def test_every_readout_runs_remotely_like_locally(remote_model, local_model):
    """The read, patch and frame readouts on the server: the affine lens's maps and the grid's
    readout modules travel with the request, the SAE stays here, relevancy reruns remotely."""
    from superscopes import corpus, lens, readouts

    saved = dict(readouts.REGISTRY)
    try:  # maps fitted here: a model on NDIF cannot fit them in prepare
        maps = lens.fit_affine_lens(local_model, corpus.texts("patchscopes", limit=100), [15], "text")
        readouts.register(readouts.AffineLens(maps))
        scope = Scope(
            prompts=GRID["prompts"],
            sites=["resid_post"],
            layers=[15],  # the embedded SAE's layer
            alphas=[1, 6],
            target_layers=[0, 4],
            max_new_tokens=4,
            readouts=["lens", "affine_lens", "sae", "self_similarity", "relevancy"],
        )
        remote = superscopes.run(remote_model, scope, remote=True, progress=False)
        local = superscopes.run(local_model, scope, progress=False)
    finally:
        readouts.REGISTRY.clear()
        readouts.REGISTRY.update(saved)
    for column in ("output_ids", "lens_ids", "affine_lens_ids", "sae_latents"):
        assert remote[column].tolist() == local[column].tolist(), column
    assert remote["self_similarity"].tolist() == pytest.approx(local["self_similarity"].tolist(), abs=1e-4)
    for far, near in zip(remote["relevancy"], local["relevancy"]):
        assert far == pytest.approx(near, abs=1e-4)


def test_a_request_too_large_for_the_server_is_explained(remote_model):
    """ndif 0.1.2 parses a request as form data and refuses a part over 1 MB: a random (so
    incompressible) 576 x 576 affine map is 1.3 MB."""
    from superscopes.remote import RemoteRunError

    weight = torch.randn(576, 576, generator=torch.Generator().manual_seed(0)) / 24
    scope = Scope(prompts=["Diana"], sites=["resid_post"], layers=[3], transforms=["affine"], affine_weight=weight)
    with pytest.raises(RemoteRunError, match=r"could not read the request \(HTTP 400, body not parsed\).*about 1 MB"):
        superscopes.run(remote_model, scope, remote=True, progress=False)
