"""Gram iteration: certified, differentiable upper bounds on a convolution's spectral norm.

Delattre, Barthélemy, Araujo and Allauzen (ICML 2023): for any matrix ``A`` the Gram iterates
``G₀ = A``, ``G_{t+1} = G_tᴴ G_t`` have singular values ``σᵢ^{2^t}``, so
``σ₁(A) ≤ ‖G_t‖_F^{1/2^t}``, and the gap closes quadratically (the bound is at most
``σ₁ · rank^{1/2^{t+1}}``). A circular convolution is block diagonal in the Fourier basis, so its spectral
norm is the largest block's, and the iteration runs on all blocks at once. Every iterate is rescaled by
its Frobenius norm and the logarithms of the scales are accumulated, so nothing overflows however large
``t`` is.

Zero padding: Delattre, Barthélemy and Allauzen (2024) run a Gram iteration on the Toeplitz structure
directly; it is not implemented here. Instead :func:`gram_iteration_bound` uses the exact embedding that
their "bridging" results build on: a zero-padded convolution (padding ``p``, stride ``s``) on inputs of size
``n`` equals ``crop ∘ C_N ∘ embed``, where ``embed`` places the input in a zero grid of size
``N ≥ n + 2p`` (a multiple of ``s``), ``C_N`` is the circular convolution on that grid and ``crop`` keeps the
layer's outputs (no output of the layer wraps around). ``embed`` is an isometry and ``crop`` a contraction,
so ``σ₁(zero-padded) ≤ σ₁(C_N) ≤`` the Gram bound of ``C_N``: certified, slightly looser than theirs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_specclip.methods.base import ClipMethod
from lightning_specclip.spectral.conv import conv_geometry as _conv_geometry
from lightning_specclip.spectral.conv import ints as _ints
from lightning_specclip.spectral.exact import circular_frequency_matrices
from lightning_specclip.tracked_map import TrackedMap, known_shape

__all__ = ["PADDING_MODES", "GramRegularizer", "gram_iteration_bound", "gram_regularizer"]

PADDING_MODES = ("circular", "zeros")


def _grid(
    weight: Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int],
    dilation: int | Sequence[int],
    padding_mode: str,
    padding: int | Sequence[int],
) -> tuple[int, ...]:
    """The size of the circular grid whose convolution bounds the layer (see the module docstring)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r} (reflect and replicate "
            f"padding are not isometric embeddings; no certified bound is implemented for them)"
        )
    d = weight.dim() - 2
    n = _ints(input_size, d, "input_size")
    if padding_mode == "circular":
        return n
    if isinstance(padding, str):
        raise ValueError(f"padding must be the layer's numeric zero padding (ints), got {padding!r}")
    s, dil, p = _ints(stride, d, "stride"), _ints(dilation, d, "dilation"), _ints(padding, d, "padding")
    if any(v < 0 for v in p):
        raise ValueError(f"padding must be non-negative, got {p}")
    extent = [(k - 1) * dj + 1 for k, dj in zip(weight.shape[2:], dil, strict=True)]
    sizes = [max(nj + 2 * pj, e) for nj, pj, e in zip(n, p, extent, strict=True)]
    return tuple(math.ceil(v / sj) * sj for v, sj in zip(sizes, s, strict=True))


