"""FastClip's least-squares rounds (``spectral/clip/iterative.py``): the products in the weight, CGLS against the
dense least-norm solution, the warm start's Rayleigh–Ritz step, and rolling back when a round fails.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import CLIP_TARGET, big_conv, big_conv_bn, state_snapshot, state_unchanged
from torch import nn

from lightning_specclip import ImplicitLinear, clip_spectral_norm_, spectrum
from lightning_specclip.spectral.clip import iterative
from lightning_specclip.spectral.exact import dense_matrix, dense_spectral_norm


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2), (4, 9, 9)),
        (lambda: nn.Conv1d(3, 5, 5, padding=4, dilation=2), (3, 11)),
        (lambda: nn.Conv3d(2, 3, 3, padding=(1, 0, 1)), (2, 5, 5, 5)),
    ],
    ids=["conv2d_strided_grouped", "conv1d_dilated", "conv3d"],
)
def test_closed_form_weight_products_are_the_autograd_ones(make, shape) -> None:
    """The least-squares rounds move a plain conv's weight with direct kernel calls; they are the map ``Δ ↦ A_Δ V``
    and its adjoint that autograd would give."""
    from lightning_specclip.spectral.clip.iterative import weight_change_products

    torch.manual_seed(0)
    conv = make()
    A = ImplicitLinear(conv, shape)
    right = torch.randn(2, *shape)
    apply, adjoint = weight_change_products(A, "weight", right)
    delta = torch.randn_like(conv.weight)
    expected, vjp = torch.func.vjp(lambda d: A.apply(right, {**A.tensors, "weight": d}), delta)
    torch.testing.assert_close(apply(delta), expected, rtol=1e-5, atol=1e-5)
    r = torch.randn_like(expected)
    torch.testing.assert_close(adjoint(r), vjp(r)[0], rtol=1e-4, atol=1e-4)


def _dense_least_norm(A: ImplicitLinear, right: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Ground truth: the least-norm least-squares weight change, from the dense matrix of ``Δ ↦ A_Δ V`` (float64)."""
    weight = A.tensors["weight"]

    def images(deltas: torch.Tensor) -> torch.Tensor:
        return torch.stack([A.apply(right, {**A.tensors, "weight": d}) for d in deltas])

    matrix = dense_matrix(images, weight.shape)
    return (torch.linalg.pinv(matrix) @ rhs.reshape(-1)).reshape(weight.shape)


