"""``affine_lens``: each cell's source vector through a least-squares map from its layer to the
last layer, then the model's own final norm and unembedding (the affine, or "tuned", lens the
Patchscopes paper compares with; ``superscopes.lens.affine_lens`` for whole prompts).

A frame readout: after the grid, the source vectors are mapped here and decoded in one pass
(one request when remote), so the maps (d x d floats per layer) never travel with a request."""

from __future__ import annotations

import torch

from superscopes.readouts.base import Readout
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
    stage = "frame"
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
            return self
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
        return AffineLens(self._fitted[key], self.fit_corpus, self.fit_texts, self.ridge)

    def annotate(self, model, target_model, scope, frame, remote, vectors) -> dict[str, list]:
        from superscopes import lens

        # Each distinct source vector once (a grid patches one vector into many cells).
        keys = list(zip(frame["source"], frame["position"], frame["layer"]))
        first: dict[tuple, int] = {}  # each key's first row, in order of first appearance
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        rows = list(first.values())
        table = vectors()[rows]
        mapped = torch.stack([lens.apply_affine(v[None], *self.maps[keys[i][2]])[0] for v, i in zip(table, rows)])
        top = lens.decode(model, mapped, scope.top_k, remote=remote)
        at = {key: j for j, key in enumerate(first)}
        ids = [top["ids"][at[key]].tolist() for key in keys]
        return {
            "affine_lens": [model.tokenizer.decode([row[0]]) for row in ids],
            "affine_lens_ids": ids,
            "affine_lens_probs": [top["probs"][at[key]].tolist() for key in keys],
        }
