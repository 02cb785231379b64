"""Measurements and clips of many layers in lock-step (``gap_free_spectra``, ``clip_spectral_norms_``): the same
results as one layer at a time, checked against float64 dense ground truth."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_specclip import ImplicitLinear, SpectralClipper, spectrum
from lightning_specclip.spectral.clip import clip_spectral_norm_, clip_spectral_norms_
from lightning_specclip.spectral.exact import dense_matrix, dense_spectral_norm
from lightning_specclip.spectral.spectrum import GAP_FREE_DENSE_MAX, gap_free_spectra

TOL = 0.0075


def _layers() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Three convolutions of one geometry (one grouped convolution on a CPU), one of another input size, a
    reflect-padded one (no closed form), a strided one, a conv→BN, and a small Linear (measured densely)."""
    torch.manual_seed(0)
    layers: list[tuple[nn.Module, tuple[int, ...]]] = [(nn.Conv2d(3, 3, 3, padding=1), (3, 10, 10)) for _ in range(3)]
    bn = nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.5, 2.0)
    layers += [
        (nn.Conv2d(3, 3, 3, padding=1), (3, 12, 12)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 10, 10)),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 10, 10)),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn.eval()), (3, 9, 9)),
        (nn.Linear(20, 7), (20,)),
    ]
    for module, _ in layers:
        with torch.no_grad():
            next(module.parameters()).mul_(4)
    return layers


def test_lockstep_measurements_match_one_at_a_time_and_the_ground_truth() -> None:
    layers = _layers()
    operators = [ImplicitLinear(m, shape) for m, shape in layers]
    seeds = list(range(len(operators)))
    together = gap_free_spectra(operators, TOL, seeds=seeds, left=[True, False] * 4)
    assert any(A.in_features <= GAP_FREE_DENSE_MAX for A in operators)
    for (module, shape), A, seed, got in zip(layers, operators, seeds, together, strict=True):
        alone = spectrum(A, solver="gap_free", tol=TOL, seed=seed, left=False)
        assert got.solver == "gap_free" and got.matvecs == alone.matvecs
        assert got.sigma == pytest.approx(alone.sigma, rel=1e-5)
        torch.testing.assert_close(got.right.abs(), alone.right.abs(), rtol=0, atol=1e-3)
        truth = dense_spectral_norm(module, shape)
        assert truth * (1 - TOL) <= got.sigma <= truth * (1 + 1e-5)
    for i, got in enumerate(together):
        assert (got.left is not None) == (i % 2 == 0)
        if got.left is not None:  # A v = σ u
            image = operators[i].matvec(got.right)
            torch.testing.assert_close(image, got.values[0] * got.left, rtol=0, atol=1e-4 * got.sigma)


def test_lockstep_measurements_refuse_mismatched_arguments() -> None:
    A = ImplicitLinear(nn.Linear(3, 3), (3,))
    with pytest.raises(ValueError, match="one seed and one left flag per operator"):
        gap_free_spectra([A, A], TOL, seeds=[0])
    with pytest.raises(ValueError, match="tol"):
        gap_free_spectra([A], 1.5)
    assert gap_free_spectra([], TOL) == []


