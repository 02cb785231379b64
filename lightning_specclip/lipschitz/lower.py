"""The empirical lower bound on a model's Lipschitz constant: the largest difference quotient at probe inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_specclip.spectral.operator import eval_mode

#: relative allowance for float64 rounding taken off the empirical lower bound's difference quotient
_ROUNDING = 1e-9


def _lower_bound(
    model: nn.Module, shape: tuple[int, ...], data: Tensor | None, samples: int, iters: int, seed: int, device: Any
) -> float:
    """The largest difference quotient ``‖f(x + δ) − f(x)‖ / ‖δ‖`` at the probe inputs, in float64 and eval mode,
    with ``δ`` along the top right singular vector of the Jacobian at ``x`` found by power iteration on ``JᵀJ``
    (``J v`` as a forward difference, ``Jᵀ`` by autograd: a forward-mode ``jvp`` is ~10× slower here). A quotient
    is a lower bound on the Lipschitz constant by definition, whatever the power iteration found."""
    generator = torch.Generator().manual_seed(seed)
    if data is None:
        x = torch.rand((samples, *shape), generator=generator, dtype=torch.float64)
    else:
        x = data.detach().to(torch.float64).cpu()
    x = x.to(device)
    tensors = {
        name: t.detach().to(torch.float64) if t.is_floating_point() else t
        for name, t in (*model.named_parameters(), *model.named_buffers())
    }

    def f(inputs: Tensor) -> Tensor:
        return torch.func.functional_call(model, tensors, (inputs,))

    def unit(v: Tensor, previous: Tensor) -> Tensor:
        """``v`` normalized per sample; where it vanished (a zero Jacobian: every ReLU off) the previous direction."""
        norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
        return torch.where(norm > 0, v / norm.clamp_min(1e-300), previous)

    # a step small against the input and large against float64 rounding: the quotient's rounding error is about
    # 1e-16/1e-3 relative, which the (1 − ROUNDING) below takes off, so that a linear map's quotient stays ≤ its σ
    step = 1e-3 * x.flatten(1).norm(dim=1).clamp_min(1.0).view(-1, *([1] * len(shape)))
    start = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device)
    v = start / torch.linalg.vector_norm(start, dim=tuple(range(1, x.dim())), keepdim=True)
    with eval_mode(model):
        fx0, pullback = torch.func.vjp(f, x)[:2]  # (output, pullback); a third item only with has_aux
        fx0 = fx0.detach()
        for _ in range(iters):
            with torch.no_grad():
                jv = (f(x + step * v) - fx0) / step.flatten(1)[:, :1].view(-1, *([1] * (fx0.dim() - 1)))
            v = unit(pullback(jv)[0], v)
        with torch.no_grad():
            delta = step * v
            quotient = (f(x + delta) - fx0).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
    return float(quotient.max()) * (1 - _ROUNDING)
