"""Gram-iteration bounds and the Gram regularizer (Delattre et al.; ``methods/gram.py``) against dense truths: tight
for circular padding, certified for zero padding, monotone in the iterations, gradients that descend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import circular_conv
from torch import nn

from lightning_specclip.methods.gram import gram_iteration_bound, gram_regularizer
from lightning_specclip.spectral.exact import dense_singular_values, fft_singular_values


@pytest.mark.parametrize(("stride", "groups"), [(1, 1), (2, 1), (1, 2)])
def test_gram_bound_circular_is_tight_upper_bound(stride: int, groups: int) -> None:
    conv = circular_conv(c_out=4, stride=stride, groups=groups)
    sigma = dense_singular_values(conv, (4, 8, 8))[0].item()
    bound = gram_iteration_bound(conv.weight, (8, 8), n_iter=10, stride=stride, groups=groups).item()
    assert sigma * (1 - 1e-12) <= bound <= sigma * (1 + 1e-3)  # rounding when converged


def test_gram_bound_is_monotone_in_iterations() -> None:
    w = circular_conv().weight
    bounds = [gram_iteration_bound(w, (8, 8), n_iter=t).item() for t in range(8)]
    assert all(b1 <= b0 * (1 + 1e-12) for b0, b1 in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == pytest.approx(
        torch.linalg.matrix_norm(torch.fft.fft2(w, s=(8, 8)).permute(2, 3, 0, 1)).max().item()
    )


@pytest.mark.parametrize(("stride", "padding"), [(1, 1), (2, 1), (1, 0), (2, 2)])
def test_gram_bound_zero_padding_is_certified(stride: int, padding: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding).double()
    sigma = dense_singular_values(conv, (3, 8, 8))[0].item()
    bound = gram_iteration_bound(conv.weight, (8, 8), 8, stride=stride, padding_mode="zeros", padding=padding)
    assert sigma <= bound.item()
    assert bound.item() <= 1.5 * sigma  # and not vacuous


def test_gram_bound_conv1d() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 3, 3, padding=1, padding_mode="circular").double()
    sigma = dense_singular_values(conv, (3, 12))[0].item()
    assert sigma * (1 - 1e-12) <= gram_iteration_bound(conv.weight, 12, n_iter=10).item() <= sigma * (1 + 1e-3)


def test_gram_bound_no_overflow_and_zero_kernel() -> None:
    w = circular_conv().weight.detach()
    big = gram_iteration_bound(w * 1e30, (8, 8), n_iter=12)
    assert big.item() == pytest.approx(1e30 * gram_iteration_bound(w, (8, 8), n_iter=12).item(), rel=1e-9)
    zero = torch.zeros(2, 2, 3, 3, requires_grad=True)
    b = gram_iteration_bound(zero, (4, 4))
    b.backward()
    assert b.item() < 1e-30 and torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_regularizer_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = (3 * torch.randn(4, 4, 3, 3) / 6).to(dtype).requires_grad_(True)
    loss = gram_regularizer(w, (8, 8), target=0.1)
    loss.backward()
    assert loss.item() > 0 and w.grad is not None and w.grad.dtype == dtype
    assert torch.isfinite(w.grad.float()).all() and w.grad.float().abs().sum() > 0
    w.grad = None
    free = gram_regularizer(w, (8, 8), target=1e6)
    free.backward()
    assert free.item() == 0 and (w.grad == 0).all()


def test_gram_regularizer_descends() -> None:
    """A few gradient steps on the regularizer bring the true circular norm near the target."""
    w = circular_conv().weight.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        gram_regularizer(w, (8, 8), target=1.0).backward()
        opt.step()
    assert fft_singular_values(w, (8, 8), k=1).item() < 1.05


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_iter": -1}, "n_iter must be"),
        ({"padding_mode": "reflect"}, "padding_mode must be one of"),
        ({"padding_mode": "zeros", "padding": -1}, "non-negative"),
        ({"padding_mode": "zeros", "padding": "same"}, "numeric zero padding"),
        ({"stride": 3}, "stride must divide"),
    ],
)
def test_gram_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gram_iteration_bound(torch.randn(2, 2, 3, 3), (8, 8), **kwargs)
    with pytest.raises(ValueError, match="target must be"):
        gram_regularizer(torch.randn(2, 2, 3, 3), (8, 8), target=-1.0)
