"""FFT clipping of convolutions (Sedghi, Gupta and Long, 2019; Senderovich, Bulatova, Eyal and Pitman, 2022).

The baseline the paper compares against: a convolution with circular padding is block diagonal in the
Fourier basis (:func:`lightning_specclip.spectral.exact.circular_frequency_matrices`), so its singular values
can be clipped block by block. The clipped operator is again a circular convolution, but with a kernel of
full spatial support ``n_1 × ⋯ × n_d``; projecting it back onto the layer's ``k_1 × ⋯ × k_d`` support (the
only thing a ``Conv2d`` can hold) changes its spectrum again, so the clipped layer generally misses the
target. The paper proves this is unavoidable: circular convolutions with a small kernel cannot represent
arbitrary spectra, in particular not the clipped spectrum ``min(σ, target)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_specclip.methods.base import ClipMethod, measured_result
from lightning_specclip.spectral.clip import ClipResult, clip_spectral_norm_
from lightning_specclip.spectral.conv import conv_geometry as _conv_geometry
from lightning_specclip.spectral.exact import circular_frequency_matrices
from lightning_specclip.tracked_map import TrackedMap, known_shape

__all__ = ["Senderovich", "senderovich_clip_"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _blocks_to_kernel(blocks: Tensor, c_in_g: int, input_size: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """Invert the layout of :func:`circular_frequency_matrices`: blocks → real kernel on the full grid."""
    groups, *m, c_out_g, _ = blocks.shape
    d = len(m)
    fold = math.prod(stride)
    spec = blocks * math.sqrt(fold)
    spec = spec.reshape(groups, *m, c_out_g, c_in_g, *stride)
    # (groups, g_1..g_d, c_out, c_in, r_1..r_d) → (groups, c_out, c_in, r_1, g_1, ..., r_d, g_d)
    order = [0, 1 + d, 2 + d]
    for j in range(d):
        order += [3 + d + j, 1 + j]
    spec = spec.permute(*order).reshape(groups * c_out_g, c_in_g, *input_size)
    return torch.fft.ifftn(spec, dim=tuple(range(2, 2 + d))).real


def senderovich_clip_(
    conv: nn.Module,
    target: float,
    input_size: int | Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """Clip a convolution's singular values to ``target`` in the Fourier domain, then project the kernel.

    Steps: the kernel's per-frequency blocks on inputs of spatial size ``input_size`` (strided layers: the
    ``c_out × c_in·∏s`` blocks that gather aliased frequencies, Senderovich et al. 2022), an SVD of each
    block, every singular value above ``target`` set to ``target``, the inverse FFT back to a kernel of
    full support ``input_size``, and the orthogonal projection (truncation) of that kernel onto the layer's
    ``k_1 × ⋯ × k_d`` (dilated) support. ``conv.weight`` is overwritten in place (same ``Parameter``, via
    ``copy_``, under ``torch.no_grad()``) in its own dtype; the bias is left alone. Nothing is written when
    ``sigma_before ≤ target`` (the round trip would only add rounding).

    When it is exact:

    * The spectrum it works on is that of the *circular* convolution on ``input_size``. This is the
      layer's true spectrum only for ``padding_mode="circular"`` with output size ``input_size / stride``.
      For zero, reflect or replicate padding it is an approximation (boundary effects), and the returned
      sigmas describe the circular surrogate, not the layer; measure the layer itself (e.g. with
      :func:`lightning_specclip.spectral.exact.lanczos_singular_values`) to know where it ended.
    * Clipping the blocks is an exact clip of the circular operator (any stride dividing ``input_size``,
      any dilation, groups). The projection onto the kernel support is the step that makes the result
      inexact: it keeps the operator closest in Frobenius norm among small-kernel convolutions, not one
      with clipped singular values, so ``sigma_after`` is usually above ``target`` (and other singular
      values move too). It is exact when the clipped full-support kernel already fits the support, e.g.
      ``target >= sigma_before`` (nothing changes) or a 1×1 kernel (every frequency holds the same matrix).
      Repeating the call alternates the Frobenius projections onto two convex sets (operators with
      ``σ₁ ≤ target``, small-kernel circular convolutions), so it converges to a kernel with
      ``σ₁ ≤ target``, but slowly (σ₁ approaches the target from above), and its spectrum is not
      ``min(σ, target)``: that spectrum needs a full-support kernel.

    Args:
        conv: an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (not transposed); its stride, dilation and
            groups are used, its padding is not (an offset changes no singular value).
        target: the clip value, positive and finite.
        input_size: the spatial input size ``(n_1, ..., n_d)`` the layer is applied to (an int for all
            dimensions); the stride must divide it and the dilated kernel must fit in it.
        dtype: real dtype of the computation (float64 by default; bf16/half weights are never used for the
            math, only for the final write).

    Returns:
        tuple[float, float]: ``(sigma_before, sigma_after)``, the largest singular value of the circular
        convolution with the old kernel and with the kernel actually written (after rounding to the
        weight's dtype), computed by the FFT method.

    Raises:
        TypeError: ``conv`` is not a (non-transposed) 1-D/2-D/3-D convolution.
        ValueError: ``target`` is not positive and finite, the weight holds NaN or inf (nothing is
            written), the stride does not divide ``input_size``, or the dilated kernel does not fit in it.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(5)
        >>> before, after = senderovich_clip_(conv, 1.0, (8, 8))
        >>> before > after > 1.0  # closer to the target, but not on it
        True
        >>> conv1x1 = nn.Conv2d(4, 4, 1)
        >>> _, after = senderovich_clip_(conv1x1, 0.1, (8, 8))
        >>> abs(after - 0.1) < 1e-6  # a 1×1 kernel is clipped exactly
        True
    """
    if not isinstance(conv, _CONVS):
        raise TypeError(f"senderovich_clip_ needs an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"target must be a positive finite number, got {target!r}") from None
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target must be a positive finite number, got {target!r}")
    weight = conv.weight
    d, n, s, dil = _conv_geometry(weight, input_size, conv.stride, conv.dilation, conv.groups)
    kernel = tuple(weight.shape[2:])
    extent = tuple((kj - 1) * dj + 1 for kj, dj in zip(kernel, dil, strict=True))
    if any(e > nj for e, nj in zip(extent, n, strict=True)):
        raise ValueError(
            f"the dilated kernel {extent} does not fit in input_size {n}: its taps would alias and the "
            f"projection onto the kernel support is not defined"
        )
    with torch.no_grad():
        w = weight.detach().to(dtype)
        if not torch.isfinite(w).all():
            raise ValueError("conv.weight holds NaN or inf; refusing to clip (the weight was not modified)")
        blocks = circular_frequency_matrices(w, n, s, dilation=dil, groups=conv.groups)
        u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)
        sigma_before = float(sv.max())
        if sigma_before <= target:  # nothing above the target: the kernel is left exactly as it is
            return sigma_before, sigma_before
        clipped = (u * sv.clamp(max=target).to(u.dtype).unsqueeze(-2)) @ vh
        full = _blocks_to_kernel(clipped, weight.shape[1], n, s)
        for j in range(d):
            taps = torch.arange(kernel[j], device=full.device) * dil[j]
            full = full.index_select(2 + j, taps)
        weight.copy_(full.to(weight.dtype))
        sigma_after = float(
            torch.linalg.svdvals(
                circular_frequency_matrices(weight.detach().to(dtype), n, s, dilation=dil, groups=conv.groups)
            ).max()
        )
    return sigma_before, sigma_after


class Senderovich(ClipMethod):
    """FFT clipping (Sedghi et al. 2019; strided: Senderovich et al. 2022) as a clip method.

    Convolutions (not transposed) are clipped with :func:`senderovich_clip_`: exact for the circular
    surrogate, then projected back to the kernel support, so the layer usually ends above the target (and
    other paddings are only approximated). ``Linear`` layers, whose "FFT" is the matrix itself, are clipped
    exactly by SVD. Transposed convolutions and compositions are tracked only.

    Example:
        >>> Senderovich().name
        'senderovich'
    """

    name: ClassVar[str] = "senderovich"

    def supports(self, tracked: TrackedMap) -> bool:
        """Convolutions (not transposed), Linear layers and BatchNorm.

        Args:
            tracked: a map.

        Returns:
            bool: whether it can be clipped.
        """
        module = tracked.module
        if tracked.kind == "batchnorm" or isinstance(module, nn.Linear):
            return True
        return tracked.kind == "layer" and isinstance(module, _ConvNd) and not module.transposed

    def clip_(self, tracked: TrackedMap, value: float, state: dict[str, Tensor], init: Tensor | None) -> ClipResult:
        """Clip ``tracked`` in the Fourier domain (Linear: exact SVD).

        Args:
            tracked: a convolution or Linear map with its input shape.
            value: the clip value.
            state: unused.
            init: the tracked top right singular vectors: a warm start for measuring the written layer.

        Returns:
            ClipResult: for a convolution ``before`` and ``estimate`` are the circular surrogate's norms before
            and after (the FFT method's own numbers), ``after`` (with ``spectrum``) the layer's true spectral
            norm measured on the written weights; ``changed`` whether the kernel was written. For ``Linear``:
            the exact dense clip's result.
        """
        if isinstance(tracked.module, nn.Linear):
            return clip_spectral_norm_(tracked.module, value)
        before, estimate = senderovich_clip_(tracked.module, value, known_shape(tracked)[1:])
        return measured_result(tracked, value, before, estimate, before > value, init)
