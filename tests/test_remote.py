"""Remote configuration and failures: clear errors, and the API key never shown.

A fake NDIF on 127.0.0.1 answers like a real one would refuse; the real server tier
(tests marked ndif, `make test-remote`) covers successful remote runs."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import superscopes
from superscopes import Scope
from superscopes.cli import main
from superscopes.remote import RemoteRunError, explain, read_dotenv, settings

SECRET = "ndif-secret-key-0123456789"


class FakeNDIF(BaseHTTPRequestHandler):
    status, detail = 401, "Invalid API key."

    def _answer(self) -> None:
        body = json.dumps({"detail": self.detail}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_ndif(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeNDIF)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    yield FakeNDIF
    server.shutdown()
    server.server_close()


def remote_run():
    model = superscopes.load("smollm2-135m", remote=True)
    return superscopes.run(model, Scope("Diana", layers=[1], alphas=[1], output="topk"), remote=True, progress=False)


@pytest.mark.parametrize(
    "status,detail,advice",
    [
        (401, "Invalid API key.", "NDIF refused the API key"),
        (500, "RuntimeError: CUDA out of memory on the server", "the server raised an exception"),
    ],
)
def test_refusals_become_clear_errors_without_the_key(fake_ndif, status, detail, advice):
    fake_ndif.status, fake_ndif.detail = status, detail
    with pytest.raises(RemoteRunError) as caught:
        remote_run()
    message = str(caught.value)
    assert advice in message and str(status) in message
    assert SECRET not in message


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
