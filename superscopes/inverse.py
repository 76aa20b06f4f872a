"""InverseScope's conditional generator of inputs (Luo, Zhou and Dong, arXiv 2506.07406).

InverseScope reads an activation z at one (site, layer) by the distribution of inputs whose
activations are close to it, P(x | z) proportional to k(d(z(x), z)), and tests a hypothesis f by
its feature consistency rate FCR = E_{(x0, z0)} E_{x ~ P(x | z0)} 1{f(x) = f(x0)}. Sampling that
distribution by rejection is hopeless in a high-dimensional activation space, so the paper trains a
conditional generator of inputs on (input, activation) pairs and samples from it. This module does
the same at a size two CPU cores train in minutes:

- Pairs. An input x is a text read up to and including one token; z(x) is the activation at that
  token. Every corpus text is cut to ``max_tokens`` tokens and read once; each of its "text"
  positions (``superscopes.lens``) gives one pair (its prefix, the activation there). The model is
  causal, so the activation at a prefix's last token is exactly z(prefix).
- Objective. Maximum likelihood of x given a noisy activation z + sigma * eps (eps ~ N(0, I), in
  per-dimension standardised units), teacher-forced. Its optimum is
  P(x | z) proportional to P_corpus(x) * exp(-|z(x) - z|^2 / (2 sigma^2)): the paper's kernel
  form with a Gaussian kernel k of bandwidth ``noise`` on the standardised Euclidean distance d,
  and the corpus as the prior over inputs. ``distance`` is that d (as a root mean square per
  dimension), the number to read to see whether samples land near z at all.
- Generator. A small causal transformer: z (standardised) maps linearly to ``n_prefix`` soft
  prefix vectors, followed by the input's tokens; output weights tied to the input embedding.

Where this deviates from the paper, and why:

- The paper's generator is a pretrained language model of the size of the one it reads; here it is
  a 4-layer, 256-wide transformer trained from scratch (two CPU cores, well under an hour).
  Consequence: samples are fluent only as far as the corpus teaches, and rare words are missing.
- Vocabulary: the ``max_vocab`` most frequent tokens of the training inputs (plus an unknown token
  that is never sampled), not the full 49k vocabulary, to keep the softmax cheap on a CPU.
- The input is generated from its last token backwards. The condition is the activation at the
  last token, which determines that token best and earlier ones less and less; putting it first
  lets a small generator spend its capacity where z is informative. The likelihood is the same
  chain rule in the other order.
- Inputs are at most ``max_tokens`` tokens (16 by default), where the paper reads whole prompts.
- Only the method's abstract, introduction and third-party summaries were readable through this
  project's search tool (the method section's text was not); where the paper's exact injection of
  z, kernel or distance differ from the above, the above is this module's choice, not the paper's.

Train at one layer of SmolLM2 (documented in the README with its measured time)::

    python -m superscopes.inverse train --model smollm2-135m --layer 15 --steps 3000 \\
        --out results/inverse/smollm2-135m-L15

Checkpoints (``checkpoint.pt``) are written every ``--checkpoint-every`` steps and the same
command resumes from them; ``generator.pt`` is the trained generator (``Generator.load``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from superscopes.files import load_torch
from superscopes.parsing import CommandParser

if TYPE_CHECKING:
    from superscopes.models import Model

PAD, BOUNDARY, UNKNOWN = 0, 1, 2  # generator-vocabulary indices before the corpus tokens
SPECIAL = 3


# ---------------------------------------------------------------- (input, activation) pairs


@dataclass
class Pairs:
    """Inputs (token ids of the model's tokenizer, in reading order), their activations
    ``[n, d]`` at the last token, and the index of the corpus text each came from."""

    inputs: list[list[int]]
    activations: torch.Tensor
    sources: list[int]

    def __post_init__(self):
        if len(self.inputs) != len(self.activations) or len(self.inputs) != len(self.sources):
            raise ValueError(
                f"{len(self.inputs)} inputs, {len(self.activations)} activations and "
                f"{len(self.sources)} sources: need one of each per pair"
            )
        if any(len(x) == 0 for x in self.inputs):
            raise ValueError("every input needs at least one token")

    def fingerprint(self) -> str:
        digest = hashlib.sha1(json.dumps(self.inputs).encode())
        digest.update(self.activations.float().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def truncate(tokenizer, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Each text cut after its ``max_tokens``-th token (at that token's last character)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: an input needs at least 2 tokens (position 0 is an attention sink)")
    out = []
    for text in texts:
        encoding = tokenizer(text, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        out.append(text[: offsets[max_tokens - 1][1]] if len(offsets) > max_tokens else text)
    return out


def collect_pairs(
    model: Model,
    texts: Sequence[str],
    site: str,
    layer: int,
    max_tokens: int = 16,
    batch_size: int = 32,
    progress: bool = False,
) -> Pairs:
    """(prefix, activation at its last token) for every "text" position of every text, each text
    cut to ``max_tokens`` tokens and read once (``progress``: a bar per batch of texts)."""
    from superscopes import lens

    check_site(model, site, layer)
    texts = [t for t in truncate(model.tokenizer, texts, max_tokens) if t.strip()]
    if not texts:
        raise ValueError("no non-empty texts to read")
    positions = lens.token_positions(model.tokenizer, texts, "text")
    ids = [model.tokenizer(t)["input_ids"] for t in texts]
    activations = lens.collect(model, texts, site, [layer], "text", batch_size, progress=progress)[layer]
    return Pairs([ids[p][: i + 1] for p, i in positions], activations, [p for p, _ in positions])


def check_site(model: Model, site: str, layer: int) -> None:
    """Raise before any forward pass if ``site`` or ``layer`` does not exist in ``model``."""
    from superscopes.sites import architecture_of, num_layers

    sites = architecture_of(model).sites
    if site not in sites:
        raise ValueError(f"site {site!r}: choose one of {', '.join(sites)}")
    n = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} is out of range 0-{n - 1}")


def last_token_activations(
    model: Model, texts: Sequence[str], site: str, layer: int, batch_size: int = 32
) -> torch.Tensor:
    """z(x) for each text x: the activation at its last token ``[n, d]``."""
    from superscopes import lens

    check_site(model, site, layer)
    return lens.collect(model, list(texts), site, [layer], "last", batch_size)[layer]


# ---------------------------------------------------------------- the generator


@dataclass
class GeneratorConfig:
    """Architecture and training settings; stored with every checkpoint (a resume must match)."""

    model: str = ""  # the read model's name, for labels only
    site: str = "resid_post"
    layer: int = 0
    max_tokens: int = 16
    max_vocab: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_prefix: int = 4
    noise: float = 0.5  # kernel bandwidth sigma, in standardised activation units
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    held_out: float = 0.1  # share of corpus texts whose pairs are held out
    seed: int = 0

    def __post_init__(self):
        for name in ("max_tokens", "max_vocab", "d_model", "n_layers", "n_heads", "n_prefix", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.noise < 0 or not 0 <= self.held_out < 1 or self.lr <= 0:
            raise ValueError(f"noise={self.noise} must be >= 0, held_out={self.held_out} in [0, 1), lr={self.lr} > 0")


class _Net(nn.Module):
    """Causal transformer over [soft prefix from z, BOUNDARY, x_t, x_{t-1}, ...]."""

    def __init__(self, d_in: int, vocab_size: int, c: GeneratorConfig):
        super().__init__()
        self.n_prefix, self.d_model = c.n_prefix, c.d_model
        self.condition = nn.Linear(d_in, c.n_prefix * c.d_model)
        self.embed = nn.Embedding(vocab_size, c.d_model)
        self.position = nn.Embedding(c.n_prefix + c.max_tokens + 2, c.d_model)
        layer = nn.TransformerEncoderLayer(
            c.d_model, c.n_heads, 4 * c.d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, T, vocab]`` for the token after each of ``tokens [b, T]``."""
        b, t = tokens.shape
        prefix = self.condition(z).view(b, self.n_prefix, self.d_model)
        h = torch.cat([prefix, self.embed(tokens)], 1) + self.position.weight[: self.n_prefix + t]
        mask = nn.Transformer.generate_square_subsequent_mask(self.n_prefix + t)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.norm(h[:, self.n_prefix :]) @ self.embed.weight.T


class Generator:
    """A trained conditional generator of inputs for one (model, site, layer)."""

    def __init__(
        self,
        config: GeneratorConfig,
        vocab: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        state: dict | None = None,
        history: list[dict] | None = None,
    ):
        self.config, self.vocab = config, vocab.long()
        self.mean, self.std = mean.float(), std.float()
        self.history = list(history or [])
        self._index = {int(t): i + SPECIAL for i, t in enumerate(self.vocab)}
        # Built outside inference mode: tests and callers may hold one, and training needs grads.
        with torch.inference_mode(False), torch.random.fork_rng():
            torch.manual_seed(config.seed)
            self.net = _Net(len(mean), len(vocab) + SPECIAL, config)
            if state is not None:
                self.net.load_state_dict(state)
        self.net.eval()

    @property
    def d_in(self) -> int:
        return len(self.mean)

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.d_in:
            raise ValueError(
                f"activations of shape {tuple(z.shape)}: need [n, {self.d_in}] ({self.config.site}, "
                f"layer {self.config.layer} of {self.config.model or 'the read model'})"
            )
        return (z.float() - self.mean) / self.std

    # ------------------------------------------------------------ sequences

    def encode(self, inputs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing ``(tokens, targets)`` ``[b, T]``: each input reversed (last token
        first), tokens start with BOUNDARY and targets end with it; PAD after."""
        rows = [[self._index.get(int(t), UNKNOWN) for t in reversed(x[-self.config.max_tokens :])] for x in inputs]
        width = max(len(r) for r in rows) + 1
        tokens = torch.full((len(rows), width), PAD, dtype=torch.long)
        targets = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r) + 1] = torch.tensor([BOUNDARY] + r)
            targets[i, : len(r) + 1] = torch.tensor(r + [BOUNDARY])
        return tokens, targets

    def loss(self, z: torch.Tensor, inputs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """Mean negative log-likelihood per token (nats) of ``inputs`` given standardised ``z``, and the token count."""
        tokens, targets = self.encode(inputs)
        logits = self.net(z, tokens)
        n = int((targets != PAD).sum())
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD), n

    @torch.inference_mode()
    def sample(
        self, z: torch.Tensor, k: int = 10, seed: int = 0, temperature: float = 1.0, batch_size: int = 256
    ) -> list[list[list[int]]]:
        """``k`` inputs (token ids in reading order) for each activation of ``z [n, d]``.

        Seeded: the same z, k, seed and batch_size give the same samples."""
        if k < 1 or temperature <= 0 or batch_size < 1:
            raise ValueError(f"k={k} and batch_size={batch_size} must be >= 1, temperature={temperature} > 0")
        zs = self.standardise(z).repeat_interleave(k, 0)
        rng = torch.Generator().manual_seed(seed)
        rows: list[list[int]] = []
        for start in range(0, len(zs), batch_size):
            rows += self._sample_batch(zs[start : start + batch_size], rng, temperature)
        vocab = self.vocab.tolist()
        inputs = [[vocab[i - SPECIAL] for i in reversed(r)] for r in rows]
        return [inputs[i * k : (i + 1) * k] for i in range(len(z))]

    def _sample_batch(self, z: torch.Tensor, rng: torch.Generator, temperature: float) -> list[list[int]]:
        b = len(z)
        tokens = torch.full((b, 1), BOUNDARY, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(self.config.max_tokens):
            logits = self.net(z, tokens)[:, -1] / temperature
            logits[:, [PAD, UNKNOWN]] = -math.inf  # never emit padding or the unknown token
            if step == 0:
                logits[:, BOUNDARY] = -math.inf  # an input has at least one token
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=rng).squeeze(1)
            nxt[done] = PAD
            done |= nxt == BOUNDARY
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            if done.all():
                break
        return [[int(t) for t in row[1:] if t >= SPECIAL] for row in tokens]

    def sample_texts(
        self, tokenizer, z: torch.Tensor, k: int = 10, seed: int = 0, temperature: float = 1.0
    ) -> list[list[str]]:
        """``sample`` decoded to text with the read model's tokenizer."""
        return [[tokenizer.decode(x) for x in row] for row in self.sample(z, k, seed, temperature)]

    # ------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "config": asdict(self.config),
                "vocab": self.vocab,
                "mean": self.mean,
                "std": self.std,
                "state": self.net.state_dict(),
                "history": self.history,
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Generator:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no generator at {path} (train one: python -m superscopes.inverse train ...)")
        saved = load_torch(path)
        return cls(
            GeneratorConfig(**saved["config"]),
            saved["vocab"],
            saved["mean"],
            saved["std"],
            saved["state"],
            saved["history"],
        )


# ---------------------------------------------------------------- training


def split_sources(sources: Sequence[int], held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair indices ``(train, held out)``, split by corpus text so no text is in both."""
    texts = np.unique(np.asarray(sources))
    chosen = np.random.default_rng(seed).permutation(texts)[: int(round(held_out * len(texts)))]
    mask = np.isin(np.asarray(sources), chosen)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def build_vocab(inputs: Sequence[Sequence[int]], max_vocab: int) -> torch.Tensor:
    """The ``max_vocab`` most frequent token ids of the inputs (ties by id, so it is deterministic)."""
    counts = Counter(t for x in inputs for t in x)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:max_vocab]
    return torch.tensor(ranked, dtype=torch.long)


def _schedule(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over 5% of the steps, then cosine down to 10%."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train(
    pairs: Pairs,
    config: GeneratorConfig,
    out: str | Path | None = None,
    eval_every: int = 200,
    checkpoint_every: int = 200,
    progress: bool = True,
    eval_pairs: int = 2048,
    stop_after: int | None = None,
) -> Generator:
    """Train a generator on ``pairs`` (seeded; each step's batch and noise depend only on the
    seed and the step, so a resumed run matches an uninterrupted one).

    With ``out``, ``out/checkpoint.pt`` is written every ``checkpoint_every`` steps and a run
    with the same config and pairs resumes from it; ``out/generator.pt`` is the result.
    ``history`` holds the held-out loss (nats per token, with the training noise), the held-out
    last-token accuracy (the first generated token given the clean z) and time per step.
    ``stop_after``: stop (with a checkpoint) once that many steps are done, to train in pieces on
    a shared machine; the learning-rate schedule still follows ``config.steps``."""
    from tqdm.auto import tqdm

    if eval_every < 1 or checkpoint_every < 1:
        raise ValueError(f"eval_every={eval_every} and checkpoint_every={checkpoint_every} must be >= 1")
    train_rows, held_rows = split_sources(pairs.sources, config.held_out, config.seed)
    if len(train_rows) == 0:
        raise ValueError(f"held_out={config.held_out} leaves no training pairs ({len(set(pairs.sources))} texts)")
    with torch.inference_mode(False), torch.enable_grad():
        acts = pairs.activations.float().clone()  # a normal tensor, even if read in inference mode
        mean, std = acts[train_rows].mean(0), acts[train_rows].std(0).clamp_min(1e-4)
        vocab = build_vocab([pairs.inputs[i] for i in train_rows], config.max_vocab)
        generator = Generator(config, vocab, mean, std)
        net = generator.net
        optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.01)
        fingerprint, step = pairs.fingerprint(), 0
        checkpoint = Path(out) / "checkpoint.pt" if out is not None else None
        if checkpoint is not None and checkpoint.exists():
            saved = load_torch(checkpoint)
            if saved["config"] != asdict(config) or saved["fingerprint"] != fingerprint:
                changed = sorted(k for k in saved["config"] if saved["config"][k] != asdict(config).get(k))
                raise ValueError(
                    f"{checkpoint} is from another run (config fields differing: {changed or 'none'}; "
                    f"pairs {saved['fingerprint']} vs {fingerprint}): delete it or use another "
                    "out"
                )
            net.load_state_dict(saved["state"])
            optimiser.load_state_dict(saved["optimiser"])
            step, generator.history = saved["step"], saved["history"]
        z_all = generator.standardise(acts)
        held = held_rows[:eval_pairs]

        def evaluate() -> dict:
            net.eval()
            with torch.no_grad():
                if len(held) == 0:
                    return {}
                noise = torch.randn(len(held), generator.d_in, generator=torch.Generator().manual_seed(config.seed))
                inputs = [pairs.inputs[i] for i in held]
                loss, _ = generator.loss(z_all[held] + config.noise * noise, inputs)
                tokens, targets = generator.encode(inputs)
                first = generator.net(z_all[held], tokens[:, :1])[:, 0].argmax(-1)
            net.train()
            accuracy = float((first == targets[:, 0]).float().mean())
            return {"held_out_loss": float(loss), "held_out_last_token_acc": accuracy}

        net.train()
        bar = tqdm(total=config.steps, initial=step, desc=f"inverse L{config.layer}", unit="step", disable=not progress)
        window, tokens_seen, t_window = [], 0, time.perf_counter()
        end = config.steps if stop_after is None else min(config.steps, stop_after)
        while step < end:
            rng = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            rows = train_rows[torch.randint(len(train_rows), (config.batch_size,), generator=rng).numpy()]
            z = z_all[rows] + config.noise * torch.randn(len(rows), generator.d_in, generator=rng)
            loss, n_tokens = generator.loss(z, [pairs.inputs[i] for i in rows])
            for group in optimiser.param_groups:
                group["lr"] = config.lr * _schedule(step, config.steps)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimiser.step()
            step += 1
            window.append(float(loss.detach()))
            tokens_seen += n_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window[-50:]):.3f}")
            if step % eval_every == 0 or step == config.steps:
                seconds = time.perf_counter() - t_window
                record = {
                    "step": step,
                    "train_loss": float(np.mean(window)),
                    "seconds_per_step": seconds / len(window),
                    "tokens_per_second": tokens_seen / seconds,
                    **evaluate(),
                }
                generator.history.append(record)
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                window, tokens_seen, t_window = [], 0, time.perf_counter()
            if checkpoint is not None and (step % checkpoint_every == 0 or step == end):
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "config": asdict(config),
                        "fingerprint": fingerprint,
                        "step": step,
                        "state": net.state_dict(),
                        "optimiser": optimiser.state_dict(),
                        "history": generator.history,
                    },
                    checkpoint,
                )
        bar.close()
        net.eval()
    if out is not None and step == config.steps:
        generator.save(Path(out) / "generator.pt")
    return generator


# ---------------------------------------------------------------- evaluation


def distance(a: torch.Tensor, b: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The kernel's distance d(a, b): root mean square of the per-dimension standardised
    difference (``std``: the activations' per-dimension standard deviation). Two independent
    draws from the activation distribution are about sqrt(2) = 1.41 apart."""
    return (((a.float() - b.float()) / std).pow(2).mean(-1)).sqrt()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def nearest(corpus: torch.Tensor, z: torch.Tensor, k: int) -> np.ndarray:
    """The training-free sampler: indices of the k ``corpus`` rows nearest each row of ``z`` by cosine."""
    keys, values = nn.functional.normalize(corpus.float(), dim=-1), nn.functional.normalize(z.float(), dim=-1)
    return (values @ keys.T).topk(k, dim=-1).indices.numpy()


def fcr(f_original, f_samples: Sequence) -> float:
    """Feature consistency rate of one query: the share of samples x with f(x) = f(x_original)."""
    if len(f_samples) == 0:
        raise ValueError("FCR needs at least one sample")
    return float(np.mean([f == f_original for f in f_samples]))


def fcr_table(
    cells,
    value: str = "consistency",
    prompt: str = "query",
    by: Sequence[str] = ("hypothesis", "layer", "sampler"),
    seed: int = 0,
):
    """Mean of ``value`` (FCR by default; any per-query score) per group, with a 95% bootstrap
    interval over queries: each query's mean is one value, its samples are not independent draws."""
    from superscopes.metrics import prompt_means

    return prompt_means(cells, value, prompt, by, seed)


def compare_samplers(
    cells,
    a: str = "generator",
    others: Sequence[str] = ("nearest", "random"),
    value: str = "consistency",
    prompt: str = "query",
    seed: int = 0,
):
    """Sampler ``a`` against each of ``others`` per (hypothesis, layer), paired by query (the
    queries both answer): mean difference, 95% bootstrap interval over queries, paired sign-flip
    p, and Holm-adjusted p over the whole family of comparisons."""
    from superscopes.metrics import compare_conditions

    return compare_conditions(
        cells, "sampler", [(a, other) for other in others], ("hypothesis", "layer"), value, prompt, seed
    )


def lexical_labels(
    cells,
    sampler: str = "nearest",
    value: str = "consistency",
    prompt: str = "query",
    seed: int = 0,
    level_share: float = 0.9,
):
    """Per hypothesis, is its FCR already at its level at layer 0? From ``sampler``'s cells (and
    ``random``'s at layer 0): FCR at layer 0 and at the best layer, their paired difference over
    queries (95% bootstrap), the share of the best layer's lift over random already reached at
    layer 0 (``share_at_layer0`` = (FCR_0 - random_0) / (FCR_best - random_0)), and a label.
    ``lexical``: above random at layer 0 and already at its level there: the rise's interval
    reaches 0, or the layer-0 FCR is inside the best layer's interval, or layer 0 already has
    ``level_share`` of the lift (a rise from 0.94 to 0.97 over a random 0.03 is significant, yet
    the token embedding carries the feature). Such a hypothesis says nothing about what the
    layers compute. ``rises``: clearly above layer 0. ``not above random``: flat and never above
    random. The best layer is chosen on the same queries, which only makes "lexical" rarer."""
    import pandas as pd

    from superscopes.metrics import bootstrap_ci, compare

    if not 0 < level_share <= 1:
        raise ValueError(f"level_share {level_share!r} is not valid; choose a share in (0, 1]")
    rows = []
    for hypothesis, part in cells.groupby("hypothesis"):
        wide = part.pivot_table(index=prompt, columns=["sampler", "layer"], values=value)
        if (sampler, 0) not in wide or ("random", 0) not in wide:
            continue
        scores, random0 = wide[sampler], wide[("random", 0)]
        best = int(scores.mean().idxmax())
        rise = compare(scores[best].to_numpy(), scores[0].to_numpy(), seed=seed)
        at_best = bootstrap_ci(scores[best].to_numpy(), seed=seed)
        above_random = compare(scores[0].to_numpy(), random0.to_numpy(), seed=seed)["ci_low"] > 0
        lift = rise["mean_a"] - random0.mean()
        share = (rise["mean_b"] - random0.mean()) / lift if lift > 0 else float("nan")
        flat = rise["ci_low"] <= 0 or rise["mean_b"] >= at_best[0] or share >= level_share
        label = "rises" if not flat else "lexical" if above_random else "not above random"
        rows.append(
            {
                "hypothesis": hypothesis,
                "fcr_layer0": rise["mean_b"],
                "best_layer": best,
                "fcr_best": rise["mean_a"],
                "best_ci_low": at_best[0],
                "difference": rise["difference"],
                "ci_low": rise["ci_low"],
                "ci_high": rise["ci_high"],
                "share_at_layer0": share,
                "label": label,
            }
        )
    return pd.DataFrame(rows)


def evaluate(
    model: Model,
    generator: Generator,
    pairs: Pairs,
    queries: int = 100,
    k: int = 10,
    seed: int = 0,
    batch_size: int = 32,
):
    """Does the generator sample near z at all? For ``queries`` held-out pairs (one per held-out
    text, seeded), per sampler: the mean distance from z(x) of its ``k`` inputs to the query's z
    (``distance``; and ``cosine``), and the share of inputs ending in the query's last token.

    Samplers: ``generator``; ``nearest``, the k training inputs nearest to z by ``distance``
    (the training-free stand-in; training inputs only, so never the query's own text); ``random``,
    k training inputs drawn uniformly. One row per (query, sampler)."""
    import pandas as pd

    config = generator.config
    train_rows, held_rows = split_sources(pairs.sources, config.held_out, config.seed)
    if len(held_rows) == 0:
        raise ValueError(f"no held-out pairs to evaluate on (held_out={config.held_out})")
    rng = np.random.default_rng(seed)
    by_text: dict[int, list[int]] = {}
    for row in held_rows:
        by_text.setdefault(pairs.sources[row], []).append(row)
    texts = rng.permutation(sorted(by_text))[:queries]
    chosen = np.array([rng.choice(by_text[t]) for t in texts])
    z = pairs.activations[chosen].float()
    corpus = pairs.activations[train_rows].float()
    # Standardised, distance() is a scaled Euclidean distance: the nearest by it are a cdist away.
    nearest = torch.cdist(z / generator.std, corpus / generator.std).topk(k, largest=False).indices.numpy()
    random_rows = rng.choice(len(train_rows), (len(chosen), k))
    samples = generator.sample(z, k, seed)
    texts_out = [model.tokenizer.decode(x) for row in samples for x in row]
    z_generated = last_token_activations(model, texts_out, config.site, config.layer, batch_size)
    z_generated = z_generated.view(len(chosen), k, -1)
    rows = []
    for qi, row in enumerate(chosen):
        last = pairs.inputs[row][-1]
        found = {
            "generator": (z_generated[qi], [x[-1] for x in samples[qi]], texts_out[qi * k : qi * k + 3]),
            "nearest": (
                corpus[nearest[qi]],
                [pairs.inputs[train_rows[j]][-1] for j in nearest[qi]],
                [model.tokenizer.decode(pairs.inputs[train_rows[j]]) for j in nearest[qi][:3]],
            ),
            "random": (
                corpus[random_rows[qi]],
                [pairs.inputs[train_rows[j]][-1] for j in random_rows[qi]],
                [model.tokenizer.decode(pairs.inputs[train_rows[j]]) for j in random_rows[qi][:3]],
            ),
        }
        for sampler, (acts, lasts, shown) in found.items():
            rows.append(
                {
                    "query": model.tokenizer.decode(pairs.inputs[row]),
                    "sampler": sampler,
                    "distance": float(distance(acts, z[qi], generator.std).mean()),
                    "cosine": float(cosine_distance(acts, z[qi][None]).mean()),
                    "same_last_token": fcr(last, lasts),
                    "examples": json.dumps(shown),
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- command line


def _train_command(args: argparse.Namespace) -> None:
    import superscopes
    from superscopes.corpus import texts as corpus_texts
    from superscopes.models import model_name

    config = GeneratorConfig(
        site=args.site,
        layer=args.layer,
        max_tokens=args.max_tokens,
        max_vocab=args.max_vocab,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        noise=args.noise,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    # Every stage says what it does as it starts (reading the corpus and the activations took a
    # silent minute before the training bar).
    print(f"inverse train: loading the {args.corpus} corpus and {args.model}", file=sys.stderr, flush=True)
    texts = corpus_texts(args.corpus, "train", args.texts, args.text_column)
    out = Path(args.out)
    cache = out / "pairs.pt"
    model = superscopes.load(args.model)
    config.model = model_name(model)
    check_site(model, args.site, args.layer)
    t0 = time.perf_counter()
    read = {
        "model": config.model,
        "site": args.site,
        "layer": args.layer,
        "corpus": args.corpus,
        "texts": len(texts),
        "max_tokens": args.max_tokens,
    }
    if cache.exists():  # activations are read once per out folder; a resume reuses them
        saved = load_torch(cache)
        if saved.get("read") != read:
            changed = sorted(k for k in read if (saved.get("read") or {}).get(k) != read[k])
            raise ValueError(f"{cache} was read with other settings ({', '.join(changed)}): use another --out")
        pairs = Pairs(saved["inputs"], saved["activations"], saved["sources"])
    else:
        print(
            f"inverse train: reading {args.site} layer {args.layer} of {len(texts)} texts", file=sys.stderr, flush=True
        )
        pairs = collect_pairs(model, texts, args.site, args.layer, args.max_tokens, args.read_batch_size, progress=True)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"read": read, "inputs": pairs.inputs, "activations": pairs.activations, "sources": pairs.sources}, cache
        )
    read_seconds = time.perf_counter() - t0
    print(f"{len(pairs.inputs)} pairs from {len(set(pairs.sources))} texts ({read_seconds:.0f} s to read or load)")
    t1 = time.perf_counter()
    generator = train(pairs, config, out, args.eval_every, args.checkpoint_every, stop_after=args.stop_after)
    last = generator.history[-1] if generator.history else {}
    report = {
        "config": asdict(config),
        "corpus": args.corpus,
        "texts": len(set(pairs.sources)),
        "pairs": len(pairs.inputs),
        "read_seconds": read_seconds,
        "train_seconds_this_invocation": time.perf_counter() - t1,
        "final": last,
        "history": generator.history,
    }
    (out / "train.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(last))


def _sample_command(args: argparse.Namespace) -> None:
    import superscopes

    generator = Generator.load(args.generator)
    model = superscopes.load(args.model or generator.config.model)
    z = last_token_activations(model, [args.text], generator.config.site, generator.config.layer)
    texts = generator.sample_texts(model.tokenizer, z, args.k, args.seed, args.temperature)[0]
    z_samples = last_token_activations(model, texts, generator.config.site, generator.config.layer)
    for text, d in zip(texts, distance(z_samples, z, generator.std).tolist()):
        print(f"{d:.3f}\t{text!r}")


def _evaluate_command(args: argparse.Namespace) -> None:
    import superscopes

    out = Path(args.out)
    generator = Generator.load(out / "generator.pt")
    saved = load_torch(out / "pairs.pt")
    pairs = Pairs(saved["inputs"], saved["activations"], saved["sources"])
    model = superscopes.load(args.model or generator.config.model)
    t0 = time.perf_counter()
    table = evaluate(model, generator, pairs, args.queries, args.k, args.seed)
    table.to_csv(out / "eval.csv", index=False)
    summary = {}
    for value in ("distance", "cosine", "same_last_token"):
        part = fcr_table(table, value, by=("sampler",), seed=args.seed).set_index("sampler")
        summary[value] = {
            sampler: {"mean": r[value], "ci95": [r["ci_low"], r["ci_high"]], "n": r["n"]}
            for sampler, r in part.iterrows()
        }
    history = generator.history[-1] if generator.history else {}
    report = {
        "generator": str(out / "generator.pt"),
        "queries": int(table["query"].nunique()),
        "k": args.k,
        "held_out_loss": history.get("held_out_loss"),
        "seconds": time.perf_counter() - t0,
        **summary,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m superscopes.inverse", description=__doc__.split("\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    t = verbs.add_parser("train", help="read (input, activation) pairs from a corpus and train a generator")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--site", default="resid_post")
    t.add_argument("--layer", type=int, required=True)
    t.add_argument(
        "--corpus",
        default="patchscopes",
        help="'patchscopes', 'debian', hf:NAME (a hub dataset), a csv/json/jsonl/parquet file or a file "
        "with one text a line (superscopes.corpus.texts)",
    )
    t.add_argument("--text-column", default="text", help="the texts' column of a dataset or csv/json/parquet file")
    t.add_argument("--texts", type=int, help="use only the first N texts")
    t.add_argument("--out", required=True, help="folder for pairs.pt, checkpoint.pt, generator.pt, train.json")
    defaults = GeneratorConfig()
    for name in ("max_tokens", "max_vocab", "d_model", "n_layers", "n_heads", "steps", "batch_size", "seed"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    t.add_argument("--noise", type=float, default=defaults.noise, help="kernel bandwidth (standardised units)")
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--read-batch-size", type=int, default=32)
    t.add_argument("--stop-after", type=int, help="stop once this many steps are done (rerun to resume)")
    t.set_defaults(run=_train_command)
    s = verbs.add_parser("sample", help="inputs a trained generator proposes for the activation at a text's last token")
    s.add_argument("--generator", required=True)
    s.add_argument("--text", required=True)
    s.add_argument("--model", help="default: the model the generator was trained on")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--temperature", type=float, default=1.0)
    s.set_defaults(run=_sample_command)
    e = verbs.add_parser("evaluate", help="distance to held-out z: generated vs nearest vs random inputs")
    e.add_argument("--out", required=True, help="the train folder (generator.pt, pairs.pt)")
    e.add_argument("--model", help="default: the model the generator was trained on")
    e.add_argument("--queries", type=int, default=100)
    e.add_argument("-k", type=int, default=10)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(run=_evaluate_command)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
