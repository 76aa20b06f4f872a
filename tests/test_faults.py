"""Fault injection: hostile pickles, writes cut at every byte, corrupted files, kill -9.

Each test here failed on the code before the fault-proofing round (issue 23) and checks
that nothing is unpickled, lost, mixed or left unreadable. Kills are bounded and on
loopback only; caches are built under ``tmp_path``, never the user's."""

from __future__ import annotations

import ast
import io
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from superscopes.results import ResultStore

from .test_app import make_app, model  # noqa: F401 - fixtures: the tiny app on loopback

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- hostile pickles


class _Planted:
    """Unpickling this creates ``marker``: the harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_every_torch_load_in_the_project_is_weights_only():
    unsafe = []
    for folder in ("superscopes", "recipes", "scripts", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                ):
                    flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_a_planted_sae_checkpoint_runs_no_code(tmp_path):
    from superscopes.files import UnsafeFileError
    from superscopes.sae import train_sae

    marker, checkpoint = tmp_path / "pwned", tmp_path / "checkpoint.pt"
    torch.save({"settings": _Planted(marker)}, checkpoint)
    with pytest.raises(UnsafeFileError) as caught:
        train_sae(
            torch.randn(64, 8),
            latents=16,
            k=2,
            site="resid_post",
            layer=0,
            batch_size=16,
            checkpoint=checkpoint,
            progress=False,
        )
    assert not marker.exists()
    message = str(caught.value)
    assert str(checkpoint) in message and "\n" not in message and "weights_only=False" not in message


def test_a_real_sae_checkpoint_still_resumes(tmp_path):
    from superscopes.sae import train_sae

    acts, checkpoint = torch.randn(64, 8), tmp_path / "checkpoint.pt"
    settings = dict(latents=16, k=2, site="resid_post", layer=0, batch_size=16, progress=False)
    whole = train_sae(acts, epochs=2, **settings)
    train_sae(acts, epochs=1, checkpoint=checkpoint, checkpoint_every=1, **settings)
    state = torch.load(checkpoint, weights_only=True)  # resume a run cut after its first epoch
    state["settings"]["epochs"] = 2
    torch.save(state, checkpoint)
    resumed = train_sae(acts, epochs=2, checkpoint=checkpoint, **settings)
    assert torch.allclose(resumed.W_dec, whole.W_dec, atol=1e-6)


@pytest.mark.parametrize("damage", ["nan", "torn", "cfg"])
def test_an_sae_folder_with_bad_weights_or_cfg_is_refused_naming_the_file(tmp_path, damage):
    from superscopes.sae import SAE, SAEError, load_folder

    sae = SAE(
        torch.randn(8, 16), torch.zeros(16), torch.randn(16, 8), torch.zeros(8), "standard", site="resid_post", layer=0
    )
    folder = sae.save(tmp_path / "sae")
    if damage == "nan":
        sae.W_dec[3, 2] = float("inf")
        sae.b_enc[0] = float("nan")
        folder = sae.save(tmp_path / "sae")
        file, message = "sae_weights.safetensors", r"W_dec has 1 NaN or inf value\(s\)"
    elif damage == "torn":
        weights = folder / "sae_weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        file, message = "sae_weights.safetensors", "cannot be read as safetensors"
    else:
        (folder / "cfg.json").write_text("{not json")
        file, message = "cfg.json", "cannot be read as JSON"
    with pytest.raises(SAEError, match=message) as caught:
        load_folder(folder)
    assert str(folder / file) in str(caught.value)


def test_a_planted_generator_or_corpus_file_runs_no_code(tmp_path):
    from superscopes.files import UnsafeFileError
    from superscopes.inverse import Generator

    marker = tmp_path / "pwned"
    torch.save({"config": _Planted(marker)}, tmp_path / "generator.pt")
    with pytest.raises(UnsafeFileError, match=str(tmp_path / "generator.pt")):
        Generator.load(tmp_path / "generator.pt")
    assert not marker.exists()


# ---------------------------------------------------------------- result store

SETTINGS = {"model": "smollm2-135m", "alphas": [1, 3], "seed": 0}


def _units() -> list[pd.DataFrame]:
    """Three units with what breaks naive CSV writers: quoted newlines and commas, lists, a list column
    that one unit lacks."""
    return [
        pd.DataFrame(
            {
                "source": ["Diana"] * 2,
                "alpha": [1, 3],
                "output": ['a "b",\nc', ""],
                "output_ids": [[1, 2], []],
                "output_probs": [[0.5, 0.25], []],
            }
        ),
        pd.DataFrame({"source": ["Wales"] * 2, "alpha": [1, 3], "output": ["x\n", "1135"], "output_ids": [[3], [4]]}),
        pd.DataFrame(
            {"source": ["Paris"], "alpha": [1], "output": [",\n,"], "output_ids": [[5]], "output_probs": [[1.0]]}
        ),
    ]


def _resume(path: Path) -> None:
    """Open the store as a rerun does and append the units it has not done."""
    store = ResultStore(path, ["source"], settings=SETTINGS)
    done = store.done()
    for unit in _units():
        if store.key([unit["source"][0]]) not in done:
            store.append(unit)


def _finish(path: Path) -> pd.DataFrame:
    """``_resume``, then the table as a new process reads it."""
    _resume(path)
    return ResultStore(path, ["source"], settings=SETTINGS).load()


@pytest.fixture
def whole_store(tmp_path) -> tuple[Path, pd.DataFrame, dict[str, bytes]]:
    path = tmp_path / "whole" / "cells.csv"
    table = _finish(path)
    files = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    return path, table, files


def test_a_list_column_one_unit_lacks_is_appended(whole_store):
    _, table, _ = whole_store
    assert table["output_probs"].tolist()[:2] == [[0.5, 0.25], []] and table["output_probs"][2:4].isna().all()
    assert table["output_ids"].tolist() == [[1, 2], [], [3], [4], [5]]
    assert table["output"].tolist() == ['a "b",\nc', "", "x\n", "1135", ",\n,"]


@pytest.fixture
def scratch(tmp_path) -> Path:
    """A folder in memory (tmpfs) where there is one: thousands of small writes cost little there."""
    memory = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=memory if memory.is_dir() and os.access(memory, os.W_OK) else tmp_path))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _cut_files(folder: Path, files: dict[str, bytes], name: str, offset: int) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for file, data in files.items():
        (folder / file).write_bytes(data[:offset] if file == name else data)
    return folder / "cells.csv"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_csv_cut_at_every_byte_is_rebuilt_whole(whole_store, scratch, monkeypatch):
    """A write of the CSV cut anywhere (the journal intact): reopened, every file is byte for byte
    the uninterrupted store's."""
    _, _, files = whole_store
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # cuts are simulated here; syncing the disk only adds time
    for offset in range(len(files["cells.csv"]) + 1):
        _resume(_cut_files(scratch / "cut", files, "cells.csv", offset))
        assert _files(scratch / "cut") == files, offset
    assert offset > 150  # a table of some size, cut at every offset


