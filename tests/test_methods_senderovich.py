"""The FFT clipping baseline (Sedghi/Senderovich; ``methods/senderovich.py``) vs dense truths: exact for circular
padding, 1×1, strided and grouped convolutions, Conv1d, bf16 write-back, refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import circular_conv
from torch import nn

from lightning_specclip.methods.senderovich import senderovich_clip_
from lightning_specclip.spectral.exact import dense_singular_values, fft_singular_values

# ---- senderovich_clip_


def test_clip_in_place_and_sigmas_are_exact_for_circular() -> None:
    conv = circular_conv()
    param, ptr = conv.weight, conv.weight.data_ptr()
    truth_before = dense_singular_values(conv, (4, 8, 8))[0].item()
    before, after = senderovich_clip_(conv, 1.0, (8, 8))
    assert conv.weight is param and conv.weight.data_ptr() == ptr
    truth_after = dense_singular_values(conv, (4, 8, 8))[0].item()
    assert before == pytest.approx(truth_before, rel=1e-9)
    assert after == pytest.approx(truth_after, rel=1e-9)
    assert before > after > 1.0 + 1e-3  # the projection onto 3×3 misses the target (the paper's point)


def test_clip_noop_when_target_above_sigma() -> None:
    conv = circular_conv()
    old = conv.weight.detach().clone()
    before, after = senderovich_clip_(conv, 1e3, (8, 8))
    assert before == pytest.approx(after, rel=1e-12)
    torch.testing.assert_close(conv.weight.detach(), old, atol=1e-12, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_clip_1x1_is_exact(stride: int) -> None:
    conv = circular_conv(k=1, stride=stride)
    before, after = senderovich_clip_(conv, 0.5, (8, 8))
    assert before > 0.5
    assert after == pytest.approx(0.5, rel=1e-9)
    dense = dense_singular_values(conv, (4, 8, 8))
    assert dense[0].item() == pytest.approx(0.5, rel=1e-9)


def test_clip_strided_grouped_matches_dense() -> None:
    conv = circular_conv(c_in=4, c_out=6, stride=2, groups=2)
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
    conv = circular_conv().to(torch.bfloat16)
    before, after = senderovich_clip_(conv, 1.0, (8, 8))
    assert conv.weight.dtype == torch.bfloat16 and torch.isfinite(conv.weight).all()
    measured = fft_singular_values(conv.weight, (8, 8), k=1).item()
    assert after == pytest.approx(measured, rel=1e-9)  # sigma_after is that of the rounded weight
    assert after < before


def test_clip_rejects_non_finite_without_writing() -> None:
    conv = circular_conv()
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
