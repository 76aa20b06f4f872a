"""Trace snippets: read, amplify and write a site, inside any nnsight trace.

Everything here is plain torch on the values nnsight hands over, so the same calls run
locally, under ``remote="local"`` and on NDIF (``superscopes`` registers this module and
``sites`` to be shipped by value with remote requests)::

    from superscopes import ops

    with model.trace("Diana, Princess of Wales"):
        v = ops.read(model, "mlp_out", 3, position=-1)          # [batch, d]
    with model.trace(target_prompt):
        ops.patch(model, "resid_post", 0, v, position=-1, alpha=6.0)

Sites are described in ``superscopes.sites``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers.cache_utils import DynamicLayer

from superscopes.sites import ScopeError, architecture_of, resolve

Transform = Literal["scale", "cfg", "norm", "affine", "random", "latent"]


@dataclass(frozen=True)
class TransformSpec:
    """What a transform needs: read by the grid's validation, its planning and its patch passes."""

    description: str
    writes: bool = True  # False: nothing is written (the control)
    base: bool = False  # amplify gets the clean vector at the write site
    argument: Literal["weight", "direction", "latent"] | None = None  # its per-grid tensors, as amplify takes them
    any_hidden_size: bool = False  # can write into a model of another hidden size than the read one


# The one table of transforms (``amplify`` says what each computes); "none" is the grid's control.
TRANSFORM_TABLE: dict[str, TransformSpec] = {
    "scale": TransformSpec("alpha * v"),
    "cfg": TransformSpec("base + alpha * (v - base)", base=True),
    "norm": TransformSpec("v at the norm of the vector it replaces, times alpha", base=True),
    "affine": TransformSpec("alpha * (v @ weight.T + bias), a fitted map", argument="weight", any_hidden_size=True),
    "random": TransformSpec("a random direction with the norm of v, times alpha (a control)", argument="direction"),
    "latent": TransformSpec("v with one SAE latent's component scaled by alpha", argument="latent"),
    "none": TransformSpec("nothing written: the target's own output (a control)", writes=False, any_hidden_size=True),
}
TRANSFORMS: tuple[str, ...] = tuple(name for name, spec in TRANSFORM_TABLE.items() if spec.writes)
WRITE_MODES: tuple[str, ...] = ("replace", "add")

Position = int | torch.Tensor


def activation(model, site: str, layer: int) -> torch.Tensor:
    """The live ``[batch, seq, d_model]`` tensor of ``site`` at ``layer``; writes to it patch the run.

    A site or layer the model does not have raises the grid's ``ScopeError`` (checked before
    the module is touched, so no forward pass waits on it)."""
    arch = architecture_of(model)
    if site not in arch.sites:
        raise ScopeError(f"site {site!r} is not valid; choose from {', '.join(arch.sites)}")
    blocks = resolve(model, arch.blocks)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(blocks):
        raise ScopeError(f"layer {layer!r} is out of range: the model has layers 0-{len(blocks) - 1}")
    spec = arch.sites[site]
    module = resolve(blocks[layer], spec.module)
    value = module.input if spec.io == "input" else module.output
    return value if spec.index is None else value[spec.index]


def unembed(model, vectors: torch.Tensor) -> torch.Tensor:
    """The model's own readout of residual-stream vectors ``[n, d]`` as if they left the last
    block: final norm, unembedding, and final logit soft-capping where the architecture has it
    (Gemma 2). Every readout of the toolkit (logit lens, top-k, the lenses) goes through the
    model's logits or this, so none of them drifts from the model's own probabilities."""
    arch = architecture_of(model)
    head = resolve(model, arch.unembed)
    weight = head.weight  # the server's device and dtype when remote
    logits = head(resolve(model, arch.final_norm)(vectors.to(device=weight.device, dtype=weight.dtype))).float()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _index(position: Position, rows: torch.Tensor | None, length: int) -> tuple:
    """The index of ``position`` (per row with ``rows``) in a ``[batch, length, d]`` site;
    a position outside the sequence raises ``ScopeError``, not torch's IndexError."""
    try:
        positions = torch.as_tensor(position)
    except (TypeError, ValueError, RuntimeError):
        positions = None
    if (
        isinstance(position, bool)
        or positions is None
        or positions.is_floating_point()
        or positions.is_complex()
        or positions.dtype == torch.bool
    ):
        raise ScopeError(f"position {position!r} is not a token index (an int, or a tensor of them)")
    if positions.numel() and not bool(((positions >= -length) & (positions < length)).all()):
        raise ScopeError(
            f"position {position!r} is outside the sequence: it has {length} tokens (indices {-length} to {length - 1})"
        )
    return (slice(None), position) if rows is None else (rows, position)


