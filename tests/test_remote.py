"""Remote configuration and failures: clear errors, and the API key never shown.

A fake NDIF on 127.0.0.1 speaks the client's protocol (a ``/subscribe`` websocket that
sends a session id, ``POST /request``, status frames) and fails the way a real one does;
the real server tier (tests marked ndif, `make test-remote`) covers successful remote runs."""

from __future__ import annotations

import base64
import hashlib
import json
import select
import socket
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import websocket

import superscopes
from superscopes import Scope
from superscopes.cli import main
from superscopes.remote import (
    RemoteConfigError,
    RemoteRunError,
    compare_versions,
    configure,
    diagnose,
    explain,
    read_dotenv,
    redact,
    settings,
)

SECRET = "ndif-secret-key-0123456789"


class FakeNDIF(BaseHTTPRequestHandler):
    """One scenario at a time (class attributes, reset by the fixture):

    - ``post_status``/``detail``: how ``POST /request`` answers (FastAPI's ``{"detail": ...}``);
    - ``run_error``: with a 200 POST, the ERROR description sent over the websocket;
    - ``plain_404``: every path answers 404, like a web server that is not NDIF;
    - ``whoami``: ``(status, body)`` of ``GET /whoami``; ``server_nnsight``: ``GET /env``."""

    protocol_version = "HTTP/1.1"  # websocket-client wants an HTTP/1.1 101
    post_status, detail, run_error, plain_404, silent = 200, "", "", False, False
    whoami: tuple[int, dict] = (200, {"email": "someone@example.org", "tags": []})
    server_nnsight = "0.8.1"
    frames: list[str] = []  # queued for the websocket after the POST
    requests = 0  # POST /request received: one per remote request

    def _json(self, status: int, value) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _frame(self, text: str) -> None:
        payload = text.encode()
        header = (
            bytes([0x81, len(payload)]) if len(payload) < 126 else bytes([0x81, 126]) + len(payload).to_bytes(2, "big")
        )
        self.wfile.write(header + payload)
        self.wfile.flush()

    def do_GET(self) -> None:
        if self.plain_404:
            return self._json(404, {"detail": "Not Found"})
        if self.path == "/subscribe" and self.headers.get("Upgrade", "").lower() == "websocket":
            accept = base64.b64encode(
                hashlib.sha1(
                    (self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()
                ).digest()
            ).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self._frame(json.dumps({"session_id": "session-1"}))
            # Send queued status frames until the client sends anything (its close frame).
            while not self.server.closing.is_set():
                while FakeNDIF.frames:
                    self._frame(FakeNDIF.frames.pop(0))
                if select.select([self.connection], [], [], 0.02)[0]:
                    self.wfile.write(b"\x88\x00")  # close, answering the client's
                    break
            self.close_connection = True
            return None
        if self.path == "/status":
            return self._json(200, {"deployments": {}})
        if self.path == "/env":
            return self._json(200, {"packages": {"nnsight": self.server_nnsight}})
        if self.path == "/whoami":
            return self._json(*self.whoami)
        return self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        FakeNDIF.requests += 1
        if self.plain_404 or self.post_status != 200:
            return self._json(404 if self.plain_404 else self.post_status, {"detail": self.detail or "Not Found"})
        self._json(200, {"id": "request-1", "status": "RECEIVED"})
        if self.silent:  # a stalled server: the request is accepted, no result ever comes
            return None
        FakeNDIF.frames.append(json.dumps({"id": "request-1", "status": "ERROR", "description": self.run_error}))
        return None

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_ndif(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeNDIF)
    server.daemon_threads = True
    server.closing = threading.Event()
    for name, value in dict(
        post_status=200,
        detail="",
        run_error="",
        plain_404=False,
        silent=False,
        server_nnsight="0.8.1",
        whoami=(200, {"email": "someone@example.org", "tags": []}),
        frames=[],
        requests=0,
    ).items():
        monkeypatch.setattr(FakeNDIF, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    yield FakeNDIF
    server.closing.set()
    server.shutdown()
    server.server_close()


def remote_run():
    model = superscopes.load("smollm2-135m", remote=True)
    return superscopes.run(model, Scope("Diana", layers=[1], alphas=[1], output="topk"), remote=True, progress=False)


def run_failure(fake_ndif, **scenario) -> tuple[str, str]:
    """The message of the RemoteRunError a remote run raises, and its full chained traceback."""
    for name, value in scenario.items():
        setattr(fake_ndif, name, value)
    with pytest.raises(RemoteRunError) as caught:
        remote_run()
    return str(caught.value), "".join(traceback.format_exception(caught.value))


@pytest.mark.parametrize(
    "scenario,advice",
    [
        (
            dict(post_status=401, detail="Missing or invalid API key. Please visit https://login.ndif.us/"),
            "refused the API key (HTTP 401)",
        ),
        (dict(post_status=403, detail="Invalid API key."), "refused the API key (HTTP 403)"),
        (
            dict(post_status=400, detail=f"Invalid API key format: '{SECRET}'. Keys are UUIDs."),
            "refused the API key (HTTP 400)",
        ),
        (
            dict(
                post_status=400,
                detail="Client nnsight version 0.8.1 is below the minimum supported 0.9.0. "
                "Please `pip install --upgrade nnsight`.",
            ),
            "client nnsight version 0.8.1 is below the minimum supported 0.9.0 on http://127.0.0.1",
        ),
        # An auth database that is down: the server answered, so it is not "unreachable".
        (
            dict(post_status=500, detail="could not connect to server: Connection refused (postgres)"),
            "failed to accept the request (HTTP 500)",
        ),
        (
            dict(post_status=503, detail="Service temporarily unavailable: compute backend is reconnecting."),
            "is up but cannot run requests now (HTTP 503)",
        ),
        (
            dict(run_error="Traceback ...\nRuntimeError: CUDA out of memory on the server"),
            "the server raised an exception while running the request",
        ),
        (
            dict(run_error="Could not deploy this model. Remotable.describe_checkpoint() got an unexpected keyword"),
            "the model is not deployed on http://127.0.0.1",
        ),
        (
            dict(
                run_error='Model nnsight.modeling.language.LanguageModel:{"repo_id": "meta-llama/Llama-3.2-3B"} is not '
                "dedicated and hotswapping is not supported for this API key."
            ),
            "the model is not deployed on http://127.0.0.1",
        ),
        (
            dict(run_error="Module superscopes_helpers is not whitelisted"),
            "the server refused code that imports a module it does not allow",
        ),
        (dict(plain_404=True), "answered 404 Not Found: it does not look like an NDIF server"),
        # ndif 0.1.2's form parser refuses a request part over 1 MB (tests/test_ndif.py meets it for real)
        (
            dict(post_status=400, detail="There was an error parsing the body"),
            "could not read the request (HTTP 400, body not parsed)",
        ),
    ],
)
def test_refusals_become_clear_errors_without_the_key(fake_ndif, scenario, advice):
    message, chained = run_failure(fake_ndif, **scenario)
    assert advice in message
    assert "unreachable" not in message
    assert SECRET not in chained and SECRET not in message


@pytest.mark.parametrize("call", ["decode", "collect"])
def test_a_lens_on_ndif_is_one_request_whose_failure_is_explained(fake_ndif, call):
    """``lens.decode`` once sent one request per 256 vectors, and its errors bypassed ``explain``."""
    import torch

    from superscopes import lens

    fake_ndif.run_error = "Traceback ...\nRuntimeError: CUDA out of memory on the server"
    model = superscopes.load("smollm2-135m", remote=True)
    with pytest.raises(RemoteRunError, match="the server raised an exception while running the request"):
        if call == "decode":
            lens.decode(model, torch.randn(600, model.config.hidden_size), batch_size=256, remote=True)
        else:
            lens.collect(model, ["Diana, Princess of Wales"] * 5, layers=[1], batch_size=2, remote=True)
    assert fake_ndif.requests == 1


def test_the_key_from_nnsights_config_file_is_scrubbed(fake_ndif, monkeypatch, tmp_path):
    """A key only nnsight knows (its config file): no NDIF_API_KEY in the environment or .env."""
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.chdir(tmp_path)  # no ./.env
    monkeypatch.setattr(CONFIG.API, "APIKEY", "nnsight-config-file-key-42")
    message, chained = run_failure(
        fake_ndif, post_status=400, detail="Invalid API key format: 'nnsight-config-file-key-42'."
    )
    assert "nnsight-config-file-key-42" not in chained and "***" in message
    assert redact("key nnsight-config-file-key-42 here") == "key *** here"


def test_a_stalled_server_meets_the_client_time_out(fake_ndif):
    import time

    fake_ndif.silent = True
    model = superscopes.load("smollm2-135m", remote=True)
    start = time.monotonic()
    with pytest.raises(RemoteRunError, match=r"timed out .*within the client time-out of 1\.5 s"):
        superscopes.run(
            model, Scope("Diana", layers=[1], alphas=[1], output="topk"), remote=True, timeout=1.5, progress=False
        )
    assert time.monotonic() - start < 15


def test_a_host_without_scheme_is_refused_before_anything_is_sent(monkeypatch):
    monkeypatch.setenv("NDIF_HOST", "127.0.0.1:5001")
    with pytest.raises(
        RemoteConfigError, match=r"NDIF_HOST '127.0.0.1:5001' has no scheme: write it as http://127.0.0.1:5001"
    ):
        configure()
    assert main(["remote", "status"]) == 2


def test_transport_failures_are_recognised_by_type_not_text():
    host = "http://127.0.0.1:5001"
    request = httpx.Request("POST", f"{host}/request")
    refused = RuntimeError("Failed to send request")
    refused.__cause__ = httpx.ConnectError("[Errno 111]", request=request)
    assert "is unreachable (ConnectError)" in diagnose(refused, host)
    assert "timed out (ReadTimeout)" in diagnose(httpx.ReadTimeout("read", request=request), host)
    assert "is unreachable (WebSocketConnectionClosedException)" in diagnose(
        websocket.WebSocketConnectionClosedException("socket is already closed."), host
    )
    # Words alone are not a transport failure: a server message mentioning "connect".
    assert "unreachable" not in diagnose(RuntimeError("could not connect to the auth database"), host)


def test_time_outs_do_not_advise_a_smaller_batch_size():
    host = "http://127.0.0.1:5001"
    for error in (TimeoutError("timed out"), RuntimeError("Job exceeded the time limit of 3600 s")):
        message = diagnose(error, host)
        assert "batch_size" not in message and "one request" in message and "cells_per_request" in message


def test_status_verifies_the_key_and_compares_versions(fake_ndif, capsys):
    assert main(["remote", "status"]) == 2  # no model deployed on the fake
    out = capsys.readouterr().out
    assert "ok  api key  accepted for someone@example.org" in out and "ok  nnsight  client 0.8.1, server 0.8.1" in out
    fake_ndif.whoami = (403, {"detail": "Invalid API key."})
    main(["remote", "status"])
    out = capsys.readouterr().out
    assert "NO  api key  refused by http://127.0.0.1" in out and "(HTTP 403)" in out and SECRET not in out


def test_status_on_a_server_that_is_not_ndif(fake_ndif, capsys):
    fake_ndif.plain_404 = True
    assert main(["remote", "status"]) == 2
    assert "answered HTTP 404 to /status: it does not look like an NDIF server" in capsys.readouterr().out


def test_nnsight_versions_patch_level_warns_minor_level_fails():
    assert compare_versions("0.8.1", "0.8.1") == (True, "client 0.8.1, server 0.8.1")
    ok, sentence = compare_versions("0.8.1", "0.8.0")
    assert ok and sentence.startswith("warning: client 0.8.1, server 0.8.0 differ in patch level only")
    ok, sentence = compare_versions("0.8.1", "0.9.0")
    assert not ok and "client 0.8.1, server 0.9.0 differ in minor version" in sentence


def test_unreachable_server_is_named(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{port}")
    with pytest.raises(RemoteRunError, match=f"the NDIF server at http://127.0.0.1:{port} is unreachable"):
        remote_run()


def test_status_command_reports_an_unreachable_server(monkeypatch, capsys):
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    assert main(["remote", "status"]) == 2
    captured = capsys.readouterr()
    assert "NO  server" in captured.out and "unreachable" in captured.out
    assert SECRET not in captured.out + captured.err


def test_explain_diagnoses_and_redacts(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    error = explain(RuntimeError(f"Model meta-llama/Llama-3.1-70B is not deployed (key {SECRET})"), "llama")
    assert "the model is not deployed" in str(error) and SECRET not in str(error) and "***" in str(error)
    assert "timed out" in str(explain(TimeoutError("read timed out")))


def test_dotenv_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nexport NDIF_API_KEY='from-file'\nNDIF_HOST=http://127.0.0.1:5001\n")
    assert read_dotenv(dotenv) == {"NDIF_API_KEY": "from-file", "NDIF_HOST": "http://127.0.0.1:5001"}
    monkeypatch.delenv("NDIF_HOST", raising=False)
    monkeypatch.setenv("NDIF_API_KEY", "from-env")
    assert settings(dotenv) == {"NDIF_API_KEY": "from-env", "NDIF_HOST": "http://127.0.0.1:5001"}
