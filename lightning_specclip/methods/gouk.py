"""Spectral-norm estimate of Gouk, Frank, Pfahringer and Cree (2021), "Regularisation of neural networks by
enforcing Lipschitz continuity".

Single-vector power iteration on ``AᵀA`` where ``A`` is applied with the layer's own functional convolution
(``F.conv1d/2d/3d`` with its stride, padding, dilation and groups) and ``Aᵀ`` with the matching
``F.conv_transpose1d/2d/3d`` (the ``output_padding`` chosen so that it returns the input's size); for a
``Linear`` layer, ``A`` is the weight. The bias is left out (it does not change the linear part).

What it computes: the spectral norm of the layer **with zero padding**. ``padding_mode`` is ignored, so for
``"circular"``, ``"reflect"`` or ``"replicate"`` padding the estimate is that of a different operator (the
zero-padded one) and it does not converge to the layer's spectral norm; use
:func:`lightning_specclip.spectrum` for those. For zero padding it converges to the exact spectral norm of
the convolution on inputs of the given shape (at the rate ``(σ₂/σ₁)²`` per iteration), and one iteration per
training step with a persistent vector (``u`` returned and passed back) is how Gouk et al. use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, NoReturn, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lightning_specclip.methods.base import ClipMethod, measured_result
from lightning_specclip.spectral.clip import ClipResult, _positive_finite
from lightning_specclip.tracked_map import TrackedMap, known_shape

__all__ = ["SUPPORTED", "Gouk", "gouk_clip_", "gouk_sigma", "operator_pair"]

SUPPORTED = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

Pair = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]


def _compute_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _same_pads(kernel: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    """Left/right zero padding of ``padding="same"`` (PyTorch puts the odd extra element on the right)."""
    pads = []
    for k, d in zip(kernel, dilation, strict=True):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def _conv_pair(module: _ConvNd, w: Tensor, input_shape: tuple[int, ...]) -> Pair:
    """``A`` and ``Aᵀ`` of a zero-padded ``Conv{1,2,3}d`` on inputs ``(B, *input_shape)``."""
    d = w.dim() - 2
    stride, dilation, groups = tuple(module.stride), tuple(module.dilation), module.groups
    kernel = tuple(w.shape[2:])
    if isinstance(module.padding, str):
        pads = [(0, 0)] * d if module.padding == "valid" else _same_pads(kernel, dilation)
    else:
        pads = [(int(p), int(p)) for p in module.padding]
    n = input_shape[1:]
    padded = [nj + lo + hi for nj, (lo, hi) in zip(n, pads, strict=True)]
    out = [(pj - dj * (kj - 1) - 1) // sj + 1 for pj, dj, kj, sj in zip(padded, dilation, kernel, stride, strict=True)]
    if any(o <= 0 for o in out):
        raise ValueError(
            f"input_shape={input_shape} is too small for the kernel {kernel} with padding {pads} and "
            f"dilation {dilation}: the output would be empty"
        )
    # conv_transpose returns (out-1)·s + d·(k-1) + 1 + output_padding elements of the padded input; the
    # output padding restores the rows the strided convolution never reached (they get zero gradient).
    base = [(o - 1) * s + dj * (kj - 1) + 1 for o, s, dj, kj in zip(out, stride, dilation, kernel, strict=True)]
    out_pad = [pj - bj for pj, bj in zip(padded, base, strict=True)]
    conv, conv_t = _CONV[d], _CONV_T[d]
    if all(lo == hi for lo, hi in pads):
        padding = tuple(lo for lo, _ in pads)
        # with symmetric padding the transposed convolution crops it itself; output_padding < stride holds
        # because out_pad = (padded − d(k−1) − 1) mod stride.
        return (
            lambda x: conv(x, w, None, stride, padding, dilation, groups),
            lambda y: conv_t(y, w, None, stride, padding, tuple(out_pad), groups, dilation),
        )
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]  # F.pad wants the last dimension first

    def adjoint(y: Tensor) -> Tensor:
        full = conv_t(y, w, None, stride, 0, tuple(out_pad), groups, dilation)
        index = [slice(None), slice(None)] + [slice(lo, lo + nj) for (lo, _), nj in zip(pads, n, strict=True)]
        return full[tuple(index)]

    return lambda x: conv(F.pad(x, flat), w, None, stride, 0, dilation, groups), adjoint


def _conv_transpose_pair(module: _ConvTransposeNd, w: Tensor, input_shape: tuple[int, ...]) -> Pair:
    """``A`` and ``Aᵀ`` of a ``ConvTranspose{1,2,3}d`` (zero padding is its only mode)."""
    d = w.dim() - 2
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    padding = tuple(cast(tuple[int, ...], module.padding))  # a transposed convolution refuses string paddings
    out_pad, groups = tuple(module.output_padding), module.groups
    conv, conv_t = _CONV[d], _CONV_T[d]
    return (
        lambda x: conv_t(x, w, None, stride, padding, out_pad, groups, dilation),
        lambda y: conv(y, w, None, stride, padding, dilation, groups),
    )


def _unsupported(module: nn.Module) -> NoReturn:
    names = ", ".join(t.__name__ for t in SUPPORTED)
    raise TypeError(
        f"gouk_sigma supports {names}; got {type(module).__name__} (use lightning_specclip.spectrum for "
        f"any other affine module)"
    )


def operator_pair(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype | None = None) -> Pair:
    """The functional ``A`` and ``Aᵀ`` that Gouk et al. iterate with (zero padding, no bias).

    Args:
        module: a ``Linear``, ``Conv{1,2,3}d`` or ``ConvTranspose{1,2,3}d`` layer.
        input_shape: the shape of one input without the batch dimension, e.g. ``(C, H, W)``.
        dtype: compute dtype (default float32, float64 for a float64 weight).

    Returns:
        tuple: ``(forward, adjoint)``, functions on batches ``(B, *input_shape)`` and ``(B, *output_shape)``.

    Raises:
        TypeError: ``module`` is not one of :data:`SUPPORTED`.
        ValueError: ``input_shape`` does not fit the layer.

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> fwd, adj = operator_pair(conv, (2, 5, 5))
        >>> x, y = torch.randn(1, 2, 5, 5), torch.randn(1, 3, 5, 5)
        >>> abs((fwd(x) * y).sum() - (x * adj(y)).sum()).item() < 1e-4
        True
    """
    if not isinstance(module, SUPPORTED):
        _unsupported(module)
    shape = tuple(int(s) for s in input_shape)
    weight = module.weight.detach()
    w = weight.to(dtype or _compute_dtype(weight))
    if isinstance(module, nn.Linear):
        if len(shape) == 0 or shape[-1] != module.in_features:
            raise ValueError(f"input_shape={shape} does not end with in_features={module.in_features}")
        return (lambda x: F.linear(x, w), lambda y: F.linear(y, w.T))
    d = w.dim() - 2
    c_in = module.in_channels
    if len(shape) != d + 1 or shape[0] != c_in:
        raise ValueError(
            f"input_shape={shape} does not fit {type(module).__name__}: expected (in_channels={c_in}, "
            f"{d} spatial sizes)"
        )
    if isinstance(module, _ConvTransposeNd):
        return _conv_transpose_pair(module, w, shape)
    return _conv_pair(module, w, shape)


def gouk_sigma(
    module: nn.Module,
    input_shape: Sequence[int],
    n_iter: int = 1,
    u: Tensor | None = None,
    *,
    seed: int = 0,
) -> tuple[float, Tensor]:
    """Estimate a layer's spectral norm by power iteration through its own conv and conv-transpose.

    Gouk et al. (2021): starting from the unit vector ``u`` (random from ``seed`` when not given), repeat
    ``n_iter`` times ``u ← AᵀA u / ‖AᵀA u‖`` with ``A`` the layer's functional convolution with **zero
    padding** (``padding_mode`` is ignored) and ``Aᵀ`` the matching transposed convolution; the estimate is
    ``‖A u‖`` for the final ``u``. It never exceeds the spectral norm of the zero-padded operator and
    converges to it from below; for other padding modes it estimates a different operator. No gradients are
    recorded, the math runs in float32 (float64 for a float64 weight) on the weight's device, and the
    module is not modified. Pass the returned vector back as ``u`` to warm-start (one iteration per step).

    Cost: ``n_iter`` applications of ``AᵀA`` plus one of ``A``.

    Args:
        module: ``Linear``, ``Conv{1,2,3}d`` (any stride, dilation, groups, numeric or ``"same"``/``"valid"``
            padding) or ``ConvTranspose{1,2,3}d``.
        input_shape: the shape of one input without the batch dimension, e.g. ``(C, H, W)``.
        n_iter: power iterations (``≥ 0``; ``0`` only evaluates ``‖A u‖``).
        u: warm start, a vector of ``input_shape`` (or ``(1, *input_shape)``); normalised before use.
        seed: seed of the random start when ``u`` is ``None``; the result is deterministic for a seed.

    Returns:
        tuple[float, Tensor]: the estimate ``‖A u‖`` and the unit vector ``u`` (shape ``input_shape``, in the
        compute dtype) after the iterations.

    Raises:
        TypeError: unsupported layer type (the message lists the supported ones).
        ValueError: ``n_iter`` negative, ``input_shape`` does not fit the layer, ``u`` of the wrong size, zero
            or non-finite.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> conv = nn.Conv2d(3, 4, 3, padding=1)
        >>> sigma, u = gouk_sigma(conv, (3, 8, 8), n_iter=200)
        >>> from lightning_specclip.spectral.exact import dense_singular_values
        >>> abs(sigma / dense_singular_values(conv, (3, 8, 8))[0].item() - 1) < 1e-4
        True
        >>> sigma2, u = gouk_sigma(conv, (3, 8, 8), n_iter=1, u=u)  # warm start: one step per call
    """
    if not (isinstance(n_iter, int) and n_iter >= 0):
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if not isinstance(module, SUPPORTED):
        _unsupported(module)
    forward, adjoint = operator_pair(module, input_shape)
    weight = module.weight
    dtype, device = _compute_dtype(weight), weight.device
    shape = tuple(int(s) for s in input_shape)
    with torch.no_grad():
        if u is None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            # drawn in float32 whatever the compute dtype, so the start is the same for every dtype
            x = torch.randn((1, *shape), generator=gen).to(device, dtype)
        else:
            if u.numel() != math.prod(shape):
                raise ValueError(f"u must have shape {shape} (or (1, *input_shape)), got {tuple(u.shape)}")
            x = u.detach().to(device, dtype).reshape(1, *shape)
        norm = x.norm()
        if not (torch.isfinite(norm) and norm > 0):
            raise ValueError("u must be a finite non-zero vector")
        x = x / norm
        for _ in range(n_iter):
            g = adjoint(forward(x))
            norm = g.norm()
            if not (torch.isfinite(norm) and norm > 0):
                break  # A u = 0 (or overflow): keep u, the estimate below says so
            x = g / norm
        sigma = float(forward(x).norm())
    return sigma, x.reshape(shape)


# Clipping with the estimate


def gouk_clip_(
    module: nn.Module,
    target: float,
    input_shape: Sequence[int],
    n_iter: int = 1,
    u: Tensor | None = None,
    *,
    seed: int = 0,
) -> tuple[float, float, Tensor]:
    """Clip a layer's spectral norm as Gouk et al. (2021) do: estimate ``σ``, then ``W ← W / max(1, σ/target)``.

    ``σ`` is :func:`gouk_sigma` (power iteration through the layer's own convolution and transposed
    convolution with **zero padding**). The layer is linear in its weight, so dividing the weight by
    ``σ/target`` divides every singular value by it: the clip is exact exactly when the estimate is.

    What is exact for what:

    * ``Linear``, ``Conv{1,2,3}d`` with ``padding_mode="zeros"`` (numeric, ``"same"`` or ``"valid"`` padding,
      any stride, dilation, groups) and ``ConvTranspose{1,2,3}d``: the estimate converges to the layer's
      spectral norm from below, at the rate ``(σ₂/σ₁)²`` per iteration. With too few iterations it is low
      and the layer stays a little above ``target``; with a persistent ``u`` (passed back every step, one
      iteration per step, as in the paper) it tracks the norm during training.
    * ``padding_mode="circular"``, ``"reflect"`` or ``"replicate"``: **wrong operator**. The padding mode is
      ignored, so ``σ`` is the norm of the zero-padded convolution, and the layer ends wherever the ratio of
      the two norms puts it. Neither bounds the other in general: the circular layer's norm is the largest
      frequency response ``‖P(ω)‖`` over the ``n``-point frequency grid, the zero-padded one is at most that
      over an ``(n + 2p)``-point grid (both below the supremum over all ``ω``); reflect/replicate padding
      copies border values, which usually adds to the norm. So the layer is typically left a few percent to
      tens of percent above ``target`` (see ``docs/benchmarks.md``). Use
      :func:`lightning_specclip.clip_spectral_norm_` for these.
    * Every singular value is scaled by the same factor, so the whole spectrum shrinks, not only the part
      above ``target`` (the values below ``target`` move too).

    The weight is edited in place under ``torch.no_grad()`` (the same ``Parameter``, so optimizers keep their
    state), computed in float32 (float64 for a float64 weight) and written in the weight's dtype. The bias is
    not touched (it does not enter the spectral norm). Nothing is written when ``σ ≤ target``.

    Args:
        module: ``Linear``, ``Conv{1,2,3}d`` or ``ConvTranspose{1,2,3}d``.
        target: the clip value (``> 0``, finite).
        input_shape: the shape of one input without the batch dimension, e.g. ``(C, H, W)``.
        n_iter: power iterations for the estimate (``≥ 0``; ``0`` only evaluates ``‖A u‖`` for the given ``u``).
        u: warm-start vector of ``input_shape`` (e.g. the ``u`` returned by the previous call).
        seed: seed of the random start when ``u`` is ``None``.

    Returns:
        tuple[float, float, Tensor]: the estimate before clipping, the estimate ``‖A' u‖`` of the written
        layer with the same vector (``min(σ, target)`` up to the rounding of the written weight), and the unit
        vector ``u`` to pass back next time.

    Raises:
        TypeError: unsupported layer type.
        ValueError: ``target`` not positive and finite, the weight holds NaN or inf (nothing is written),
            ``n_iter`` negative, or ``input_shape``/``u`` do not fit the layer.
        RuntimeError: the estimate is not finite (overflow); nothing is written.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> conv = nn.Conv2d(3, 4, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(10)
        >>> before, after, u = gouk_clip_(conv, 1.0, (3, 8, 8), n_iter=200)
        >>> before > 1.0, round(after, 4)
        (True, 1.0)
        >>> from lightning_specclip.spectral.exact import dense_singular_values
        >>> abs(dense_singular_values(conv, (3, 8, 8))[0].item() - 1.0) < 1e-3  # zero padding: exact
        True
    """
    target = _positive_finite(target)
    if not isinstance(module, SUPPORTED):
        _unsupported(module)
    weight = module.weight
    if not torch.isfinite(weight.detach()).all():
        raise ValueError("the layer's weight holds NaN or inf; refusing to clip it (the weight was not modified)")
    before, u = gouk_sigma(module, input_shape, n_iter, u, seed=seed)
    if not math.isfinite(before):
        raise RuntimeError(f"the spectral-norm estimate is not finite ({before}); the weight was not modified")
    if before > target:
        with torch.no_grad():
            scaled = weight.detach().to(_compute_dtype(weight)) * (target / before)
            if not torch.isfinite(scaled).all():
                raise RuntimeError("clipping produced non-finite weights; the weight was not modified")
            weight.copy_(scaled.to(weight.dtype))
    after, _ = gouk_sigma(module, input_shape, 0, u)
    return before, after, u


class Gouk(ClipMethod):
    """Gouk et al. (2021) as a clip method: one power iteration per step, divide the weight when clipping.

    The vector ``u`` persists across steps (in the clipper's state, so checkpoints keep it). The estimate
    runs the layer's convolution and its transpose with zero padding: right for zero-padded layers of any
    stride, wrong for circular, reflect and replicate padding. Compositions with BatchNorm are not supported.

    Args:
        n_iter_clip: extra power iterations right before each clip.

    Example:
        >>> Gouk().name
        'gouk'
    """

    name: ClassVar[str] = "gouk"

    def __init__(self, n_iter_clip: int = 1) -> None:
        self.n_iter_clip = n_iter_clip

    def supports(self, tracked: TrackedMap) -> bool:
        """Linear, convolutions and transposed convolutions (and BatchNorm, clamped).

        Args:
            tracked: a map.

        Returns:
            bool: whether it can be clipped.
        """
        return tracked.kind == "batchnorm" or (tracked.kind == "layer" and isinstance(tracked.module, SUPPORTED))

    def step(self, tracked: TrackedMap, state: dict[str, Tensor]) -> None:
        """One power iteration, warm-started from ``state["u"]``.

        Args:
            tracked: a layer map with its input shape.
            state: holds ``"u"``.
        """
        _, state["u"] = gouk_sigma(tracked.module, known_shape(tracked), 1, state.get("u"))

    def clip_(self, tracked: TrackedMap, value: float, state: dict[str, Tensor], init: Tensor | None) -> ClipResult:
        """``W ← W / max(1, σ/value)`` with the power-iteration estimate ``σ``.

        Args:
            tracked: a layer map with its input shape.
            value: the clip value.
            state: holds ``"u"``.
            init: the tracked top right singular vectors: a warm start for measuring the written layer.

        Returns:
            ClipResult: ``before`` is Gouk's estimate before the clip, ``estimate`` his estimate after it, and
            ``after`` (with ``spectrum``) the layer's true spectral norm measured on the written weights (for
            padding other than zeros it can be well above ``value``); ``changed`` whether the weight was divided.
        """
        before, estimate, state["u"] = gouk_clip_(
            tracked.module, value, known_shape(tracked), self.n_iter_clip, state.get("u")
        )
        return measured_result(tracked, value, before, estimate, before > value, init)