@pytest.mark.parametrize(
    "make, shape, k",
    [
        (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8), 1),  # more equations than unknowns
        (lambda: nn.Conv2d(8, 3, 3, padding=1), (8, 3, 3), 1),  # fewer: the least-norm solution
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 9, 9), 2),
        (lambda: nn.Conv2d(4, 4, (3, 5), padding=(2, 1), dilation=(2, 1), groups=4), (4, 7, 7), 3),  # depthwise
        (lambda: nn.Conv1d(3, 5, 5, padding=4, dilation=2, stride=2), (3, 11), 2),
    ],
    ids=["tall", "wide", "strided_grouped", "depthwise_dilated", "conv1d"],
)
def test_cgls_iterated_to_the_end_is_the_least_norm_solution(make, shape, k) -> None:
    """Run to convergence, FastClip's least-squares step lands on the least-norm least-squares solution of the dense
    problem (float64 pseudo-inverse) and stays there: consistent (wide) systems and least-squares (tall) ones."""
    from lightning_specclip.spectral.clip.iterative import cgls

    torch.manual_seed(0)
    A = ImplicitLinear(make().double(), shape, dtype=torch.float64)
    right = torch.randn(k, *shape, dtype=torch.float64)
    rhs = torch.randn(k, *A.output_shape, dtype=torch.float64)
    got = cgls(A, "weight", right, rhs, iters=2000, atol=0.0)
    torch.testing.assert_close(got, _dense_least_norm(A, right, rhs), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("iters", [30, 300])
def test_cgls_stays_on_the_least_squares_solution_however_many_iterations(iters) -> None:
    """FastClip's least-squares step by CGLS in float32 (a reflect-padded conv): more iterations than it needs leave
    it on the solution (it used to drift off it: relative error 0.36 after 100 iterations, 1e15 after 300)."""
    from lightning_specclip.spectral.clip.iterative import cgls

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
    A = ImplicitLinear(conv, (6, 12, 12))
    right, rhs = torch.randn(2, 6, 12, 12), torch.randn(2, *A.output_shape)
    want = _dense_least_norm(ImplicitLinear(copy.deepcopy(conv).double(), (6, 12, 12)), right.double(), rhs.double())
    got = cgls(A, "weight", right, rhs, iters=iters, atol=0.0)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-4


def test_rayleigh_ritz_of_one_warm_vector_is_its_gain() -> None:
    """The warm start of a clip: one product gives the value ``‖Av‖`` and the left vector ``Av/‖Av‖`` that a
    Rayleigh–Ritz step of the Krylov solver gives."""
    from lightning_specclip.spectral.clip.iterative import gain

    torch.manual_seed(0)
    A = ImplicitLinear(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6))
    v = 3.0 * torch.randn(1, 3, 6, 6)
    got, want = gain(A, v), spectrum(A, k=1, init=v, max_iters=1, tol=1e-12)
    torch.testing.assert_close(got.values, want.values.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got.left.abs(), want.left.abs(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.right, v / v.norm())


def test_a_hooked_conv_is_moved_through_what_it_computes() -> None:
    """A forward hook can change what a conv computes: its least-squares rounds then go through the module (not the
    bare kernels), and the clip lands on the target of the hooked map."""
    from lightning_specclip.spectral.clip.iterative import weight_change_products

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.register_forward_hook(lambda module, args, out: 3.0 * out)
    A = ImplicitLinear(conv, (3, 7, 7))
    assert not A.closed_form
    right = torch.randn(1, 3, 7, 7)
    apply, _ = weight_change_products(A, "weight", right)
    delta = torch.randn_like(conv.weight)
    torch.testing.assert_close(apply(delta), 3.0 * nn.functional.conv2d(right, delta, None, 1, 1), rtol=1e-5, atol=1e-5)
    result = clip_spectral_norm_(conv, 0.5, (3, 7, 7))
    assert dense_spectral_norm(conv, (3, 7, 7)) == pytest.approx(0.5, rel=0.01) == result.after


@pytest.mark.parametrize("make", [big_conv, big_conv_bn], ids=["conv", "conv_bn"])
def test_nan_from_least_squares_rolls_back(monkeypatch, make) -> None:
    module = make()
    snap = state_snapshot(module)
    real = iterative.cgls
    calls = []

    def nan_on_second_round(*args, **kwargs):
        calls.append(1)
        delta = real(*args, **kwargs)
        return delta if len(calls) < 2 else torch.full_like(delta, math.nan)

    monkeypatch.setattr(iterative, "cgls", nan_on_second_round)
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8))
    assert len(calls) == 2  # it failed mid-way, after one good round
    assert state_unchanged(module, snap)


def test_exception_from_least_squares_rolls_back(monkeypatch) -> None:
    module = big_conv()
    snap = state_snapshot(module)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(iterative, "cgls", boom)
    with pytest.raises(RuntimeError, match="boom"):
        clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8))
    assert state_unchanged(module, snap)


def test_overflowing_least_squares_rolls_back(monkeypatch) -> None:
    module = big_conv()
    snap = state_snapshot(module)
    real = iterative.cgls
    monkeypatch.setattr(iterative, "cgls", lambda *a, **k: torch.full_like(real(*a, **k), 1e38))
    with pytest.raises(RuntimeError):  # non-finite weights, or the eigensolver failing on them
        clip_spectral_norm_(module, CLIP_TARGET, (4, 8, 8))
    assert state_unchanged(module, snap)