def gram_iteration_bound(
    weight: Tensor,
    input_size: int | Sequence[int],
    n_iter: int = 6,
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "circular",
    padding: int | Sequence[int] = 0,
) -> Tensor:
    """An upper bound on the spectral norm of a convolution, by Gram iteration on its Fourier blocks.

    What is bounded: with ``padding_mode="circular"``, the largest singular value of the circular
    convolution on inputs of spatial size ``input_size`` with this kernel, stride (dividing
    ``input_size``), dilation and groups (equal to the layer's for ``nn.ConvNd(padding_mode="circular")``
    whose output size is ``input_size / stride``); the bound converges to it quadratically in ``n_iter``.
    With ``padding_mode="zeros"``, the largest singular value of the zero-padded layer (``padding`` as in
    ``nn.ConvNd``, output size ``⌊(n + 2p − dil·(k − 1) − 1) / s⌋ + 1``), bounded through the circular
    convolution on a larger grid (module docstring); this bound converges to that circular norm, not to
    the zero-padded one. The guarantee holds in exact arithmetic; in float32 expect relative rounding of a
    few ``1e-6``. Differentiable with respect to ``weight`` (use it as a training regularizer); the
    gradient flows through the block that attains the maximum.

    Args:
        weight: kernel ``(c_out, c_in / groups, k_1, ..., k_d)``, ``d`` in 1..3; math in the weight's dtype
            (float32 for half types).
        input_size: spatial input size ``(n_1, ..., n_d)``.
        n_iter: Gram iterations; ``0`` gives the largest Frobenius norm of a block.
        stride: stride per dimension.
        dilation: dilation per dimension.
        groups: convolution groups.
        padding_mode: ``"circular"`` or ``"zeros"``.
        padding: the layer's zero padding per dimension (only used with ``"zeros"``).

    Returns:
        Tensor: a scalar upper bound on the spectral norm, in the compute dtype, attached to the graph.

    Raises:
        ValueError: ``n_iter < 0``, an unknown ``padding_mode``, negative padding, or a geometry rejected
            by :func:`lightning_specclip.spectral.exact.circular_frequency_matrices` (for ``"circular"`` the
            stride must divide ``input_size``).

    Example:
        >>> from lightning_specclip.spectral.exact import fft_singular_values
        >>> w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
        >>> bound = gram_iteration_bound(w, (8, 8), n_iter=10)
        >>> sigma = fft_singular_values(w, (8, 8), k=1)[0]
        >>> bool(sigma <= bound <= sigma * (1 + 1e-3))
        True
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative number of Gram iterations, got {n_iter}")
    _conv_geometry(weight, input_size, 1, dilation, groups)  # shapes first, for clear messages
    grid = _grid(weight, input_size, stride, dilation, padding_mode, padding)
    _conv_geometry(weight, grid, stride, dilation, groups)
    blocks = circular_frequency_matrices(weight, grid, stride, dilation=dilation, groups=groups)
    x = blocks.reshape(-1, *blocks.shape[-2:])
    real = x.real.dtype
    tiny = torch.finfo(real).tiny

    def _fro(m: Tensor) -> Tensor:
        return (m.real.square() + m.imag.square()).sum((-2, -1)).clamp_min(tiny).sqrt()

    scale = _fro(x)
    log_bound = scale.log()
    x = x / scale[:, None, None].to(x.dtype)
    for t in range(1, n_iter + 1):
        # the first product picks the smaller Gram matrix; afterwards the iterate is Hermitian
        x = x @ x.mH if (t == 1 and x.shape[-2] < x.shape[-1]) else x.mH @ x
        scale = _fro(x)
        log_bound = log_bound + scale.log() / 2**t
        x = x / scale[:, None, None].to(x.dtype)
    return log_bound.max().exp()


def gram_regularizer(
    weight: Tensor,
    input_size: int | Sequence[int],
    target: float,
    n_iter: int = 6,
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "circular",
    padding: int | Sequence[int] = 0,
) -> Tensor:
    """Penalty ``relu(bound − target)²`` on the Gram-iteration bound, to add to a training loss.

    Zero (with zero gradient) while the certified bound of :func:`gram_iteration_bound` is at most
    ``target``; otherwise it pushes the kernel's spectral norm down.

    Args:
        weight: kernel ``(c_out, c_in / groups, k_1, ..., k_d)``.
        input_size: spatial input size ``(n_1, ..., n_d)``.
        target: the spectral norm allowed for free, non-negative.
        n_iter: Gram iterations.
        stride: stride per dimension.
        dilation: dilation per dimension.
        groups: convolution groups.
        padding_mode: ``"circular"`` or ``"zeros"``.
        padding: the layer's zero padding per dimension (only used with ``"zeros"``).

    Returns:
        Tensor: a non-negative scalar, differentiable with respect to ``weight``.

    Raises:
        ValueError: ``target`` negative or not finite, or any error of :func:`gram_iteration_bound`.

    Example:
        >>> w = torch.randn(4, 4, 3, 3, requires_grad=True)
        >>> loss = gram_regularizer(w, (8, 8), target=1.0)
        >>> loss.backward()
        >>> bool(loss > 0 and torch.isfinite(w.grad).all())
        True
    """
    if not (math.isfinite(target) and target >= 0):
        raise ValueError(f"target must be a non-negative finite number, got {target!r}")
    bound = gram_iteration_bound(
        weight,
        input_size,
        n_iter,
        stride=stride,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        padding=padding,
    )
    return torch.relu(bound - target).square()


class GramRegularizer(ClipMethod):
    """Gram-iteration regularizer (Delattre et al. 2023) as a clip method: it never clips.

    After every backward pass the clipper (:meth:`~lightning_specclip.SpectralClipper.penalize`) adds
    ``weight · ∇ relu(bound − target)²`` to each layer's gradient, where ``bound`` is
    :func:`gram_iteration_bound` of the layer (circular padding: the layer's own norm; zero padding: a
    certified bound through a larger circular grid). Linear layers use their exact spectral norm.
    Reflect/replicate padding and transposed convolutions are tracked only (no certified bound here).

    Args:
        weight: the regularization strength.
        n_iter: Gram iterations per bound.

    Example:
        >>> GramRegularizer(weight=0.1).name
        'gram'
    """

    name: ClassVar[str] = "gram"

    def __init__(self, weight: float = 1.0, n_iter: int = 6) -> None:
        if not (math.isfinite(weight) and weight >= 0) or n_iter < 0:
            raise ValueError(f"need weight >= 0 (finite) and n_iter >= 0; got {weight}, {n_iter}")
        self.weight = weight
        self.n_iter = n_iter

    def supports(self, tracked: TrackedMap) -> bool:
        """Linear layers and convolutions (not transposed) with zero or circular padding.

        Args:
            tracked: a map.

        Returns:
            bool: whether a penalty is defined for it (BatchNorm targets are clamped as by every method).
        """
        module = tracked.module
        if tracked.kind == "batchnorm" or isinstance(module, nn.Linear):
            return True
        return (
            tracked.kind == "layer"
            and isinstance(module, _ConvNd)
            and not module.transposed
            and module.padding_mode in PADDING_MODES
            and not isinstance(module.padding, str)
        )

    def penalty(self, tracked: TrackedMap, value: float) -> Tensor | None:
        """``weight · relu(bound − value)²`` for a layer tracked, attached to its weight.

        Args:
            tracked: a layer map with its input shape.
            value: the target spectral norm.

        Returns:
            Tensor | None: the penalty, or ``None`` for targets it does not regularize.
        """
        module = tracked.module
        if tracked.kind != "layer" or not self.supports(tracked) or self.weight == 0:
            return None
        if isinstance(module, nn.Linear):
            sigma = torch.linalg.matrix_norm(module.weight.float(), ord=2)
            return self.weight * torch.relu(sigma - value) ** 2
        # supports() admitted only Linear and numerically padded convolutions (not transposed)
        assert isinstance(module, _ConvNd) and not isinstance(module.padding, str)
        return self.weight * gram_regularizer(
            module.weight,
            known_shape(tracked)[1:],
            value,
            self.n_iter,
            stride=module.stride,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            padding=module.padding,
        )
