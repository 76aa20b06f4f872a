"""The web app under hostile or careless input: bounds, cross-site requests, the job queue,
error replies, secrets in logs, CSV formulas, and a bounded loopback load test.

Everything runs on the tiny random Llama and the fake judge, on 127.0.0.1."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request

import pandas as pd
import pytest

from superscopes.app import make_server
from superscopes.app.errors import BadRequest, Refused, redact, secret_values
from superscopes.app.fields import check_layers, parse_alphas, parse_target_layer, parse_whole
from superscopes.app.jobs import csv_safe
from superscopes.app.request import LIMITS, parse_body
from superscopes.app.scheduler import KEEP_JOBS
from superscopes.app.testing import fake_similarity
from superscopes.app.web import Handler, Server, cross_site
from tests.test_app import NAME, PROMPT, Client, api, grid_body, make_app, model  # noqa: F401 - fixtures

SECRET = "hf_Zq8example0secret0value"  # a made-up token


def gated_judge():
    """A judge that holds the worker inside a job until ``gate`` is set."""
    entered, gate = threading.Event(), threading.Event()

    def judge(frame):
        entered.set()
        assert gate.wait(60)
        return fake_similarity(frame)

    return judge, entered, gate


def post_raw(base: str, path: str, raw: bytes, headers: dict | None = None, timeout: float = 10):
    """A POST with the body exactly as given (json.dumps cannot write 1e309 or deep nesting)."""
    request = urllib.request.Request(
        base + path, data=raw, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ---------------------------------------------------------------- pure parsing and bounds


def test_layer_ranges_are_bounded_before_they_are_expanded():
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(BadRequest, match=r"layers '1-1000000000': layer 2 is out of range: m has layers 0-1"):
            check_layers("1-1000000000", 2, "m")
        with pytest.raises(BadRequest, match=r"layer 7 is out of range: m has layers 0-1"):
            check_layers("7-" + "9" * 150, 2, "m")
        with pytest.raises(BadRequest, match=r"layer 5 is out of range"):
            check_layers([0, 5], 2, "m")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5 and peak < 1_000_000  # nothing was expanded
    with pytest.raises(BadRequest, match=r"layers has 201 characters; this page takes at most 200"):
        check_layers("0," * 100 + "1", 2, "m")
    with pytest.raises(BadRequest, match=r"the range '1-0' is reversed; write 0-1"):  # the one parser's words
        check_layers("1-0", 2, "m")
    with pytest.raises(BadRequest, match=r"use 'all', '3', '1-7' or '1,3,5-7'"):
        check_layers("-1", 2, "m")
    with pytest.raises(BadRequest, match=r"give whole numbers"):
        check_layers([0, True], 2, "m")
    for good in ("0-1", "1", "0,1", "all", [0, 1], " 0 - 1 "):
        check_layers(good, 2, "m")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(4, 4), (4.0, 4), ("4", 4), (" 32 ", 32), (1, 1)],
)
def test_whole_numbers(value, expected):
    assert parse_whole(value, "max_new_tokens", 1, 32) == expected


@pytest.mark.parametrize(
    "value", [float("inf"), float("nan"), 1e309, True, 4.5, "4.5", "abc", [4], None, 0, 33, 10**30, "9" * 5000, -1]
)
def test_whole_numbers_refused_with_field_and_range(value):
    with pytest.raises(BadRequest, match=r"^max_new_tokens must be a whole number from 1 to 32, got "):
        parse_whole(value, "max_new_tokens", 1, 32)


def test_alphas_are_counted_before_conversion_and_bounded():
    with pytest.raises(BadRequest, match=r"alphas has 30000 values; a run takes at most 2000"):
        parse_alphas("1," * 30000, 2000, 1000)
    with pytest.raises(BadRequest, match=r"alpha inf is not a finite number"):
        parse_alphas([1, float("inf")], 2000, 1000)
    with pytest.raises(BadRequest, match=r"alpha 1e\+06 is out of range: alphas go from -1000 to 1000"):
        parse_alphas("1,1e6", 2000, 1000)
    with pytest.raises(BadRequest, match=r"alpha True is not a number"):
        parse_alphas([True], 2000, 1000)
    assert parse_alphas("3, 1,3,-2.5", 2000, 1000) == [-2.5, 1.0, 3.0]


def test_target_layer_bounds():
    assert parse_target_layer("same", 2) == "same"
    assert parse_target_layer("1", 2) == 1
    with pytest.raises(BadRequest, match=r"target_layer 7 is out of range: m has layers 0-1"):
        parse_target_layer(7, 2, "m")
    for bad in (float("inf"), "x", True, 1.5):
        with pytest.raises(BadRequest, match=r"target_layer .*: use same, or a layer of m \(0-1\)"):
            parse_target_layer(bad, 2, "m")


def test_request_bodies():
    assert parse_body(b'{"a": [1, "b"]}', "application/json; charset=utf-8") == {"a": [1, "b"]}
    for media_type in ("text/plain;charset=json", "text/plain", "", "application/jsonp", "multipart/form-data"):
        with pytest.raises(Refused, match="send the request as application/json") as refused:
            parse_body(b"{}", media_type)
        assert refused.value.status == 415
    with pytest.raises(BadRequest, match="the request nests too deeply"):
        parse_body(b"[" * 60000 + b"]" * 60000, "application/json")
    with pytest.raises(BadRequest, match="'sites' nests too deeply"):
        parse_body(b'{"sites": [["mlp_out"]]}', "application/json")
    with pytest.raises(BadRequest, match="'layers' nests too deeply"):
        parse_body(b'{"layers": {"a": 1}}', "application/json")
    with pytest.raises(BadRequest, match="not UTF-8"):
        parse_body(b'{"prompt": "\xff\xfe\xfa"}', "application/json")
    with pytest.raises(BadRequest, match="must be a JSON object"):
        parse_body(b"[1]", "application/json")
    with pytest.raises(BadRequest, match="over 65536 bytes"):
        parse_body(None, "application/json")


def test_cross_site_rule():
    host = "127.0.0.1:8765"
    assert cross_site(None, None, host) is None  # a script: no browser headers
    assert cross_site("http://127.0.0.1:8765", "same-origin", host) is None
    assert cross_site(None, "none", host) is None  # typed into the address bar
    assert "Origin 'http://127.0.0.1:9999'" in cross_site("http://127.0.0.1:9999", None, host)  # another port
    assert "Origin 'null'" in cross_site("null", None, host)
    assert "Origin 'https://evil.example'" in cross_site("https://evil.example", None, host)
    for site in ("cross-site", "same-site"):
        assert "Sec-Fetch-Site" in cross_site("http://127.0.0.1:8765", site, host)


def test_csv_cells_cannot_be_formulas():
    frame = pd.DataFrame(
        {
            "output": ["=1+1", "+SUM(A1)", "-2+3", "@cmd", "\t=x", "\rx", "plain", "a=b", ""],
            "alpha": [-1.0, 1, 2, 3, 4, 5, 6, 7, 8],
        }
    )
    safe = csv_safe(frame)
    assert safe["output"].tolist() == ["'=1+1", "'+SUM(A1)", "'-2+3", "'@cmd", "'\t=x", "'\rx", "plain", "a=b", ""]
    assert safe["alpha"].tolist() == frame["alpha"].tolist()  # numbers stay numbers
    assert pd.read_csv(io.StringIO(safe.to_csv(index=False)))["alpha"].iloc[0] == -1.0


def test_secret_values_are_redacted():
    environ = {"HF_TOKEN": SECRET, "MY_SERVICE_API_KEY": "k" * 12, "GITHUB_TOKEN": "short", "PATH": "/usr/bin:/bin"}
    assert secret_values(environ) == [SECRET, "k" * 12]
    text = f"failed with {SECRET} and {'k' * 12} on /usr/bin (short)"
    assert redact(text, environ) == "failed with *** and *** on /usr/bin (short)"


# ---------------------------------------------------------------- over HTTP


def test_huge_grids_are_refused_fast_while_a_job_runs(make_app):
    judge, entered, gate = gated_judge()
    app, base = make_app(judge=judge)
    client = Client(base, app)
    status, job = client.run(client="busy", tokens="last")
    assert status == 202
    assert entered.wait(60), "the job never reached the judge"
    try:
        cases = [
            (grid_body(client="a", layers="1-1000000000"), "layers '1-1000000000': layer 2 is out of range"),
            (grid_body(client="b", alphas="1," * 30000), "alphas has 30000 values; a run takes at most 2000"),
            (grid_body(client="c", alphas=",".join(str(a) for a in range(1000))), "the grid has 36000 cells"),
            (grid_body(client="d", max_new_tokens=10**9), "max_new_tokens must be a whole number from 1 to 32"),
        ]
        for body, message in cases:
            started = time.perf_counter()
            status, answer = post_raw(base, "/api/run", json.dumps(body).encode(), timeout=10)
            assert status == 400 and message in answer["error"], answer
            assert time.perf_counter() - started < 3, f"{message}: took {time.perf_counter() - started:.1f} s"
        assert list(app.jobs) == [job["job"]]
        # A good grid is queued at once too: the request path shares no lock with the running job.
        started = time.perf_counter()
        status, queued = post_raw(
            base, "/api/run", json.dumps(grid_body(client="e", tokens="last")).encode(), timeout=10
        )
        assert status == 202 and (queued["status"], queued["ahead"]) == ("queued", 1)
        assert time.perf_counter() - started < 3
    finally:
        gate.set()
    assert client.wait(job["job"])["status"] == "done"
    assert client.wait(queued["job"])["status"] == "done"


def test_overflowing_deep_and_malformed_values_get_400_naming_the_field(api):
    base = api.base
    valid = json.dumps(grid_body(tokens="last"))[1:-1]  # the fields, to append one raw field after

    def run(field: str) -> tuple[int, dict]:
        return post_raw(base, "/api/run", ("{" + valid + ", " + field + "}").encode())

    cases = {
        '"max_new_tokens": 1e309': "max_new_tokens must be a whole number from 1 to 32, got inf",
        '"max_new_tokens": NaN': "max_new_tokens must be a whole number from 1 to 32, got nan",
        '"max_new_tokens": true': "max_new_tokens must be a whole number from 1 to 32, got True",
        '"max_new_tokens": 4.5': "max_new_tokens must be a whole number from 1 to 32, got 4.5",
        '"max_new_tokens": [4]': "max_new_tokens must be a whole number from 1 to 32, got [4]",
        '"target_layer": 1e309': "target_layer inf: use same, or a layer of tiny-llama (0-1)",
        '"target_layer": -Infinity': "target_layer -inf: use same",
        '"alphas": [1, 1e309]': "alpha inf is not a finite number",
        '"alphas": [[1]]': "'alphas' nests too deeply",
        '"layers": {"a": 1}': "'layers' nests too deeply",
        '"layers": [0, 1.5]': "layers [0, 1.5]: give whole numbers",
        '"sites": "mlp_out,attn"': "site 'attn' is not valid here; choose from mlp_in, mlp_out, resid_post",
        '"prompt": 5': "prompt must be text, got 5",
        '"client": "' + "c" * 100 + '"': "client has 100 characters; this page takes at most 64",
        '"target": "custom", "template": "'
        + "t" * 2000
        + '"': "template has 2000 characters; this page takes at most 1000",
    }
    for field, message in cases.items():
        status, answer = run(field)
        assert status == 400 and message in answer["error"], (field, answer)
    status, answer = post_raw(base, "/api/run", b"[" * 30000 + b"]" * 30000)
    assert status == 400 and "nests too deeply" in answer["error"]
    status, answer = api.json("GET", "/api/jobs/0123abcd?since=abc")
    assert status == 400 and "since must be a whole number" in answer["error"]
    assert api.app.jobs == {}


def test_cross_site_posts_are_refused(api):
    base = api.base
    body = json.dumps(grid_body(tokens="last", layers="0", sites=["mlp_out"])).encode()
    other_port = {"Origin": "http://127.0.0.1:1"}  # another page on this machine
    for headers in (other_port, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        for path, data in (
            ("/api/run", body),
            ("/api/tokens", b'{"prompt": "hi"}'),
            (  # the cell panels' too
                "/api/cell",
                b'{"prompt": "hi", "position": 0, "site": "resid_post", "layer": 0}',
            ),
            ("/api/latent", b'{"sae": "x", "latent": 0}'),
        ):
            status, answer = post_raw(base, path, data, headers)
            assert status == 403 and "another site" in answer["error"], (headers, answer)
    # The simple request a page on another site can send without a preflight.
    for path in ("/api/run", "/api/cell", "/api/latent"):
        status, answer = post_raw(base, path, body, {"Content-Type": "text/plain;charset=json"})
        assert status == 415 and "application/json" in answer["error"]
    assert api.app.jobs == {}
    # The page itself (same origin) may.
    own = {"Origin": base, "Sec-Fetch-Site": "same-origin"}
    status, job = post_raw(base, "/api/run", body, own)
    assert status == 202, job
    status, answer = post_raw(base, f"/api/jobs/{job['job']}/cancel", b"{}", other_port)
    assert status == 403 and not api.app.jobs[job["job"]].cancel.is_set()
    for path in ("cancel", "focus"):  # the new focus endpoint follows the same rules
        status, answer = post_raw(base, f"/api/jobs/{job['job']}/{path}", b'{"position": 5}', other_port)
        assert status == 403, answer
        status, answer = post_raw(
            base, f"/api/jobs/{job['job']}/{path}", b'{"position": 5}', {"Content-Type": "text/plain;charset=json"}
        )
        assert status == 415, answer
    assert api.wait(job["job"])["status"] == "done"


def test_one_queue_one_worker_and_no_page_starves_the_others(make_app):
    judge, entered, gate = gated_judge()
    app, base = make_app(judge=judge, limits={"max_queued": 3})
    client = Client(base, app)
    small = {"tokens": "last", "layers": "0", "sites": ["mlp_out"], "alphas": "1"}
    try:
        status, first = client.run(client="a")  # six chunks, one per token: a cancel has time to land
        assert status == 202 and first["ahead"] == 0
        assert entered.wait(60)
        status, second = client.run(client="b", **small)
        assert status == 202 and (second["status"], second["ahead"]) == ("queued", 1)
        status, third = client.run(client="c", **small)
        assert (third["status"], third["ahead"]) == ("queued", 2)
        # One page cannot queue a second job; a full queue refuses everyone else.
        status, answer = client.run(client="a", **small)
        assert status == 409 and answer["job"] == first["job"]
        status, answer = client.run(client="d", **small)
        assert status == 503 and "the queue is full (3 runs)" in answer["error"]
        # A queued job cancels at once; the ones behind it move up.
        status, answer = client.json("POST", f"/api/jobs/{second['job']}/cancel", {})
        assert status == 200 and answer["status"] == "cancelled" and not answer["cancelling"]
        assert client.json("GET", f"/api/jobs/{third['job']}")[1]["ahead"] == 1
        # A running job shows the cancel at once, and the flag sticks until it stops.
        status, answer = client.json("POST", f"/api/jobs/{first['job']}/cancel", {})
        assert (answer["status"], answer["cancelling"]) == ("running", True)
        assert client.json("GET", f"/api/jobs/{first['job']}")[1]["cancelling"] is True
    finally:
        gate.set()
    assert client.wait(first["job"])["status"] == "cancelled"
    state = client.wait(third["job"])
    assert state["status"] == "done" and state["done"] == 1
    assert client.wait(second["job"])["done"] == 0
    assert app.worker is not None and app.worker.is_alive()


def test_stalled_connections_time_out_and_the_backlog_holds_bursts(make_app, monkeypatch):
    assert Server.request_queue_size >= 20
    assert Handler.timeout is not None and Handler.timeout <= 60  # the default; the test shortens it
    monkeypatch.setattr(Handler, "timeout", 0.5)
    app, base = make_app()
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
        stalled.sendall(b"POST /api/run HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        assert Client(base, app).json("GET", "/api/config")[0] == 200  # others are answered meanwhile
        started = time.perf_counter()
        assert stalled.recv(1024) == b""  # the server closed it
        assert time.perf_counter() - started < 4


def test_internal_errors_are_500_without_traceback_and_logs_redact_secrets(make_app, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", SECRET)

    def broken_judge(frame):
        raise RuntimeError(f"the judge fell over with {SECRET}")

    app, base = make_app(judge=broken_judge)
    client = Client(base, app)

    def broken_config(client=None):
        raise RuntimeError(f"config failed, token {SECRET}")

    monkeypatch.setattr(app, "config", broken_config)
    status, _, raw = client.request("GET", "/api/config")
    assert status == 500
    assert json.loads(raw) == {"error": "server error: RuntimeError: config failed, token ***"}
    status, job = client.run(tokens="last", layers="0", sites=["mlp_out"])
    state = client.wait(job["job"])
    assert state["error"] == "RuntimeError: the judge fell over with ***"

    # A failure outside the handlers' own catch goes to the server's handle_error: redacted too.
    def broken_host_check(self):
        raise RuntimeError(f"host check failed near {SECRET}")

    with monkeypatch.context() as patch:
        patch.setattr(Handler, "_host_ok", broken_host_check)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(base + "/api/config", timeout=10)
    # A verbose server logs request lines; a secret in a URL is redacted there too.
    server = make_server(app, "127.0.0.1", 0, verbose=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        Client(server.url.rstrip("/"), app).request("GET", f"/nowhere?key={SECRET}")
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert err.count("Traceback") >= 3 and "config failed, token ***" in err and "with ***" in err
    assert "host check failed near ***" in err
    assert "GET /nowhere?key=***" in err
    assert SECRET not in err


def test_csv_download_is_formula_safe(api):
    prompt = '=HYPERLINK("http://evil.example","x")'
    status, job = api.run(prompt=prompt, tokens="last", layers="0", sites=["mlp_out"], alphas="1")
    assert status == 202, job
    api.wait(job["job"])
    status, _, raw = api.request("GET", f"/api/jobs/{job['job']}/csv")
    frame = pd.read_csv(io.BytesIO(raw))
    assert frame["source"].tolist() == ["'" + prompt] * 3  # the readout and its two controls run
    text_columns = frame.select_dtypes(exclude="number")
    assert not text_columns.map(lambda v: isinstance(v, str) and v.startswith(("=", "+", "-", "@"))).any().any()


def test_load_50_jobs_from_20_concurrent_clients(make_app):
    """Bounded: 50 one-cell jobs, 20 client threads, a 90 s ceiling; the server answers a
    config request throughout, and memory stays bounded."""
    app, base = make_app()
    n_clients, n_jobs = 20, 50
    small = {"tokens": "last", "layers": "0", "sites": ["mlp_out"], "alphas": "1", "max_new_tokens": 1}
    deadline = time.time() + 90
    barrier = threading.Barrier(n_clients)
    outcomes: list[dict] = []
    errors: list[str] = []
    aheads: list[int] = []
    latencies: list[float] = []
    stop = threading.Event()

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def one_client(index: int) -> None:
        client = Client(base, app)
        barrier.wait(30)  # all 20 connect at once
        for k in range(index, n_jobs, n_clients):  # 2 or 3 jobs each, one at a time
            status, job = client.run(client=f"client-{index}", prompt=f"{PROMPT} {k}", **small)
            if status != 202:
                errors.append(f"client {index}: {status} {job}")
                return
            aheads.append(job["ahead"])
            while time.time() < deadline:
                status, state = client.json("GET", f"/api/jobs/{job['job']}")
                if state["status"] not in ("queued", "running"):
                    outcomes.append(state)
                    break
                time.sleep(0.2)

    def watch() -> None:
        client = Client(base, app)
        while not stop.is_set():
            started = time.perf_counter()
            status = client.json("GET", "/api/config")[0]
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(f"config: {status}")
            time.sleep(0.1)

    before = rss()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=one_client, args=(i,), daemon=True) for i in range(n_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1, deadline - time.time()))
    stop.set()
    watcher.join(10)
    assert not errors, errors
    assert len(outcomes) == n_jobs and all(s["status"] == "done" and s["done"] == 1 for s in outcomes)
    assert max(aheads) <= n_clients and max(aheads) > 0  # queued jobs said how many ran before them
    assert latencies and max(latencies) < 2, max(latencies)
    assert len(app.jobs) <= KEEP_JOBS + LIMITS["max_queued"]
    assert rss() - before < 200 * 2**20
