"""Every variable of .env.example is honoured from .env, the process environment winning;
secrets from either never appear in the text the toolkit shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from superscopes import env, remote
from superscopes.models import cache_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dotenv(tmp_path, monkeypatch):
    """A working directory whose .env sets every variable; none set in the process."""
    for name in env.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)

    def write(**values: str) -> Path:
        (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        return tmp_path / ".env"

    return write


def test_every_variable_of_the_example_is_a_setting():
    example = set(re.findall(r"^#?\s*([A-Z_]+)=", (ROOT / ".env.example").read_text(), flags=re.M))
    assert example == set(env.ENV_VARS)


def test_superscopes_cache(dotenv, monkeypatch, tmp_path):
    dotenv(SUPERSCOPES_CACHE=str(tmp_path / "from-file"))
    assert cache_dir() == tmp_path / "from-file"
    dotenv(SUPERSCOPES_CACHE="~/weights")
    assert cache_dir() == Path.home() / "weights"  # as .env.example writes it
    monkeypatch.setenv("SUPERSCOPES_CACHE", str(tmp_path / "from-env"))
    assert cache_dir() == tmp_path / "from-env"


def test_hf_token(dotenv, monkeypatch):
    import huggingface_hub

    dotenv(HF_TOKEN="hf_fromfile1234")
    monkeypatch.setenv("HF_TOKEN", "")  # unset (empty), and removed again after the test
    env.export_hf_token()
    assert huggingface_hub.get_token() == "hf_fromfile1234"
    assert remote.redact("token hf_fromfile1234 here") == "token *** here"
    monkeypatch.setenv("HF_TOKEN", "hf_fromenv5678")
    env.export_hf_token()
    assert huggingface_hub.get_token() == "hf_fromenv5678"


def test_load_reads_the_hf_token_from_dotenv(dotenv, monkeypatch):
    """``superscopes.load`` exports .env's token before any hub request."""
    import os

    import superscopes
    from superscopes import models

    dotenv(HF_TOKEN="hf_fromfile1234")
    monkeypatch.setenv("HF_TOKEN", "")
    seen = []
    monkeypatch.setattr(models, "resolve_path", lambda name: seen.append(os.environ.get("HF_TOKEN")) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        superscopes.load("some/repo")
    assert seen == ["hf_fromfile1234"]


@pytest.mark.parametrize(
    ("name", "file_value", "env_value"),
    [
        ("NDIF_HOST", "http://127.0.0.1:5001", "http://127.0.0.1:6001"),
        ("NDIF_API_KEY", "key-from-file", "key-from-env"),
    ],
)
def test_ndif_settings(dotenv, monkeypatch, name, file_value, env_value):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "HOST", CONFIG.API.HOST)
    monkeypatch.setattr(CONFIG.API, "APIKEY", CONFIG.API.APIKEY)
    dotenv(**{name: file_value})
    remote.configure()
    assert (CONFIG.API.HOST if name == "NDIF_HOST" else CONFIG.API.APIKEY) == file_value
    monkeypatch.setenv(name, env_value)
    remote.configure()
    assert (CONFIG.API.HOST if name == "NDIF_HOST" else CONFIG.API.APIKEY) == env_value


def test_unknown_setting_is_named():
    with pytest.raises(KeyError, match="'HF_TOKENN' is not a superscopes setting; the settings are HF_TOKEN"):
        env.value("HF_TOKENN")