def test_the_journal_cut_at_every_byte_resumes_to_the_uninterrupted_table(whole_store, scratch, monkeypatch):
    """A write of the journal cut anywhere: reopened, the store is byte for byte the one cut at the
    end of its last whole record (the unit being written is lost, nothing else), and that one
    resumes to the uninterrupted store. (Resuming at every offset as well would only append the
    same units to the same files.)"""
    _, _, files = whole_store
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    journal = files["cells.csv.journal"]
    ends = [0] + [i + 1 for i, byte in enumerate(journal) if byte == ord("\n")]
    assert len(ends) == 4  # three units
    reopened = {}
    for end in ends:  # a cut between records: what a reopen makes of it, and that it resumes
        ResultStore(_cut_files(scratch / "cut", files, "cells.csv.journal", end), ["source"], settings=SETTINGS)
        reopened[end] = _files(scratch / "cut")
        _resume(scratch / "cut" / "cells.csv")
        assert _files(scratch / "cut") == files, end
    for offset in range(len(journal) + 1):
        store = ResultStore(
            _cut_files(scratch / "cut", files, "cells.csv.journal", offset), ["source"], settings=SETTINGS
        )
        last = max(end for end in ends if end <= offset)
        assert _files(scratch / "cut") == reopened[last], offset
        assert len(store.done()) == ends.index(last)
    assert offset > 500


