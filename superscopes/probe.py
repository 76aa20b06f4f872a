"""A linear probe in plain torch: multinomial logistic regression with an L2 penalty.

The Patchscopes attribute-extraction baseline: predict the object class (e.g. the capital)
from the hidden state ``h_l`` at the last subject token, trained on one split of the rows and
scored on held-out rows. Features are standardised with the training split's mean and
standard deviation; the loss (mean cross-entropy + ``l2 * |W|^2 / 2``) is convex and is
minimised full-batch with L-BFGS, so the fit is deterministic for given data.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Probe:
    classes: list[Hashable]
    weight: torch.Tensor  # [n_classes, d]
    bias: torch.Tensor  # [n_classes]
    mean: torch.Tensor  # [d]
    scale: torch.Tensor  # [d]

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        Z = (X.double() - self.mean) / self.scale
        return Z @ self.weight.T + self.bias

    def predict(self, X: torch.Tensor) -> list[Hashable]:
        if len(X) == 0:
            return []
        return [self.classes[i] for i in self.logits(X).argmax(-1).tolist()]

    def accuracy(self, X: torch.Tensor, labels: Sequence[Hashable]) -> float:
        """Share of rows whose predicted class is the label (labels unseen in training count as wrong)."""
        if len(labels) == 0:
            return float("nan")
        return sum(p == y for p, y in zip(self.predict(X), labels)) / len(labels)


def fit_probe(X: torch.Tensor, labels: Sequence[Hashable], l2: float = 1e-2, max_iter: int = 200) -> Probe:
    """Fit a logistic-regression probe on ``X [n, d]`` with class ``labels`` (any hashables).

    ``l2`` weights the squared-norm penalty on the standardised weights (not the bias)."""
    if X.dim() != 2 or X.shape[0] != len(labels):
        raise ValueError(f"X {tuple(X.shape)} must be [n, d] with one label per row ({len(labels)} labels)")
    if len(labels) == 0:
        raise ValueError("fit_probe needs at least one row")
    classes = sorted(set(labels), key=str)
    index = {c: i for i, c in enumerate(classes)}
    # Callers may hold inference tensors (inference_mode): train on a normal copy.
    with torch.inference_mode(False), torch.enable_grad():
        y = torch.tensor([index[c] for c in labels])
        X64 = X.detach().clone().double()
        mean = X64.mean(0)
        scale = X64.std(0, unbiased=False).clamp_min(1e-6)
        Z = (X64 - mean) / scale
        W = torch.zeros(len(classes), X.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
        if len(classes) > 1:
            optimizer = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

            def closure():
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(Z @ W.T + b, y) + 0.5 * l2 * W.pow(2).sum()
                loss.backward()
                return loss

            optimizer.step(closure)
    return Probe(classes, W.detach(), b.detach(), mean, scale)
