"""The dense paths (``spectral/clip/dense.py``): ``Linear`` (and ``Linear``∘BN) by an SVD, exact; BatchNorm by a
clamp of its gains; the float32 SVD that breaks down retried in float64; repeated singular values; roll back.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import (
    CLIP_TARGET,
    scale_to_,
    seeded,
    singular_values,
    snapshot,
    state_snapshot,
    state_unchanged,
    unchanged,
    weight_sigma,
    with_stats,
)
from torch import Tensor, nn

from lightning_specclip import clip_spectral_norm_
from lightning_specclip.spectral.clip import batchnorm_scale, dense

TOL = 1e-2  # the relative tolerance these tests allow the library


@pytest.mark.parametrize("with_bn, pair", [(False, False), (True, False), (True, True)])
def test_linear_is_exact_and_leaves_values_below_target(with_bn: bool, pair: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(12, 9)
    module = (
        (lin, with_stats(nn.BatchNorm1d(9)))
        if pair
        else (nn.Sequential(lin, with_stats(nn.BatchNorm1d(9))) if with_bn else lin)
    )
    scale_to_(module, (12,), 3.0 * CLIP_TARGET)
    before = singular_values(module, (12,))
    assert (before < CLIP_TARGET).any() and (
        before > CLIP_TARGET
    ).sum() >= 2  # a real clip: some values above, some below
    weight = lin.weight
    result = clip_spectral_norm_(module, CLIP_TARGET)
    after = singular_values(module, (12,))
    assert lin.weight is weight
    assert abs(after[0].item() / CLIP_TARGET - 1) <= 1e-4
    torch.testing.assert_close(after, before.clamp(max=CLIP_TARGET), atol=1e-5, rtol=1e-4)  # only the top moved
    assert result.rounds == 0 and result.converged
    assert result.before == pytest.approx(before[0].item(), rel=1e-5)


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (6,)), (nn.BatchNorm2d, (6, 3, 3))])
def test_batchnorm_clamp_is_exact(cls, shape) -> None:
    bn = with_stats(cls(6))
    with torch.no_grad():
        bn.weight.mul_(torch.tensor([3.0, 0.2, 2.0, -3.0, 0.1, 1.0]))
    scale = batchnorm_scale(bn)
    below = scale.abs() <= CLIP_TARGET
    assert below.any() and not below.all()
    gamma = bn.weight.detach().clone()
    weight = bn.weight
    result = clip_spectral_norm_(bn, CLIP_TARGET)
    assert bn.weight is weight
    new = batchnorm_scale(bn)
    torch.testing.assert_close(new.abs().max().item(), CLIP_TARGET, rtol=1e-6, atol=0)
    assert torch.equal(bn.weight[below], gamma[below])  # channels already below are untouched
    assert torch.equal(new.sign(), scale.sign())
    assert singular_values(bn, shape)[0].item() == pytest.approx(CLIP_TARGET, rel=1e-6)
    assert result.before == pytest.approx(scale.abs().max().item()) and result.converged


def test_dense_and_batchnorm_paths_roll_back(monkeypatch) -> None:
    lin = seeded(lambda: nn.Linear(6, 5))
    bn = with_stats(nn.BatchNorm2d(3))
    with torch.no_grad():
        lin.weight.mul_(10)
        bn.weight.mul_(10)
    snaps = state_snapshot(lin), state_snapshot(bn)
    monkeypatch.setattr(dense, "clip_values", lambda values, *a: torch.full_like(values, math.nan))
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_spectral_norm_(lin, 0.5)
    monkeypatch.setattr(dense, "batchnorm_scale", lambda b: torch.full((3,), math.nan))
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_spectral_norm_(bn, 0.5)
    assert state_unchanged(lin, snaps[0]) and state_unchanged(bn, snaps[1])


def test_bf16_linear_reports_the_norm_of_the_written_weight() -> None:
    module = seeded(lambda: nn.Linear(8, 8))
    scale_to_(module, (8,), 4.0 * CLIP_TARGET)
    module = module.to(torch.bfloat16)
    result = clip_spectral_norm_(module, CLIP_TARGET)
    assert result.after == pytest.approx(singular_values(module, (8,))[0].item(), rel=1e-4)


def test_bf16_batchnorm_clamp() -> None:
    bn = with_stats(nn.BatchNorm2d(4))
    with torch.no_grad():
        bn.weight.mul_(5)
    bn = bn.to(torch.bfloat16)
    clip_spectral_norm_(bn, CLIP_TARGET)
    assert bn.weight.dtype == torch.bfloat16
    assert batchnorm_scale(bn).abs().max().item() == pytest.approx(CLIP_TARGET, rel=1.5e-2)


FIXTURE = Path(__file__).parent / "fixtures" / "convnext_linear_svd_breakdown.pt"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Pin one intra-op thread (the setting under which float32 LAPACK broke on the fixture), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fixture_linear() -> nn.Linear:
    weight = torch.load(FIXTURE)
    lin = nn.Linear(384, 1536)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def _broken_float32_svd(monkeypatch, how: str) -> list[torch.dtype]:
    """Make float32 ``torch.linalg.svd`` fail as LAPACK did on the fixture: raise, or return a non-orthogonal U
    (the columns of the repeated cluster all equal, so max|UᵀU − I| ≈ 1). Float64 calls are left alone."""
    real = torch.linalg.svd
    calls: list[torch.dtype] = []

    def svd(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if matrix.dtype != torch.float32:
            return real(matrix, *args, **kwargs)
        if how == "raise":
            raise torch.linalg.LinAlgError(
                "linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned or has "
                "too many repeated singular values (error code: 191)."
            )
        U, S, Vh = real(matrix, *args, **kwargs)
        cluster = ((S - S[0]).abs() <= 1e-5 * S[0]).nonzero().flatten()
        U = U.clone()
        U[:, cluster] = U[:, cluster[:1]]
        return U, S, Vh

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


@pytest.mark.parametrize("how", ["non_orthogonal", "raise"])
def test_fixture_broken_float32_svd_is_retried_in_float64(monkeypatch, one_thread, how: str) -> None:
    lin = _fixture_linear()
    assert weight_sigma(lin.weight) == pytest.approx(1.0, abs=1e-5)
    calls = _broken_float32_svd(monkeypatch, how)
    result = clip_spectral_norm_(lin, 0.9)
    truth = weight_sigma(lin.weight)
    assert truth <= 0.9 * (1 + TOL) and truth == pytest.approx(0.9, rel=1e-5), truth
    assert result.after == pytest.approx(truth, rel=1e-6) and result.converged
    assert torch.float64 in calls  # the broken float32 decomposition was not trusted
    assert result.changed


def test_fixture_when_every_svd_fails_nothing_is_written(monkeypatch, one_thread) -> None:
    lin = _fixture_linear()
    snap = snapshot(lin)

    def svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", svd)
    with pytest.raises(RuntimeError, match=r"float32 SVD raised.*float64 SVD raised.*left unchanged"):
        clip_spectral_norm_(lin, 0.9)
    assert unchanged(lin, snap)


def test_fixture_clip_is_exact_and_already_clipped_is_a_no_op(one_thread) -> None:
    lin = _fixture_linear()
    snap = snapshot(lin)
    before = weight_sigma(lin.weight)  # 1.0000036: within tol of 1.0
    result = clip_spectral_norm_(lin, 1.0)
    assert unchanged(lin, snap) and result.converged
    assert result.before == pytest.approx(before, rel=1e-6) and result.after == result.before
    assert not result.changed
    result = clip_spectral_norm_(lin, 0.5)
    truth = torch.linalg.svdvals(lin.weight.detach().double())
    assert truth[0].item() == pytest.approx(0.5, rel=1e-5)
    assert result.after == pytest.approx(truth[0].item(), rel=1e-6) and result.changed


def _repeated(m: int, n: int, repeats: int, value: float, seed: int = 0) -> Tensor:
    """A float32 (m, n) matrix with ``repeats`` singular values equal to ``value`` and the rest in (0, value/2)."""
    gen = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    s = value * torch.rand(n, generator=gen, dtype=torch.float64) / 2
    s[:repeats] = value
    return ((Q1 * s) @ Q2.T).float()


def test_synthetic_repeated_singular_values_at_the_target(monkeypatch, one_thread) -> None:
    lin = nn.Linear(256, 768)
    with torch.no_grad():
        lin.weight.copy_(_repeated(768, 256, 200, 1.000014))
    snap = snapshot(lin)
    result = clip_spectral_norm_(lin, 1.0)  # σ = 1.000014 ≤ 1·(1 + tol/4): nothing to do
    assert unchanged(lin, snap) and not result.changed
    assert result.after == pytest.approx(weight_sigma(lin.weight), rel=1e-5)  # a verified float32 SVD
    # clipping the whole cluster, with real LAPACK and with one that breaks down on it
    for broken in (False, True):
        copy_ = copy.deepcopy(lin)
        if broken:
            _broken_float32_svd(monkeypatch, "non_orthogonal")
        result = clip_spectral_norm_(copy_, 0.8)
        truth = weight_sigma(copy_.weight)
        assert truth == pytest.approx(0.8, rel=1e-5) and result.after == pytest.approx(truth, rel=1e-6)
        # the singular values below the target are untouched
        below = torch.linalg.svdvals(lin.weight.detach().double())[200:]
        torch.testing.assert_close(torch.linalg.svdvals(copy_.weight.detach().double())[200:], below, atol=1e-5, rtol=0)


def test_linear_within_tolerance_is_a_no_op() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight.mul_(1.000014 / weight_sigma(lin.weight))
    snap = snapshot(lin)
    result = clip_spectral_norm_(lin, 1.0, tol=1e-2)
    assert unchanged(lin, snap) and not result.changed
    lin_bn = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()
    snap = snapshot(lin_bn)
    result = clip_spectral_norm_(lin_bn, 10.0)
    assert unchanged(lin_bn, snap) and not result.changed
