"""``affine_lens``: each read source vector through a least-squares map from its layer to the
last layer, then the model's own final norm and unembedding (the affine, or "tuned", lens the
Patchscopes paper compares with)."""

from __future__ import annotations

import torch

from superscopes import ops
from superscopes.readouts.base import Context, Readout
from superscopes.sites import ScopeError

FIT_CORPUS = "patchscopes"  # superscopes.corpus.texts: embedded, so the default fit needs no download
FIT_TEXTS = 1000


class AffineLens(Readout):
    """``maps``: ``{layer: (W [d, d], b [d])}`` as ``superscopes.lens.fit_affine_lens`` returns
    them, fitted on held-out text; without them ``prepare`` fits them once per model and
    layers on the first ``fit_texts`` texts of ``fit_corpus`` (every text position) and keeps
    them. Register your own maps with ``register(AffineLens(maps))``."""

    name = "affine_lens"
    columns = ("affine_lens", "affine_lens_ids", "affine_lens_probs")
    stage = "read"
    description = "the source vector mapped to the last layer by a fitted affine map, then unembedded (top_k)"

    def __init__(
        self,
        maps: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        fit_corpus: str = FIT_CORPUS,
        fit_texts: int = FIT_TEXTS,
        ridge: float = 0.0,
    ):
        self.maps, self.fit_corpus, self.fit_texts, self.ridge = maps, fit_corpus, fit_texts, ridge
        self._fitted: dict[tuple[str, tuple[int, ...]], dict] = {}  # (model, layers) -> maps, fitted here

    def check(self, scope, model, target_model) -> None:
        if scope.vectors is not None:
            raise ScopeError("readout 'affine_lens' reads the source vectors' own lens; with vectors, leave it out")
        wrong = [site for site in scope.sites if site != "resid_post"]
        if wrong:
            raise ScopeError(
                f"readout 'affine_lens' maps resid_post of a layer to the last layer's; the grid reads "
                f"{', '.join(map(repr, wrong))} too: use sites=['resid_post']"
            )

    def prepare(self, plan, model, target_model) -> AffineLens:
        from superscopes import corpus, lens
        from superscopes.models import model_name

        layers = tuple(sorted({cell.layer for cell in plan.cells}))
        if self.maps is not None:
            missing = [layer for layer in layers if layer not in self.maps]
            if missing:
                raise ScopeError(f"readout 'affine_lens' has no map for layer(s) {missing}; it has {sorted(self.maps)}")
            maps = self.maps
        else:
            key = (model_name(model), layers)
            if key not in self._fitted:
                weights = next(model._module.parameters(), None) if hasattr(model, "_module") else None
                if weights is not None and weights.device.type == "meta":
                    raise ScopeError(
                        "readout 'affine_lens' would fit its maps here, but the model's weights are on NDIF: fit "
                        "them with superscopes.lens.fit_affine_lens(model, texts, remote=True), then "
                        "register(AffineLens(maps))"
                    )
                texts = corpus.texts(self.fit_corpus, limit=self.fit_texts)
                self._fitted[key] = lens.fit_affine_lens(model, texts, list(layers), "text", self.ridge)
            maps = self._fitted[key]
        # Only the grid's layers travel with a remote request.
        return AffineLens({layer: maps[layer] for layer in layers}, self.fit_corpus, self.fit_texts, self.ridge)

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        vectors = context.vectors.float()
        mapped = torch.zeros_like(vectors)
        for layer, (weight, bias) in self.maps.items():
            rows = context.layers.to(vectors.device) == layer
            mapped[rows] = vectors[rows] @ weight.to(vectors.device).T + bias.to(vectors.device)
        top = ops.unembed(model, mapped).softmax(-1).topk(context.top_k)
        return top.indices, top.values

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        ids = values[0][row].tolist()
        return {
            "affine_lens": tokenizer.decode([ids[0]]),
            "affine_lens_ids": ids,
            "affine_lens_probs": values[1][row].tolist(),
        }
