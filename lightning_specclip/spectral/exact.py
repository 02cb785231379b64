"""Ground truths for the spectra of implicitly linear layers.

* :func:`dense_matrix` / :func:`dense_singular_values`: the operator's matrix built column by column from
  its action on the standard basis, then a full SVD in float64. Exact for any affine op; small ops only.
* :func:`fft_singular_values`: every singular value of a convolution with circular padding (any stride that
  divides the input size, dilation, groups; 1-D, 2-D, 3-D) from the SVDs of the kernel's per-frequency
  blocks (Sedghi et al., 2019; Senderovich et al., 2022). Exact for circular padding; large layers too.
* :func:`lanczos_singular_values`: top-k singular values of any affine op by SciPy's ARPACK on the implicit
  operator; exact to ``tol`` for any op, and the "scipy ARPACK" baseline (it reports its operator calls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, svds
from torch import Tensor

from lightning_specclip.spectral.conv import conv_geometry
from lightning_specclip.spectral.operator import ImplicitLinear, Op

__all__ = [
    "LanczosResult",
    "circular_frequency_matrices",
    "dense_matrix",
    "dense_singular_values",
    "dense_spectral_norm",
    "fft_singular_values",
    "lanczos_singular_values",
]


def _as_operator(op: Op | ImplicitLinear, input_shape: Sequence[int] | None) -> ImplicitLinear:
    if isinstance(op, ImplicitLinear):
        return op
    if input_shape is None:
        raise ValueError("input_shape is required (the shape of one input, without the batch dimension)")
    return ImplicitLinear(op, input_shape, dtype=torch.float64, check_affine=False)


def dense_matrix(op: Op | ImplicitLinear, input_shape: Sequence[int] | None = None, *, chunk: int = 1024) -> Tensor:
    """Form the matrix of ``x ↦ op(x) − op(0)`` on inputs of ``input_shape`` (float64 unless an operator).

    Args:
        op: a module, a callable on batches, or an :class:`ImplicitLinear`.
        input_shape: the shape of one input without the batch dimension (not needed for an operator).
        chunk: basis vectors pushed through ``op`` per call.

    Returns:
        Tensor: ``(out_features, in_features)``, column ``j`` is ``A eⱼ``.

    Raises:
        ValueError: ``input_shape`` missing or not accepted by ``op``.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> torch.allclose(dense_matrix(lin, (3,)), lin.weight.double())
        True
    """
    A = _as_operator(op, input_shape)
    n = A.in_features
    cols = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        basis = torch.zeros((stop - start, n), dtype=A.dtype, device=A.device)
        basis[:, start:stop] = torch.eye(stop - start, dtype=A.dtype, device=A.device)
        cols.append(A.matvec(basis.reshape(-1, *A.input_shape)).reshape(stop - start, -1))
    return torch.cat(cols).T


def dense_singular_values(op: Op | ImplicitLinear, input_shape: Sequence[int] | None = None) -> Tensor:
    """All singular values of ``x ↦ op(x) − op(0)``, descending, from a dense float64 SVD.

    Args:
        op: a module, a callable on batches, or an :class:`ImplicitLinear`.
        input_shape: the shape of one input without the batch dimension (not needed for an operator).

    Returns:
        Tensor: ``min(out_features, in_features)`` singular values, float64, descending.

    Raises:
        ValueError: ``input_shape`` missing or not accepted by ``op``.

    Example:
        >>> conv = torch.nn.Conv1d(1, 1, 3, padding=1, bias=False)
        >>> dense_singular_values(conv, (1, 8)).shape
        torch.Size([8])
    """
    return torch.linalg.svdvals(dense_matrix(op, input_shape))


def dense_spectral_norm(op: Op | ImplicitLinear, input_shape: Sequence[int] | None = None) -> float:
    """σ₁ of ``x ↦ op(x) − op(0)`` from its dense float64 matrix: the square root of the largest eigenvalue of the
    smaller Gram matrix (``MᵀM`` or ``MMᵀ``), about 4× faster than all the singular values at 2048 inputs and as
    accurate for σ₁ (rounding in the Gram matrix is ``ε·σ₁²``: σ₁ to ``ε/2`` relative).

    Args:
        op: a module, a callable on batches, or an :class:`ImplicitLinear`.
        input_shape: the shape of one input without the batch dimension (not needed for an operator).

    Returns:
        float: the largest singular value.

    Raises:
        ValueError: ``input_shape`` missing or not accepted by ``op``.

    Example:
        >>> conv = torch.nn.Conv1d(1, 1, 3, padding=1, bias=False)
        >>> abs(dense_spectral_norm(conv, (1, 8)) - float(dense_singular_values(conv, (1, 8))[0])) < 1e-12
        True
    """
    M = dense_matrix(op, input_shape)
    gram = M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


# Circular convolutions: block diagonalisation by the DFT


def circular_frequency_matrices(
    weight: Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    *,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """The blocks of the block-diagonal form of a circular convolution in the Fourier basis.

    A convolution with circular padding on inputs of spatial size ``n = (n_1, ..., n_d)`` is diagonalised
    by the unitary DFT up to ``c_out × c_in`` blocks, one per frequency ``f``: the DFT of the kernel,
    zero-padded (and wrapped, if larger than ``n``) to ``n`` (Sedghi, Gupta and Long, 2019). With stride
    ``s`` (``s_j`` dividing ``n_j``) the output is subsampled, which folds the ``s_1 ⋯ s_d`` frequencies
    ``g + r ⊙ (n / s)`` onto output frequency ``g``; the block of output frequency ``g`` gathers them side by
    side into a ``c_out × (c_in · s_1 ⋯ s_d)`` matrix scaled by ``1 / √(s_1 ⋯ s_d)`` (Senderovich et al.,
    2022). The singular values of the layer are the union of the blocks' singular values. Up to a complex
    conjugation and unit-modulus phases per column block (which depend on PyTorch's cross-correlation
    convention and the padding offset and change no singular value), these blocks are the layer's matrix
    in the Fourier bases. Differentiable with respect to ``weight``.

    Layout: block ``[grp, g_1, ..., g_d]`` is ``F[grp, :, :, g + r ⊙ m] / √S`` with ``m = n / s`` and
    ``F = fftn(kernel wrapped to n)``; its columns are ordered ``(c_in, r_1, ..., r_d)``, ``r_j`` slowest
    within each input channel.

    Args:
        weight: kernel ``(c_out, c_in / groups, k_1, ..., k_d)``, real; any float dtype (FFT in float32 for
            half types).
        input_size: spatial input size ``(n_1, ..., n_d)`` (an int is used for every dimension).
        stride: stride per dimension; must divide ``input_size``.
        dilation: dilation per dimension.
        groups: convolution groups; the layer is block diagonal over groups and each group gets its blocks.

    Returns:
        Tensor: complex ``(groups, m_1, ..., m_d, c_out / groups, (c_in / groups) · s_1 ⋯ s_d)``.

    Raises:
        ValueError: the kernel is not ``(c_out, c_in / groups, k...)``, sizes are not positive, ``groups``
            does not divide ``c_out``, or the stride does not divide the input size.

    Example:
        >>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        >>> circular_frequency_matrices(w, (8, 8)).shape
        torch.Size([1, 8, 8, 4, 3])
        >>> circular_frequency_matrices(w, (8, 8), stride=2).shape
        torch.Size([1, 4, 4, 4, 12])
    """
    d, n, s, dil = conv_geometry(weight, input_size, stride, dilation, groups)
    w = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    kernel = w.shape[2:]
    # Wrap the (dilated) kernel onto the n-periodic grid: tap a sits at position a·dil mod n. A 0/1 matrix
    # per dimension does it differentiably and also sums taps that alias when the kernel is wider than n.
    for j in range(d):
        taps = torch.arange(kernel[j], device=w.device) * dil[j] % n[j]
        place = torch.zeros(kernel[j], n[j], dtype=w.dtype, device=w.device)
        place[torch.arange(kernel[j], device=w.device), taps] = 1
        w = (w.movedim(2 + j, -1) @ place).movedim(-1, 2 + j)
    spec = torch.fft.fftn(w, dim=tuple(range(2, 2 + d)))
    c_out, c_in_g = weight.shape[0] // groups, weight.shape[1]
    m = tuple(nj // sj for nj, sj in zip(n, s, strict=True))
    # frequency index along dim j is r·m_j + g_j, r < s_j: split it into (r, g) with r the slower index
    split = [v for sj, mj in zip(s, m, strict=True) for v in (sj, mj)]
    spec = spec.reshape(groups, c_out, c_in_g, *split)
    r_dims = [3 + 2 * j for j in range(d)]
    g_dims = [4 + 2 * j for j in range(d)]
    spec = spec.permute(0, *g_dims, 1, 2, *r_dims)
    fold = math.prod(s)
    return spec.reshape(groups, *m, c_out, c_in_g * fold) / math.sqrt(fold)


def fft_singular_values(
    weight: Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    *,
    k: int | None = None,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """All (or the top-k) singular values of a convolution with circular padding, from per-frequency SVDs.

    Exact (to floating point) for ``nn.Conv1d/2d/3d(..., padding_mode="circular")`` whose output spatial
    size is ``input_size / stride`` (e.g. a 3×3 kernel with ``padding=1``; the padding amount only shifts
    the output, a phase in the Fourier domain, so it does not enter). For other paddings (zeros, reflect)
    the values are those of the circular convolution on ``input_size``, an approximation of the layer's.
    Cost: one FFT of the kernel and ``∏ n_j / s_j`` SVDs of ``c_out × c_in ∏ s_j`` matrices per group,
    see :func:`circular_frequency_matrices`.

    Args:
        weight: kernel ``(c_out, c_in / groups, k_1, ..., k_d)`` (detached; not differentiated).
        input_size: spatial input size ``(n_1, ..., n_d)``.
        stride: stride per dimension; must divide ``input_size``.
        k: return only the ``k`` largest values (default: all).
        dilation: dilation per dimension.
        groups: convolution groups.
        dtype: real compute dtype (float64 by default; complex of the same precision for the FFT).

    Returns:
        Tensor: ``groups · ∏ m_j · min(c_out / groups, (c_in / groups) ∏ s_j)`` singular values (or ``k``),
        descending, in ``dtype`` on the weight's device.

    Raises:
        ValueError: bad kernel shape or sizes (see :func:`circular_frequency_matrices`), or ``k < 1``.

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False).double()
        >>> sv = fft_singular_values(conv.weight, (6, 6))
        >>> torch.allclose(sv, dense_singular_values(conv, (2, 6, 6)))
        True
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be a positive number of singular values, got {k}")
    with torch.no_grad():
        blocks = circular_frequency_matrices(
            weight.detach().to(dtype), input_size, stride, dilation=dilation, groups=groups
        )
        values = torch.linalg.svdvals(blocks).flatten().sort(descending=True).values
    return values if k is None else values[:k]