def test_a_kill_before_the_record_is_written_loses_no_column_type(tmp_path):
    path = tmp_path / "cells.csv"
    store = ResultStore(path, ["source"], settings=SETTINGS)
    store.append(_units()[0])
    meta = (tmp_path / "cells.csv.meta.json").read_bytes()
    store.append(_units()[1].assign(answer=["12", "7"], success=[True, False]))
    (tmp_path / "cells.csv.meta.json").write_bytes(meta)  # killed after the journal and CSV, before the record
    table = ResultStore(path, ["source"], settings=SETTINGS).load()
    assert table["answer"].tolist()[2:] == ["12", "7"] and table["success"].tolist()[2:] == [True, False]
    assert ResultStore(path, ["source"], settings=SETTINGS).done() == {("Diana",), ("Wales",)}


def test_a_table_cut_to_nothing_still_refuses_other_settings(whole_store):
    from superscopes.results import SettingsMismatchError

    path, _, _ = whole_store
    path.write_bytes(b"")
    with pytest.raises(SettingsMismatchError, match="seed: on disk 0, now 1"):
        ResultStore(path, ["source"], settings={**SETTINGS, "seed": 1})


def test_a_corrupt_journal_line_loses_only_its_unit(whole_store, tmp_path):
    path, table, files = whole_store
    journal = bytearray(files["cells.csv.journal"])
    second = journal.index(b"\n") + 1
    journal[second + 80] ^= 0x01  # one flipped bit inside the second unit's record
    (path.parent / "cells.csv.journal").write_bytes(bytes(journal))
    assert ResultStore(path, ["source"], settings=SETTINGS).done() == {("Diana",), ("Paris",)}
    pd.testing.assert_frame_equal(
        _finish(path).sort_values("source", ignore_index=True), table.sort_values("source", ignore_index=True)
    )


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_corrupt_meta_file_is_named(whole_store, data):
    from superscopes.results import StoreReadError

    path, _, _ = whole_store
    meta = path.parent / "cells.csv.meta.json"
    meta.write_bytes(data)
    for open_it in (lambda: ResultStore(path, ["source"], settings=SETTINGS), lambda: ResultStore.read(path)):
        with pytest.raises(StoreReadError, match=str(meta)):
            open_it()


def test_a_committed_store_without_journal_resumes(whole_store):
    """``results/`` commits the CSV and its record, not the journal."""
    path, table, files = whole_store
    (path.parent / "cells.csv.journal").unlink()
    pd.testing.assert_frame_equal(_finish(path), table)
    assert path.read_bytes() == files["cells.csv"]
    assert os.path.exists(path.parent / "cells.csv.journal")


# ---------------------------------------------------------------- model cache


from .test_models import fake_cache  # noqa: E402,F401  (the fixture: a tiny Llama cached as "smollm2-135m")


def _overwrite_keeping_size_and_mtime(path: Path) -> None:
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(stat.st_size // 2)
        f.write(bytes(64))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_corruption_that_keeps_size_and_mtime_does_not_load(fake_cache):
    from superscopes import models

    models.verify_cache("smollm2-135m")  # verified once: its stamp is on disk
    _overwrite_keeping_size_and_mtime(fake_cache / "model.safetensors")
    with pytest.raises(models.CorruptCacheError, match="model.safetensors does not match its sha256"):
        models.resolve_path("smollm2-135m")
    assert models.cache_state("smollm2-135m") == "corrupt"


@pytest.mark.parametrize("damage", ["delete", "empty", "drop weights"])
def test_a_missing_or_damaged_manifest_is_refused_not_rebuilt(fake_cache, damage):
    import json

    from superscopes import models

    manifest = fake_cache / models.MANIFEST
    _overwrite_keeping_size_and_mtime(fake_cache / "model.safetensors")
    if damage == "delete":
        manifest.unlink()
    elif damage == "empty":
        manifest.write_text("")
    else:  # a manifest that no longer vouches for the weights
        manifest.write_text(
            json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "model.safetensors"})
        )
    with pytest.raises(models.CorruptCacheError, match=r"refetch smollm2-135m"):
        models.resolve_path("smollm2-135m")
    assert damage != "delete" or not manifest.exists()  # not re-recorded from the corrupt files