@pytest.mark.parametrize("warm", [False, True])
def test_clipping_many_writes_what_clipping_each_writes(warm: bool) -> None:
    layers = _layers()
    twins = copy.deepcopy(layers)
    targets = [0.5 + 0.1 * i for i in range(len(layers))]
    targets[0] = 100.0  # already below: nothing to write
    inits = [spectrum(m, shape, left=False).right if warm else None for m, shape in layers]
    results = clip_spectral_norms_(
        [m for m, _ in layers], targets, [shape for _, shape in layers], spectra=inits, max_rounds=1, block_size=1
    )
    for (module, shape), (twin, _), target, init, got in zip(layers, twins, targets, inits, results, strict=True):
        alone = clip_spectral_norm_(twin, target, shape, spectrum=init, max_rounds=1, block_size=1)
        assert (got.changed, got.rounds, got.rescaled) == (alone.changed, alone.rounds, alone.rescaled)
        assert got.after == pytest.approx(alone.after, rel=1e-4)
        for p, q in zip(module.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        truth = dense_spectral_norm(module, shape)
        assert truth <= target * 1.01 and got.after == pytest.approx(truth, rel=0.01)
        if target < 100:
            assert truth >= target * 0.99
    assert not results[0].changed


def test_clipping_many_refuses_shared_parameters_and_mismatched_lists() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    bn = nn.BatchNorm2d(2).eval()
    with pytest.raises(ValueError, match="share a parameter"):
        clip_spectral_norms_([conv, nn.Sequential(conv, bn)], 1.0, [(2, 6, 6), (2, 6, 6)])
    with pytest.raises(ValueError, match="one target, input shape and spectrum per module"):
        clip_spectral_norms_([conv], [1.0, 2.0], [(2, 6, 6)])


def test_one_bad_layer_leaves_every_layer_unchanged() -> None:
    layers = _layers()
    with torch.no_grad():
        layers[4][0].weight[0, 0, 0, 0] = float("nan")
    before = [[p.detach().clone() for p in m.parameters()] for m, _ in layers]
    with pytest.raises(ValueError, match="non-finite"):
        clip_spectral_norms_([m for m, _ in layers], 0.5, [shape for _, shape in layers])
    for (module, _), saved in zip(layers, before, strict=True):
        for p, q in zip(module.parameters(), saved, strict=True):
            assert torch.equal(p.detach().nan_to_num(7.0), q.nan_to_num(7.0))


def test_a_layer_run_at_two_sizes_is_clipped_in_order_and_holds_both_bounds() -> None:
    """The clipper clips maps that share parameters one after the other (the second sees the first's clip)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    clipper = SpectralClipper(model, 1.0)
    model(torch.randn(2, 3, 6, 6))
    model(torch.randn(2, 3, 11, 11))
    clipper.clip()
    assert len(clipper.maps) == 4
    for m in clipper.maps:
        truth = dense_spectral_norm(m.module, m.input_shape)
        assert truth <= 1.01
        assert clipper.sigmas[m.name] == pytest.approx(truth, rel=0.01)


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
    from lightning_specclip.spectral.clip.iterative import _weight_products

    torch.manual_seed(0)
    conv = make()
    A = ImplicitLinear(conv, shape)
    right = torch.randn(2, *shape)
    apply, adjoint = _weight_products(A, "weight", right)
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
    from lightning_specclip.spectral.clip.iterative import _cgls

    torch.manual_seed(0)
    A = ImplicitLinear(make().double(), shape, dtype=torch.float64)
    right = torch.randn(k, *shape, dtype=torch.float64)
    rhs = torch.randn(k, *A.output_shape, dtype=torch.float64)
    got = _cgls(A, "weight", right, rhs, iters=2000, atol=0.0)
    torch.testing.assert_close(got, _dense_least_norm(A, right, rhs), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("iters", [30, 300])
def test_cgls_stays_on_the_least_squares_solution_however_many_iterations(iters) -> None:
    """FastClip's least-squares step by CGLS in float32 (a reflect-padded conv): more iterations than it needs leave
    it on the solution (it used to drift off it: relative error 0.36 after 100 iterations, 1e15 after 300)."""
    from lightning_specclip.spectral.clip.iterative import _cgls

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
    A = ImplicitLinear(conv, (6, 12, 12))
    right, rhs = torch.randn(2, 6, 12, 12), torch.randn(2, *A.output_shape)
    want = _dense_least_norm(ImplicitLinear(copy.deepcopy(conv).double(), (6, 12, 12)), right.double(), rhs.double())
    got = _cgls(A, "weight", right, rhs, iters=iters, atol=0.0)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-4


def test_rayleigh_ritz_of_one_warm_vector_is_its_gain() -> None:
    """The warm start of a clip: one product gives the value ``‖Av‖`` and the left vector ``Av/‖Av‖`` that a
    Rayleigh–Ritz step of the Krylov solver gives."""
    from lightning_specclip.spectral.clip.iterative import _gain

    torch.manual_seed(0)
    A = ImplicitLinear(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6))
    v = 3.0 * torch.randn(1, 3, 6, 6)
    got, want = _gain(A, v), spectrum(A, k=1, init=v, max_iters=1, tol=1e-12)
    torch.testing.assert_close(got.values, want.values.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got.left.abs(), want.left.abs(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.right, v / v.norm())


def test_a_hooked_conv_is_moved_through_what_it_computes() -> None:
    """A forward hook can change what a conv computes: its least-squares rounds then go through the module (not the
    bare kernels), and the clip lands on the target of the hooked map."""
    from lightning_specclip.spectral.clip.iterative import _weight_products

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.register_forward_hook(lambda module, args, out: 3.0 * out)
    A = ImplicitLinear(conv, (3, 7, 7))
    assert not A.closed_form
    right = torch.randn(1, 3, 7, 7)
    apply, _ = _weight_products(A, "weight", right)
    delta = torch.randn_like(conv.weight)
    torch.testing.assert_close(apply(delta), 3.0 * nn.functional.conv2d(right, delta, None, 1, 1), rtol=1e-5, atol=1e-5)
    result = clip_spectral_norm_(conv, 0.5, (3, 7, 7))
    assert dense_spectral_norm(conv, (3, 7, 7)) == pytest.approx(0.5, rel=0.01) == result.after


def test_clipping_many_of_mixed_dtypes_lands_each_on_its_target() -> None:
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)]
    convs[1] = convs[1].double()
    convs[2] = convs[2].to(torch.bfloat16)
    for conv in convs:
        with torch.no_grad():
            conv.weight.mul_(6)
    results = clip_spectral_norms_(convs, [0.5, 0.7, 0.9], [(3, 9, 9)] * 3)
    for conv, target, result in zip(convs, [0.5, 0.7, 0.9], results, strict=True):
        assert result.changed and conv.weight.dtype in (torch.float32, torch.float64, torch.bfloat16)
        truth = dense_spectral_norm(conv.double(), (3, 9, 9))
        assert truth == pytest.approx(target, rel=0.01) and result.after == pytest.approx(truth, rel=0.01)
