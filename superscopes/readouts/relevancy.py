"""``relevancy``: SelfIE's relevancy score of each generated token, its probability with the
patch minus without it (Chen et al.: how much the token depends on the patched vector), and
their mean. A frame readout: after the grid, each row's prompt and generated tokens rerun
teacher-forced, once patched as the cell was and once clean (``batching.teacher_forced``)."""

from __future__ import annotations

from superscopes import ops
from superscopes.readouts.base import Readout
from superscopes.sites import ScopeError


class Relevancy(Readout):
    name = "relevancy"
    columns = ("relevancy", "relevancy_mean")
    stage = "frame"
    description = "per generated token, its probability with the patch minus without (SelfIE), and the mean"

    def check(self, scope, model, target_model) -> None:
        if scope.output != "generate":
            raise ScopeError("readout 'relevancy' scores generated tokens: use output='generate'")
        refused = [t for t in scope.transforms if ops.TRANSFORM_TABLE[t].argument is not None]
        if refused:
            plain = [name for name, spec in ops.TRANSFORM_TABLE.items() if spec.argument is None]
            raise ScopeError(
                f"readout 'relevancy' reruns each cell's patch, which it can for transforms {', '.join(plain)}; "
                f"not {', '.join(map(repr, refused))}"
            )

    def annotate(self, model, target_model, scope, frame, remote, vectors) -> dict[str, list]:
        from superscopes.batching import teacher_forced

        scores = teacher_forced(target_model, frame, list(vectors()), remote)
        relevancy = [(patched - clean).tolist() for patched, clean, _, _ in scores]
        return {"relevancy": relevancy, "relevancy_mean": [sum(r) / len(r) if r else float("nan") for r in relevancy]}