# ---------------------------------------------------------------- bounds


def _layer_options(parser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings if "layers" in flag]


def test_a_huge_layer_range_is_an_error_before_it_is_expanded(capsys):
    import importlib
    import tracemalloc

    from recipes import RECIPES
    from superscopes.cli import build_parser

    parsers = [("superscopes scope", build_parser(), ["scope", "Diana"])]
    for name in RECIPES:
        parsers.append((name, importlib.import_module(f"recipes.{name}").build_parser(), []))
    checked = 0
    tracemalloc.start()
    try:
        for name, parser, words in parsers:
            for option in _layer_options(parser) if words == [] else ["--layers"]:
                with pytest.raises(SystemExit):
                    parser.parse_args([*words, option, "1-1000000000"])
                error = capsys.readouterr().err
                assert "'1-1000000000': layer 1000 is out of range: layers run 0-999" in error, (name, option, error)
                checked += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000 and checked >= 6  # nothing was expanded, and every recipe with --layers was tried


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from .conftest import build_tiny

    return build_tiny("llama", tokenizer)


@pytest.mark.parametrize("share_prefix", [True, False])  # the shared-prefix graph and the plain one
@pytest.mark.parametrize("output", ["topk", "generate"])
def test_an_alpha_that_overflows_the_norm_is_refused_not_read_as_uniform(tiny_llama, share_prefix, output, monkeypatch):
    """Alphas from 1e18 to the dtype's bound once gave uniform probabilities and '<|endoftext|>'."""
    from superscopes import Scope, ScopeError, graph, run

    patched = []
    monkeypatch.setattr(graph, "_execute_patches", lambda *a, **k: patched.append(1))
    grid = dict(
        prompts=["Diana, Princess of Wales"],
        sites=["resid_post"],
        layers=[0],
        output=output,
        top_k=3,
        max_new_tokens=2,
        share_prefix=share_prefix,
    )
    with pytest.raises(ScopeError, match=r"alpha 1e\+25 times the read vectors .* normalisation overflows"):
        run(tiny_llama, Scope(alphas=[1, 1e25], **grid), progress=False)
    assert not patched  # refused after the read pass, before any patched pass


@pytest.mark.parametrize("how", ["remote", "grid"])
def test_an_overflowing_alpha_is_refused_where_the_client_cannot_watch_the_passes(tiny_llama, how):
    """On NDIF (here remote="local") and in a Grid run inside the user's session the read vectors
    never reach the client before the patches: their largest entry and norm come back with the
    outputs, and no cell is reported."""
    from superscopes import Grid, Scope, ScopeError, run

    scope = Scope(
        prompts=["Diana, Princess of Wales"],
        sites=["resid_post"],
        layers=[0],
        alphas=[1, 1e25],
        output="generate",
        max_new_tokens=2,
    )
    with pytest.raises(ScopeError, match=r"alpha 1e\+25 times the read vectors .* normalisation overflows"):
        if how == "remote":
            run(tiny_llama, scope, remote="local", progress=False)
        else:
            grid = Grid(tiny_llama, scope)
            with tiny_llama.session():
                outputs = grid.run()
            grid.frame(outputs)


def test_a_nan_readout_is_refused_not_reported(tokenizer):
    from superscopes import Scope, ScopeError, run

    from .conftest import build_tiny

    model = build_tiny("llama", tokenizer, seed=1)
    with torch.no_grad():
        model._module.model.norm.weight[0] = float("nan")  # a NaN activation in every pass
    with pytest.raises(ScopeError, match="non-finite next-token probabilities"):
        run(
            model, Scope(prompts=["Diana"], sites=["resid_post"], layers=[0], alphas=[1], output="topk"), progress=False
        )