def read(model, site: str, layer: int, position: Position = -1, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of ``site`` at ``layer``: ``[batch, d]`` at one position, or ``[len(rows), d]``
    at ``(rows[i], position[i])``. Cloned so that saving it ships only these values."""
    value = activation(model, site, layer)
    return value[_index(position, rows, value.shape[1])].clone()


def amplify(
    vectors: torch.Tensor,
    alpha: float | torch.Tensor = 1.0,
    transform: Transform = "scale",
    base: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    direction: torch.Tensor | None = None,
    latent: dict | None = None,
) -> torch.Tensor:
    """Transform ``[n, d]`` vectors before they are written.

    - ``scale``:  alpha * v (the Superscopes paper's code).
    - ``cfg``:    base + alpha * (v - base), classifier-free-guidance style; ``base`` is the
                  vector being replaced at the write site.
    - ``norm``:   v rescaled to the norm of ``base``, then times alpha: tells amplification
                  apart from merely restoring a normal residual norm.
    - ``affine``: alpha * (v @ weight.T + bias), e.g. a map fitted between two models.
    - ``random``: a random ``direction`` with the norm of v, times alpha (a control).
    - ``latent``: v + (alpha - 1) * a(v) * d: one SAE latent's component of v (its activation
                  a(v) times its decoder row d) scaled by alpha, the rest of v (the SAE's error
                  term included) kept; ``latent`` holds the SAE's tensors (``SAE.latent_params``).
    ``alpha`` is a scalar or one value per row.
    """
    alpha = torch.as_tensor(alpha, dtype=vectors.dtype, device=vectors.device)
    if alpha.dim() == 1:
        alpha = alpha[:, None]
    if transform == "scale":
        return alpha * vectors
    if transform == "cfg":
        return base + alpha * (vectors - base)
    if transform == "norm":
        return alpha * vectors * (base.norm(dim=-1, keepdim=True) / vectors.norm(dim=-1, keepdim=True))
    if transform == "affine":
        mapped = vectors @ weight.T.to(vectors.dtype)
        return alpha * (mapped if bias is None else mapped + bias.to(vectors.dtype))
    if transform == "random":
        unit = direction.to(vectors.dtype) / direction.norm(dim=-1, keepdim=True)
        return alpha * unit * vectors.norm(dim=-1, keepdim=True)
    if transform == "latent":
        encoder = dict(latent)
        row = encoder.pop("decoder_row").to(vectors.dtype)
        # With run-time input normalisation the decoder works in normalised units: one
        # latent's part of the output is a(v) * d times the factor that maps them back.
        scale = sae_normalize(vectors.float(), encoder.get("normalize", "none"))[1].to(vectors.dtype)
        return vectors + (alpha - 1) * latent_activation(vectors, **encoder).to(vectors.dtype) * row * scale
    raise ScopeError(f"transform {transform!r} is not valid; choose from {', '.join(TRANSFORMS)}")


def sae_normalize(x: torch.Tensor, normalize: str = "none") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAELens' run-time input normalisation of an SAE: ``x`` in the SAE's units, and the
    ``scale`` and ``shift`` ``[n, 1]`` that map a reconstruction back (``y * scale + shift``).
    ``constant_norm_rescale``: each row to norm sqrt(d); ``layer_norm``: each row centred and
    divided by its (unbiased) standard deviation + 1e-5, mapped back without the 1e-5, as SAELens does."""
    ones, zeros = x.new_ones(x.shape[:-1] + (1,)), x.new_zeros(x.shape[:-1] + (1,))
    if normalize == "none":
        return x, ones, zeros
    if normalize == "constant_norm_rescale":
        coefficient = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True)
        return x * coefficient, 1 / coefficient, zeros
    if normalize == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        return (x - mu) / (std + 1e-5), std, mu
    raise ValueError(f"normalize {normalize!r} is not one of none, constant_norm_rescale, layer_norm")


