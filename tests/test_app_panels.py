"""The app's cell panels: the SAE breakdown of a clicked cell's vector, a latent as the source and
inputs generated for the vector, on the tiny Llama with an SAE and a generator trained in seconds."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import superscopes
from superscopes import inverse, lens
from superscopes import sae as S
from superscopes.app import App
from superscopes.app.panels import Panels
from superscopes.app.server import main as app_main
from superscopes.app.store import RunStore
from superscopes.app.testing import fake_similarity, tiny_model, tiny_panels
from tests.test_app import NAME, PROMPT, Client, page_helpers, start

CELL = {"model": NAME, "prompt": PROMPT, "position": 5, "site": "resid_post", "layer": 0}  # the tiny SAE's layer


@pytest.fixture(scope="module")
def model():
    return tiny_model(name=NAME)


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    return tiny_panels(model, tmp_path_factory.mktemp("panels"), NAME)


@pytest.fixture
def make_app(model, trained, tmp_path):
    servers = []

    def make(**kwargs):
        sae, generator = trained
        kwargs.setdefault("judge", fake_similarity)
        kwargs.setdefault("store", RunStore(tmp_path / "runs.sqlite"))
        kwargs.setdefault("saes", [sae])
        kwargs.setdefault("generators", [generator])
        app = App(default_model=NAME, models={NAME: model}, offer_embedded=False, **kwargs)
        server = start(app)
        servers.append(server)
        return Client(server.url.rstrip("/"), app)

    yield make
    for server in servers:
        server.app.close()
        server.shutdown()
        server.server_close()


def post(client: Client, path: str, **fields) -> dict:
    status, job = client.json("POST", path, {"client": "test", **fields})
    assert status == 202, job
    return client.wait(job["job"])


def test_cell_breakdown_and_inputs_equal_the_library_by_hand(make_app, model, trained):
    client = make_app()
    status, config = client.json("GET", "/api/config")
    assert [s["id"] for s in config["panels"]["saes"]] == ["sae:sae"]
    assert config["panels"]["saes"][0] | {"detail": ""} == {
        "id": "sae:sae",
        "model": NAME,
        "site": "resid_post",
        "layer": 0,
        "d_in": 64,
        "latents": 128,
        "detail": "",
    }
    assert [c["id"] for c in config["panels"]["corpora"]] == ["corpus:generator"]  # the generator's own pairs.pt
    state = post(client, "/api/cell", **CELL, k=6, samples=4, seed=3)
    assert state["kind"] == "cell" and state["status"] == "done", state
    result = state["result"]

    # The vector as the grid reads it (the read pass of the core), and the SAE's own decomposition.
    vector = lens.collect(model, [PROMPT], "resid_post", [0], "all")[0][5].float()
    assert result["norm"] == pytest.approx(float(vector.norm()), rel=1e-4)
    sae = S.load(trained[0], model=model)
    expected = sae.decompose(vector, 6)
    got = result["sae"]["latents"]
    assert [r["latent"] for r in got] == [i for i, _ in expected]
    assert [r["activation"] for r in got] == pytest.approx([a for _, a in expected], rel=1e-4)
    # Each label: the tokens its decoder direction promotes through the model's own unembedding.
    top = lens.decode(model, sae.W_dec[[i for i, _ in expected]], top_k=5)
    assert [r["promotes"] for r in got] == [[model.tokenizer.decode([int(i)]) for i in row] for row in top["ids"]]
    assert result["sae"]["active"] == int((sae.encode(vector) > 0).sum()) == 8  # the tiny SAE's k
    assert result["sae"]["error_share"] == pytest.approx(float((vector - sae(vector)).norm() / vector.norm()), rel=1e-4)
    assert result["sae"]["reconstruction_cosine"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(sae(vector[None])[0], vector, dim=0)), rel=1e-4
    )

    # Generated inputs: the generator's seeded samples, each with its own activation's distance.
    generator = inverse.Generator.load(trained[1] / "generator.pt")
    texts = generator.sample_texts(model.tokenizer, vector[None], 4, 3)[0]
    assert [x["text"] for x in result["generated"]["inputs"]] == texts
    assert result["generated"]["detail"] == "1-layer generator, 20 steps, inputs up to 8 tokens"
    readable = [t for t in texts if t.strip()]
    own = inverse.distance(
        inverse.last_token_activations(model, readable, "resid_post", 0), vector[None], generator.std
    )
    shown = {x["text"]: x["distance"] for x in result["generated"]["inputs"]}
    assert [shown[t] for t in readable] == pytest.approx(own.tolist(), rel=1e-4)
    # Nearest corpus inputs: the smallest distances over the pairs, by the generator's std, one per text.
    pairs = torch.load(trained[1] / "pairs.pt", weights_only=True)
    distances = inverse.distance(pairs["activations"], vector[None], generator.std).tolist()
    best: dict[str, float] = {}
    for ids, d in zip(pairs["inputs"], distances):
        text = model.tokenizer.decode(ids)
        best[text] = min(d, best.get(text, d))
    expected = sorted(best.items(), key=lambda item: item[1])[:4]
    nearest = result["nearest"]["inputs"]
    assert [x["text"] for x in nearest] == [text for text, _ in expected]
    assert [x["distance"] for x in nearest] == pytest.approx([d for _, d in expected], rel=1e-4)
    assert result["nearest"]["std"] == "the generator's"


def test_a_latent_job_equals_latent_scope_run_by_hand(make_app, model, trained):
    sources = []

    def judge(frame):
        sources.append(set(frame["source"]))
        return fake_similarity(frame)

    client = make_app(judge=judge)
    state = post(
        client, "/api/latent", model=NAME, sae="sae:sae", latent=7, alphas="1,4", max_new_tokens=5, prompt=PROMPT
    )
    assert state["kind"] == "latent" and state["status"] == "done", state
    sae = S.load(trained[0], model=model)
    scope = S.latent_scope(sae, [7], model=model, alphas=[1.0, 4.0], max_new_tokens=5)
    by_hand = S.explanation_scores(model, scope, superscopes.run(model, scope, progress=False))
    rows = state["result"]["rows"]
    assert [r["alpha"] for r in rows] == by_hand["alpha"].tolist() == [1.0, 4.0]
    assert [r["output"] for r in rows] == by_hand["output"].tolist()
    assert [r["self_similarity"] for r in rows] == pytest.approx(by_hand["self_similarity"].tolist(), abs=1e-5)
    assert [r["relevancy_mean"] for r in rows] == pytest.approx(by_hand["relevancy_mean"].tolist(), rel=1e-3)
    assert sources == [{PROMPT}]  # readouts are judged against the prompt the latent was read from
    assert [r["similarity"] for r in rows] == pytest.approx(fake_similarity(by_hand)["similarity"].tolist())
    chosen = by_hand.loc[by_hand["relevancy_mean"].idxmax()]
    assert state["result"]["explanation"]["alpha"] == chosen["alpha"]
    assert state["result"]["scale"] == "mean" and state["result"]["layer"] == 0


@pytest.mark.parametrize(
    ("path", "fields", "message"),
    [
        ("/api/latent", {"sae": "sae:sae", "latent": 128}, "latent must be a whole number from 0 to 127, got 128"),
        ("/api/latent", {"sae": "sae:sae", "latent": -1}, "latent must be a whole number from 0 to 127"),
        ("/api/latent", {"sae": "sae:sae", "latent": "7; drop"}, "latent must be a whole number"),
        (
            "/api/latent",
            {"sae": "sae:narrow", "latent": 0},
            "sae 'sae:narrow' does not fit tiny-llama: its width 32 is not tiny-llama's hidden size 64",
        ),
        ("/api/latent", {"sae": "sae:elsewhere", "latent": 0}, "sae 'sae:elsewhere' is not loaded on this server"),
        ("/api/latent", {"latent": 0}, "sae is missing"),
        (
            "/api/latent",
            {"sae": "sae:sae", "latent": 0, "alphas": "1,2,3,4,5,6,7,8,9"},
            "alphas has 9 values; a run takes at most 8",
        ),
        ("/api/latent", {"sae": "sae:sae", "latent": 0, "alphas": "1,inf"}, "alpha inf is not a finite number"),
        (
            "/api/latent",
            {"sae": "sae:sae", "latent": 0, "max_new_tokens": 99},
            "max_new_tokens must be a whole number from 1 to 32",
        ),
        ("/api/cell", {**CELL, "sae": "sae:narrow"}, "sae 'sae:narrow' does not fit tiny-llama resid_post layer 0"),
        (
            "/api/cell",
            {**CELL, "layer": 1, "sae": "sae:sae"},
            "sae 'sae:sae' does not fit tiny-llama resid_post layer 1: it reads resid_post layer 0",
        ),
        ("/api/cell", {**CELL, "position": 6}, "position must be a whole number from 0 to 5, got 6"),
        ("/api/cell", {**CELL, "site": "attn"}, "site 'attn' is not valid here"),
        ("/api/cell", {**CELL, "layer": 2}, "layer must be a whole number from 0 to 1, got 2"),
        ("/api/cell", {**CELL, "k": 0}, "k must be a whole number from 1 to 32, got 0"),
        ("/api/cell", {**CELL, "samples": 9}, "samples must be a whole number from 1 to 8, got 9"),
        ("/api/cell", {**CELL, "seed": 2.5}, "seed must be a whole number"),
        ("/api/cell", {**CELL, "prompt": ""}, "the prompt is empty"),
        ("/api/cell", {**CELL, "generator": "generator:none"}, "generator 'generator:none' is not loaded"),
        ("/api/cell", {**CELL, "model": "ndif:x"}, "model 'ndif:x' is not offered"),
    ],
)
def test_bad_panel_requests_are_refused_naming_the_field(make_app, trained, tmp_path, path, fields, message):
    narrow = S.SAE(
        torch.eye(32),
        torch.zeros(32),
        torch.eye(32),
        torch.zeros(32),
        "standard",
        site="resid_post",
        layer=0,
        model=NAME,
    ).save(tmp_path / "narrow")  # an SAE of another width
    client = make_app(saes=[trained[0], narrow])
    status, answer = client.json("POST", path, {"client": "test", "model": NAME, "prompt": PROMPT, **fields})
    assert status == 400, answer
    assert message in answer["error"]
    assert client.app.jobs == {} and not client.app.quick  # nothing queued


def test_a_cell_no_sae_or_generator_fits_says_why_and_how_to_train(make_app):
    client = make_app()
    state = post(client, "/api/cell", **CELL | {"site": "mlp_in", "layer": 1})
    assert state["status"] == "done", state
    sae, generated, nearest = (state["result"][k] for k in ("sae", "generated", "nearest"))
    assert sae["id"] is None and "no sae here applies to tiny-llama mlp_in layer 1" in sae["why"]
    assert "sae:sae (tiny-llama, resid_post layer 0, width 64): it reads resid_post layer 0" in sae["why"]
    assert [a["id"] for a in sae["available"]] == ["sae:sae"]
    assert generated["id"] is None and "generator:generator" in generated["why"]
    assert generated["command"] == (
        "python -m superscopes.inverse train --model tiny-llama --site mlp_in --layer 1 --steps 3000 "
        "--out results/inverse/tiny-llama-L1\nsuperscopes app --model tiny-llama --generator results/inverse/tiny-llama-L1"
    )
    assert nearest["id"] is None
    bare = make_app(saes=[], generators=[])
    state = post(bare, "/api/cell", **CELL)
    assert (
        state["result"]["sae"]["why"]
        == "no sae is loaded on this server, so none applies to tiny-llama resid_post layer 0"
    )


def test_panels_are_kept_restored_after_a_restart_and_label_the_breakdown(make_app, tmp_path):
    client = make_app()
    cell = post(client, "/api/cell", **CELL, k=4)
    latent = cell["result"]["sae"]["latents"][0]["latent"]
    assert cell["explanations"] == {}
    explained = post(client, "/api/latent", model=NAME, sae="sae:sae", latent=latent, alphas="1,2", prompt=PROMPT)
    # The breakdown now labels that latent with its self-explanation.
    status, again = client.json("GET", f"/api/jobs/{cell['job']}")
    assert again["explanations"][str(latent)] == explained["result"]["explanation"] | {"job": explained["job"]}
    # A restart on the same store: both panel jobs restore from their ids, the label too; the
    # history lists grids only, and a panel job has no CSV.
    client.app.close()
    restarted = make_app(store=RunStore(tmp_path / "runs.sqlite"))
    status, kept = restarted.json("GET", f"/api/jobs/{cell['job']}")
    assert status == 200 and kept["result"] == cell["result"] and kept["request"] == cell["request"]
    assert kept["explanations"][str(latent)]["output"] == explained["result"]["explanation"]["output"]
    status, kept_latent = restarted.json("GET", f"/api/jobs/{explained['job']}")
    assert kept_latent["result"]["rows"] == explained["result"]["rows"]
    assert restarted.json("GET", "/api/runs")[1]["runs"] == []
    assert restarted.request("GET", f"/api/jobs/{cell['job']}/csv")[0] == 404


def test_a_panel_runs_between_a_running_grids_chunks_and_one_per_page(make_app):
    gate, calls = threading.Event(), []

    def judge(frame):
        calls.append(time.time())
        gate.wait(30)  # the grid's first chunk holds here until the panel job is queued
        return fake_similarity(frame)

    client = make_app(judge=judge, limits={"max_queued": 2})
    status, grid = client.run(layers="0-1", alphas="1,3", controls=False)  # 6 chunks, one per token
    assert status == 202, grid
    status, cell = client.json("POST", "/api/cell", {"client": "test", **CELL})
    assert status == 202 and cell["status"] == "queued", cell  # the page's grid does not block its panel
    status, second = client.json("POST", "/api/cell", {"client": "test", **CELL})
    assert status == 409 and second["job"] == cell["job"]  # one panel job per page at a time
    status, full = client.json("POST", "/api/latent", {"client": "other", "sae": "sae:sae", "latent": 0})
    assert status == 503 and "the queue is full" in full["error"]  # panel jobs count toward the queue's cap
    gate.set()
    done = client.wait(cell["job"])
    client.wait(grid["job"])
    panel = client.app.jobs[done["job"]]
    assert done["status"] == "done" and len(calls) == 6
    assert calls[0] < panel.started < panel.finished < calls[1]  # after the first chunk, before the second


def test_panel_posts_are_json_only_and_same_origin(make_app):
    client = make_app()
    body = {"client": "test", **CELL}
    status, _, _ = client.request("POST", "/api/cell", body, headers={"Origin": "http://evil.example"})
    assert status == 403
    request = urllib.request.Request(
        client.base + "/api/latent",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 415
    assert client.app.jobs == {}


def test_the_embedded_sae_is_offered_by_name_and_matched_without_reading_its_weights():
    embedded = S.EMBEDDED_DIR / S.EMBEDDED["smollm2-135m"]
    for panels in (Panels(), Panels(saes=[embedded]), Panels(saes=[embedded], embedded=False)):
        assert list(panels.saes) == ["embedded:smollm2-135m"]  # by its name, once
        offer = panels.saes["embedded:smollm2-135m"]
        assert offer.loaded is None  # weights are read on first use, in the worker
        assert offer.describe() | {"detail": ""} == {
            "id": "embedded:smollm2-135m",
            "model": "smollm2-135m",
            "site": "resid_post",
            "layer": 15,
            "d_in": 576,
            "latents": 4608,
            "detail": "",
        }
    names = ("smollm2-135m", "smollm2-135m")
    assert Panels().pick("sae", names, 576, "resid_post", 15) == ("embedded:smollm2-135m", "")
    # A SAELens folder records the repo id: the same model.
    assert Panels().pick("sae", ("HuggingFaceTB/SmolLM2-135M",), 576, "resid_post", 15)[0] == "embedded:smollm2-135m"
    chosen, why = Panels().pick("sae", ("gemma3-270m",), 640, "resid_post", 15)
    assert chosen is None and "it was made for smollm2-135m" in why
    chosen, why = Panels().pick("sae", names, 576, "mlp_out", 3)
    assert chosen is None and why.endswith("it reads resid_post layer 15")


def test_the_command_line_refuses_an_sae_or_generator_it_cannot_read(tmp_path, capsys):
    store = str(tmp_path / "runs.sqlite")
    assert app_main(["--port", "0", "--store", store, "--sae", str(tmp_path / "missing")]) == 2
    assert "missing is not an SAE folder: no such folder; expected a SAELens folder" in capsys.readouterr().err
    assert app_main(["--port", "0", "--store", store, "--generator", str(tmp_path / "none.pt")]) == 2
    assert "no generator at" in capsys.readouterr().err


def test_page_panel_lines_say_what_each_number_is_and_why_a_panel_is_empty():
    lines = page_helpers("""[
        app.panelStatus({status: "queued", ahead: 1}),
        app.panelStatus({status: "error", error: "boom"}),
        app.panelStatus({status: "done"}),
        app.saeHint({id: null, why: "no sae here applies"}, "m"),
        app.saeHint({id: "s", label: "SAE(x)", active: 3, reconstruction_cosine: 0.912, error_share: 0.41}, "m"),
        app.latentHint({scale: "mean", layer: 15}, {latent: 7}, "Diana"),
        app.latentHint({scale: "unit", layer: 2}, {latent: 7}, ""),
        app.panelsLine({saes: [{id: "a", model: "m", site: "resid_post", layer: 3}], generators: [], corpora: []}),
    ]""")
    assert lines[0] == "queued (1 ahead: it runs after the chunk in progress)"
    assert lines[1:3] == ["failed: boom", ""]
    assert lines[3] == "no sae here applies"
    assert lines[4].startswith(
        "SAE(x): 3 latents active; the reconstruction's cosine with the vector is 0.91 and its "
        "error is 41% of the vector's norm."
    )
    assert "m's own final norm and unembedding" in lines[4]
    assert "× its mean activation when active × α" in lines[5] and "“Diana”" in lines[5]
    assert "unit norm" in lines[6] and "similarity: the judge's" not in lines[6]
    assert lines[7] == "Cell panels: SAEs a (m, resid_post layer 3); generators none; corpora none."