# ---------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(token=5), r"token 5 must be text"),
        (dict(position=1.5), r"position 1.5 must be a whole number"),
        (dict(batch_size=None), r"batch_size None must be a whole number, at least 1"),
        (dict(batch_size="8"), r"batch_size '8' must be a whole number, at least 1"),
        (dict(batch_size=1.5), r"batch_size 1.5 must be a whole number, at least 1"),
        (dict(seed="a"), r"seed 'a' must be a whole number, or None"),
        (dict(alphas=[1, torch.tensor(2.0)]), r"alpha tensor\(2.\) is a tensor; give plain numbers"),
        (dict(prompts=[1, 2]), r"prompt 0 is 1 \(int\); prompts are text"),
        (dict(samples=0), r"samples 0 must be a whole number, at least 1"),
        (dict(prompts=["Diana \ud800"]), r"prompt 0 'Diana \\ud800' has a character that is not valid text"),
    ],
)
def test_a_setting_of_the_wrong_type_is_named_before_any_forward_pass(tiny_llama, settings, message, monkeypatch):
    from superscopes import Scope, ScopeError, graph, run

    monkeypatch.setattr(graph, "_execute_reads", lambda *a, **k: pytest.fail("a forward pass ran"))
    grid = dict(prompts=["Diana, Princess of Wales"], sites=["resid_post"], layers=[0], alphas=[1], output="topk")
    with pytest.raises(ScopeError, match=message):
        run(tiny_llama, Scope(**{**grid, **settings}), progress=False)


def test_a_prompt_that_is_not_text_or_a_list_is_named():
    from superscopes import Scope, ScopeError

    with pytest.raises(ScopeError, match="prompts 123 must be a prompt"):
        Scope(123)


@pytest.mark.parametrize(
    "status,row",
    [
        (401, "NO  api key  refused by http://127.0.0.1:{port} (HTTP 401 to /status)"),
        (403, "NO  api key  refused by http://127.0.0.1:{port} (HTTP 403 to /status)"),
        (503, "NO  server   http://127.0.0.1:{port} is up but unavailable now (HTTP 503 to /status"),
    ],
)
def test_remote_status_tells_a_refused_key_and_an_unavailable_server_from_a_wrong_host(
    status, row, monkeypatch, capsys
):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from superscopes.cli import main

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("NDIF_API_KEY", "ndif-key-not-shown-0123456789")
    try:
        assert main(["remote", "status"]) == 2
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert row.format(port=server.server_port) in out and "not look like an NDIF server" not in out
    assert "ndif-key-not-shown" not in out


# ---------------------------------------------------------------- the explorer


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_chunked_body_is_refused_and_never_parsed_as_a_second_request(make_app, method):
    import socket

    _, base = make_app()
    port = int(base.rsplit(":", 1)[1])
    smuggled = b"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    head = (
        f"{method} /api/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head + body)
        replies = b""
        while chunk := connection.recv(65536):  # the server closes the connection after its one reply
            replies += chunk
    assert replies.startswith(b"HTTP/1.0 411") or replies.startswith(b"HTTP/1.1 411"), replies[:80]
    assert replies.count(b"HTTP/1.") == 1 and b"Content-Length, not chunked" in replies


