"""Ground truths: FFT singular values of circular convolutions and ARPACK, both checked against dense SVDs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_specclip.spectral import ImplicitLinear
from lightning_specclip.spectral.exact import (
    LanczosResult,
    circular_frequency_matrices,
    dense_singular_values,
    fft_singular_values,
    lanczos_singular_values,
)


def _circular(cls: type[nn.Module], c_in: int, c_out: int, k: int, seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return cls(c_in, c_out, k, padding_mode="circular", **kw).double()


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "kw", "size"),
    [
        (3, 4, 3, {"padding": 1}, (8, 8)),
        (4, 4, 3, {"padding": 1, "stride": 2}, (8, 8)),
        (2, 3, 4, {"padding": 1, "stride": 2}, (8, 6)),  # even kernel, non-square input
        (4, 2, 2, {"padding": 0, "stride": 2}, (6, 6)),  # c_out < c_in·s²: wide blocks
        (2, 6, 3, {"padding": 1, "stride": (2, 1)}, (4, 6)),  # different strides per dimension
        (4, 4, 3, {"padding": 2, "dilation": 2}, (8, 8)),
        (4, 6, 3, {"padding": 1, "stride": 2, "groups": 2}, (8, 8)),
        (2, 2, 5, {"padding": 2}, (4, 4)),  # kernel wider than the input: taps alias
        (3, 4, 3, {"padding": 1, "stride": 3}, (6, 6)),
    ],
)
def test_fft_matches_dense_conv2d(c_in: int, c_out: int, k: int, kw: dict, size: tuple[int, int]) -> None:
    conv = _circular(nn.Conv2d, c_in, c_out, k, **kw)
    stride = kw.get("stride", 1)
    expected = dense_singular_values(conv, (c_in, *size))
    out_hw = conv(torch.zeros(1, c_in, *size, dtype=torch.float64)).shape[2:]
    s = (stride, stride) if isinstance(stride, int) else stride
    assert tuple(out_hw) == (size[0] // s[0], size[1] // s[1])  # the geometry the FFT formula describes
    got = fft_singular_values(conv.weight, size, stride, dilation=kw.get("dilation", 1), groups=kw.get("groups", 1))
    assert got.dtype == torch.float64
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_fft_matches_dense_conv1d(stride: int) -> None:
    conv = _circular(nn.Conv1d, 3, 4, 3, padding=1, stride=stride)
    expected = dense_singular_values(conv, (3, 10))
    torch.testing.assert_close(fft_singular_values(conv.weight, 10, stride), expected, atol=1e-6, rtol=0)


def test_fft_matches_dense_conv3d() -> None:
    conv = _circular(nn.Conv3d, 2, 2, 3, padding=1)
    expected = dense_singular_values(conv, (2, 4, 4, 4))
    torch.testing.assert_close(fft_singular_values(conv.weight, (4, 4, 4)), expected, atol=1e-6, rtol=0)


def test_padding_offset_does_not_matter() -> None:
    """Circular padding 0, 1 or 2 with a 3×3 kernel on a torus: same full circular operator up to a shift."""
    torch.manual_seed(1)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    ref = fft_singular_values(w, (6, 6))
    for pad in (0, 1, 2):
        # wrap the input by hand so that the output is the full 6×6 circular convolution with offset `pad`
        def op(x: torch.Tensor, pad: int = pad) -> torch.Tensor:
            xp = torch.nn.functional.pad(x, (pad, 2 - pad, pad, 2 - pad), mode="circular")
            return torch.nn.functional.conv2d(xp, w)

        torch.testing.assert_close(dense_singular_values(op, (3, 6, 6)), ref, atol=1e-6, rtol=0)


def test_fft_top_k_and_float32() -> None:
    conv = _circular(nn.Conv2d, 4, 4, 3, padding=1)
    full = fft_singular_values(conv.weight, (8, 8))
    torch.testing.assert_close(fft_singular_values(conv.weight, (8, 8), k=3), full[:3])
    top32 = fft_singular_values(conv.weight.float(), (8, 8), k=1, dtype=torch.float32)
    assert top32.dtype == torch.float32
    torch.testing.assert_close(top32.double(), full[:1], rtol=1e-5, atol=0)
    bf16 = fft_singular_values(conv.weight.bfloat16(), (8, 8), k=1)  # half types are upcast for the FFT
    torch.testing.assert_close(bf16, full[:1], rtol=2e-2, atol=0)


def test_frequency_matrices_are_differentiable() -> None:
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    blocks = circular_frequency_matrices(w, (4, 4), stride=2)
    assert blocks.shape == (1, 2, 2, 2, 8)
    (blocks.abs() ** 2).sum().backward()
    # Parseval: Σ over blocks of ‖·‖_F² = ‖wrapped kernel‖² · n² / S, here ‖w‖² · 16 / 4
    torch.testing.assert_close(w.grad, 2 * w.detach() * 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_size": (7, 8), "stride": 2}, "stride must divide"),
        ({"input_size": (8,)}, "sequence of 2 ints"),
        ({"input_size": (8, 8), "k": 0}, "k must be"),
        ({"input_size": (8, 8), "groups": 3}, "groups=3 does not divide"),
        ({"input_size": (0, 8)}, "must be positive"),
    ],
)
def test_fft_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fft_singular_values(torch.randn(4, 4, 3, 3), **kwargs)
    with pytest.raises(ValueError, match="convolution kernel"):
        fft_singular_values(torch.randn(4, 4), (8, 8))


def test_lanczos_matches_dense_zero_padding() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)  # zero padding: no FFT formula, ARPACK still exact
    expected = dense_singular_values(conv, (4, 8, 8))
    res = lanczos_singular_values(conv, (4, 8, 8), k=3)
    assert isinstance(res, LanczosResult)
    assert res.values.dtype == torch.float64
    torch.testing.assert_close(res.values, expected[:3], rtol=1e-9, atol=0)
    assert res.matvecs > 0 and res.rmatvecs > 0
    assert res.gram_applications == min(res.matvecs, res.rmatvecs)
    again = lanczos_singular_values(conv, (4, 8, 8), k=3)  # deterministic starting vector
    assert (again.values == res.values).all() and again.matvecs == res.matvecs


def test_lanczos_rectangular_float32_and_operator() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 5, 3, stride=2, padding=1)  # 5·4·4 = 80 outputs < 2·8·8 = 128 inputs
    expected = dense_singular_values(conv, (2, 8, 8))
    res32 = lanczos_singular_values(conv, (2, 8, 8), k=2, dtype=torch.float32)
    assert res32.values.dtype == torch.float32
    torch.testing.assert_close(res32.values.double(), expected[:2], rtol=1e-4, atol=0)
    op = ImplicitLinear(conv, (2, 8, 8), dtype=torch.float64)
    torch.testing.assert_close(lanczos_singular_values(op, k=2).values, expected[:2], rtol=1e-9, atol=0)


def test_lanczos_errors() -> None:
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="1 <= k < min"):
        lanczos_singular_values(lin, (4,), k=3)
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        lanczos_singular_values(lin, (4,), dtype=torch.float16)
    with pytest.raises(ValueError, match="input_shape is required"):
        lanczos_singular_values(lin)
