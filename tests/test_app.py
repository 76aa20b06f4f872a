"""The web app's JSON API, on a tiny random Llama and a fake judge (one test uses the real judge)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pandas as pd
import pytest

import superscopes
from superscopes.app import App, make_server
from superscopes.app.fields import SITES
from superscopes.app.request import LIMITS
from superscopes.app.server import add_arguments
from superscopes.app.store import RunStore, Snapshot
from superscopes.app.testing import fake_similarity, tiny_model
from superscopes.app.web import STATIC
from superscopes.prompts import tokens as prompt_tokens
from superscopes.scope import RESULT_COLUMNS

PROMPT = "Diana, Princess of Wales"  # 6 tokens in SmolLM2's tokenizer, no BOS
NAME = "tiny-llama"


@pytest.fixture(scope="module")
def model():
    return tiny_model(name=NAME)


def start(app: App):
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


@pytest.fixture
def make_app(model, tmp_path):
    servers = []

    def make(**kwargs):
        kwargs.setdefault("judge", fake_similarity)
        kwargs.setdefault("store", RunStore(tmp_path / f"runs-{len(servers)}.sqlite"))
        app = App(default_model=NAME, models={NAME: model}, offer_embedded=False, **kwargs)
        server = start(app)
        servers.append(server)
        return app, server.url.rstrip("/")

    yield make
    for server in servers:
        server.app.close()
        server.shutdown()
        server.server_close()


@pytest.fixture
def api(make_app):
    app, base = make_app()
    return Client(base, app)


def grid_body(**fields) -> dict:
    """A small grid as the page posts it to /api/run; ``fields`` override."""
    return {
        "client": "test",
        "model": NAME,
        "prompt": PROMPT,
        "layers": "0-1",
        "alphas": "1,3",
        "target_layer": "same",
        "max_new_tokens": 4,
        **fields,
    }


class Client:
    def __init__(self, base: str, app: App):
        self.base, self.app = base, app

    def request(self, method: str, path: str, body=None, headers=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def json(self, method: str, path: str, body=None, headers=None):
        status, _, raw = self.request(method, path, body, headers)
        return status, json.loads(raw)

    def run(self, **fields):
        return self.json("POST", "/api/run", grid_body(**fields))

    def wait(self, job: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        rows, since = [], 0
        while time.time() < deadline:
            status, state = self.json("GET", f"/api/jobs/{job}?since={since}")
            assert status == 200, state
            rows += state["rows"]
            since = state["next"]
            if state["status"] not in ("queued", "running"):
                return {**state, "rows": rows}
            time.sleep(0.05)
        raise AssertionError(f"job {job} still running after {timeout} s")


def test_page_and_config(api):
    status, headers, html = api.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'id="badges"' in html and b"/static/app.js" in html and b'id="stale-note"' in html
    for name in ("app.js", "app.css", "favicon.svg"):
        assert api.request("GET", f"/static/{name}")[0] == 200
    assert api.request("GET", "/static/../server.py")[0] == 404
    status, config = api.json("GET", "/api/config?client=x")
    assert status == 200
    assert [m["id"] for m in config["models"]] == [NAME]
    assert config["default_model"] == NAME
    assert config["limits"]["max_cells"] == LIMITS["max_cells"]
    assert config["sites"] == {"mlp_in": "MLP input", "mlp_out": "MLP output", "resid_post": "Hidden state"}
    assert set(config["transforms"]) == {"scale", "cfg", "norm"}
    assert "x" in config["templates"]["entity"]["text"]
    assert config["active_job"] is None


def test_tokens_endpoint(api, model):
    status, answer = api.json("POST", "/api/tokens", {"model": NAME, "prompt": PROMPT})
    assert status == 200
    assert [t["text"] for t in answer["tokens"]] == prompt_tokens(model.tokenizer, PROMPT)
    assert [t["index"] for t in answer["tokens"]] == list(range(6))
    assert answer["num_layers"] == 2
    assert not any(t["special"] for t in answer["tokens"])
    status, answer = api.json("POST", "/api/tokens", {"model": NAME, "prompt": "<|im_start|>hi"})
    assert answer["tokens"][0]["special"] is True
    status, answer = api.json("POST", "/api/tokens", {"model": NAME, "prompt": ""})
    assert status == 200 and answer["tokens"] == []


def test_run_to_completion_matches_the_core(api, model):
    status, job = api.run()
    assert status == 202, job
    assert job["status"] in ("queued", "running")
    assert job["total"] == 6 * 3 * 2 * 2  # tokens x sites x layers x alphas
    assert job["grid"]["positions"] == list(range(6))
    assert job["grid"]["layers"] == [0, 1] and job["grid"]["alphas"] == [1.0, 3.0]
    state = api.wait(job["job"])
    assert state["status"] == "done" and state["error"] is None
    assert state["done"] == state["total"] == len(state["rows"]) == 72
    rows = pd.DataFrame(state["rows"])
    assert set(rows.columns) == {
        "token",
        "position",
        "site",
        "layer",
        "target_layer",
        "alpha",
        "output",
        "similarity",
        "echo",
    }
    assert rows.groupby(["position", "site", "layer", "alpha"]).size().eq(1).all()
    assert (rows["target_layer"] == rows["layer"]).all()  # target layer "same"
    assert rows["similarity"].between(0, 1).all()

    # The app is the core graph: its rows for one token equal a direct superscopes.run.
    direct = superscopes.run(
        model,
        superscopes.Scope(
            PROMPT,
            position=5,
            sites=["mlp_in", "mlp_out", "resid_post"],
            layers=[0, 1],
            alphas=[1, 3],
            target_layers=["same"],
            max_new_tokens=4,
        ),
        progress=False,
    )
    mine = rows[rows["position"] == 5].reset_index(drop=True)
    assert mine["token"].eq(" Wales").all()
    key = ["site", "layer", "alpha"]
    merged = direct.merge(mine, on=key, suffixes=("_core", "_app"))
    assert len(merged) == 12
    assert (merged["output_core"] == merged["output_app"]).all()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layers": "0-5"}, "layer 2 is out of range: tiny-llama has layers 0-1"),
        ({"target_layer": "7"}, "target_layer 7 is out of range"),
        ({"tokens": "match", "token": "zebra"}, "token 'zebra' is not in the prompt"),
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": "   "}, "the prompt is empty"),
        (
            {"alphas": ",".join(map(str, range(1, 70)))},
            "the grid has 2484 cells (6 tokens x 3 sites x 2 layers x 69 alphas), over this page's cap of 2000",
        ),
        ({"prompt": "word " * 70}, "this page takes at most 300"),
        ({"prompt": "a b " * 30}, "the prompt has 61 tokens; this page takes at most 48"),
        ({"layers": "one-two"}, "layers 'one-two': use 'all'"),
        ({"alphas": "1,big"}, "alpha 'big' is not a number"),
        ({"alphas": "1,nan"}, "alpha nan is not a finite number"),
        ({"sites": []}, "pick at least one site"),
        ({"sites": ["mlp_out", "nowhere"]}, "site 'nowhere' is not valid"),
        ({"transform": "affine"}, "transform 'affine' is not offered here"),
        ({"target": "custom", "template": "no placeholder here", "placeholder": "@"}, "has no placeholder '@'"),
        ({"target": "custom", "template": ""}, "the custom target template is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a whole number from 1 to 32, got 0"),
        ({"model": "gpt-17"}, "model 'gpt-17' is not offered by this server"),
        ({"tokens": "match", "token": ""}, "type the token to scope"),
    ],
)
def test_validation_messages(api, fields, message):
    status, answer = api.run(**fields)
    assert status == 400, answer
    assert message in answer["error"]
    assert api.app.jobs == {}  # nothing started


def test_cap_is_configurable_and_counts_only_scoped_tokens(make_app):
    app, base = make_app(limits={"max_cells": 12})
    client = Client(base, app)
    status, answer = client.run()
    assert status == 400 and "over this page's cap of 12" in answer["error"]
    # The controls count too: 2 per best readout run (alpha 1 is in the grid already).
    status, answer = client.run(tokens="last")
    assert status == 400 and "the grid's 12 cells and 12 control cells (2 per best readout) make 24" in answer["error"]
    status, job = client.run(tokens="last", controls=False)  # 1 token x 3 sites x 2 layers x 2 alphas = 12
    assert status == 202 and job["total"] == 12 and job["grid"]["positions"] == [5]
    assert client.wait(job["job"])["status"] == "done"


def test_match_token_and_fixed_target_layer(api):
    status, job = api.run(tokens="match", token="Princess", target_layer=1, sites=["mlp_out"], layers="0")
    assert status == 202, job
    state = api.wait(job["job"])
    assert [r["position"] for r in state["rows"]] == [3, 3]
    assert {r["target_layer"] for r in state["rows"]} == {1}


def test_custom_and_identity_targets(api):
    status, job = api.run(
        tokens="last",
        sites=["resid_post"],
        layers="1",
        target="custom",
        template="Tell me about @ please",
        placeholder="@",
    )
    assert status == 202, job
    assert job["grid"]["target"] == "Tell me about @ please" and job["grid"]["target_token"].strip() == "@"
    assert api.wait(job["job"])["status"] == "done"
    status, job = api.run(tokens="last", sites=["resid_post"], layers="1", target="identity", transform="norm")
    assert status == 202 and job["grid"]["target"].startswith("cat -> cat") and job["grid"]["target_token"] == "?"
    assert api.wait(job["job"])["status"] == "done"
    # The placeholder is a whole token: the first word x, not the x inside "complex" or "Explain".
    status, job = api.run(
        tokens="last",
        sites=["resid_post"],
        layers="1",
        target="custom",
        template="x is a complex idea. Explain",
        placeholder="x",
    )
    assert status == 202 and job["grid"]["target_token"] == "x"
    assert api.wait(job["job"])["status"] == "done"


def test_cancel_keeps_partial_results_and_one_job_per_client(make_app):
    entered, gate = threading.Event(), threading.Event()

    def slow_judge(frame):
        entered.set()
        assert gate.wait(30)
        return fake_similarity(frame)

    app, base = make_app(judge=slow_judge)
    client = Client(base, app)
    status, job = client.run()
    assert status == 202
    assert entered.wait(60), "the first chunk never reached the judge"
    # The same page cannot start a second job while one runs; the config tells it which.
    status, answer = client.run()
    assert status == 409 and answer["job"] == job["job"] and "already queued or in progress" in answer["error"]
    assert client.json("GET", "/api/config?client=test")[1]["active_job"] == job["job"]
    status, answer = client.json("POST", f"/api/jobs/{job['job']}/cancel", {})
    assert status == 200 and answer["job"] == job["job"]
    gate.set()
    state = client.wait(job["job"])
    assert state["status"] == "cancelled"
    assert 0 < state["done"] < state["total"]
    assert len(state["rows"]) == state["done"] == 12  # the chunk in progress: one token, 2 layers
    status, headers, raw = client.request("GET", f"/api/jobs/{job['job']}/csv")
    assert status == 200 and len(pd.read_csv(io.BytesIO(raw))) == 12
    # After the cancel the page may run again.
    status, job2 = client.run(tokens="last", layers="0", sites=["mlp_out"])
    assert status == 202
    assert client.wait(job2["job"])["status"] == "done"


def test_csv_download(api):
    status, job = api.run(tokens="last", controls=False)
    state = api.wait(job["job"])
    status, headers, raw = api.request("GET", f"/api/jobs/{job['job']}/csv")
    assert status == 200
    assert headers["Content-Type"].startswith("text/csv")
    assert (
        headers["Content-Disposition"] == f'attachment; filename="superscopes-diana-princess-of-wales-{job["job"]}.csv"'
    )
    frame = pd.read_csv(io.BytesIO(raw))
    assert list(frame.columns) == [*RESULT_COLUMNS, "similarity", "echo", "control"]
    assert len(frame) == state["total"] == 12
    assert (frame["model"] == NAME).all() and (frame["source"] == PROMPT).all()
    assert frame.sort_values(["site", "layer", "alpha"])["output"].fillna("").tolist() == [
        "'" * r["output"].startswith(("=", "+", "-", "@")) + r["output"]  # formula-safe: see test_app_security
        for r in sorted(state["rows"], key=lambda r: (r["site"], r["layer"], r["alpha"]))
    ]


def test_server_side_failure_is_reported(make_app):
    def broken_judge(frame):
        raise RuntimeError("the judge fell over")

    app, base = make_app(judge=broken_judge)
    client = Client(base, app)
    status, job = client.run(tokens="last")
    state = client.wait(job["job"])
    assert state["status"] == "error"
    assert "RuntimeError: the judge fell over" in state["error"]


def test_http_errors(api):
    assert api.json("GET", "/api/jobs/0123abcd0123")[0] == 404
    assert "no such page" in api.json("GET", "/nowhere")[1]["error"]
    status, _, raw = api.request("POST", "/api/run", None, {"Content-Type": "text/plain"})
    assert status == 415 and b"application/json" in raw
    request = urllib.request.Request(
        api.base + "/api/run", data=b"{not json", method="POST", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 400 and b"not valid JSON" in error.value.read()
    # DNS rebinding: a page on another origin resolving to 127.0.0.1 gets nothing.
    status, answer = api.json("GET", "/api/config", headers={"Host": "evil.example:8765"})
    assert status == 403
    assert api.json("GET", "/api/config", headers={"Host": "localhost:8765"})[0] == 200


def test_real_judge(make_app):
    from superscopes import judge

    app, base = make_app(judge=None)
    client = Client(base, app)
    status, job = client.run(tokens="last", sites=["mlp_out"], layers="1")
    state = client.wait(job["job"], timeout=300)
    assert state["status"] == "done", state["error"]
    rows = pd.DataFrame(state["rows"])
    expected = judge.score(rows.assign(source=PROMPT))["similarity"]
    assert rows["similarity"].round(5).tolist() == expected.round(5).tolist()


def test_command_line_prints_the_address_and_binds_loopback(tmp_path):
    args = add_arguments(__import__("argparse").ArgumentParser()).parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8765, superscopes.DEFAULT_MODEL)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from superscopes.app import main; sys.exit(main(sys.argv[1:]))",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SUPERSCOPES_CACHE": str(tmp_path)},
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("superscopes app: serving on http://127.0.0.1:"), line
        assert f"runs kept in {tmp_path / 'app' / 'runs.sqlite'}" in line
        url = line.split()[4]
        with urllib.request.urlopen(url + "api/config", timeout=30) as response:
            config = json.loads(response.read())
        assert config["default_model"] == superscopes.DEFAULT_MODEL
        assert not any(m["remote"] for m in config["models"]) or config["remote_configured"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_remote_models_are_offered_only_when_ndif_is_configured(model, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    for name in ("NDIF_API_KEY", "NDIF_HOST"):
        monkeypatch.delenv(name, raising=False)
    app = App(default_model=NAME, models={NAME: model}, remote_models=["smollm2-135m"])
    assert not app.remote_configured
    assert [m["id"] for m in app.model_choices()] == [NAME, "smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"]
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:9")
    app = App(default_model=NAME, models={NAME: model}, remote_models=["smollm2-135m"], offer_embedded=False)
    assert app.remote_configured
    assert [(m["id"], m["label"], m["remote"]) for m in app.model_choices()] == [
        (NAME, NAME, False),
        ("ndif:smollm2-135m", "smollm2-135m (NDIF)", True),
    ]


def page_helpers(script: str):
    """Run ``script`` in Node against the page's pure helpers (``app``); its printed JSON."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    code = f"const app = require({json.dumps(str(STATIC / 'app.js'))});\nconsole.log(JSON.stringify({script}));"
    done = subprocess.run([node, "-e", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_page_status_line_shows_queue_place_a_cancel_at_once_and_an_estimate():
    lines = page_helpers("""[
        app.statusText({status: "queued", ahead: 2}),
        app.statusText({status: "queued", ahead: 2, cancelling: true}),
        app.statusText({status: "running", done: 12, total: 72, elapsed: 3.2, cancelling: true}),
        app.statusText({status: "cancelled", done: 12, total: 72, elapsed: 4, cancelling: false}),
        app.statusText({status: "running", done: 36, total: 72, controls_done: 0, controls_total: 24, elapsed: 3, eta: 4.5}),
        app.statusText({status: "done", done: 72, total: 72, controls_done: 24, controls_total: 24, elapsed: 9, eta: null}),
        app.statusText({status: "running", done: 0, total: 72, elapsed: 0.4, eta: null}),
        app.statusText({status: "interrupted", done: 0, total: 72, elapsed: 1}),
        app.statusText({status: "done", done: 72, total: 72, elapsed: 1, dropped: true}),
    ]""")
    assert lines == [
        "queued (2 ahead)",
        "queued — cancelling…",
        "12 / 72 cells — running (3.2 s) — cancelling after the chunk in progress…",
        "12 / 72 cells — cancelled (4.0 s)",
        # The estimate from the measured rate, and the controls counted apart.
        "36 / 72 cells + 0 / 24 controls — running (3.0 s, about 4.5 s left)",
        "72 / 72 cells + 24 / 24 controls — done (9.0 s)",
        "0 / 72 cells — running (0.4 s)",
        "0 / 72 cells — interrupted by a restart (1.0 s)",
        "72 / 72 cells — done (1.0 s) — too large to keep: its settings are restored, run it again for the results",
    ]
    # A poll the server answered before the cancel does not undo it; a stopped job is not cancelling.
    cancelling = page_helpers("""[
        app.jobState({job: "a1", status: "running", cancelling: false, rows: [1]}, "a1"),
        app.jobState({job: "a1", status: "queued", cancelling: false}, "a1"),
        app.jobState({job: "a1", status: "cancelled", cancelling: false}, "a1"),
        app.jobState({job: "b2", status: "running", cancelling: false}, "a1"),
    ].map((job) => [job.cancelling, "rows" in job])""")
    assert cancelling == [[True, False], [True, False], [False, False], [False, False]]


def test_page_hint_says_amplified_only_when_every_best_alpha_amplifies():
    hints = page_helpers("""[[1, 1], [1, 6], [], [3, 6], [0.5, 3]].map(
        (best) => app.readoutHint({target_layer: "same", transform: "scale", threshold: 0.3}, best))""")
    all_one, mixed, none_yet, amplified, shrunk = hints
    assert "at α 1" in all_one and "amplif" not in all_one
    for hint in (mixed, none_yet, shrunk):
        assert "amplified" not in hint and "best alpha" in hint
    assert "amplified by the best alpha" in amplified


def test_page_heatmap_titles_fit_and_edited_prompts_mark_the_table_stale():
    titles = list(SITES.values())
    sizes = page_helpers(f"{json.dumps(titles)}.map((t) => app.heatmapSize(t, 1, 2))")
    for title, size in zip(titles, sizes):
        assert size["width"] >= 2 + 8 * len(title)  # a 13 px bold character is under 8 px on average
    assert page_helpers('app.heatmapSize("MLP input", 6, 2)')["width"] == 40 + 42 * 6 + 4
    job = {"prompt": PROMPT, "model": NAME}
    assert page_helpers(f"""[
        app.isStale({json.dumps(job)}, {json.dumps(PROMPT)}, {json.dumps(NAME)}),
        app.isStale({json.dumps(job)}, "Diana, Princess", {json.dumps(NAME)}),
        app.isStale({json.dumps(job)}, {json.dumps(PROMPT)}, "other-model"),
        app.isStale(null, "anything", {json.dumps(NAME)}),
    ]""") == [False, True, True, False]


# ---------------------------------------------------------------- kept runs, controls, progress


def test_runs_are_kept_across_restarts_with_settings_rows_and_csv(make_app, tmp_path):
    path = tmp_path / "kept.sqlite"
    app, base = make_app(store=RunStore(path))
    client = Client(base, app)
    status, job = client.run(
        tokens="last", layers="1", alphas="1,3", target="custom", template="Tell me about @ please", placeholder="@"
    )
    assert status == 202
    live = client.wait(job["job"])
    _, _, live_csv = client.request("GET", f"/api/jobs/{job['job']}/csv")
    # A new server on the same store (a restart): the run's URL restores it.
    app2, base2 = make_app(store=RunStore(path))
    again = Client(base2, app2)
    status, kept = again.json("GET", f"/api/jobs/{job['job']}?since=0")
    assert status == 200 and kept["status"] == "done" and job["job"] not in app2.jobs
    assert kept["rows"] == live["rows"] and kept["controls"] == live["controls"] and kept["grid"] == live["grid"]
    assert kept["settings"] == {
        "model": NAME,
        "prompt": PROMPT,
        "tokens": "last",
        "token": "",
        "layers": "1",
        "target_layer": "same",
        "sites": list(SITES),
        "alphas": "1,3",
        "transform": "scale",
        "target": "custom",
        "template": "Tell me about @ please",
        "placeholder": "@",
        "max_new_tokens": 4,
        "controls": True,
        "readouts": [],
    }
    status, kept = again.json("GET", f"/api/jobs/{job['job']}?since=4&controls_since=5")
    assert kept["rows"] == live["rows"][4:] and kept["controls"] == live["controls"][5:]
    status, headers, raw = again.request("GET", f"/api/jobs/{job['job']}/csv")
    assert status == 200 and raw == live_csv and job["job"] in headers["Content-Disposition"]
    # The history lists it, newest first, with its best similarity.
    status, second = again.run(tokens="last", layers="0", sites=["mlp_out"], alphas="1")
    again.wait(second["job"])
    status, history = again.json("GET", "/api/runs?limit=5")
    assert [r["id"] for r in history["runs"]] == [second["job"], job["job"]]
    first = history["runs"][1]
    assert (first["status"], first["prompt"], first["model"], first["done"], first["total"]) == (
        "done",
        PROMPT,
        NAME,
        6,
        6,
    )
    assert first["best"] == max(r["similarity"] for r in live["rows"])
    assert again.json("GET", "/api/runs?limit=1")[1]["runs"][0]["id"] == second["job"]
    status, answer = again.json("GET", "/api/runs?limit=1000")
    assert status == 400 and "limit must be a whole number from 1 to 100" in answer["error"]
    # A run too large to keep has no CSV to give.
    app2.store.save(
        "0000000000ff", Snapshot(1.0, "done", {}, {"prompt": "p", "rows": [], "controls": [], "dropped": True})
    )
    status, answer = again.json("GET", "/api/jobs/0000000000ff/csv")
    assert status == 404 and "too large to keep its results" in answer["error"]


def test_a_run_cut_off_by_a_restart_is_kept_as_interrupted(make_app, tmp_path):
    path = tmp_path / "cut.sqlite"
    entered, gate = threading.Event(), threading.Event()

    def slow_judge(frame):
        entered.set()
        assert gate.wait(30)
        return fake_similarity(frame)

    app, base = make_app(judge=slow_judge, store=RunStore(path))
    status, job = Client(base, app).run(tokens="last")
    assert entered.wait(60)
    try:
        restarted = RunStore(path)  # what a new server does on start
        kept = restarted.state(job["job"])
        assert kept["settings"]["tokens"] == "last" and kept["rows"] == []
        assert restarted.recent(5)[0]["status"] == "interrupted"
    finally:
        gate.set()


def test_run_ids_in_urls_are_validated(api):
    bad = ["0123", "0123abcd012g", "0123ABCD0123", "..%2F..%2Fetc%2Fpasswd", "x'%20OR%20'1'%3D'1", "0" * 13]
    for run_id in bad:
        for method, path, body in (
            ("GET", "", None),
            ("GET", "/csv", None),
            ("POST", "/cancel", {}),
            ("POST", "/focus", {"position": 0}),
        ):
            status, answer = api.json(method, f"/api/jobs/{run_id}{path}", body)
            assert status == 400, (run_id, path, answer)
            assert "is not valid: a run id is 12 characters from 0-9 and a-f" in answer["error"]
    assert api.json("GET", "/api/jobs/../../server.py")[0] == 404  # no route: not a file either
    status, answer = api.json("GET", "/api/jobs/0123abcd0123")
    assert status == 404 and "no run '0123abcd0123'" in answer["error"]


def test_the_store_is_bounded_and_parameterised(tmp_path):
    from superscopes.app.store import check_run_id

    store = RunStore(tmp_path / "s.sqlite", keep=3, max_bytes=10**6, max_run_bytes=2000)
    state = {"prompt": "p", "rows": [{"output": "a"}], "controls": []}
    ids = [f"{i:012x}" for i in range(5)]
    for i, run_id in enumerate(ids):
        assert store.save(run_id, Snapshot(1000.0 + i, "done", {"prompt": "p"}, state, b"csv"))
    assert len(store) == 3 and [r["id"] for r in store.recent(10)] == ids[:1:-1]  # the newest three
    assert store.state(ids[0]) is None and store.state(ids[4]) == state and store.csv(ids[4]) == b"csv"
    # A run over max_run_bytes keeps its settings, not its rows.
    noisy = {"prompt": "p", "rows": [{"output": os.urandom(16).hex()} for _ in range(200)], "controls": []}
    assert not store.save("0000000000ff", Snapshot(2000.0, "done", {}, noisy, b"x" * 10))
    assert store.state("0000000000ff") == {"prompt": "p", "rows": [], "controls": [], "dropped": True}
    assert store.csv("0000000000ff") is None
    # The byte bound evicts the oldest too.
    small = RunStore(tmp_path / "b.sqlite", keep=100, max_bytes=3000, max_run_bytes=2000)
    for i in range(6):
        small.save(f"{i:012x}", Snapshot(float(i), "done", {}, {"rows": [{"output": os.urandom(700).hex()}]}))
    assert 1 <= len(small) < 6 and small.recent(1)[0]["id"] == f"{5:012x}"
    for run_id in ("'; DROP TABLE runs; --", "../../x", "", None):
        with pytest.raises(ValueError, match="is not valid: a run id is 12 characters"):
            check_run_id(run_id)
        with pytest.raises(ValueError):
            store.state(run_id)
    assert len(store) == 3  # the table is intact


def test_controls_beside_each_best_readout(api, model):
    from superscopes.app.grid import best_rows
    from superscopes.metrics import is_echo

    status, job = api.run(tokens="last", alphas="1,3")
    assert job["controls_total"] == 3 * 2 * 2  # 3 sites x 2 layers x (norm, random); alpha 1 is in the grid
    state = api.wait(job["job"])
    assert state["status"] == "done" and state["controls_done"] == state["controls_total"] == 12
    best = best_rows(state["rows"])
    assert len(best) == 6 and len(state["controls"]) == 18
    by = {(c["site"], c["layer"], c["control"]): c for c in state["controls"]}
    assert len(by) == 18
    target = state["grid"]["target"]
    for (_, site, layer), row in best.items():
        alpha1 = next(r for r in state["rows"] if (r["site"], r["layer"], r["alpha"]) == (site, layer, 1.0))
        assert by[(site, layer, "alpha1")] | {"control": None} == alpha1 | {"control": None}  # the grid's own
        assert by[(site, layer, "norm")]["alpha"] == 1.0
        assert by[(site, layer, "random")]["alpha"] == row["alpha"]  # the best readout's norm
        for control in ("norm", "random"):
            c = by[(site, layer, control)]
            assert c["echo"] == is_echo(c["output"], c["token"], target)
            assert c["similarity"] is not None
    # The control phase is the core graph: a direct run of one random control gives the same text.
    (position, site, layer), row = next(iter(best.items()))
    direct = superscopes.run(
        model,
        superscopes.Scope(
            PROMPT,
            position=position,
            sites=[site],
            layers=[layer],
            alphas=[row["alpha"]],
            transforms=["random"],
            target_layers=["same"],
            max_new_tokens=4,
        ),
        progress=False,
    )
    assert direct["output"].iloc[0] == by[(site, layer, "random")]["output"]
    # With controls off, none run; with transform norm, the norm-matched control is the grid's alpha 1.
    status, job = api.run(tokens="last", layers="0", sites=["mlp_out"], controls=False)
    assert job["controls_total"] == 0 and api.wait(job["job"])["controls"] == []
    status, job = api.run(tokens="last", layers="0", sites=["mlp_out"], transform="norm")
    assert job["controls_total"] == 2  # alpha 1 and random
    state = api.wait(job["job"])
    norm = next(c for c in state["controls"] if c["control"] == "norm")
    assert norm["output"] == next(r["output"] for r in state["rows"] if r["alpha"] == 1.0)
    status, answer = api.run(controls="yes")
    assert status == 400 and "controls must be true or false, got 'yes'" in answer["error"]


def test_progress_has_a_rate_and_estimate_and_the_clicked_token_runs_first(make_app):
    calls, entered, gate = [], threading.Event(), threading.Event()

    def judge(frame):  # holds the worker in the second chunk
        calls.append(frame["position"].iloc[0])
        if len(calls) == 2:
            entered.set()
            assert gate.wait(30)
        return fake_similarity(frame)

    app, base = make_app(judge=judge)
    client = Client(base, app)
    status, job = client.run(layers="0", sites=["mlp_out"], alphas="1", focus=3, controls=False)
    assert status == 202 and job["focus"] == 3
    try:
        assert entered.wait(60)
        state = client.json("GET", f"/api/jobs/{job['job']}")[1]
        assert state["status"] == "running" and state["done"] == 1 and state["rows"][0]["position"] == 3
        assert state["rate"] > 0 and state["eta"] == pytest.approx(5 / state["rate"], rel=0.5)
        status, answer = client.json("POST", f"/api/jobs/{job['job']}/focus", {"position": 5})
        assert status == 200 and answer == {"job": job["job"], "focus": 5}
        status, answer = client.json("POST", f"/api/jobs/{job['job']}/focus", {"position": 48})
        assert status == 400 and "position must be a whole number from 0 to 47, got 48" in answer["error"]
    finally:
        gate.set()
    state = client.wait(job["job"])
    assert calls[:3] == [3, 0, 5]  # the focused token, the chunk in progress, then the clicked one
    assert state["eta"] is None and state["rate"] > 0
    status, job = client.run(tokens="last", layers="0", sites=["mlp_out"], alphas="1", controls=False)
    status, answer = client.json("POST", f"/api/jobs/{job['job']}/focus", {"position": 0})
    assert (
        status == 400
        and "position 0 is not a source token of this run; its source tokens are at [5]" in answer["error"]
    )
    client.wait(job["job"])


def test_page_permalinks_accept_only_run_ids_and_restore_the_target_layer():
    parsed = page_helpers("""[
        "?run=0123456789ab", "?run=0123456789ab&compare=ba9876543210", "?run=../../etc&compare=0123456789ab",
        "?run=0123456789AB", "?run=0123456789ab%27%3B", "", "?compare=<script>",
    ].map(app.runsFromUrl)""")
    none = {"cell": None, "latent": None}
    assert parsed == [
        {"run": "0123456789ab", "compare": None, **none},
        {"run": "0123456789ab", "compare": "ba9876543210", **none},
        {"run": None, "compare": "0123456789ab", **none},
        {"run": None, "compare": None, **none},
        {"run": None, "compare": None, **none},
        {"run": None, "compare": None, **none},
        {"run": None, "compare": None, **none},
    ]
    assert page_helpers('[app.runUrl("0123456789ab"), app.runUrl("0123456789ab", "ba9876543210")]') == [
        "/?run=0123456789ab",
        "/?run=0123456789ab&compare=ba9876543210",
    ]
    # The open cell and latent panel jobs travel in the URL too; ids that are not run ids never do.
    panels = page_helpers("""[
        app.runsFromUrl("?run=0123456789ab&cell=aaaaaaaaaaaa&latent=bbbbbbbbbbbb"),
        app.runsFromUrl("?run=0123456789ab&cell=javascript:1&latent=<img>"),
        app.runUrl("0123456789ab", null, {cell: "aaaaaaaaaaaa", latent: "bbbbbbbbbbbb"}),
        app.runUrl("0123456789ab", "ba9876543210", {cell: "../x", latent: null}),
    ]""")
    assert panels == [
        {"run": "0123456789ab", "compare": None, "cell": "aaaaaaaaaaaa", "latent": "bbbbbbbbbbbb"},
        {"run": "0123456789ab", "compare": None, **none},
        "/?run=0123456789ab&cell=aaaaaaaaaaaa&latent=bbbbbbbbbbbb",
        "/?run=0123456789ab&compare=ba9876543210",
    ]
    assert page_helpers('["same", 0, 5].map(app.targetLayerFields)') == [
        {"select": "same", "number": None},
        {"select": "0", "number": None},
        {"select": "number", "number": "5"},
    ]
    assert page_helpers("[app.closestPosition([1, 2, 5], 2), app.closestPosition([1, 2, 5], 9)]") == [2, 5]
    line = page_helpers(
        'app.historyLine({prompt: "Diana", model: "m", status: "done", done: 6, total: 6, best: 0.4567})'
    )
    assert line == {"prompt": "Diana", "detail": "m · done · 6/6 cells · best 0.46"}


def test_page_controls_sit_beside_the_best_readout_and_echoes_never_pass():
    cells = page_helpers("""(() => {
        const view = {rows: new Map(), controls: new Map()};
        app.addRows(view, {controls: [
            {position: 5, site: "mlp_out", layer: 1, control: "random", alpha: 6, output: "r", similarity: 0.1, echo: false},
            {position: 5, site: "mlp_out", layer: 1, control: "alpha1", alpha: 1, output: "a", similarity: 0.2, echo: false},
            {position: 5, site: "mlp_out", layer: 1, control: "norm", alpha: 1, output: "Wales", similarity: 0.5, echo: true},
            {position: 4, site: "mlp_out", layer: 1, control: "norm", alpha: 1, output: "x", similarity: 0.5, echo: false},
        ]});
        return app.cellControls(view.controls, 5, "mlp_out", 1).map((c) => [c.label, c.output, app.passes(c, 0.3)]);
    })()""")
    assert cells == [["α 1", "a", False], ["norm-matched", "Wales", False], ["random dir.", "r", False]]
    assert page_helpers("[app.passes({similarity: 0.5, echo: false}, 0.3), app.passes({similarity: null}, 0.3)]") == [
        True,
        False,
    ]
    # The grid-size line counts the control cells the server will run (alpha 1 reused when in the grid).
    assert page_helpers("""[["scale", "1,3"], ["scale", "3,6"], ["norm", "1, 3"], ["cfg", "1,3"]].map(
        ([t, a]) => app.controlsPerBest(t, a))""") == [2, 3, 2, 3]
    hint = page_helpers(
        'app.readoutHint({target_layer: "same", transform: "scale", threshold: 0.3, target_token: " x"}, [3], true)'
    )
    assert 'at its token " x"' in hint
    assert "norm-matched" in hint and "random direction" in hint and "not an echo" in hint


def test_layout_holds_from_420_px_to_wide_screens():
    """Without a browser: every fixed width that applies at 420 px fits in it (the 900 px and
    600 px queries stack and shrink the page), and the pair of runs wraps under 2 x 460 px."""
    css = (STATIC / "app.css").read_text()
    html = (STATIC / "index.html").read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    narrow = css[css.index("@media (max-width: 600px)") :]
    for rule in (
        ".row { flex-wrap: wrap; }",
        ".progress-line { flex-wrap: wrap;",
        "progress { flex: 1 1 100%; }",
        "ol.alphas li { grid-template-columns: 1fr;",
        "td ul.controls li { grid-template-columns: 1fr;",
    ):
        assert rule in narrow, rule
    assert "@media (max-width: 900px) { .layout { grid-template-columns: 1fr; } }" in css
    assert "repeat(auto-fit, minmax(min(100%, 460px), 1fr))" in css  # side by side when both fit, else stacked
    assert ".heatmap { max-width: 100%; height: auto; }" in css  # heatmaps have a viewBox: they scale down
    base = css[: css.index("@media (max-width: 600px)")].replace(
        "@media (max-width: 900px) { .layout { grid-template-columns: 1fr; } }", ""
    )
    base = base.replace("grid-template-columns: 340px minmax(0, 1fr);", "")  # the form column: 900 px and up
    fixed = [int(px) for px in re.findall(r"(?:^|[\s:(])(?:min-)?width:\s*(\d+)px", base)]
    fixed += [int(px) for px in re.findall(r"flex:\s*0 0 (\d+)px", base)]
    assert fixed and max(fixed) <= 400 - 2 * (8 + 10), fixed  # inside the page and panel padding at 420 px