def _held_lock(path: Path):
    """Another process holding the run store's write lock until it is killed."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_store_locked_by_another_process_blocks_no_request_and_keeps_the_run(make_app, tmp_path):
    import time

    from superscopes.app.store import RunStore

    from .test_app import Client

    path = tmp_path / "runs.sqlite"
    app, base = make_app(store=RunStore(path))
    client = Client(base, app)
    _, first = client.run(tokens="last", layers="0", alphas="1")
    client.wait(first["job"])
    holder = _held_lock(path)
    try:
        started = time.perf_counter()
        status, job = client.run(tokens="last")
        assert status == 202 and time.perf_counter() - started < 3  # not the 10 s lock timeout
        finished = client.wait(job["job"])
        assert finished["status"] == "done"
        for page in ("/api/runs?limit=5", f"/api/jobs/{first['job']}", f"/api/jobs/{job['job']}"):
            assert client.json("GET", page)[0] == 200, page  # history and permalinks while it is locked
        assert client.request("GET", f"/api/jobs/{job['job']}/csv")[0] == 200
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 20  # the writer retries until the lock is gone
    while (RunStore(path).state(job["job"]) or {}).get("status") != "done":
        assert time.time() < deadline, "the run finished while the store was locked was never kept"
        time.sleep(0.1)
    assert RunStore(path).state(job["job"])["rows"] == finished["rows"]


@pytest.mark.parametrize("damage", [b"", b"not a database" * 100, b"SQLite format 3\x00" + bytes(4000)])
def test_a_corrupt_run_store_is_moved_aside_with_a_message(make_app, tmp_path, capfd, damage):
    from superscopes.app.store import RunStore, Snapshot

    from .test_app import Client

    path = tmp_path / "runs.sqlite"
    RunStore(path).save(
        "0123456789ab", Snapshot(1.0, "done", {"prompt": "p"}, {"prompt": "p", "rows": [], "controls": []})
    )
    path.write_bytes(damage + path.read_bytes()[len(damage) : len(damage) + 100] if damage else b"\xff" * 5000)
    store = RunStore(path)
    message = capfd.readouterr().err
    assert store.moved_aside is not None and store.moved_aside.exists()
    assert str(path) in message and str(store.moved_aside) in message
    app, base = make_app(store=store)
    client = Client(base, app)
    assert client.json("GET", "/api/runs?limit=5") == (200, {"runs": []})
    status, job = client.run(tokens="last", layers="0", alphas="1")
    assert client.wait(job["job"])["status"] == "done"


def test_a_run_store_cut_at_many_offsets_opens_whole_or_moved_aside(tmp_path, scratch):
    """The database file cut at every 16th byte (and its first and last page at every byte):
    each opens, with the kept run whole or the file moved aside, never a read error."""
    import sqlite3
    from contextlib import closing

    from superscopes.app.store import RunStore, Snapshot

    whole = tmp_path / "whole.sqlite"
    state = {
        "prompt": "Diana",
        "rows": [{"output": f"row {i}", "similarity": i / 10} for i in range(30)],
        "controls": [],
    }
    RunStore(whole).save("0123456789ab", Snapshot(1.0, "done", {"prompt": "Diana"}, state, b"csv,rows\n"))
    with closing(sqlite3.connect(whole)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
    data = whole.read_bytes()
    offsets = sorted({*range(0, len(data), 16), *range(0, 512), *range(len(data) - 512, len(data))})
    folder = scratch  # SQLite's fsyncs cost nothing there
    cut, outcomes = folder / "cut.sqlite", Counter()
    for offset in offsets:
        for leftover in folder.glob("cut.sqlite*"):
            leftover.unlink()
        cut.write_bytes(data[:offset])
        store = RunStore(cut)
        kept = store.state("0123456789ab")  # raises nothing
        assert kept in (state, None), offset  # whole, or gone: never a torn state
        outcomes["whole" if kept else "moved aside" if store.moved_aside else "started empty"] += 1
        assert store.recent(5) in ([], [{"id": "0123456789ab", "created": 1.0, "status": "done", "prompt": "Diana"}])
        store.save("ba9876543210", Snapshot(2.0, "done", {}, {"rows": []}))  # and it takes new runs
    assert len(offsets) > 500 and outcomes["moved aside"] > 0, outcomes


# ---------------------------------------------------------------- kill -9

_SERVE = """
import sys, time
from superscopes.app import make_server
from superscopes.app.server import App
from superscopes.app.store import RunStore
from superscopes.app.testing import fake_similarity, tiny_model

def judge(frame):  # a slow judge: the run is still going when it is killed
    time.sleep(0.3)
    return fake_similarity(frame)

app = App(default_model="tiny-llama", models={"tiny-llama": tiny_model()}, offer_embedded=False, judge=judge,
          store=RunStore(sys.argv[1]), chunk_rows=2)