def latent_activation(
    vectors: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    index: int,
    k: int | None = None,
    threshold: torch.Tensor | None = None,
    subtract_b_dec: bool = True,
    normalize: str = "none",
    r_mag: torch.Tensor | None = None,
    b_mag: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SAE latent's activation ``[n, 1]`` on vectors ``[n, d]``, computed as the SAE does:
    ReLU, JumpReLU (``threshold``), TopK (``k``: the latent counts only when its
    pre-activation is among the ``k`` largest) or gated (``b_enc`` the gate's bias, ``r_mag``
    and ``b_mag`` the magnitude path's); ``normalize``: the SAE's input normalisation
    (``sae_normalize``). Plain torch, so it runs inside a trace."""
    x = sae_normalize(vectors.float(), normalize)[0]
    x = x - b_dec.float() if subtract_b_dec else x
    pre = x @ W_enc.float() + b_enc.float()
    own = pre[:, index : index + 1]
    if r_mag is not None:
        magnitude = x @ (W_enc.float() * r_mag.float().exp()) + b_mag.float()
        return (own > 0).float() * magnitude[:, index : index + 1].relu()
    if threshold is not None:
        return own.relu() * (own > threshold[index])
    if k is not None:
        return own.relu() * (own >= pre.topk(k, dim=-1).values[:, -1:])
    return own.relu()


def write(
    model,
    site: str,
    layer: int,
    value: torch.Tensor,
    position: Position = -1,
    rows: torch.Tensor | None = None,
    mode: Literal["replace", "add"] = "replace",
) -> None:
    """Overwrite (or add to) ``site`` at ``layer`` and ``position`` with ``value`` ``[n, d]``."""
    target = activation(model, site, layer)
    _write_into(target, _index(position, rows, target.shape[1]), value, mode)


def _write_into(target: torch.Tensor, index: tuple, value: torch.Tensor, mode: str) -> None:
    value = value.to(device=target.device, dtype=target.dtype)
    if mode == "add":
        target[index] += value
    elif mode == "replace":
        target[index] = value
    else:
        raise ScopeError(f"mode {mode!r} is not valid; choose from {', '.join(WRITE_MODES)}")


def patch(
    model,
    site: str,
    layer: int,
    vectors: torch.Tensor,
    position: Position = -1,
    rows: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 1.0,
    transform: Transform = "scale",
    mode: Literal["replace", "add"] = "replace",
    **transform_args: torch.Tensor,
) -> None:
    """Amplify ``vectors`` and write them at ``site``/``layer``: the amplify-and-patch step.

    The ``base`` of ``cfg`` and ``norm`` is the clean vector at the write site."""
    target = activation(model, site, layer)
    index = _index(position, rows, target.shape[1])
    vectors = vectors.to(device=target.device, dtype=target.dtype)
    spec = TRANSFORM_TABLE.get(transform)  # an unknown one is named by amplify
    base = target[index].clone() if spec is not None and spec.base else None
    _write_into(target, index, amplify(vectors, alpha, transform, base=base, **transform_args), mode)


def repeat_cache(model, cache, rows: int, room: int = 0):
    """A new KV cache (transformers ``DynamicCache``) holding a one-row cache's keys and values
    repeated to ``rows`` rows, so a prefix computed once continues in every row of a batch.
    The one-row cache is left as it is (each pass that continues from it gets its own).

    ``room``: tokens the caller will add (fed tokens plus generated ones). Full-attention
    layers then get that space once and fill it in place (``PreallocatedLayer``) instead of
    concatenating their whole cache at every decoding step; sliding-window layers are kept."""
    repeated = type(cache)(config=model.config)  # one empty layer per layer type of the model
    for i, (keys, values, *_) in enumerate(cache):
        if room > 0 and type(repeated.layers[i]) is DynamicLayer:
            repeated.layers[i] = PreallocatedLayer(keys, values, rows, room)
        else:
            repeated.layers[i].update(keys.repeat_interleave(rows, 0), values.repeat_interleave(rows, 0))
    return repeated


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` holding a one-row cache repeated to ``rows`` rows, with room for
    ``room`` more tokens allocated once: ``update`` writes new keys and values into that space
    and returns views of the filled part, so values, shapes and masks are those of
    ``DynamicLayer`` without a ``torch.cat`` of the whole cache at every step (about 5% of
    greedy decoding on CPU). Past the room it concatenates."""

    # The base class is named, not ``super()``: NDIF compiles shipped methods from their source
    # alone, without the ``__class__`` cell that a bare ``super()`` needs.
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, room: int):
        DynamicLayer.__init__(self)
        length = keys.shape[-2]
        self._keys = keys.new_empty(rows, *keys.shape[1:-2], length + room, keys.shape[-1])
        self._values = values.new_empty(rows, *values.shape[1:-2], length + room, values.shape[-1])
        self._keys[..., :length, :] = keys  # broadcast over rows
        self._values[..., :length, :] = values
        self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
        start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            return DynamicLayer.update(self, key_states, value_states, *args, **kwargs)
        self._keys[..., start:end, :] = key_states
        self._values[..., start:end, :] = value_states
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values


class CellSampler:
    """A logits processor that makes greedy decoding sample: each row adds Gumbel noise from
    its own seed (and the step) to ``scores / temperature``, and argmax of that is an exact
    draw from ``softmax(scores / temperature)`` (the Gumbel-max trick). Rows never share a
    random stream, so a row's sample does not depend on the batch it runs in."""

    def __init__(self, seeds: torch.Tensor, temperature: float = 1.0):
        self.seeds = seeds.tolist()
        self.temperature = temperature
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noise = torch.empty(scores.shape, dtype=torch.float32)
        for row, seed in enumerate(self.seeds):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + self.step)
            uniform = torch.rand(scores.shape[-1], generator=generator).clamp_(min=1e-20, max=1 - 1e-7)
            noise[row] = -torch.log(-torch.log(uniform))
        self.step += 1
        return scores.float() / self.temperature + noise.to(scores.device)