# Lanczos (ARPACK) on the implicit operator


@dataclass
class LanczosResult:
    """Top-k singular values from :func:`lanczos_singular_values` and what they cost.

    Attributes:
        values: ``(k,)`` singular values, descending.
        matvecs: applications of ``A`` to one vector (a block of ``b`` vectors counts ``b``).
        rmatvecs: applications of ``Aᵀ`` to one vector.
    """

    values: Tensor
    matvecs: int
    rmatvecs: int

    @property
    def gram_applications(self) -> int:
        """Applications of ``AᵀA`` (or ``AAᵀ``) to one vector: ``min(matvecs, rmatvecs)``.

        ARPACK works on the smaller of the two Gram matrices; each of its steps costs one ``A`` and one
        ``Aᵀ`` application, and a final ``k`` applications of one side recover the singular values. This is
        the number to compare with :attr:`lightning_specclip.spectral.Spectrum.matvecs`.
        """
        return min(self.matvecs, self.rmatvecs)


def lanczos_singular_values(
    op: Op | ImplicitLinear,
    input_shape: Sequence[int] | None = None,
    k: int = 1,
    tol: float = 0.0,
    *,
    dtype: torch.dtype | None = None,
    maxiter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
) -> LanczosResult:
    """Top-k singular values of ``x ↦ op(x) − op(0)`` by ARPACK (implicitly restarted Lanczos), via SciPy.

    ``scipy.sparse.linalg.svds(solver="arpack")`` on a ``LinearOperator`` whose products call
    :meth:`ImplicitLinear.matvec` / :meth:`ImplicitLinear.rmatvec` (batched for blocks of vectors), so the
    matrix is never formed. Exact for any affine op up to ``tol`` (``0`` means machine precision); the
    starting vector is drawn from ``seed``, so results are reproducible. Data crosses to NumPy on the CPU
    for every product, which makes this a reference and a baseline rather than a fast path on GPUs.

    Args:
        op: a module, a callable on batches, or an :class:`ImplicitLinear` (used as is, in its dtype).
        input_shape: the shape of one input without the batch dimension (not needed for an operator).
        k: number of singular values; ARPACK needs ``1 <= k < min(out_features, in_features)``.
        tol: relative accuracy of the Ritz values (``0``: machine precision).
        dtype: compute dtype, float64 (default) or float32; ignored when ``op`` is an operator.
        maxiter: ARPACK restarts limit (SciPy's default when ``None``).
        ncv: Lanczos basis size (SciPy's default when ``None``).
        seed: seed of the starting vector.

    Returns:
        LanczosResult: ``values`` (``(k,)`` descending, in the compute dtype, on the CPU) and the numbers of
        ``A`` and ``Aᵀ`` applications.

    Raises:
        ValueError: ``input_shape`` missing or not accepted by ``op``, ``dtype`` not float32/float64, or
            ``k`` out of ARPACK's range.
        scipy.sparse.linalg.ArpackNoConvergence: ARPACK did not converge within ``maxiter``.

    Example:
        >>> conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        >>> res = lanczos_singular_values(conv, (2, 6, 6), k=2)
        >>> torch.allclose(res.values, dense_singular_values(conv, (2, 6, 6))[:2])
        True
        >>> res.matvecs > 0 and res.rmatvecs > 0
        True
    """
    if isinstance(op, ImplicitLinear):
        A = op
    else:
        dtype = torch.float64 if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (ARPACK), got {dtype}")
        if input_shape is None:
            raise ValueError("input_shape is required (the shape of one input, without the batch dimension)")
        A = ImplicitLinear(op, input_shape, dtype=dtype, check_affine=False)
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the operator's dtype must be float32 or float64 for ARPACK, got {A.dtype}")
    small = min(A.in_features, A.out_features)
    if not 1 <= k < small:
        raise ValueError(
            f"ARPACK needs 1 <= k < min(out_features, in_features) = {small}, got k={k}; use "
            f"dense_singular_values for all singular values of a small operator"
        )
    np_dtype = np.float64 if A.dtype == torch.float64 else np.float32
    counts = {"matvecs": 0, "rmatvecs": 0}

    def _apply(x: np.ndarray, transpose: bool) -> np.ndarray:
        cols = np.asarray(x, dtype=np_dtype).reshape(A.out_features if transpose else A.in_features, -1)
        batch = torch.from_numpy(np.ascontiguousarray(cols.T)).to(A.device, A.dtype)
        if transpose:
            counts["rmatvecs"] += batch.shape[0]
            out = A.rmatvec(batch.reshape(-1, *A.output_shape))
        else:
            counts["matvecs"] += batch.shape[0]
            out = A.matvec(batch.reshape(-1, *A.input_shape))
        return out.reshape(batch.shape[0], -1).T.detach().cpu().numpy().astype(np_dtype, copy=False)

    lin = LinearOperator(
        shape=(A.out_features, A.in_features),
        dtype=np_dtype,
        matvec=lambda x: _apply(x, False).ravel(),
        rmatvec=lambda y: _apply(y, True).ravel(),
        matmat=lambda x: _apply(x, False),
        rmatmat=lambda y: _apply(y, True),
    )
    v0 = np.random.default_rng(seed).standard_normal(small).astype(np_dtype)
    values = svds(lin, k=k, tol=tol, v0=v0, maxiter=maxiter, ncv=ncv, solver="arpack", return_singular_vectors=False)
    values = torch.from_numpy(np.sort(np.asarray(values, dtype=np_dtype))[::-1].copy())
    return LanczosResult(values=values, matvecs=counts["matvecs"], rmatvecs=counts["rmatvecs"])
