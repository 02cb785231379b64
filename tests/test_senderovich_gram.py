"""FFT clipping baseline (Sedghi/Senderovich) and Gram-iteration bounds (Delattre et al.) vs dense truths."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lightning_specclip.methods.gram import gram_iteration_bound, gram_regularizer
from lightning_specclip.methods.senderovich import senderovich_clip_
from lightning_specclip.spectral.exact import dense_singular_values, fft_singular_values


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny ops: intra-op threads only add synchronisation (60× slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv(c_in: int = 4, c_out: int = 4, k: int = 3, scale: float = 3.0, seed: int = 0, **kw: object) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, padding_mode="circular", **kw).double()
    with torch.no_grad():
        conv.weight.mul_(scale)
    return conv


# ---- senderovich_clip_


def test_clip_in_place_and_sigmas_are_exact_for_circular() -> None:
    conv = _conv()
    param, ptr = conv.weight, conv.weight.data_ptr()
    truth_before = dense_singular_values(conv, (4, 8, 8))[0].item()
    before, after = senderovich_clip_(conv, 1.0, (8, 8))
    assert conv.weight is param and conv.weight.data_ptr() == ptr
    truth_after = dense_singular_values(conv, (4, 8, 8))[0].item()
    assert before == pytest.approx(truth_before, rel=1e-9)
    assert after == pytest.approx(truth_after, rel=1e-9)
    assert before > after > 1.0 + 1e-3  # the projection onto 3×3 misses the target (the paper's point)


def test_clip_noop_when_target_above_sigma() -> None:
    conv = _conv()
    old = conv.weight.detach().clone()
    before, after = senderovich_clip_(conv, 1e3, (8, 8))
    assert before == pytest.approx(after, rel=1e-12)
    torch.testing.assert_close(conv.weight.detach(), old, atol=1e-12, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_clip_1x1_is_exact(stride: int) -> None:
    conv = _conv(k=1, stride=stride)
    before, after = senderovich_clip_(conv, 0.5, (8, 8))
    assert before > 0.5
    assert after == pytest.approx(0.5, rel=1e-9)
    dense = dense_singular_values(conv, (4, 8, 8))
    assert dense[0].item() == pytest.approx(0.5, rel=1e-9)


def test_clip_strided_grouped_matches_dense() -> None:
    conv = _conv(c_in=4, c_out=6, stride=2, groups=2)
    before, after = senderovich_clip_(conv, 1.0, (8, 8))
    assert after < before
    assert after == pytest.approx(dense_singular_values(conv, (4, 8, 8))[0].item(), rel=1e-9)


def test_clip_conv1d() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 3, 3, padding=1, padding_mode="circular").double()
    with torch.no_grad():
        conv.weight.mul_(4)
    before, after = senderovich_clip_(conv, 1.0, 16)
    assert before > after
    assert after == pytest.approx(dense_singular_values(conv, (3, 16))[0].item(), rel=1e-9)


def test_clip_bf16_writes_back_in_dtype() -> None:
    conv = _conv().to(torch.bfloat16)
    before, after = senderovich_clip_(conv, 1.0, (8, 8))
    assert conv.weight.dtype == torch.bfloat16 and torch.isfinite(conv.weight).all()
    measured = fft_singular_values(conv.weight, (8, 8), k=1).item()
    assert after == pytest.approx(measured, rel=1e-9)  # sigma_after is that of the rounded weight
    assert after < before


def test_clip_rejects_non_finite_without_writing() -> None:
    conv = _conv()
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    old = conv.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        senderovich_clip_(conv, 1.0, (8, 8))
    assert torch.equal(conv.weight.detach().isnan(), old.isnan())
    torch.testing.assert_close(conv.weight.detach(), old, equal_nan=True)


@pytest.mark.parametrize(
    ("module", "target", "size", "error", "match"),
    [
        (nn.Linear(3, 3), 1.0, (8, 8), TypeError, "nn.Conv1d, nn.Conv2d or nn.Conv3d"),
        (nn.ConvTranspose2d(2, 2, 3), 1.0, (8, 8), TypeError, "nn.Conv1d"),
        (nn.Conv2d(2, 2, 3), 0.0, (8, 8), ValueError, "positive finite"),
        (nn.Conv2d(2, 2, 3), float("inf"), (8, 8), ValueError, "positive finite"),
        (nn.Conv2d(2, 2, 3, stride=2), 1.0, (7, 8), ValueError, "stride must divide"),
        (nn.Conv2d(2, 2, 5), 1.0, (4, 4), ValueError, "does not fit"),
    ],
)
def test_clip_errors(module: nn.Module, target: float, size: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        senderovich_clip_(module, target, size)


# ---- Gram iteration


@pytest.mark.parametrize(("stride", "groups"), [(1, 1), (2, 1), (1, 2)])
def test_gram_bound_circular_is_tight_upper_bound(stride: int, groups: int) -> None:
    conv = _conv(c_out=4, stride=stride, groups=groups)
    sigma = dense_singular_values(conv, (4, 8, 8))[0].item()
    bound = gram_iteration_bound(conv.weight, (8, 8), n_iter=10, stride=stride, groups=groups).item()
    assert sigma * (1 - 1e-12) <= bound <= sigma * (1 + 1e-3)  # rounding when converged


def test_gram_bound_is_monotone_in_iterations() -> None:
    w = _conv().weight
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
    w = _conv().weight.detach()
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
    w = _conv().weight.detach().clone().requires_grad_(True)
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
