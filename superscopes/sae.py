"""Sparse autoencoders (SAEs) on a model's sites: load, save, train, decompose, use as sources.

An ``SAE`` is ``encode(x) = f((n(x) - b_dec) @ W_enc + b_enc)`` and ``decode(a) = n^-1(a @ W_dec +
b_dec)`` with ``f`` one of ``standard`` (ReLU), ``topk`` (the ``k`` largest pre-activations,
ReLU'd), ``jumprelu`` (ReLU, zero at or below a per-latent ``threshold``) or ``gated`` (the
gate's pre-activation > 0 times ReLU of a magnitude path sharing ``W_enc``, scaled by
``exp(r_mag)``, with its own bias ``b_mag``); ``b_dec`` is subtracted only if
``apply_b_dec_to_input``; ``n`` is SAELens' run-time ``normalize_activations`` (``none``,
``constant_norm_rescale``, ``layer_norm``), undone with the statistics of the encoded input.

``load`` reads SAELens folders (pre-6.0 and 6.x ``cfg.json``; every architecture SAELens 6
saves, BatchTopK and Matryoshka as the JumpReLU SAEs SAELens makes of them, TopK's
``rescale_acts_by_decoder_norm`` folded into the weights), Gemma Scope's ``params.npz``,
EleutherAI sparsify and dictionary_learning folders, and SAELens release ids or Hugging Face
``owner/repo/folder`` names from the local Hugging Face cache. A setting that changes the math
and is not implemented is refused by name; weights are checked (finite, shapes) and never
unpickled. ``tests/test_sae_saelens.py`` holds the proof against SAELens itself. Hooks map to
our sites by TransformerLens name (``blocks.L.hook_resid_pre``, ``hook_resid_post``,
``hook_mlp_out``, ``hook_attn_out``) or HF module path (``hook_site``). ``save`` writes a
SAELens folder (both layouts' fields, so ``sae_lens.SAE.load_from_disk`` reads it too).
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

from superscopes import ops
from superscopes.files import UnsafeFileError, load_torch
from superscopes.parsing import CommandParser
from superscopes.sites import hidden_size

if TYPE_CHECKING:  # pandas only where a frame is built
    import pandas as pd

    from superscopes.models import Model

ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "jumprelu", "gated")
NORMALIZATIONS: tuple[str, ...] = ("none", "constant_norm_rescale", "layer_norm")  # run-time, per input
HOOK_SITES: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
}
SITE_HOOKS = {site: hook for hook, site in HOOK_SITES.items()}
CFG_FILE, WEIGHTS_FILE, STATS_FILE, METRICS_FILE = (
    "cfg.json",
    "sae_weights.safetensors",
    "latent_stats.safetensors",
    "metrics.json",
)
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
        normalize_activations: str = "none",
        r_mag: torch.Tensor | None = None,
        b_mag: torch.Tensor | None = None,
        source: str | None = None,
    ):
        super().__init__()
        d_in, d_sae = W_enc.shape
        if architecture not in ARCHITECTURES:
            raise SAEError(f"architecture {architecture!r} is not supported; choose from {', '.join(ARCHITECTURES)}")
        if site not in SITE_HOOKS:
            raise SAEError(f"site {site!r} has no SAE hook; choose from {', '.join(SITE_HOOKS)}")
        if normalize_activations not in NORMALIZATIONS:
            raise SAEError(
                f"normalize_activations {normalize_activations!r} is not supported; choose from "
                f"{', '.join(NORMALIZATIONS)}"
            )
        shapes = {"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_in)), "b_dec": (b_dec, (d_in,))}
        needs = {"jumprelu": {"threshold": threshold}, "gated": {"r_mag": r_mag, "b_mag": b_mag}}.get(architecture, {})
        for name, tensor in needs.items():
            if tensor is None:
                raise SAEError(f"a {architecture} SAE needs {name} (one per latent)")
            shapes[name] = (tensor, (d_sae,))
        for name, (tensor, shape) in shapes.items():
            if tuple(tensor.shape) != shape:
                raise SAEError(
                    f"{name} has shape {tuple(tensor.shape)}; with W_enc {tuple(W_enc.shape)} it must be {shape}"
                )
        if architecture == "topk" and (not isinstance(k, int) or not 0 < k <= d_sae):
            raise SAEError(f"a topk SAE needs k in 1-{d_sae}, got {k!r}")
        self.W_enc = torch.nn.Parameter(W_enc.float())
        self.b_enc = torch.nn.Parameter(b_enc.float())
        self.W_dec = torch.nn.Parameter(W_dec.float())
        self.b_dec = torch.nn.Parameter(b_dec.float())
        frozen = lambda t: None if t is None else torch.nn.Parameter(t.float(), requires_grad=False)  # noqa: E731
        self.threshold = frozen(threshold if architecture == "jumprelu" else None)
        # Gated (Rajamanoharan et al., 2024): b_enc is the gate's bias; the magnitude path
        # shares W_enc, scaled per latent by exp(r_mag), with its own bias b_mag.
        self.r_mag = frozen(r_mag if architecture == "gated" else None)
        self.b_mag = frozen(b_mag if architecture == "gated" else None)
        self.architecture, self.k, self.site, self.layer, self.model = architecture, k, site, layer, model
        self.apply_b_dec_to_input, self.normalize_activations = apply_b_dec_to_input, normalize_activations
        self.mean_activation, self.frequency = mean_activation, frequency
        self.source = source  # the file it was read from, named in errors

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.architecture == "topk" else ""
        source = f", from {self.source}" if self.source else ""
        return f"SAE({self.architecture}{k}, {self.d_in}->{self.d_sae}, {self.site} layer {self.layer} of {self.model}{source})"

    # ------------------------------------------------------------ encode / decode

    def sae_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the encoder sees it: normalised (``normalize_activations``), minus ``b_dec``
        if ``apply_b_dec_to_input``."""
        x = ops.sae_normalize(x.to(self.W_enc.dtype), self.normalize_activations)[0]
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pre-activations (for gated SAEs: the gate's)."""
        return self.sae_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of activations ``[..., d_in]``."""
        sae_in = self.sae_input(x)
        pre = sae_in @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            return pre.relu()
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        if self.architecture == "gated":
            return (pre > 0).to(pre.dtype) * (sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction from ``latents``. An SAE with ``normalize_activations`` maps it
        back with the norm (and mean) of the input ``x`` it encoded, so it needs ``x``."""
        out = latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.normalize_activations == "none":
            return out
        if x is None:
            raise SAEError(
                f"{self!r} normalizes its input ({self.normalize_activations}): decode(latents, x) needs "
                "the input x that was encoded, to map the reconstruction back"
            )
        _, scale, shift = ops.sae_normalize(x.to(self.W_dec.dtype), self.normalize_activations)
        return out * scale + shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x``, in ``x``'s dtype (so it can be written back at the site)."""
        return self.decode(self.encode(x), x).to(x.dtype)

    # ------------------------------------------------------------ fitting a model

    def check(self, model: Model) -> None:
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
        flat = vectors.reshape(-1, self.d_in)
        return ops.amplify(flat, alpha, "latent", latent=self.latent_params(latent)).reshape(vectors.shape)

    def latent_params(self, latent: int) -> dict:
        """What ``ops.amplify(..., "latent")`` needs to amplify one latent, as plain tensors
        (they travel with a remote request: the whole encoder for TopK, one column otherwise)."""
        (latent,) = self._latents([latent])
        params = {
            "decoder_row": self.W_dec.detach()[latent].float(),
            "b_dec": self.b_dec.detach().float(),
            "subtract_b_dec": self.apply_b_dec_to_input,
            "normalize": self.normalize_activations,
        }
        if self.architecture == "topk":
            return params | {
                "W_enc": self.W_enc.detach().float(),
                "b_enc": self.b_enc.detach().float(),
                "index": latent,
                "k": self.k,
            }
        params |= {
            "W_enc": self.W_enc.detach()[:, latent : latent + 1].float(),
            "b_enc": self.b_enc.detach()[latent : latent + 1].float(),
            "index": 0,
        }
        if self.architecture == "jumprelu":
            params["threshold"] = self.threshold.detach()[latent : latent + 1].float()
        if self.architecture == "gated":
            params |= {
                "r_mag": self.r_mag.detach()[latent : latent + 1].float(),
                "b_mag": self.b_mag.detach()[latent : latent + 1].float(),
            }
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
            "normalize_activations": self.normalize_activations,
            "model_name": self.model,
            "hook_name": hook,
            "hook_layer": self.layer,
            "hook_head_index": None,
            "activation_fn_str": "topk" if self.architecture == "topk" else "relu",
            "activation_fn_kwargs": {"k": self.k} if self.architecture == "topk" else {},
            "metadata": {"model_name": self.model, "hook_name": hook, "hook_layer": self.layer},
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
        extra = {"threshold": self.threshold, "r_mag": self.r_mag, "b_mag": self.b_mag}
        weights |= {name: tensor for name, tensor in extra.items() if tensor is not None}
        if self.architecture == "gated":  # SAELens' gated SAE names the gate's bias b_gate
            weights["b_gate"] = weights.pop("b_enc")
        save_file({n: t.detach().to(dtype).contiguous() for n, t in weights.items()}, path / WEIGHTS_FILE)
        stats = {
            n: t for n, t in (("mean_activation", self.mean_activation), ("frequency", self.frequency)) if t is not None
        }
        if stats:
            save_file({n: t.detach().float().contiguous() for n, t in stats.items()}, path / STATS_FILE)
        return path


# ---------------------------------------------------------------- reading SAEs

FORMATS = (
    f"a SAELens folder ({CFG_FILE} + {WEIGHTS_FILE}), a Gemma Scope params.npz (or its folder), a sparsify "
    "folder (cfg.json + sae.safetensors) or a dictionary_learning folder (ae.pt + config.json)"
)
SAELENS_TRAINING = ("batchtopk", "matryoshka_batchtopk")  # saved for inference as JumpReLU, as SAELens does
# SAELens conversions (its registry's conversion_func) whose files we read; None is SAELens' own folder.
CONVERSIONS = (None, "gemma_2", "sparsify", "dictionary_learning_1")
DICTIONARY_LEARNING = (
    "AutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
    "GatedAutoEncoder",
)


def hook_site(hook: str, model: Model | None = None, where: str = "") -> tuple[str, int]:
    """``(site, layer)`` of a TransformerLens hook name (``blocks.L.hook_resid_post``, ...) or
    an HF module path whose output is a site (``model.layers.L``, ``layers.L.mlp``,
    ``transformer.h.L.attn``, ...; the module paths of ``model``'s architecture if given, else
    of every architecture in ``superscopes.sites``, which must agree)."""
    from superscopes.sites import ARCHITECTURES as TABLE
    from superscopes.sites import architecture_of

    match = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", hook or "")
    if match and match.group(2) in HOOK_SITES:
        return HOOK_SITES[match.group(2)], int(match.group(1))
    found = set()
    for arch in [architecture_of(model)] if model is not None else TABLE.values():
        parts = arch.blocks.split(".")
        for prefix in (".".join(parts[i:]) for i in range(len(parts))):  # with or without model./transformer.
            match = re.fullmatch(re.escape(prefix) + r"\.(\d+)(?:\.(.+))?", hook or "")
            if match:
                found |= {
                    (site, int(match.group(1)))
                    for site, spec in arch.sites.items()
                    if site in SITE_HOOKS and spec.io == "output" and spec.module == (match.group(2) or "")
                }
    if len(found) == 1:
        return found.pop()
    valid = ", ".join(f"blocks.<layer>.{h}" for h in HOOK_SITES)
    why = f"it names {len(found)} sites ({sorted(found)}): give the model" if found else "supported"
    raise SAEError(
        f"{where}hook_name {hook!r} does not map to a site; {why}: {valid}, or an HF module path whose "
        "output is a site (e.g. model.layers.<layer>, model.layers.<layer>.mlp)"
    )


def cfg_field(cfg: dict, name: str):
    """A SAELens ``cfg.json`` field: at the top level (pre-6.0) or under ``metadata`` (6.x; ``meta`` in
    folders superscopes wrote before it followed 6.x)."""
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    return cfg[name] if cfg.get(name) is not None else meta.get(name)


def _json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SAEError(f"{file} cannot be read as JSON: {error}") from error


def _safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError)
        raise SAEError(f"{file} cannot be read as safetensors: {error}") from error


