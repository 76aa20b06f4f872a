"""The InverseScope generator (superscopes.inverse): it recovers inputs when the activation
determines them, samples reproducibly, saves, resumes, and its FCR and distance are hand-checkable."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from superscopes import inverse
from superscopes.inverse import Generator, GeneratorConfig, Pairs

TOY = dict(d_model=64, n_layers=2, n_heads=4, n_prefix=2, noise=0.1, batch_size=32, lr=3e-3, held_out=0.0, max_tokens=8)


def toy_pairs(n: int = 24, d: int = 16, seed: int = 0) -> Pairs:
    """A corpus where the activation determines the input: n distinct random token sequences,
    each with its own random activation."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    while len(inputs) < n:
        x = torch.randint(100, 300, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        if x not in inputs:
            inputs.append(x)
    return Pairs(inputs, torch.randn(n, d, generator=g) * 3 + 1, list(range(n)))


@pytest.fixture(scope="module")
def toy():
    pairs = toy_pairs()
    return pairs, inverse.train(pairs, GeneratorConfig(steps=300, **TOY), progress=False)


def recovered(generator: Generator, z: torch.Tensor, inputs: list[list[int]], k: int = 4) -> float:
    samples = generator.sample(z, k=k, seed=1)
    return sum(x == inputs[i] for i, row in enumerate(samples) for x in row) / (k * len(inputs))


def test_generator_recovers_inputs_the_activation_determines(toy):
    pairs, generator = toy
    assert recovered(generator, pairs.activations, pairs.inputs) >= 0.8
    # It reads z: with the activations shuffled, the samples follow the activations, not the order.
    order = torch.randperm(len(pairs.inputs), generator=torch.Generator().manual_seed(3))
    assert recovered(generator, pairs.activations[order], [pairs.inputs[i] for i in order]) >= 0.8
    history = generator.history[-1]
    assert history["step"] == 300 and history["train_loss"] < 0.2 and history["seconds_per_step"] > 0


def test_sampling_is_seeded(toy):
    _, generator = toy
    z = torch.randn(5, 16) * 20  # far from every training activation: samples vary
    a, b = generator.sample(z, k=6, seed=7), generator.sample(z, k=6, seed=7)
    assert a == b
    assert generator.sample(z, k=6, seed=8) != a
    assert all(1 <= len(x) <= TOY["max_tokens"] for row in a for x in row)
    assert generator.sample(z, k=6, seed=7, batch_size=4) == generator.sample(z, k=6, seed=7, batch_size=4)


def test_save_load_round_trip(toy, tmp_path):
    pairs, generator = toy
    loaded = Generator.load(generator.save(tmp_path / "g.pt"))
    assert loaded.config == generator.config and torch.equal(loaded.vocab, generator.vocab)
    assert loaded.history == generator.history
    for (name, a), (_, b) in zip(generator.net.state_dict().items(), loaded.net.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.sample(pairs.activations, k=3, seed=2) == generator.sample(pairs.activations, k=3, seed=2)
    with pytest.raises(FileNotFoundError, match="no generator at"):
        Generator.load(tmp_path / "missing.pt")


def test_resumed_training_matches_uninterrupted(tmp_path):
    pairs = toy_pairs(n=12)
    config = GeneratorConfig(steps=30, **{**TOY, "held_out": 0.25})
    whole = inverse.train(pairs, config, tmp_path / "whole", eval_every=10, checkpoint_every=10, progress=False)
    inverse.train(pairs, config, tmp_path / "part", eval_every=10, checkpoint_every=10, progress=False, stop_after=20)
    assert not (tmp_path / "part" / "generator.pt").exists()  # stopped early: only the checkpoint
    resumed = inverse.train(pairs, config, tmp_path / "part", eval_every=10, checkpoint_every=10, progress=False)
    for (name, a), (_, b) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert [h["step"] for h in resumed.history] == [10, 20, 30]
    assert all("held_out_loss" in h for h in resumed.history)
    assert (tmp_path / "part" / "generator.pt").exists()
    # A checkpoint of another configuration is refused, naming what differs.
    other = GeneratorConfig(steps=30, **{**TOY, "held_out": 0.25, "noise": 0.3})
    with pytest.raises(ValueError, match="noise"):
        inverse.train(pairs, other, tmp_path / "part", progress=False)


def test_held_out_split_is_by_text():
    train_rows, held_rows = inverse.split_sources([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], 0.4, seed=0)
    sources = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(held_rows) == 4 and not {sources[i] for i in train_rows} & {sources[i] for i in held_rows}


def test_config_and_inputs_are_checked():
    with pytest.raises(ValueError, match="n_heads"):
        GeneratorConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="steps=0"):
        GeneratorConfig(steps=0)
    with pytest.raises(ValueError, match="one of each"):
        Pairs([[1, 2]], torch.zeros(2, 4), [0])


def test_wrong_activation_width_is_refused(toy):
    _, generator = toy
    with pytest.raises(ValueError, match=r"need \[n, 16\]"):
        generator.sample(torch.zeros(2, 15))


def test_fcr_equals_a_hand_count():
    # 3 of 4 samples share the original's feature.
    assert inverse.fcr("France", ["France", "Spain", "France", "France"]) == 0.75
    assert inverse.fcr(True, [False, False]) == 0.0
    with pytest.raises(ValueError):
        inverse.fcr(True, [])
    cells = pd.DataFrame(
        {
            "query": ["a", "b", "c", "a", "b", "c"],
            "hypothesis": "h",
            "layer": 3,
            "sampler": ["generator"] * 3 + ["random"] * 3,
            "consistency": [1.0, 0.5, 0.75, 0.25, 0.0, 0.25],
        }
    )
    table = inverse.fcr_table(cells).set_index("sampler")
    assert table.loc["generator", "consistency"] == pytest.approx(0.75)  # (1 + 0.5 + 0.75) / 3
    assert table.loc["random", "consistency"] == pytest.approx(0.5 / 3)
    assert table.loc["generator", "ci_low"] <= 0.75 <= table.loc["generator", "ci_high"]
    assert (table["n"] == 3).all()
    diff = inverse.compare_samplers(cells, others=("random",)).iloc[0]
    assert diff["difference"] == pytest.approx(0.75 - 0.5 / 3) and diff["n_prompts"] == 3
    assert diff["p"] == pytest.approx(0.25)  # all 3 differences positive: 2 of 8 sign patterns as extreme
    assert diff["p_holm"] == pytest.approx(0.25)


def _fcr_cells(near0, near5, random0) -> pd.DataFrame:
    """One hypothesis "h" over 20 queries: nearest at layers 0 and 5, random at layer 0."""
    rows = []
    for sampler, layer, values in (("nearest", 0, near0), ("nearest", 5, near5), ("random", 0, random0)):
        rows += [
            {"query": f"q{i}", "hypothesis": "h", "layer": layer, "sampler": sampler, "consistency": v}
            for i, v in enumerate(values)
        ]
    return pd.DataFrame(rows)


def test_lexical_labels_call_a_hypothesis_at_its_level_at_layer_0_lexical():
    # At 0.9 at layer 0 and 0.9 at layer 5, far above random: the embedding carries it.
    label = inverse.lexical_labels(_fcr_cells([0.9] * 20, [0.9] * 20, [0.1] * 20)).iloc[0]
    assert label["label"] == "lexical" and label["fcr_layer0"] == pytest.approx(0.9)
    # 0.1 -> 0.8 on every query: it rises, and the difference is the hand-computed 0.7.
    rises = inverse.lexical_labels(_fcr_cells([0.1] * 20, [0.8] * 20, [0.1] * 20)).iloc[0]
    assert rises["label"] == "rises" and rises["best_layer"] == 5 and rises["difference"] == pytest.approx(0.7)
    assert rises["ci_low"] == pytest.approx(0.7) and rises["ci_high"] == pytest.approx(0.7)
    # A rise that is consistent (+0.03 on every query) but small: layer 0 (0.87) lies inside the best
    # layer's interval (mean 0.9, about [0.86, 0.94] over 20 queries), so it is still lexical.
    noisy = [0.8, 1.0] * 10
    small = inverse.lexical_labels(_fcr_cells([v - 0.03 for v in noisy], noisy, [0.0] * 20)).iloc[0]
    assert small["ci_low"] == pytest.approx(0.03) and small["best_ci_low"] < 0.87 and small["label"] == "lexical"
    # Significant and outside the best layer's interval, but layer 0 already has 0.90 / 0.94 of the
    # lift over random (0.93 -> 0.97, random 0.03): lexical; from 0.5 it rises.
    almost = inverse.lexical_labels(_fcr_cells([0.93] * 20, [0.97] * 20, [0.03] * 20)).iloc[0]
    assert almost["ci_low"] == pytest.approx(0.04) and almost["best_ci_low"] > 0.93
    assert almost["share_at_layer0"] == pytest.approx(0.90 / 0.94) and almost["label"] == "lexical"
    assert inverse.lexical_labels(_fcr_cells([0.5] * 20, [0.97] * 20, [0.03] * 20)).iloc[0]["label"] == "rises"
    assert (
        inverse.lexical_labels(_fcr_cells([0.93] * 20, [0.97] * 20, [0.03] * 20), level_share=0.99).iloc[0]["label"]
        == "rises"
    )
    with pytest.raises(ValueError, match="level_share 0 "):
        inverse.lexical_labels(_fcr_cells([0.9] * 20, [0.9] * 20, [0.1] * 20), level_share=0)
    # Flat and no better than random at layer 0.
    flat = inverse.lexical_labels(_fcr_cells([0.1] * 20, [0.1] * 20, [0.1] * 20)).iloc[0]
    assert flat["label"] == "not above random"


def test_nearest_ranks_by_cosine_not_by_length():
    corpus = torch.tensor([[10.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert inverse.nearest(corpus, torch.tensor([[0.1, 5.0]]), 2).tolist() == [[1, 2]]


def test_distance_is_standardised_rms():
    std = torch.tensor([1.0, 2.0])
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    # ((3/1)^2 + (4/2)^2) / 2 = 6.5
    assert inverse.distance(a, b, std).item() == pytest.approx(6.5**0.5)
    assert inverse.distance(b, b, std).item() == 0.0
    assert inverse.cosine_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])).item() == pytest.approx(1.0)


def test_collected_pairs_are_the_prefixes_own_activations(tiny_models, tokenizer):
    model = tiny_models["llama"]
    texts = ["The cat sat on the mat and looked around", "Paris is the capital of France"]
    pairs = inverse.collect_pairs(model, texts, "resid_post", 1, max_tokens=5)
    ids = [tokenizer(t)["input_ids"][:5] for t in texts]
    assert pairs.inputs == [ids[p][:n] for p in (0, 1) for n in (2, 3, 4, 5)]
    assert pairs.sources == [0, 0, 0, 0, 1, 1, 1, 1]
    # The model is causal: the activation at a prefix's last token is the prefix's own z(x).
    own = inverse.last_token_activations(model, [tokenizer.decode(x) for x in pairs.inputs], "resid_post", 1)
    assert torch.allclose(own, pairs.activations, atol=1e-4)


def test_bad_site_or_layer_fails_before_reading(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ValueError, match="choose one of resid_pre"):
        inverse.collect_pairs(model, ["a b c"], "resid_middle", 1)
    with pytest.raises(ValueError, match="out of range 0-2"):
        inverse.last_token_activations(model, ["a b c"], "resid_post", 3)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        inverse.truncate(model.tokenizer, ["a b c"], 1)


def test_evaluate_ranks_nearest_inputs_closest_by_construction(tiny_models):
    model = tiny_models["llama"]
    words = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "sings"]
    texts = [f"The {a} {b} {c} today" for a in words[:3] for b in words[3:6] for c in words[6:]]
    pairs = inverse.collect_pairs(model, texts, "resid_post", 1, max_tokens=6)
    generator = inverse.train(pairs, GeneratorConfig(steps=20, **{**TOY, "held_out": 0.3}), progress=False)
    table = inverse.evaluate(model, generator, pairs, queries=5, k=3)
    assert table["sampler"].tolist() == ["generator", "nearest", "random"] * 5
    distance = table["distance"].to_numpy().reshape(5, 3)
    # The nearest sampler takes the k smallest distances, so its mean is at most that of any k inputs
    # (0 where another text shares the query's prefix, "The red", say).
    assert (distance[:, 1] <= distance[:, 2] + 1e-6).all()
    assert (distance >= 0).all() and table["same_last_token"].between(0, 1).all()
    with pytest.raises(ValueError, match="no held-out pairs"):
        inverse.evaluate(model, inverse.train(pairs, GeneratorConfig(steps=1, **TOY), progress=False), pairs)


