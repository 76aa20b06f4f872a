"""Helpers for testing the app fast: a tiny random Llama and a fake judge (no MiniLM), and a gated
one that holds a run in its chunk in progress for as long as a test needs."""

from __future__ import annotations

import threading
import zlib
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from superscopes.models import Model


def tiny_model(seed: int = 0, name: str = "tiny-llama"):
    """A 2-layer random Llama (d=64) with SmolLM2's tokenizer, as an nnsight model labelled ``name``."""
    import torch
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from superscopes.models import resolve_path

    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
    )
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.config._name_or_path = name  # what results and error messages call it
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("smollm2-135m"))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TransformersModel(hf, tokenizer=tokenizer)


def fake_similarity(frame: pd.DataFrame) -> pd.DataFrame:
    """A deterministic stand-in for the MiniLM judge: a number in [0, 0.6) per row."""
    values = [
        (zlib.crc32(f"{r.site}|{r.layer}|{r.alpha}|{r.position}".encode()) % 600) / 1000
        for r in frame.itertuples(index=False)
    ]
    return frame.assign(similarity=values)


class GatedJudge:
    """A fake judge (``fake_similarity``) that holds each chunk of a source prompt until the
    test opens that prompt's gate: a run stays in its chunk in progress (running, cancellable,
    with other runs queued behind it) as long as a test needs, without sleeps. ``wait(prompt)``
    waits for a chunk of ``prompt`` to reach the judge; ``open(prompt)`` lets its chunks
    through; ``open_all()`` (on teardown) lets every prompt through. A chunk held past
    ``timeout`` seconds fails its run."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.lock = threading.Lock()
        self.gates: dict[str, threading.Event] = {}
        self.arrived: dict[str, threading.Event] = {}
        self.opened = False

    def _event(self, table: dict, prompt: str) -> threading.Event:
        with self.lock:
            event = table.setdefault(prompt, threading.Event())
            if table is self.gates and self.opened:
                event.set()
            return event

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        prompt = str(frame["source"].iloc[0])
        self._event(self.arrived, prompt).set()
        if not self._event(self.gates, prompt).wait(self.timeout):
            raise TimeoutError(f"the test never opened the gate of {prompt!r}")
        return fake_similarity(frame)

    def wait(self, prompt: str, timeout: float = 60.0) -> bool:
        return self._event(self.arrived, prompt).wait(timeout)

    def open(self, prompt: str) -> None:
        self._event(self.gates, prompt).set()

    def open_all(self) -> None:
        with self.lock:
            self.opened = True
            for event in self.gates.values():
                event.set()


def tiny_panels(model: Model, folder, name: str = "tiny-llama", site: str = "resid_post", layer: int = 0) -> tuple:
    """A TopK SAE (128 latents, k=8) and an InverseScope generator (20 steps) for ``model`` at
    ``site``/``layer``, trained in seconds on the built-in fallback sentences and written to
    ``folder/sae`` and ``folder/generator`` (``generator.pt`` beside its ``pairs.pt``, as
    ``superscopes inverse train`` writes them): the two folders."""
    from pathlib import Path

    import torch

    from superscopes import inverse, lens
    from superscopes import sae as S
    from superscopes.corpus import FALLBACK

    folder = Path(folder)
    texts = list(FALLBACK)
    acts = lens.collect(model, texts, site, [layer], "text")[layer]
    sae = S.train_sae(acts, 128, 8, site, layer, model=name, batch_size=128, epochs=5, progress=False)
    _, sae.mean_activation, sae.frequency = S.measure(sae, acts)
    sae.save(folder / "sae")
    pairs = inverse.collect_pairs(model, texts, site, layer, max_tokens=8)
    config = inverse.GeneratorConfig(
        model=name, site=site, layer=layer, steps=20, d_model=32, n_layers=1, n_heads=2, max_tokens=8, held_out=0.0
    )
    generator = inverse.train(pairs, config, progress=False)
    generator.save(folder / "generator" / "generator.pt")
    read = {"model": name, "site": site, "layer": layer, "corpus": "fallback", "texts": len(texts), "max_tokens": 8}
    torch.save(
        {"read": read, "inputs": pairs.inputs, "activations": pairs.activations, "sources": pairs.sources},
        folder / "generator" / "pairs.pt",
    )
    return folder / "sae", folder / "generator"
