"""Sparse autoencoders (SAEs) on a model's sites: load, save, train, decompose, use as sources.

An ``SAE`` is ``encode(x) = f((x - b_dec) @ W_enc + b_enc)`` and ``decode(a) = a @ W_dec +
b_dec`` with ``f`` one of ``standard`` (ReLU), ``topk`` (the ``k`` largest pre-activations,
ReLU'd) or ``jumprelu`` (ReLU, zero below a per-latent ``threshold``).

On disk it is a SAELens folder: ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in,
d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``, and ``threshold`` for JumpReLU).
Both SAELens config layouts load: the older one with ``hook_name``/``hook_layer``/
``activation_fn_kwargs`` at the top level and the 6.x one with ``k`` at the top level and
``hook_name`` under ``meta``. TransformerLens hook names map to our sites:
``blocks.L.hook_resid_pre``, ``hook_resid_post``, ``hook_mlp_out``, ``hook_attn_out``. We
write both layouts' fields, so ``sae_lens.SAE.load_from_disk`` reads our folders too.
Superscopes adds ``latent_stats.safetensors`` (per latent: mean activation when active,
firing frequency) and ``metrics.json`` (training metrics) beside them.

Training (``python -m superscopes.sae train``): a TopK SAE on activations read through the
graph's batched read passes (``lens.collect``: each pass stops after the read layer) from
the offline corpus (``superscopes.corpus``), cached once on disk in float16 shards; Adam,
unit-norm decoder rows, the AuxK loss for dead latents (Gao et al., 2024), inputs scaled
to mean squared norm ``d_in`` during training and the scale folded back into the weights
(activations are in the model's own units). Checkpoints make it resumable. Held-out
metrics: fraction of variance explained, L0, dead latents, and the next-token loss with
the reconstruction spliced in vs clean vs the site zero-ablated.

Use in the graph: ``latent_scope`` (latents as sources: decoder direction x the latent's
mean activation x alpha, patched into a target prompt, as in Kharlapenko et al.'s
self-explaining SAE features), ``decompose`` (a vector's top latents) and
``amplify_latent`` (scale one latent's component of a vector).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from superscopes.files import UnsafeFileError, load_torch
from superscopes.parsing import CommandParser
from superscopes.sites import hidden_size

if TYPE_CHECKING:  # pandas only where a frame is built
    import pandas as pd

ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "jumprelu")
HOOK_SITES: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
}
SITE_HOOKS = {site: hook for hook, site in HOOK_SITES.items()}
CFG_FILE, WEIGHTS_FILE, STATS_FILE, METRICS_FILE = (
    "cfg.json", "sae_weights.safetensors", "latent_stats.safetensors", "metrics.json",
)  # fmt: skip
EMBEDDED_DIR = Path(__file__).parent / "data" / "sae"
EMBEDDED: dict[str, str] = {"smollm2-135m": "smollm2-135m/resid_post-15"}  # model -> default SAE folder


class SAEError(ValueError):
    """An SAE that cannot be read or does not fit a model; raised before any forward pass."""


class SAE(torch.nn.Module):
    """A sparse autoencoder at ``site`` of block ``layer`` of ``model`` (a name, for the record).

    ``mean_activation`` / ``frequency``: per latent, the mean activation when active and the
    fraction of tokens it is active on (measured in training); ``None`` if unknown."""

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        architecture: str = "topk",
        k: int | None = None,
        threshold: torch.Tensor | None = None,
        site: str = "resid_post",
        layer: int = 0,
        model: str | None = None,
        apply_b_dec_to_input: bool = True,
        mean_activation: torch.Tensor | None = None,
        frequency: torch.Tensor | None = None,
    ):
        super().__init__()
        d_in, d_sae = W_enc.shape
        if architecture not in ARCHITECTURES:
            raise SAEError(f"architecture {architecture!r} is not supported; choose from {', '.join(ARCHITECTURES)}")
        if site not in SITE_HOOKS:
            raise SAEError(f"site {site!r} has no SAE hook; choose from {', '.join(SITE_HOOKS)}")
        shapes = {"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_in)), "b_dec": (b_dec, (d_in,))}
        if architecture == "jumprelu":
            if threshold is None:
                raise SAEError("a jumprelu SAE needs a threshold (one per latent)")
            shapes["threshold"] = (threshold, (d_sae,))
        for name, (tensor, shape) in shapes.items():
            if tuple(tensor.shape) != shape:
                raise SAEError(f"{name} has shape {tuple(tensor.shape)}; with W_enc {tuple(W_enc.shape)} it must be {shape}")
        if architecture == "topk" and (not isinstance(k, int) or not 0 < k <= d_sae):
            raise SAEError(f"a topk SAE needs k in 1-{d_sae}, got {k!r}")
        self.W_enc = torch.nn.Parameter(W_enc.float())
        self.b_enc = torch.nn.Parameter(b_enc.float())
        self.W_dec = torch.nn.Parameter(W_dec.float())
        self.b_dec = torch.nn.Parameter(b_dec.float())
        self.threshold = None if threshold is None else torch.nn.Parameter(threshold.float(), requires_grad=False)
        self.architecture, self.k, self.site, self.layer, self.model = architecture, k, site, layer, model
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.mean_activation, self.frequency = mean_activation, frequency

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.architecture == "topk" else ""
        return f"SAE({self.architecture}{k}, {self.d_in}->{self.d_sae}, {self.site} layer {self.layer} of {self.model})"

    # ------------------------------------------------------------ encode / decode

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "standard":
            return pre.relu()
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of activations ``[..., d_in]``."""
        return self.activate(self.pre_activations(x))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``, in ``x``'s dtype (so it can be written back at the site)."""
        return self.decode(self.encode(x)).to(x.dtype)

    # ------------------------------------------------------------ fitting a model

    def check(self, model) -> None:
        """Raise ``SAEError`` unless the SAE's width, site and layer fit ``model`` (no forward pass)."""
        from superscopes.models import model_name
        from superscopes.sites import architecture_of, num_layers

        name = model_name(model)
        sites = architecture_of(model).sites
        if self.site not in sites:
            raise SAEError(f"{self!r}: site {self.site!r} is not a site of {name}; its sites: {', '.join(sites)}")
        n = num_layers(model)
        if not 0 <= self.layer < n:
            raise SAEError(f"{self!r}: layer {self.layer} is out of range: {name} has layers 0-{n - 1}")
        if self.d_in != hidden_size(model):
            raise SAEError(
                f"{self!r}: width d_in={self.d_in} does not fit {name}, whose {self.site} has "
                f"hidden_size={hidden_size(model)}"
            )

    # ------------------------------------------------------------ latents as vectors

    def directions(self, latents: Sequence[int], scale: str | float = "mean") -> torch.Tensor:
        """Decoder rows ``[len(latents), d_in]`` (unit norm after training), times ``scale``:
        ``"mean"`` (each latent's mean activation when active: a typical size of its
        component in the model's activations), ``"unit"`` (the decoder row normalised) or a number."""
        latents = self._latents(latents)
        rows = self.W_dec.detach()[latents].float()
        if scale == "mean":
            if self.mean_activation is None:
                raise SAEError(f"{self!r} has no recorded mean activations: use scale='unit' or a number")
            return rows * self.mean_activation[latents, None].float()
        if scale == "unit":
            return rows / rows.norm(dim=-1, keepdim=True)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return rows * float(scale)
        raise SAEError(f"scale {scale!r} is not valid; choose from 'mean', 'unit' or a number")

    def _latents(self, latents: Sequence[int]) -> list[int]:
        latents = [int(i) for i in latents]
        bad = [i for i in latents if not 0 <= i < self.d_sae]
        if bad:
            raise SAEError(f"latent(s) {bad[:5]} out of range: {self!r} has latents 0-{self.d_sae - 1}")
        return latents

    @torch.no_grad()
    def decompose(self, vectors: torch.Tensor, k: int = 10) -> list[list[tuple[int, float]]] | list[tuple[int, float]]:
        """The ``k`` most active latents of each vector, as ``(latent, activation)`` pairs in
        decreasing activation (inactive latents left out). ``[d]`` -> one list, ``[n, d]`` -> n lists."""
        single = vectors.dim() == 1
        acts = self.encode(vectors.reshape(-1, self.d_in).float())
        top = acts.topk(min(k, self.d_sae), dim=-1)
        out = [[(int(i), float(v)) for i, v in zip(idx, val) if v > 0] for idx, val in zip(top.indices, top.values)]
        return out[0] if single else out

    @torch.no_grad()
    def amplify_latent(self, vectors: torch.Tensor, latent: int, alpha: float) -> torch.Tensor:
        """``vectors`` with latent ``latent``'s component (activation x decoder row) scaled by
        ``alpha`` and everything else kept (the SAE's error term included): the graph's
        ``latent`` transform (``Scope(transforms=["latent"], sae_latent=(sae, latent))``)."""
        from superscopes import ops

        flat = vectors.reshape(-1, self.d_in)
        return ops.amplify(flat, alpha, "latent", latent=self.latent_params(latent)).reshape(vectors.shape)

    def latent_params(self, latent: int) -> dict:
        """What ``ops.amplify(..., "latent")`` needs to amplify one latent, as plain tensors
        (they travel with a remote request: the whole encoder for TopK, one column otherwise)."""
        (latent,) = self._latents([latent])
        params = {"decoder_row": self.W_dec.detach()[latent].float(), "b_dec": self.b_dec.detach().float(),
                  "subtract_b_dec": self.apply_b_dec_to_input}  # fmt: skip
        if self.architecture == "topk":
            return params | {"W_enc": self.W_enc.detach().float(), "b_enc": self.b_enc.detach().float(),
                             "index": latent, "k": self.k}  # fmt: skip
        params |= {"W_enc": self.W_enc.detach()[:, latent : latent + 1].float(),
                   "b_enc": self.b_enc.detach()[latent : latent + 1].float(), "index": 0}  # fmt: skip
        if self.architecture == "jumprelu":
            params["threshold"] = self.threshold.detach()[latent : latent + 1].float()
        return params

    # ------------------------------------------------------------ disk

    def config(self) -> dict:
        """``cfg.json``: SAELens's fields (both layouts) plus what training recorded."""
        hook = f"blocks.{self.layer}.{SITE_HOOKS[self.site]}"
        cfg = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "model_name": self.model,
            "hook_name": hook,
            "hook_layer": self.layer,
            "hook_head_index": None,
            "activation_fn_str": "topk" if self.architecture == "topk" else "relu",
            "activation_fn_kwargs": {"k": self.k} if self.architecture == "topk" else {},
            "meta": {"model_name": self.model, "hook_name": hook, "hook_layer": self.layer},
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
        return cfg

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write the SAELens folder (weights in ``dtype``, e.g. float16 to halve the size)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.config() | {"dtype": str(dtype).removeprefix("torch.")}
        (path / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        weights = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            weights["threshold"] = self.threshold
        save_file({n: t.detach().to(dtype).contiguous() for n, t in weights.items()}, path / WEIGHTS_FILE)
        stats = {n: t for n, t in (("mean_activation", self.mean_activation), ("frequency", self.frequency))
                 if t is not None}  # fmt: skip
        if stats:
            save_file({n: t.detach().float().contiguous() for n, t in stats.items()}, path / STATS_FILE)
        return path


def _site_and_layer(cfg: dict) -> tuple[str, int]:
    meta = cfg.get("meta") or {}
    hook = cfg.get("hook_name") or meta.get("hook_name")
    match = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", hook or "")
    if not match or match.group(2) not in HOOK_SITES:
        valid = ", ".join(f"blocks.<layer>.{h}" for h in HOOK_SITES)
        raise SAEError(f"hook_name {hook!r} does not map to a site; supported: {valid}")
    layer = int(match.group(1))
    recorded = cfg.get("hook_layer", meta.get("hook_layer"))
    if recorded is not None and int(recorded) != layer:
        raise SAEError(f"hook_layer {recorded} contradicts hook_name {hook!r} (layer {layer})")
    return HOOK_SITES[match.group(2)], layer


def load_folder(path: str | Path) -> SAE:
    """An SAE from a SAELens-format folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    path = Path(path)
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (path / name).exists():
            raise SAEError(f"{path} is not an SAE folder: {name} is missing (a SAELens folder has {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SAEError(f"{path / CFG_FILE} is not readable JSON ({error})") from None
    architecture = cfg.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise SAEError(f"{path}: architecture {architecture!r} is not supported; choose from {', '.join(ARCHITECTURES)}")
    normalize = cfg.get("normalize_activations", "none") or "none"
    if normalize != "none":  # the others need a dataset-wide factor SAELens keeps outside the folder
        raise SAEError(f"{path}: normalize_activations {normalize!r} is not supported; fold it into the weights ('none')")
    site, layer = _site_and_layer(cfg)
    try:
        weights = load_file(path / WEIGHTS_FILE)
    except Exception as error:  # safetensors raises its own SafetensorError on a torn or foreign file
        raise SAEError(f"{path / WEIGHTS_FILE} is not a readable safetensors file ({error})") from None
    bad = sorted(name for name, tensor in weights.items() if tensor.is_floating_point() and not tensor.isfinite().all())
    if bad:  # a NaN weight turns every readout into NaN without any other sign
        raise SAEError(f"{path / WEIGHTS_FILE}: {', '.join(bad)} hold NaN or inf values; refetch or retrain it")
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in weights]
    if architecture == "jumprelu" and "threshold" not in weights:
        missing.append("threshold")  # SAELens training checkpoints hold log_threshold instead
        if "log_threshold" in weights:
            weights["threshold"], missing = weights["log_threshold"].exp(), missing[:-1]
    if missing:
        raise SAEError(f"{path / WEIGHTS_FILE} lacks {', '.join(missing)}; it has {', '.join(sorted(weights))}")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if (d_in, d_sae) != tuple(weights["W_enc"].shape):
        raise SAEError(f"{path}: cfg says d_in={d_in}, d_sae={d_sae} but W_enc has shape {tuple(weights['W_enc'].shape)}")
    stats = load_file(path / STATS_FILE) if (path / STATS_FILE).exists() else {}
    return SAE(
        weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"], architecture=architecture,
        k=None if k is None else int(k), threshold=weights.get("threshold"), site=site, layer=layer,
        model=cfg.get("model_name") or (cfg.get("meta") or {}).get("model_name"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        mean_activation=stats.get("mean_activation"), frequency=stats.get("frequency"),
    )  # fmt: skip


def load(name_or_path: str | Path, model=None) -> SAE:
    """An embedded SAE by model name (``EMBEDDED``) or a SAELens folder; checked against ``model`` if given."""
    key = str(name_or_path)
    if key in EMBEDDED:
        path = EMBEDDED_DIR / EMBEDDED[key]
    elif Path(key).is_dir():
        path = Path(key)
    else:
        raise SAEError(f"no SAE {key!r}: give an SAE folder or one of the embedded SAEs: {', '.join(EMBEDDED)}")
    sae = load_folder(path)
    if model is not None:
        sae.check(model)
    return sae


# ---------------------------------------------------------------- the graph


def latent_scope(sae: SAE, latents: Sequence[int], model=None, scale: str | float = "mean", **settings):
    """A ``Scope`` whose sources are latents: each latent's ``directions(scale)`` vector,
    times each alpha, patched into the target (default ``identity``, at the SAE's layer).
    ``settings``: any other ``Scope`` field (alphas, target, target_layers, output, ...).
    With ``model``, the SAE is checked against it first."""
    from superscopes.scope import Scope

    if model is not None:
        sae.check(model)
    latents = sae._latents(latents)
    settings = {"target": "identity", "target_layers": ["same"]} | settings
    return Scope(prompts=[f"latent {i}" for i in latents], vectors=sae.directions(latents, scale),
                 sites=[sae.site], layers=[sae.layer], **settings)  # fmt: skip


def explanation_scores(model, scope, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (``run`` of a ``vectors`` scope with ``output="generate"``, e.g. from
    ``latent_scope``) with two scale-selection columns per cell:

    - ``self_similarity``: cosine between the patched vector and the last block's
      ``resid_post`` at the patched position, with the patch (Kharlapenko et al.: an
      explanation fails when the model no longer carries the feature there).
    - ``entropy``: the entropy (nats) of the patched model's next-token distribution at the
      first generated token (Kharlapenko et al. pick the scale by self-similarity together
      with an entropy of the model's prediction; too small a scale leaves the prompt's own
      broad prediction, too large one collapses it onto a token).
    - ``relevancy``: per generated token, its probability with the patch minus without
      (SelfIE's relevancy score: how much that token depends on the patched vector), and
      ``relevancy_mean`` over the tokens.

    Each cell reruns its prompt and generated tokens teacher-forced, once patched and once clean."""
    from superscopes import ops
    from superscopes.sites import num_layers

    if scope.vectors is None:
        raise SAEError("explanation_scores needs a Scope with vectors (e.g. latent_scope): it patches them again")
    if "output_ids" not in frame or scope.output != "generate":
        raise SAEError("explanation_scores needs generated outputs: run the scope with output='generate'")
    last = num_layers(model) - 1
    names = {name: i for i, name in enumerate(scope.prompts)}
    similarity, relevancy, entropy = [], [], []
    with torch.inference_mode():
        for row in frame.itertuples(index=False):
            prompt = model.tokenizer(row.target)["input_ids"]
            ids = torch.tensor([prompt + list(row.output_ids)])
            vector = scope.vectors[names[row.source]].float()
            picked = ids[0, len(prompt) :]
            probs = {}
            for patched in (True, False):
                with model.trace(ids):
                    if patched:
                        ops.patch(model, row.target_site, row.target_layer, vector[None], position=row.target_position,
                                  alpha=row.alpha, transform=row.transform, mode=row.mode)  # fmt: skip
                        final = ops.read(model, "resid_post", last, position=row.target_position).save()
                    # The predictions of every generated token, and one more: the first row
                    # is there even when generation stopped at once (no output tokens).
                    logits = model.output.logits[0, len(prompt) - 1 :].save()
                distribution = logits.float().log_softmax(-1)
                if patched:
                    entropy.append(float(-(distribution[0].exp() * distribution[0]).sum()))
                probs[patched] = distribution[:-1].exp().gather(-1, picked[:, None])[:, 0]
            similarity.append(float(torch.nn.functional.cosine_similarity(final[0].float(), vector, dim=0)))
            relevancy.append((probs[True] - probs[False]).tolist())
    return frame.assign(self_similarity=similarity, entropy=entropy, relevancy=relevancy,
                        relevancy_mean=[sum(r) / len(r) if r else float("nan") for r in relevancy])  # fmt: skip


# ---------------------------------------------------------------- metrics


def next_token_losses(model, sae: SAE, ids: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Mean next-token loss (nats) on token ids ``[n, T]`` (no padding): ``clean``; ``spliced``,
    with the site replaced by the SAE's reconstruction; ``zero``, with the site zero-ablated.
    Position 0 stays clean in both (an attention sink with outlier norms, left out of
    training); ``recovered`` = (zero - spliced) / (zero - clean)."""
    from superscopes import ops

    sae.check(model)
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            inputs = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
            for mode in totals:
                with model.trace(inputs):
                    if mode != "clean":
                        act = ops.activation(model, sae.site, sae.layer)
                        act[:, 1:] = sae(act[:, 1:]) if mode == "spliced" else torch.zeros_like(act[:, 1:])
                    logits = model.output.logits.save()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                totals[mode] += float(loss)
    n = ids[:, 1:].numel()
    out = {mode: total / n for mode, total in totals.items()}
    out["recovered"] = (out["zero"] - out["spliced"]) / (out["zero"] - out["clean"])
    return out


# ---------------------------------------------------------------- training


def cache_activations(model, site: str, layer: int, texts: Sequence[str], tokens: int, folder: str | Path,
                      batch_size: int = 32, shard_passages: int = 512, progress: bool = True,
                      require: bool = True) -> torch.Tensor:  # fmt: skip
    """Activations ``[n, d]`` (float16) of every text token but the first (see
    ``lens.token_positions``, "text") of ``texts`` in order, until ``tokens`` are read
    (``require``: at least ``tokens``, else all the texts hold).

    Read in shards of ``shard_passages`` texts, each saved to ``folder`` as it finishes; a
    rerun reads the saved shards and continues (the same texts give the same shards)."""
    from tqdm.auto import tqdm

    from superscopes.lens import collect
    from superscopes.models import model_name

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # What the shards hold: a rerun into the same folder with other settings must not reuse them.
    source = {"model": model_name(model), "site": site, "layer": layer, "shard_passages": shard_passages,
              "texts": len(texts), "first_text": zlib.crc32(texts[0].encode()) if texts else None}  # fmt: skip
    recorded = folder / "source.json"
    if recorded.exists() and json.loads(recorded.read_text()) != source:
        raise SAEError(f"{folder} holds activations of {recorded.read_text().strip()}, not {json.dumps(source)}: "
                       "give a new folder (--out), or delete it")  # fmt: skip
    recorded.write_text(json.dumps(source))
    shards, total = [], 0
    bar = tqdm(total=tokens, desc=f"activations {site} {layer}", unit="tok", disable=not progress)
    for index, start in enumerate(range(0, len(texts), shard_passages)):
        if total >= tokens:
            break
        file = folder / f"shard_{index:05d}.safetensors"
        if file.exists():
            shard = load_file(file)["activations"]
        else:
            # Sorted by length: a batch of similar lengths needs little padding (saves ~1/3 here).
            chunk = sorted(texts[start : start + shard_passages], key=len)
            shard = collect(model, chunk, site, [layer], "text", batch_size)[layer].half()
            save_file({"activations": shard.contiguous()}, file.with_suffix(".tmp"))
            file.with_suffix(".tmp").replace(file)  # a shard is on disk whole or not at all
        shards.append(shard)
        total += len(shard)
        bar.update(min(len(shard), tokens - bar.n))
    bar.close()
    if require and total < tokens:
        raise SAEError(f"the texts hold {total} tokens, fewer than tokens={tokens}: give more text or fewer tokens")
    return torch.cat(shards)


def _new_sae(d_in: int, latents: int, k: int, site: str, layer: int, model: str | None, b_dec: torch.Tensor,
             generator: torch.Generator) -> SAE:  # fmt: skip
    W_dec = torch.randn(latents, d_in, generator=generator)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    # Encoder initialised as the decoder's transpose (Gao et al., 2024): fewer dead latents.
    return SAE(W_dec.T.clone(), torch.zeros(latents), W_dec, b_dec, "topk", k, site=site, layer=layer, model=model)


def _aux_loss(sae: SAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK: the top dead latents reconstruct what the live ones miss (revives dead latents)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = min(sae.d_in // 2, n_dead)
    top = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1)
    recon = torch.nn.functional.embedding_bag(top.indices, sae.W_dec, per_sample_weights=top.values.relu(), mode="sum")
    return (recon - residual).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean().clamp_min(1e-12)


def train_sae(acts: torch.Tensor, latents: int, k: int, site: str, layer: int, model: str | None = None,
              batch_size: int = 1024, epochs: int = 1, lr: float | None = None, seed: int = 0,
              checkpoint: str | Path | None = None, checkpoint_every: int = 200, dead_after: int = 200_000,
              progress: bool = True) -> SAE:  # fmt: skip
    """A TopK SAE fitted to activations ``[n, d]``; returned with activations in ``acts``'s units.

    Training sees ``acts`` scaled to mean squared norm ``d`` (one lr fits every site and
    model); the scale is folded back at the end by dividing ``b_enc`` and ``b_dec`` by it
    (TopK commutes with a positive scale; decoder rows stay unit norm). ``dead_after``: a latent not active for this many tokens gets the AuxK loss.
    ``checkpoint``: a file to save to every ``checkpoint_every`` steps and resume from."""
    from tqdm.auto import tqdm

    with torch.inference_mode(False), torch.enable_grad():  # callers (tests) may be in inference mode
        n, d = acts.shape
        generator = torch.Generator().manual_seed(seed)
        probe = acts[torch.randperm(n, generator=generator)[:20_000]].float()
        scale = math.sqrt(d / float(probe.pow(2).sum(-1).mean()))
        sae = _new_sae(d, latents, k, site, layer, model, (probe * scale).mean(0), generator)
        lr = lr or 8e-4 / math.sqrt(latents / 1024)  # the 1/sqrt(width) rule of Gao et al., 2024
        optimizer = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], lr=lr, betas=(0.9, 0.999))
        steps_per_epoch = n // batch_size
        total = steps_per_epoch * epochs
        step, last_fired = 0, torch.zeros(latents, dtype=torch.long)
        settings = {"n": n, "latents": latents, "k": k, "batch_size": batch_size, "epochs": epochs, "lr": lr, "seed": seed}
        if checkpoint and Path(checkpoint).exists():
            state = load_torch(checkpoint)  # tensors and plain values only: a planted pickle runs no code
            if state["settings"] != settings:
                raise SAEError(f"checkpoint {checkpoint} is of another run ({state['settings']}, this run {settings}): "
                               "give a new --out, or delete it to start over")  # fmt: skip
            sae.load_state_dict(state["sae"])
            optimizer.load_state_dict(state["optimizer"])
            step, last_fired = state["step"], state["last_fired"]
        bar = tqdm(total=total, initial=step, desc="sae", unit="step", disable=not progress)
        order = None
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            if offset == 0 or order is None:  # one permutation per epoch, from the seed alone
                order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            x = acts[order[offset * batch_size : (offset + 1) * batch_size]].float() * scale
            pre = sae.pre_activations(x)
            top = pre.topk(k, dim=-1)
            values = top.values.relu()
            # Decode from the k active latents only (embedding_bag): the dense product costs d_sae/k times more.
            recon = torch.nn.functional.embedding_bag(top.indices, sae.W_dec, per_sample_weights=values, mode="sum")
            recon = recon + sae.b_dec
            mse = (recon - x).pow(2).sum(-1).mean() / x.pow(2).sum(-1).mean()
            fired = torch.zeros(latents, dtype=torch.bool)
            fired[top.indices[values > 0]] = True
            last_fired = torch.where(fired, 0, last_fired + len(x))
            aux = _aux_loss(sae, pre, (x - recon).detach(), last_fired > dead_after)
            loss = mse + aux / 32
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # unit-norm decoder rows: activations carry the size
                sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(nmse=f"{mse.item():.3f}", dead=int((last_fired > dead_after).sum()))
            if checkpoint and (step % checkpoint_every == 0 or step == total):
                tmp = Path(f"{checkpoint}.tmp")
                torch.save({"settings": settings, "sae": sae.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step, "last_fired": last_fired}, tmp)  # fmt: skip
                tmp.replace(checkpoint)
        bar.close()
        with torch.no_grad():  # activations in the model's units: pre/scale, so b_enc/scale and b_dec/scale
            sae.b_enc /= scale
            sae.b_dec /= scale
    return sae.requires_grad_(False)


@torch.no_grad()
def measure(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """FVE, L0 and dead latents of ``sae`` on activations ``[n, d]``, and per latent the mean
    activation when active and the firing frequency."""
    sums, counts = torch.zeros(sae.d_sae, dtype=torch.float64), torch.zeros(sae.d_sae, dtype=torch.float64)
    residual, l0 = 0.0, 0.0
    mean = acts.float().mean(0)
    variance = 0.0
    for start in range(0, len(acts), batch_size):
        x = acts[start : start + batch_size].float()
        latents = sae.encode(x)
        residual += float((sae.decode(latents) - x).double().pow(2).sum())
        variance += float((x - mean).double().pow(2).sum())
        active = latents > 0
        l0 += float(active.sum())
        sums += latents.double().sum(0)
        counts += active.double().sum(0)
    metrics = {"fve": 1 - residual / variance, "l0": l0 / len(acts), "dead": int((counts == 0).sum()), "tokens": len(acts)}
    return metrics, (sums / counts.clamp_min(1)).float(), (counts / len(acts)).float()


def loss_ids(tokenizer, texts: Sequence[str], length: int, n: int) -> torch.Tensor:
    """Token ids ``[<=n, length]``: the first ``length`` tokens of texts that have that many."""
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            break
    return torch.tensor(rows, dtype=torch.long)


def train(model, site: str, layer: int, latents: int, k: int, tokens: int, out: str | Path,
          texts: Sequence[str] | None = None, heldout: Sequence[str] | None = None, heldout_tokens: int = 50_000,
          loss_texts: int = 64, loss_length: int = 64, epochs: int = 1, batch_size: int = 1024, lr: float | None = None,
          read_batch: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32, progress: bool = True) -> SAE:  # fmt: skip
    """Train a TopK SAE on ``site``/``layer`` of ``model`` and write it with its metrics to ``out``.

    ``texts``/``heldout``: passages (default: the built corpus, ``superscopes.corpus``).
    Resumable: activations are cached under ``out/cache`` and training checkpoints in
    ``out/checkpoint.pt``; rerun the same command to continue."""
    from superscopes import corpus
    from superscopes.models import model_name

    out = Path(out)
    name = model_name(model)
    SAE(torch.zeros(hidden_size(model), 1), torch.zeros(1), torch.zeros(1, hidden_size(model)),
        torch.zeros(hidden_size(model)), "standard", site=site, layer=layer, model=name).check(model)  # fmt: skip
    texts = corpus.load("train") if texts is None else texts
    heldout = corpus.load("heldout") if heldout is None else heldout
    started = time.time()
    acts = cache_activations(model, site, layer, texts, tokens, out / "cache" / "train", read_batch, progress=progress)
    acts = acts[:tokens]
    read_seconds = time.time() - started
    held = cache_activations(model, site, layer, heldout, heldout_tokens, out / "cache" / "heldout", read_batch,
                             progress=progress, require=False)[:heldout_tokens]  # fmt: skip
    started = time.time()
    sae = train_sae(acts, latents, k, site, layer, name, batch_size, epochs, lr, seed, out / "checkpoint.pt",
                    progress=progress)  # fmt: skip
    train_seconds = time.time() - started
    # Typical activations from the training tokens (what "mean activation when active" means in use).
    train_metrics, sae.mean_activation, sae.frequency = measure(sae, acts)
    metrics, _, held_frequency = measure(sae, held)
    ids = loss_ids(model.tokenizer, heldout, loss_length, loss_texts)
    metrics |= {
        "loss": next_token_losses(model, sae, ids),
        "loss_tokens": int(ids[:, 1:].numel()),
        "dead_in_training_tokens": train_metrics["dead"],
        "train_fve": train_metrics["fve"],
        "training": {"model": name, "site": site, "layer": layer, "latents": latents, "k": k, "tokens": int(len(acts)),
                     "epochs": epochs, "batch_size": batch_size, "seed": seed, "heldout_tokens": int(len(held)),
                     "read_seconds": round(read_seconds, 1), "train_seconds": round(train_seconds, 1),
                     "torch_threads": torch.get_num_threads()},
    }  # fmt: skip
    sae.save(out, dtype)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return sae


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m superscopes.sae", description="Sparse autoencoders on a model's sites")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train a TopK SAE on the offline corpus (resumable)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--site", default="resid_post", choices=list(SITE_HOOKS))
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (activations read once, cached)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=None, help="default: 8e-4 / sqrt(latents / 1024)")
    p.add_argument("--heldout-tokens", type=int, default=50_000)
    p.add_argument("--corpus", default=None, help="corpus folder (default: $SUPERSCOPES_CACHE/corpus)")
    p.add_argument("--float16", action="store_true", help="store the weights in float16 (half the size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    from superscopes import corpus
    from superscopes.models import load as load_model

    model = load_model(args.model)
    try:
        sae = train(model, args.site, args.layer, args.latents, args.k, args.tokens, args.out,
                    texts=corpus.load("train", args.corpus), heldout=corpus.load("heldout", args.corpus),
                    heldout_tokens=args.heldout_tokens, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, dtype=torch.float16 if args.float16 else torch.float32)  # fmt: skip
    except (SAEError, UnsafeFileError) as error:  # one line naming the file, not a traceback
        raise SystemExit(f"superscopes sae: error: {error}") from None
    print(sae)
    print((Path(args.out) / METRICS_FILE).read_text())


if __name__ == "__main__":
    main()