def test_command_line_trains_in_pieces_evaluates_and_samples(tmp_path, tiny_models, tokenizer, capsys):
    model_dir = tmp_path / "tiny-llama"
    tiny_models["llama"]._module.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            f"The {a} {b} walked to the {c}"
            for a in ("old", "young", "tall", "small")
            for b in ("man", "woman", "dog")
            for c in ("park", "shop")
        )
    )
    out = tmp_path / "gen"
    train = [
        "train",
        "--model",
        str(model_dir),
        "--layer",
        "1",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--steps",
        "4",
        "--d-model",
        "32",
        "--n-layers",
        "1",
        "--n-heads",
        "2",
        "--eval-every",
        "2",
    ]
    inverse.main(train + ["--stop-after", "2"])
    assert (out / "checkpoint.pt").exists() and (out / "pairs.pt").exists() and not (out / "generator.pt").exists()
    with pytest.raises(ValueError, match="other settings \\(texts\\)"):
        inverse.main(train + ["--texts", "10"])  # the activations in pairs.pt were read from 24 texts
    inverse.main(train)
    report = __import__("json").loads((out / "train.json").read_text())
    assert [h["step"] for h in report["history"]] == [2, 4] and report["texts"] == 24
    inverse.main(["evaluate", "--out", str(out), "--queries", "3", "-k", "2"])
    assert set(pd.read_csv(out / "eval.csv")["sampler"]) == {"generator", "nearest", "random"}
    capsys.readouterr()
    inverse.main(["sample", "--generator", str(out / "generator.pt"), "--text", "The old man", "-k", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(float(line.split("\t")[0]) >= 0 for line in lines)
    with pytest.raises(ValueError, match="corpus 'nowhere'"):
        inverse.main(["train", "--layer", "1", "--corpus", "nowhere", "--out", str(out)])