server = make_server(app, "127.0.0.1", 0)
print(server.url, flush=True)
server.serve_forever()
"""


def test_the_explorer_killed_mid_job_reopens_the_run_as_interrupted_with_every_kept_cell(make_app, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from superscopes.app.store import RunStore

    from .test_app import Client

    path = tmp_path / "runs.sqlite"
    server = subprocess.Popen([sys.executable, "-c", _SERVE, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        base = server.stdout.readline().strip().rstrip("/")
        assert base.startswith("http://127.0.0.1:"), base
        body = {
            "client": "test",
            "model": "tiny-llama",
            "prompt": "Diana, Princess of Wales",
            "tokens": "last",
            "layers": "0-1",
            "alphas": "1,3,6",
            "max_new_tokens": 2,
            "controls": False,
        }
        request = urllib.request.Request(
            base + "/api/run", json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            job = json.loads(response.read())["job"]
        deadline, kept = time.time() + 60, []
        while len(kept) < 4:  # two chunks of two rows are on disk
            assert time.time() < deadline and server.poll() is None, "no chunk was kept"
            time.sleep(0.1)
            kept = (RunStore(path).state(job) or {}).get("rows", [])
        server.send_signal(signal.SIGKILL)  # mid-job: the grid has 3 alphas x 3 sites x 2 layers = 18 cells
        server.wait(10)
    finally:
        server.kill()
        server.wait()
    reopened = RunStore(path).state(job)
    assert reopened["status"] == "interrupted" and 4 <= len(reopened["rows"]) < 18
    assert reopened["rows"][: len(kept)] == kept  # every cell seen kept is still there, unchanged
    app, base = make_app(store=RunStore(path))  # the restarted explorer
    client = Client(base, app)
    status, state = client.json("GET", f"/api/jobs/{job}?since=0")
    assert status == 200 and state["status"] == "interrupted" and state["rows"] == reopened["rows"]
    status, history = client.json("GET", "/api/runs?limit=5")
    assert [(r["id"], r["status"]) for r in history["runs"]] == [(job, "interrupted")]
    status, _, csv = client.request("GET", f"/api/jobs/{job}/csv")
    assert status == 200 and len(pd.read_csv(io.BytesIO(csv))) == len(reopened["rows"])


def _unit(i: int) -> pd.DataFrame:
    """What a recipe's unit holds: quoted newlines, commas, lists, a list column some units lack."""
    frame = pd.DataFrame(
        {
            "source": [f"prompt {i}"] * 3,
            "alpha": [1, 3, 6],
            "output": [f"a,\n{i}", '"q"', ""],
            "output_ids": [[i, 1], [], [2]],
        }
    )
    return frame.assign(output_probs=[[0.5], [0.25], []]) if i % 2 else frame


def _append_units(path: Path, started=None, pace: float = 0.0) -> None:
    """A recipe's loop: open the store, skip the finished units, append the others (``pace``
    seconds of "compute" before each, so that a kill lands mid-run on a fast machine too)."""
    import time

    store = ResultStore(path, ["source"], settings={"recipe": "fake", "units": 40})
    done = store.done()
    if started is not None:
        started.set()
    for i in range(40):
        if store.key([f"prompt {i}"]) not in done:
            time.sleep(pace)
            store.append(_unit(i))


def test_a_recipe_killed_at_random_moments_resumes_to_the_uninterrupted_table(tmp_path):
    """Six SIGKILLs of a process appending units as a recipe does, then a run to the end. Forked,
    so that each child starts at once (a fresh interpreter spends seconds importing torch)."""
    import multiprocessing
    import random
    import signal
    import time

    reference = tmp_path / "reference" / "cells.csv"
    _append_units(reference)
    fork = multiprocessing.get_context("fork")
    rng, path, killed = random.Random(0), tmp_path / "killed" / "cells.csv", 0
    for _ in range(6):
        started = fork.Event()
        child = fork.Process(target=_append_units, args=(path, started, 0.02))  # at most ~10 units a child
        child.start()
        assert started.wait(30)
        time.sleep(rng.uniform(0.0, 0.2))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            killed += 1
        child.join(30)
    _append_units(path)
    assert killed >= 4  # most kills landed mid-run
    expected = ResultStore.read(reference)
    pd.testing.assert_frame_equal(ResultStore.read(path), expected)
    assert path.read_bytes() == reference.read_bytes() and len(expected) == 3 * 40