def _npz(file: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    try:  # allow_pickle=False: an object array (pickled Python) is refused, not run
        with np.load(file, allow_pickle=False) as data:
            return {name: torch.from_numpy(np.array(data[name])) for name in data.files}
    except (OSError, ValueError) as error:
        raise SAEError(f"{file} cannot be read as plain arrays (pickled objects are refused): {error}") from error


def _torch_file(file: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only: tensors and plain containers only, no code unpickled
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, OSError, ...
        raise SAEError(f"{file} cannot be read as plain tensors (weights_only=True): {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SAEError(f"{file} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def _build(
    file: Path,
    weights: dict[str, torch.Tensor],
    d_in: int | None = None,
    d_sae: int | None = None,
    site: str | None = None,
    layer: int | None = None,
    **settings,
) -> SAE:
    """The SAE of ``weights`` read from ``file``: every tensor finite, shapes as the config
    (``d_in``, ``d_sae``) says; errors name the file and the field."""
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if weights.get(n) is None]
    missing += [
        n
        for n in {"jumprelu": ("threshold",), "gated": ("r_mag", "b_mag")}.get(settings["architecture"], ())
        if weights.get(n) is None
    ]
    if missing:
        raise SAEError(f"{file} lacks {', '.join(missing)}")
    for name, tensor in weights.items():
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise SAEError(f"{file}: {name} has {bad} NaN or inf value(s) of {tensor.numel()}")
    shape = tuple(weights["W_enc"].shape)
    if len(shape) != 2 or (d_in is not None and shape[0] != d_in) or (d_sae is not None and shape[1] != d_sae):
        raise SAEError(f"{file}: the config says d_in={d_in}, d_sae={d_sae} but W_enc has shape {shape}")
    if site is None or layer is None:
        raise SAEError(
            f"{file} does not say which site and layer it reads: give site= and layer= (sites: {', '.join(SITE_HOOKS)})"
        )
    try:
        return SAE(
            weights["W_enc"],
            weights["b_enc"],
            weights["W_dec"],
            weights["b_dec"],
            threshold=weights.get("threshold"),
            r_mag=weights.get("r_mag"),
            b_mag=weights.get("b_mag"),
            site=site,
            layer=layer,
            source=str(file),
            **settings,
        )
    except SAEError as error:
        raise SAEError(f"{file}: {error}") from None


def _place(
    where: str, found: tuple[str, int] | None, site: str | None, layer: int | None
) -> tuple[str | None, int | None]:
    """The site and layer: from the file (``found``) or given; given ones must agree with the file."""
    if found is None:
        return site, layer
    if (site is not None and site != found[0]) or (layer is not None and layer != found[1]):
        raise SAEError(f"{where}reads {found[0]} layer {found[1]}, not the given site={site!r} layer={layer!r}")
    return found


def _fold_decoder_norm(weights: dict[str, torch.Tensor]) -> None:
    """SAELens' ``rescale_acts_by_decoder_norm`` (TopK selects on pre-activation x decoder row
    norm, decode divides by it again), folded into the weights as SAELens' fold_W_dec_norm
    does: encodes and reconstructions stay the same and the decoder rows become unit norm."""
    norm = weights["W_dec"].norm(dim=-1).clamp(min=1e-8)
    weights["W_enc"] = weights["W_enc"] * norm
    weights["b_enc"] = weights["b_enc"] * norm
    weights["W_dec"] = weights["W_dec"] / norm[:, None]


def _load_saelens(
    path: Path,
    site: str | None,
    layer: int | None,
    model: Model | None = None,
    overrides: dict | None = None,
    norm_scaling_factor: float | None = None,
) -> SAE:
    """A SAELens folder, pre-6.0 (hook fields, activation_fn_str/kwargs at the top level) or 6.x
    (``k`` etc. at the top level, the hook under ``metadata``). Every field that changes
    encode or decode is implemented or refused by name."""
    cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
    cfg = _json(cfg_file) | (overrides or {})
    field = lambda name: cfg_field(cfg, name)  # noqa: E731
    where = f"{cfg_file}: "

    def refuse(name: str, value, why: str) -> None:
        raise SAEError(f"{where}{name}={value!r} is not supported ({why})")

    architecture = cfg.get("architecture") or "standard"
    if architecture not in ARCHITECTURES + SAELENS_TRAINING:
        refuse("architecture", architecture, f"supported: {', '.join(ARCHITECTURES + SAELENS_TRAINING)}")
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn")) or "relu"  # pre-6.0 fields
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if activation not in ("relu", "topk"):
        refuse("activation_fn_str", activation, "SAELens 6 reads only relu and topk")
    if [name for name, value in kwargs.items() if name != "k" and value]:
        refuse("activation_fn_kwargs", kwargs, "only k is read")
    if architecture == "standard" and activation == "topk":  # how SAELens 6 reads a pre-6.0 TopK config
        architecture = "topk"
    k = cfg.get("k") if cfg.get("k") is not None else kwargs.get("k")
    normalize = cfg.get("normalize_activations")
    normalize = {None: "none", False: "none", True: "expected_average_only_in"}.get(normalize, normalize)
    if normalize == "expected_average_only_in" and norm_scaling_factor is None:
        refuse(
            "normalize_activations",
            normalize,
            "its scaling factor is not in the folder: SAELens folds it in from "
            "its registry (loading by release id does too), or fold it into the weights and set 'none'",
        )
    if normalize not in NORMALIZATIONS + ("expected_average_only_in",):
        refuse("normalize_activations", normalize, f"supported: {', '.join(NORMALIZATIONS)}")
    if (cfg.get("reshape_activations") or "none") != "none":
        refuse("reshape_activations", cfg["reshape_activations"], "a per-head hook_z SAE does not read a site")
    if field("hook_head_index") is not None:
        refuse("hook_head_index", field("hook_head_index"), "an SAE of one attention head does not read a site")
    hook = field("hook_name") or field("hook_point")
    found = hook_site(hook, model, where) if hook or (site is None and layer is None) else None
    recorded = field("hook_layer")
    if found and recorded is not None and int(recorded) != found[1]:
        raise SAEError(f"{where}hook_layer {recorded} contradicts hook_name {hook!r} (layer {found[1]})")
    site, layer = _place(where, found, site, layer)

    weights = _safetensors(weights_file)
    if architecture == "gated":  # SAELens names the gate's bias b_gate
        weights["b_enc"] = weights.pop("b_gate", None)
    if architecture == "jumprelu" and "threshold" not in weights and "log_threshold" in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()  # older SAELens training checkpoints
    for name in ("scaling_factor", "finetuning_scaling_factor"):  # pre-6.0: decode scaled latents by it
        if name in weights:
            if not torch.allclose(weights[name], torch.ones_like(weights[name])):
                refuse(
                    name, "not all ones", f"{weights_file} holds a finetuning scaling factor; SAELens 6 refuses it too"
                )
            del weights[name]
    if architecture in SAELENS_TRAINING:  # as SAELens' save_inference_model: a JumpReLU at the learned threshold
        if "topk_threshold" not in weights:
            raise SAEError(f"{weights_file} lacks topk_threshold (a {architecture} training SAE's threshold)")
        d_sae = weights["W_enc"].shape[-1] if "W_enc" in weights else 0
        weights["threshold"] = torch.full((d_sae,), float(weights.pop("topk_threshold")))
        architecture = "jumprelu"
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | {"jumprelu": {"threshold"}, "gated": {"r_mag", "b_mag"}}.get(
        architecture, set()
    )
    if set(weights) - expected:
        raise SAEError(
            f"{weights_file} holds {', '.join(sorted(set(weights) - expected))}, which a {architecture} "
            f"SAE does not use: refused rather than ignored (expected {', '.join(sorted(expected))})"
        )
    if norm_scaling_factor is not None and normalize == "expected_average_only_in":
        # As SAELens' fold_activation_norm_scaling_factor (before any decoder-norm rescaling, as there).
        weights["W_enc"] = weights["W_enc"] * norm_scaling_factor
        weights["W_dec"] = weights["W_dec"] / norm_scaling_factor
        weights["b_dec"] = weights["b_dec"] / norm_scaling_factor
        normalize = "none"
    rescale = cfg.get("rescale_acts_by_decoder_norm")
    if rescale and cfg.get("architecture") not in ("topk",) + SAELENS_TRAINING:
        refuse("rescale_acts_by_decoder_norm", rescale, f"SAELens uses it for topk SAEs only, not {architecture}")
    if rescale and "W_dec" in weights and "b_enc" in weights:  # a missing one is named below
        _fold_decoder_norm(weights)
    stats = _safetensors(path / STATS_FILE) if (path / STATS_FILE).exists() else {}
    return _build(
        weights_file,
        weights,
        cfg.get("d_in"),
        cfg.get("d_sae"),
        site,
        layer,
        architecture=architecture,
        k=None if k is None or architecture != "topk" else int(k),
        model=field("model_name"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        mean_activation=stats.get("mean_activation"),
        frequency=stats.get("frequency"),
    )


def _load_gemma_scope(file: Path, site: str | None, layer: int | None) -> SAE:
    """Gemma Scope's ``params.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``): a
    JumpReLU that does not subtract ``b_dec`` from its input (Lieberum et al., 2024). Site and
    layer come from the release's path (``gemma-scope-2b-pt-res/layer_20/...``) or are given."""
    weights = {("W_" + n[2:] if n.startswith("w_") else n): t.float() for n, t in _npz(file).items()}
    kinds = [m.group(1) for part in file.parts if (m := re.search(r"gemma-scope-.*-(res|mlp|att)(?:-|$)", part))]
    layers = [int(m.group(1)) for part in file.parts if (m := re.fullmatch(r"layer_(\d+)", part))]
    if "embedding" in file.parts or (kinds and kinds[-1] == "att"):
        raise SAEError(
            f"{file}: Gemma Scope's {'embedding' if 'embedding' in file.parts else 'attention (hook_z)'} "
            "SAEs do not read a site; the residual (res) and MLP (mlp) ones do"
        )
    found = ({"res": "resid_post", "mlp": "mlp_out"}[kinds[-1]], layers[-1]) if kinds and layers else None
    site, layer = _place(f"{file}: ", found, site, layer)
    extra = set(weights) - {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    if extra:
        raise SAEError(f"{file} holds {', '.join(sorted(extra))}, which a Gemma Scope SAE does not have")
    # gemma-scope-2b-pt-res reads gemma-2-2b, gemma-scope-9b-it-res gemma-2-9b-it (SAELens' names).
    sizes = [(m.group(1), m.group(2)) for part in file.parts if (m := re.search(r"gemma-scope-(\d+b)-(pt|it)-", part))]
    model = f"gemma-2-{sizes[-1][0]}{'-it' if sizes[-1][1] == 'it' else ''}" if sizes else None
    return _build(
        file, weights, site=site, layer=layer, architecture="jumprelu", apply_b_dec_to_input=False, model=model
    )


def _load_sparsify(path: Path, site: str | None, layer: int | None, model: Model | None = None) -> SAE:
    """An EleutherAI sparsify folder: ``cfg.json`` + ``sae.safetensors`` (``encoder.weight``
    ``[latents, d_in]``, ``encoder.bias``, ``W_dec`` ``[latents, d_in]``, ``b_dec``), named by
    its hookpoint (an HF module path, e.g. ``layers.5``). Its encode: ReLU((x - b_dec) W_enc +
    b_enc), the top k kept."""
    cfg_file, weights_file = path / "cfg.json", path / "sae.safetensors"
    cfg = _json(cfg_file)
    for name, bad in (
        ("activation", cfg.get("activation", "topk") != "topk"),
        ("transcode", cfg.get("transcode")),
        ("skip_connection", cfg.get("skip_connection")),
        ("signed", cfg.get("signed")),
    ):
        if bad:
            raise SAEError(
                f"{cfg_file}: {name}={cfg[name]!r} is not supported (a topk sparse autoencoder reads a site)"
            )
    state = _safetensors(weights_file)
    if "W_skip" in state:
        raise SAEError(f"{weights_file} holds W_skip (a skip connection), which is not supported")
    encoder = state.get("encoder.weight")
    weights = {
        "W_enc": None if encoder is None else encoder.T.contiguous(),
        "b_enc": state.get("encoder.bias"),
        "W_dec": state.get("W_dec"),
        "b_dec": state.get("b_dec"),
    }
    d_sae = cfg.get("num_latents") or (cfg["d_in"] * cfg["expansion_factor"] if "expansion_factor" in cfg else None)
    site, layer = _place(f"{path}: ", hook_site(path.name, model, f"{path}: "), site, layer)
    return _build(
        weights_file,
        {n: None if t is None else t.float() for n, t in weights.items()},
        cfg.get("d_in"),
        d_sae,
        site,
        layer,
        architecture="topk",
        k=int(cfg["k"]),
        model=path.parent.name,
    )


def _load_dictionary_learning(path: Path, site: str | None, layer: int | None, model: Model | None = None) -> SAE:
    """A dictionary_learning (saprmarks) folder: ``ae.pt`` (a state dict, read with
    ``weights_only=True``) and ``config.json`` (``trainer``: ``dict_class``, ``layer``,
    ``submodule_name``, ``k``, ...), each class's encode as its own code computes it."""
    cfg_file, weights_file = path / "config.json", path / "ae.pt"
    trainer = _json(cfg_file).get("trainer") or {}
    kind = trainer.get("dict_class")
    if kind not in DICTIONARY_LEARNING:
        raise SAEError(
            f"{cfg_file}: trainer.dict_class={kind!r} is not supported; supported: {', '.join(DICTIONARY_LEARNING)}"
        )
    state = {n: t.float() if t.is_floating_point() else t for n, t in _torch_file(weights_file).items()}
    T = lambda name: None if state.get(name) is None else state[name].T.contiguous()  # noqa: E731
    settings: dict = {"architecture": "standard"}
    if kind in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "GatedAutoEncoder"):  # nn.Linear layers
        weights = {
            "W_enc": T("encoder.weight"),
            "b_enc": state.get("encoder.bias"),
            "W_dec": T("decoder.weight"),
            "b_dec": state.get("b_dec", state.get("bias")),
        }
    else:
        weights = {n: state.get(n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    d_sae = weights["W_enc"].shape[1] if weights["W_enc"] is not None else None
    if kind == "AutoEncoderTopK":  # per token top k (its saved threshold is only for use_threshold=True)
        settings = {"architecture": "topk", "k": int(state.get("k", torch.tensor(trainer.get("k", 0))))}
    elif kind in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):  # inference: ReLU, zero at or below the threshold
        threshold = state.get("threshold")
        settings = {"architecture": "jumprelu"}
        weights["threshold"] = None if threshold is None or d_sae is None else threshold.float().expand(d_sae).clone()
    elif kind == "JumpReluAutoEncoder":  # does not subtract b_dec from its input
        settings = {"architecture": "jumprelu", "apply_b_dec_to_input": False}
        weights["threshold"] = state.get("threshold")
    elif kind == "GatedAutoEncoder":  # encoder without bias; gate_bias, mag_bias, r_mag; decoder_bias
        settings = {"architecture": "gated"}
        weights |= {
            "b_enc": state.get("gate_bias"),
            "b_mag": state.get("mag_bias"),
            "r_mag": state.get("r_mag"),
            "b_dec": state.get("decoder_bias"),
        }
    hook = trainer.get("submodule_name") or ""
    named = [s for s in SITE_HOOKS if s in hook]
    found = None
    if trainer.get("layer") is not None and len(named) == 1:
        found = (named[0], int(trainer["layer"]))
    elif hook:
        try:
            found = hook_site(hook, model)
        except SAEError:
            found = None
    site, layer = _place(f"{cfg_file}: ", found, site, layer)
    return _build(
        weights_file,
        weights,
        trainer.get("activation_dim"),
        trainer.get("dict_size"),
        site,
        layer,
        model=str(trainer.get("lm_name", "")).split("/")[-1] or None,
        **settings,
    )


def load_folder(
    path: str | Path,
    site: str | None = None,
    layer: int | None = None,
    model: Model | None = None,
    overrides: dict | None = None,
    norm_scaling_factor: float | None = None,
) -> SAE:
    """An SAE from a folder (or Gemma Scope ``params.npz`` file) in any of ``FORMATS``, told
    apart by the files it holds. ``site``/``layer``: where the format does not record them."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return _load_gemma_scope(path, site, layer)
    if (path / "params.npz").exists():
        return _load_gemma_scope(path / "params.npz", site, layer)
    if (path / CFG_FILE).exists() and (path / WEIGHTS_FILE).exists():
        return _load_saelens(path, site, layer, model, overrides, norm_scaling_factor)
    if (path / "cfg.json").exists() and (path / "sae.safetensors").exists():
        return _load_sparsify(path, site, layer, model)
    if (path / "ae.pt").exists() and (path / "config.json").exists():
        return _load_dictionary_learning(path, site, layer, model)
    inner = sorted(p.parent.name for p in path.glob("*/sae.safetensors"))  # a sparsify run: a folder per hookpoint
    hint = f"; it holds sparsify hookpoints {', '.join(inner)}: give one" if inner else ""
    have = f"it has {', '.join(sorted(p.name for p in path.iterdir())[:10])}" if path.is_dir() else "no such folder"
    raise SAEError(f"{path} is not an SAE folder: {have}; expected {FORMATS}{hint}")


def _cached_folder(repo: str, folder: str, download: bool) -> Path | None:
    """``folder`` of Hugging Face repo ``repo`` in the local HF cache (its documented layout:
    ``models--owner--name/snapshots/<commit>/``, refs/main first), or downloaded if ``download``."""
    from huggingface_hub import constants, snapshot_download

    if download:
        return Path(snapshot_download(repo, allow_patterns=[f"{folder}/*"])) / folder
    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    main = root / "refs" / "main"
    snapshots = [root / "snapshots" / main.read_text().strip()] if main.exists() else []
    snapshots += sorted((root / "snapshots").glob("*")) if (root / "snapshots").is_dir() else []
    return next((s / folder for s in snapshots if (s / folder).is_dir() and any((s / folder).iterdir())), None)


def load_pretrained(
    name: str, model: Model | None = None, download: bool = False, site: str | None = None, layer: int | None = None
) -> SAE:
    """An SAE by name: a SAELens release id ``release/sae_id`` (e.g.
    ``gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical``, resolved by SAELens'
    registry: needs ``sae-lens``, ``pip install 'superscopes[sae]'``) or a Hugging Face
    ``owner/repo/folder``; its files are read from the local Hugging Face cache (``download``:
    fetched into it first). SAELens' registry settings are applied as SAELens applies them."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        directory = None
    else:
        directory = get_pretrained_saes_directory()
    release = max((r for r in directory or {} if name.startswith(r + "/")), key=len, default=None)
    overrides, factor = None, None
    if release is not None:
        lookup, sae_id = directory[release], name[len(release) + 1 :]
        if sae_id not in lookup.saes_map:
            ids = list(lookup.saes_map)
            raise SAEError(
                f"{sae_id!r} is not an SAE of release {release}; its SAEs: {', '.join(ids[:5])}"
                f"{', ...' if len(ids) > 5 else ''} ({len(ids)})"
            )
        if lookup.conversion_func not in CONVERSIONS:
            raise SAEError(
                f"release {release} is stored in SAELens' {lookup.conversion_func!r} conversion, which "
                f"superscopes does not read; it reads {FORMATS}"
            )
        repo, folder = lookup.repo_id, lookup.saes_map[sae_id]
        overrides = {k: v for k, v in (lookup.config_overrides or {}).items() if k != "model_from_pretrained_kwargs"}
        factor = lookup.norm_scaling_factor.get(sae_id)
    elif name.count("/") >= 2:
        owner, repo_name, folder = name.split("/", 2)
        repo = f"{owner}/{repo_name}"
    else:
        raise SAEError(
            f"no SAE {name!r}: give an SAE folder, one of the embedded SAEs ({', '.join(EMBEDDED)}), a "
            "SAELens release id (release/sae_id) or a Hugging Face owner/repo/folder"
        )
    path = _cached_folder(repo, folder, download)
    if path is None:
        from huggingface_hub import constants

        registry = (
            ""
            if directory is not None
            else " If it is a SAELens release id, install sae-lens "
            "(pip install 'superscopes[sae]') so that its registry resolves it."
        )
        raise SAEError(
            f"SAE {name!r}: {repo}/{folder} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}): "
            f"fetch it with `huggingface-cli download {repo} --include '{folder}/*'` or "
            f"load(..., download=True), or give its folder.{registry}"
        )
    if overrides and not (path / CFG_FILE).exists():
        raise SAEError(f"release {release} overrides {', '.join(overrides)}, which only SAELens folders take here")
    return load_folder(path, site, layer, model, overrides, factor)


def load(
    name_or_path: str | Path,
    model: Model | None = None,
    site: str | None = None,
    layer: int | None = None,
    download: bool = False,
) -> SAE:
    """An SAE: an embedded one by model name (``EMBEDDED``), a folder or file in any of
    ``FORMATS`` (``load_folder``), or a SAELens release id / Hugging Face ``owner/repo/folder``
    (``load_pretrained``); checked against ``model`` if given (whose module paths then name
    the sites). ``site``/``layer``: where the files do not say."""
    key = str(name_or_path)
    if key in EMBEDDED:
        sae = load_folder(EMBEDDED_DIR / EMBEDDED[key])
        sae.source = f"the embedded SAE {key}"  # not this checkout's path (it goes into summaries)
    elif Path(key).exists():
        sae = load_folder(key, site, layer, model)
    else:
        sae = load_pretrained(key, model, download, site, layer)
    if model is not None:
        sae.check(model)
    return sae


# ---------------------------------------------------------------- the graph


def latent_scope(sae: SAE, latents: Sequence[int], model: Model | None = None, scale: str | float = "mean", **settings):
    """A ``Scope`` whose sources are latents: each latent's ``directions(scale)`` vector,
    times each alpha, patched into the target (default ``identity``, at the SAE's layer).
    ``settings``: any other ``Scope`` field (alphas, target, target_layers, output, ...).
    With ``model``, the SAE is checked against it first."""
    from superscopes.scope import Scope

    if model is not None:
        sae.check(model)
    latents = sae._latents(latents)
    settings = {"target": "identity", "target_layers": ["same"]} | settings
    return Scope(
        prompts=[f"latent {i}" for i in latents],
        vectors=sae.directions(latents, scale),
        sites=[sae.site],
        layers=[sae.layer],
        **settings,
    )


def explanation_scores(model: Model, scope, frame: pd.DataFrame) -> pd.DataFrame:
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

    Each cell reruns its prompt and generated tokens teacher-forced, once patched and once clean
    (``superscopes.batching.teacher_forced``, which the grid's ``relevancy`` readout runs too)."""
    from superscopes.batching import teacher_forced

    if scope.vectors is None:
        raise SAEError("explanation_scores needs a Scope with vectors (e.g. latent_scope): it patches them again")
    if "output_ids" not in frame or scope.output != "generate":
        raise SAEError("explanation_scores needs generated outputs: run the scope with output='generate'")
    names = {name: i for i, name in enumerate(scope.prompts)}
    vectors = [scope.vectors[names[source]].float() for source in frame["source"]]
    scores = teacher_forced(model, frame, vectors)
    relevancy = [(patched - clean).tolist() for patched, clean, _, _ in scores]
    return frame.assign(
        self_similarity=[
            float(torch.nn.functional.cosine_similarity(final, vector, dim=0))
            for (_, _, _, final), vector in zip(scores, vectors)
        ],
        entropy=[float(-(first.exp() * first).sum()) for _, _, first, _ in scores],
        relevancy=relevancy,
        relevancy_mean=[sum(r) / len(r) if r else float("nan") for r in relevancy],
    )


# ---------------------------------------------------------------- metrics


def next_token_losses(model: Model, sae: SAE, ids: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
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


def cache_activations(
    model: Model,
    site: str,
    layer: int,
    texts: Sequence[str],
    tokens: int,
    folder: str | Path,
    batch_size: int = 32,
    shard_passages: int = 512,
    progress: bool = True,
    require: bool = True,
) -> torch.Tensor:
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
    source = {
        "model": model_name(model),
        "site": site,
        "layer": layer,
        "shard_passages": shard_passages,
        "texts": len(texts),
        "first_text": zlib.crc32(texts[0].encode()) if texts else None,
    }
    recorded = folder / "source.json"
    if recorded.exists() and json.loads(recorded.read_text()) != source:
        raise SAEError(
            f"{folder} holds activations of {recorded.read_text().strip()}, not {json.dumps(source)}: "
            "give a new folder (--out), or delete it"
        )
    recorded.write_text(json.dumps(source))
    shards, total = [], 0
    bar = tqdm(total=tokens, desc=f"activations {site} {layer}", unit="tok", disable=not progress)
    for index, start in enumerate(range(0, len(texts), shard_passages)):
        if total >= tokens:
            break
        file = folder / f"shard_{index:05d}.safetensors"
        if file.exists():  # a saved shard, read back at once
            shard = load_file(file)["activations"]
            bar.update(max(0, min(len(shard), tokens - bar.n)))
        else:
            # Sorted by length: a batch of similar lengths needs little padding (saves ~1/3 here).
            chunk = sorted(texts[start : start + shard_passages], key=len)
            parts = []  # read batch by batch (the same passes), so the bar moves from the first seconds
            for first in range(0, len(chunk), batch_size):
                parts.append(
                    collect(model, chunk[first : first + batch_size], site, [layer], "text", batch_size)[layer]
                )
                bar.update(max(0, min(len(parts[-1]), tokens - bar.n)))
            shard = torch.cat(parts).half()
            save_file({"activations": shard.contiguous()}, file.with_suffix(".tmp"))
            file.with_suffix(".tmp").replace(file)  # a shard is on disk whole or not at all
        shards.append(shard)
        total += len(shard)
    bar.close()
    if require and total < tokens:
        raise SAEError(f"the texts hold {total} tokens, fewer than tokens={tokens}: give more text or fewer tokens")
    return torch.cat(shards)


def _new_sae(
    d_in: int,
    latents: int,
    k: int,
    site: str,
    layer: int,
    model: str | None,
    b_dec: torch.Tensor,
    generator: torch.Generator,
) -> SAE:
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


def train_sae(
    acts: torch.Tensor,
    latents: int,
    k: int,
    site: str,
    layer: int,
    model: str | None = None,
    batch_size: int = 1024,
    epochs: int = 1,
    lr: float | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 200,
    dead_after: int = 200_000,
    progress: bool = True,
) -> SAE:
    """A TopK SAE fitted to activations ``[n, d]``; returned with activations in ``acts``'s units.

    Training sees ``acts`` scaled to mean squared norm ``d`` (one lr fits every site and
    model); the scale is folded back at the end by dividing ``b_enc`` and ``b_dec`` by it
    (TopK commutes with a positive scale; decoder rows stay unit norm). ``dead_after``: a
    latent not active for this many tokens gets the AuxK loss.
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
        settings = {
            "n": n,
            "latents": latents,
            "k": k,
            "batch_size": batch_size,
            "epochs": epochs,
            "lr": lr,
            "seed": seed,
        }
        if checkpoint and Path(checkpoint).exists():
            state = load_torch(checkpoint)  # tensors and plain values only: a planted pickle runs no code
            if state["settings"] != settings:
                raise SAEError(
                    f"checkpoint {checkpoint} is of another run ({state['settings']}, this run {settings}): "
                    "give a new --out, or delete it to start over"
                )
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
                torch.save(
                    {
                        "settings": settings,
                        "sae": sae.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "last_fired": last_fired,
                    },
                    tmp,
                )
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
    metrics = {
        "fve": 1 - residual / variance,
        "l0": l0 / len(acts),
        "dead": int((counts == 0).sum()),
        "tokens": len(acts),
    }
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


def train(
    model: Model,
    site: str,
    layer: int,
    latents: int,
    k: int,
    tokens: int,
    out: str | Path,
    texts: Sequence[str] | None = None,
    heldout: Sequence[str] | None = None,
    heldout_tokens: int = 50_000,
    loss_texts: int = 64,
    loss_length: int = 64,
    epochs: int = 1,
    batch_size: int = 1024,
    lr: float | None = None,
    read_batch: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> SAE:
    """Train a TopK SAE on ``site``/``layer`` of ``model`` and write it with its metrics to ``out``.

    ``texts``/``heldout``: passages (default: the built corpus, ``superscopes.corpus``).
    Resumable: activations are cached under ``out/cache`` and training checkpoints in
    ``out/checkpoint.pt``; rerun the same command to continue."""
    from superscopes import corpus
    from superscopes.models import model_name

    out = Path(out)
    name = model_name(model)
    SAE(
        torch.zeros(hidden_size(model), 1),
        torch.zeros(1),
        torch.zeros(1, hidden_size(model)),
        torch.zeros(hidden_size(model)),
        "standard",
        site=site,
        layer=layer,
        model=name,
    ).check(model)
    texts = corpus.load("train") if texts is None else texts
    heldout = corpus.load("heldout") if heldout is None else heldout
    started = time.time()
    acts = cache_activations(model, site, layer, texts, tokens, out / "cache" / "train", read_batch, progress=progress)
    acts = acts[:tokens]
    read_seconds = time.time() - started
    held = cache_activations(
        model,
        site,
        layer,
        heldout,
        heldout_tokens,
        out / "cache" / "heldout",
        read_batch,
        progress=progress,
        require=False,
    )[:heldout_tokens]
    started = time.time()
    sae = train_sae(
        acts, latents, k, site, layer, name, batch_size, epochs, lr, seed, out / "checkpoint.pt", progress=progress
    )
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
        "training": {
            "model": name,
            "site": site,
            "layer": layer,
            "latents": latents,
            "k": k,
            "tokens": int(len(acts)),
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "heldout_tokens": int(len(held)),
            "read_seconds": round(read_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "torch_threads": torch.get_num_threads(),
        },
    }
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
        sae = train(
            model,
            args.site,
            args.layer,
            args.latents,
            args.k,
            args.tokens,
            args.out,
            texts=corpus.load("train", args.corpus),
            heldout=corpus.load("heldout", args.corpus),
            heldout_tokens=args.heldout_tokens,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            dtype=torch.float16 if args.float16 else torch.float32,
        )
    except (SAEError, UnsafeFileError) as error:  # one line naming the file, not a traceback
        raise SystemExit(f"superscopes sae: error: {error}") from None
    print(sae)
    print((Path(args.out) / METRICS_FILE).read_text())


if __name__ == "__main__":
    main()
