"""The probes an operator runs before it is trusted: affine in its input, linear in the weight a clip moves.

Both run the op on random inputs and compare the outputs with what an affine (linear) map would give, allowing
``atol`` times the size of the outputs plus the rounding noise of the raw outputs the comparison is computed from.
Standard layers with a closed form (:func:`~lightning_specclip.spectral.closed_form.linear_part`) are affine and
linear in their weight by construction and are not probed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_specclip.spectral.operator import ImplicitLinear

__all__ = ["NotLinearInWeightError", "probe_affine", "probe_linear_in"]

# The rounding noise the probes allow, in units of eps times the norm of the raw outputs involved.
_NOISE = 32


class NotLinearInWeightError(ValueError):
    """A layer is affine in its input but not linear in the weight a clip would move (so it cannot be clipped).

    Raised by :meth:`ImplicitLinear.check_linear_in`, :func:`~lightning_specclip.spectral.clip.check_clippable`
    and :func:`~lightning_specclip.spectral.clip.clip_spectral_norm_` (before anything is written), e.g. for a
    convolution that standardizes its weight in ``forward`` (timm's ``StdConv2d``). Such layers can be tracked.

    Example:
        >>> issubclass(NotLinearInWeightError, ValueError)
        True
    """


def _check_tensors_finite(A: ImplicitLinear) -> None:
    for name, t in A.tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"op's {name} holds non-finite values; it cannot be analysed")


def probe_affine(A: ImplicitLinear, atol: float, seed: int) -> None:
    """:meth:`ImplicitLinear.check_affine <lightning_specclip.spectral.operator.ImplicitLinear.check_affine>`."""

    if A.closed_part:
        _check_tensors_finite(A)
        _ = A.output_shape  # one product of a zero input: refuses an input shape the layer cannot take
        return
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x, y = torch.randn((2, *A.input_shape), generator=gen, dtype=A.dtype).to(A.device)
    raw = A.raw(torch.stack([x, y, x + y, -2 * x]))
    zero = A.bias[0]
    if not (torch.isfinite(raw).all() and torch.isfinite(zero).all()):
        raise ValueError("op returned non-finite values on random inputs; it cannot be analysed")
    rx, ry, rxy, r2x = raw
    fx, fy, fxy, f2x = raw - zero
    n = {name: float(t.norm()) for name, t in (("x", rx), ("y", ry), ("xy", rxy), ("2x", r2x), ("0", zero))}
    scale = max(float(fx.norm()), float(fy.norm()))
    noise = _NOISE * torch.finfo(A.dtype).eps
    probes = {
        "op(x+y) − op(0) = (op(x) − op(0)) + (op(y) − op(0))": (
            float((fxy - fx - fy).norm()),
            noise * (n["xy"] + n["x"] + n["y"] + n["0"]),
        ),
        "op(−2x) − op(0) = −2 (op(x) − op(0))": (
            float((f2x + 2 * fx).norm()),
            noise * (n["2x"] + 2 * n["x"] + 3 * n["0"]),
        ),
    }
    for probe, (defect, floor) in probes.items():
        if not defect <= atol * scale + floor:
            raise ValueError(
                f"op is not affine in its input: the probe {probe} failed on random x, y with relative "
                f"defect {defect / max(scale, 1e-30):.3g} > {atol:g} (rounding allows {floor:.3g} absolute). "
                f"Spectra are defined for affine maps only (Linear, convolutions, BatchNorm with running "
                f"statistics, their compositions); a nonlinearity such as ReLU makes the map non-affine. Pass "
                f"check_affine=False to skip this check."
            )


def probe_linear_in(A: ImplicitLinear, name: str, atol: float, seed: int) -> None:
    """:meth:`ImplicitLinear.check_linear_in
    <lightning_specclip.spectral.operator.ImplicitLinear.check_linear_in>`."""

    if not isinstance(A.op, nn.Module):
        raise ValueError("check_linear_in needs op to be an nn.Module")
    weight = A.tensors.get(name)
    if weight is None or not weight.is_floating_point():
        names = [n for n, t in A.tensors.items() if t.is_floating_point()]
        raise ValueError(f"{name!r} is not a floating point tensor of the module; it has: {names}")
    if A.closed_part:
        return
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((2, *A.input_shape), generator=gen, dtype=A.dtype).to(A.device)
    other = torch.randn(weight.shape, generator=gen, dtype=A.dtype).to(A.device)
    size = float(weight.norm())
    if size > 0:
        other = other * (size / float(other.norm()))
    batch = torch.cat([x, A.zeros(1)])
    raw = {}
    for key, w in (("W", weight), ("2W", 2 * weight), ("W'", other), ("W+W'", weight + other)):
        out = A.raw(batch, {**A.tensors, name: w})
        if not torch.isfinite(out).all():
            raise NotLinearInWeightError(
                f"{type(A.op).__name__} returned non-finite values with the weight {name!r} changed "
                f"(to {key}); it cannot be clipped through that weight (track it only)"
            )
        raw[key] = out
    lin = {key: out[:-1] - out[-1:] for key, out in raw.items()}
    norms = {key: float(out.norm()) for key, out in raw.items()}
    scale = max(float(lin["W"].norm()), float(lin["W'"].norm()))
    noise = _NOISE * torch.finfo(A.dtype).eps
    probes = {
        "A(2W) = 2 A(W)": (float((lin["2W"] - 2 * lin["W"]).norm()), noise * (norms["2W"] + 2 * norms["W"])),
        "A(W + W') = A(W) + A(W')": (
            float((lin["W+W'"] - lin["W"] - lin["W'"]).norm()),
            noise * (norms["W+W'"] + norms["W"] + norms["W'"]),
        ),
    }
    for probe, (defect, floor) in probes.items():
        if not defect <= atol * scale + 2 * floor:
            raise NotLinearInWeightError(
                f"{type(A.op).__name__} is not linear in its weight {name!r}: the probe {probe} failed on "
                f"random inputs with relative defect {defect / max(scale, 1e-30):.3g} > {atol:g}. Its forward "
                f"transforms the weight before using it (e.g. weight standardization), so clipping cannot move "
                f"that weight to a given spectral norm; it cannot be clipped (track it only)."
            )
