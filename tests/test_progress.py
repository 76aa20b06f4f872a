"""Long commands show progress from their first seconds, and module entry points print the
CLI's one-line errors, not tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from superscopes import inverse, lens
from superscopes import sae as S

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [f"Passage {i} talks about the weather and the number {i * 7} in plain words." for i in range(20)]


class Bars:
    """Records every tqdm bar made and the updates it gets (a stand-in for tqdm.auto.tqdm)."""

    made: list[Bars] = []

    def __init__(self, iterable=None, total=None, **kwargs):
        self.iterable, self.total, self.n, self.updates = iterable, total, kwargs.get("initial", 0), []
        Bars.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            self.updates.append(1)
            yield item

    def update(self, n=1):
        self.n += n
        self.updates.append(n)

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    import tqdm.auto

    Bars.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", Bars)
    return Bars.made


def test_sae_activations_bar_moves_per_batch_not_per_shard(tiny_models, tmp_path, bars):
    """`sae train` sat at 0/800000 until a whole shard of 512 passages was read."""
    model = tiny_models["llama"]
    acts = S.cache_activations(model, "resid_post", 1, TEXTS, 10_000, tmp_path / "a", batch_size=4, require=False)
    assert len(bars[0].updates) == 5  # 20 passages, 4 a batch, one shard
    whole = lens.collect(model, sorted(TEXTS, key=len), "resid_post", [1], "text", 4)[1].half()
    assert torch.equal(acts, whole)  # the same passes, read batch by batch


def test_inverse_reads_with_a_bar_per_batch(tiny_models, bars):
    model = tiny_models["llama"]
    quiet = inverse.collect_pairs(model, TEXTS, "resid_post", 1, max_tokens=8, batch_size=4)
    assert not bars
    shown = inverse.collect_pairs(model, TEXTS, "resid_post", 1, max_tokens=8, batch_size=4, progress=True)
    assert len(bars) == 1 and len(bars[0].updates) == 5
    assert torch.equal(shown.activations, quiet.activations) and shown.inputs == quiet.inputs


def test_inverse_train_says_what_it_does_before_the_first_pass(tmp_path, capsys, monkeypatch):
    import superscopes

    def load(name, **kwargs):
        raise RuntimeError("stopped at load")

    monkeypatch.setattr(superscopes, "load", load)
    with pytest.raises(RuntimeError, match="stopped at load"):
        inverse.main(["train", "--corpus", "patchscopes", "--out", str(tmp_path / "g"), "--layer", "1"])
    assert "inverse train: loading the patchscopes corpus" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["recipes.entity_description", "superscopes.recipes.entity_description"])
def test_recipe_entry_points_print_one_line_errors(module, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", module, "--model", "nobody/no-such-model", "--quick", "--out", str(tmp_path / "o")],
        cwd=ROOT if module.startswith("recipes") else tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("superscopes: error: unknown model 'nobody/no-such-model'")
