"""Certificates from a Lipschitz bound: :func:`certified` per sample and radius, :class:`CertifiedAccuracy`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["CertifiedAccuracy", "certified"]


def certified(logits: Tensor, target: Tensor, lipschitz: float, eps: Tensor) -> Tensor:
    """Which samples are certified at each radius: correct, with a logit margin above ``√2·L·ε``.

    For a perturbation ``δ`` with ``‖δ‖₂ ≤ ε`` the logits move by at most ``L·ε`` in ℓ2, so the gap between the true
    class's logit and any other moves by at most ``√2·L·ε``: a margin above that cannot be closed (Tsuzuku et al.,
    2018). At ``ε = 0`` a sample is certified exactly when it is classified correctly.

    Args:
        logits: ``(N, C)`` logits.
        target: ``(N,)`` true labels.
        lipschitz: an upper bound on the ℓ2 Lipschitz constant of input → logits.
        eps: ``(R,)`` radii.

    Returns:
        Tensor: ``(N, R)`` booleans.

    Raises:
        ValueError: the shapes do not match.

    Example:
        >>> certified(torch.tensor([[3.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]), 1.0, torch.tensor([0.0, 1.0, 2.0]))
        tensor([[ True,  True, False],
                [False, False, False]])
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    true = logits.gather(1, target.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, target.view(-1, 1), float("-inf")).amax(dim=1)
    margin = (true - others).unsqueeze(1)
    correct = (logits.argmax(dim=1) == target).unsqueeze(1)
    threshold = math.sqrt(2) * lipschitz * eps.to(logits.device, logits.dtype).view(1, -1)
    return correct & ((margin > threshold) | (threshold == 0))


class CertifiedAccuracy(Metric):
    """Accuracy certified at ℓ2 radii ``eps`` by a Lipschitz bound: the fraction of samples classified correctly
    whose logit margin (true logit minus the largest other) exceeds ``√2·L·ε`` — no perturbation of ℓ2 norm at
    most ``ε`` can change their class (:func:`certified`). Counts are summed over processes (correct under DDP).

    It is a lower bound on the robust accuracy at ``ε`` (any attack's robust accuracy is an upper bound on it),
    as good as ``lipschitz`` is tight: with :func:`lipschitz_bound`'s ``upper``, a layer-wise bound.

    Args:
        lipschitz: an upper bound on the ℓ2 Lipschitz constant of input → logits (in the units of the inputs the
            radii are measured in).
        eps: one radius, or a sequence of radii (``≥ 0``).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``lipschitz`` not a finite number ``> 0``, or a radius negative or not finite.

    Example:
        >>> metric = CertifiedAccuracy(lipschitz=1.0, eps=[0.0, 1.0, 2.0])
        >>> metric.update(torch.tensor([[3.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1]))
        >>> metric.compute()
        tensor([1.0000, 0.5000, 0.0000])
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, lipschitz: float, eps: float | Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (isinstance(lipschitz, int | float) and math.isfinite(lipschitz) and lipschitz > 0):
            raise ValueError(f"lipschitz must be a finite number > 0, got {lipschitz!r}")
        self.scalar = not isinstance(eps, Iterable)
        radii = [float(e) for e in eps] if isinstance(eps, Iterable) else [float(eps)]
        if not radii or not all(math.isfinite(e) and e >= 0 for e in radii):
            raise ValueError(f"eps must be one or more finite radii >= 0, got {eps!r}")
        self.lipschitz = float(lipschitz)
        self.eps = torch.tensor(radii, dtype=torch.float64)
        self.add_state("correct", default=torch.zeros(len(radii), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count the certified samples of a batch at every radius.

        Args:
            preds: logits ``(N, C)`` on the clean inputs.
            target: true labels ``(N,)``.

        Raises:
            ValueError: the shapes do not match.
        """
        self.correct += certified(preds.detach().double(), target, self.lipschitz, self.eps).sum(dim=0)
        self.total += target.numel()

    def compute(self) -> Tensor:
        """Certified accuracy at each radius (a 0-dim tensor when ``eps`` was one number); NaN before any sample.

        Returns:
            Tensor: ``(len(eps),)`` fractions in ``[0, 1]``, or a scalar.
        """
        if self.total == 0:
            result = torch.full(self.correct.shape, float("nan"), device=self.correct.device)
        else:
            result = self.correct.float() / self.total
        return result[0] if self.scalar else result
