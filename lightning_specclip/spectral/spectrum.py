"""Top-k singular values and vectors of an implicitly linear layer.

Two solvers, both driven only by applications of ``AᵀA`` (one forward and one backward pass through the
layer per block of vectors):

* ``"krylov"`` (the default): a block Krylov space built from the residuals of the current Ritz vectors,
  with a Rayleigh–Ritz step after each expansion and thick restarts. In exact arithmetic the space is the
  block Krylov space of ``AᵀA`` (block Lanczos); projecting every new block against the whole basis keeps it
  orthogonal in finite precision. It stops when every wanted Ritz pair's residual is below ``tol``.
* ``"power_qr"``: PowerQR as published (Ebrahimpour Boroojeny et al., 2024): ``X ← Q`` of
  ``QR(X + AᵀA X)`` and ``σᵢ = √|Rᵢᵢ − 1|``, i.e. subspace iteration on the shifted matrix ``I + AᵀA``.
* ``"subspace"``: subspace iteration without shift, with a Rayleigh–Ritz step: one ``AᵀA`` block per
  iteration gives the Ritz values of the current vectors and the next, better vectors. This is the cheap
  warm-started update used once per training step.
* ``"gap_free"``: σ₁ alone, by Lanczos from one random vector for a number of steps fixed in advance, so that
  σ₁ is within ``tol`` with probability at least ``1 − GAP_FREE_FAILURE`` *whatever the spectrum*. A residual
  test cannot give that: when many singular values crowd below σ₁ (a depthwise convolution on a 1×1 input is a
  diagonal map of 1152 of them) a Ritz pair among them reaches a small residual before σ₁'s direction has grown
  out of the random start, and the measurement stops at the wrong value. Maps of at most ``GAP_FREE_DENSE_MAX``
  inputs are measured exactly instead (``AᵀA`` from one batch of products, a dense eigensolver). This is the
  measurement a clip decides on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_specclip.spectral.operator import ImplicitLinear, Op, no_autocast
from lightning_specclip.spectral.solvers import (
    Solved,
    dense_top,
    gap_free_lanczos,
    krylov,
    power_qr,
    subspace_iteration,
)

__all__ = [
    "GAP_FREE_DENSE_MAX",
    "GAP_FREE_FAILURE",
    "SOLVERS",
    "Spectrum",
    "gap_free_spectra",
    "gap_free_steps",
    "spectrum",
]

#: the solvers :func:`spectrum` runs
SOLVERS = ("krylov", "power_qr", "subspace", "gap_free")

#: probability that a ``"gap_free"`` measurement misses σ₁ by more than its ``tol`` (for the worst spectrum)
GAP_FREE_FAILURE = 1e-3
#: maps with at most this many inputs are measured exactly by the ``"gap_free"`` solver instead: ``AᵀA`` formed by
#: one batch of products on the unit vectors, then a dense symmetric eigensolver
GAP_FREE_DENSE_MAX = 256


def gap_free_steps(n: int, tol: float, failure: float = GAP_FREE_FAILURE) -> int:
    """Lanczos steps from a random start after which σ₁ is within ``tol`` with probability ``≥ 1 − failure``.

    Kuczyński and Woźniakowski (1992, "Estimating the largest eigenvalue by the power and Lanczos algorithms
    with a random start") bound the probability that ``m`` steps of Lanczos on a positive semi-definite ``n × n``
    matrix from a uniformly random unit vector leave the largest Ritz value below ``(1 − ε)·λ₁`` by
    ``1.648·√n·exp(−√ε·(2m − 1))``, for every distribution of the eigenvalues. For ``AᵀA``, ``λ₁ = σ₁²``, and
    σ₁ within ``tol`` relative needs ``ε = 1 − (1 − tol)²``.

    Args:
        n: the input dimension of ``A`` (the size of ``AᵀA``).
        tol: relative accuracy wanted on σ₁, in ``(0, 1)``.
        failure: probability allowed of missing it, in ``(0, 1)``.

    Returns:
        int: the number of steps (never more than ``n``: then the Krylov space is the whole space, and exact).

    Raises:
        ValueError: ``tol`` or ``failure`` outside ``(0, 1)``, or ``n < 1``.

    Example:
        >>> gap_free_steps(16384, 0.0075)
        51
        >>> gap_free_steps(10, 0.0075)
        10
    """
    if not (0 < tol < 1 and 0 < failure < 1) or n < 1:
        raise ValueError(f"need n >= 1 and tol, failure in (0, 1); got n={n}, tol={tol}, failure={failure}")
    eps = 1 - (1 - tol) ** 2
    steps = math.ceil((math.log(1.648 * math.sqrt(n) / failure) / math.sqrt(eps) + 1) / 2)
    return min(max(steps, 1), n)


@dataclass
class Spectrum:
    """The top-k singular triplets of a linear map ``A`` found by :func:`spectrum`.

    Attributes:
        values: ``(k,)`` singular values, descending.
        right: ``(k, *input_shape)`` unit right singular vectors (``right[i]`` goes with ``values[i]``).
        left: ``(k, *output_shape)`` unit left singular vectors ``A vᵢ / σᵢ`` (zero where ``σᵢ = 0``), or ``None``
            when not asked for.
        matvecs: applications of ``AᵀA`` to one vector that were spent (a block of b counts b).
        iters: iterations (blocks) run.
        converged: whether every residual reached the tolerance (``False`` when ``max_iters`` ran out).
        residuals: ``(k,)`` ``‖AᵀA vᵢ − σᵢ² vᵢ‖ / σ₁²`` of the returned vectors.
        solver: the solver that ran.
    """

    values: Tensor
    right: Tensor
    left: Tensor | None
    matvecs: int
    iters: int
    converged: bool
    residuals: Tensor = field(repr=False)
    solver: str = "krylov"

    @property
    def sigma(self) -> float:
        """The largest singular value (the spectral norm), as a float."""
        return float(self.values[0])


@no_autocast()
def spectrum(
    op: Op | ImplicitLinear,
    input_shape: Sequence[int] | None = None,
    k: int = 1,
    *,
    solver: str = "krylov",
    init: Tensor | None = None,
    tol: float = 1e-5,
    max_iters: int | None = None,
    dtype: torch.dtype | None = None,
    block_size: int | None = None,
    basis_size: int | None = None,
    check_affine: bool = True,
    seed: int = 0,
    left: bool = True,
    failure: float = GAP_FREE_FAILURE,
) -> Spectrum:
    """Compute the ``k`` largest singular values and vectors of the linear map ``x ↦ op(x) − op(0)``.

    ``op`` is only ever run (forward and backward), never turned into a matrix, so this is exact for
    convolutions of every padding mode, stride, dilation and grouping, transposed convolutions, BatchNorm
    (with its running statistics), conv followed by BatchNorm, and any other map that is affine in its
    input. The module is left untouched: no parameter, buffer, ``.grad`` or mode changes.

    Args:
        op: an ``nn.Module`` or a callable on batches ``(B, *input_shape)``, or an :class:`ImplicitLinear`.
        input_shape: the shape of one input without the batch dimension, e.g. ``(C, H, W)``; the spectrum
            of a convolution depends on it. Not needed when ``op`` is an :class:`ImplicitLinear`.
        k: how many singular values to return (``1 ≤ k ≤ dim``, where ``dim`` is the input size).
        solver: ``"krylov"`` (block Krylov with Rayleigh–Ritz, the default), ``"power_qr"``
            (the published PowerQR, for comparison), ``"subspace"`` (unshifted subspace iteration with
            Rayleigh–Ritz; its values are those of the vectors it started the last iteration from, and
            ``right`` holds the vectors after that iteration's power step: the cheap per-step update), or
            ``"gap_free"`` (σ₁ within ``tol`` relative with probability ``≥ 1 − failure`` whatever the
            spectrum: Lanczos from a random vector for :func:`gap_free_steps` steps; ``k = 1``, no ``init``;
            exact, from the dense ``AᵀA``, for maps of at most ``GAP_FREE_DENSE_MAX`` inputs).
        init: warm start, e.g. ``previous.right``: ``(j, *input_shape)`` vectors, ``j ≤ block size``; the
            rest of the starting block is random.
        tol: stopping tolerance. Krylov: every returned pair has ``‖AᵀA v − σ² v‖ ≤ tol·σ₁²`` (the squared
            singular values are then within ``tol·σ₁²`` of true ones, so ``σ₁`` is accurate to about
            ``tol/2`` relative, usually far better). PowerQR: the largest relative change of a value over
            one iteration. Gap-free: the relative accuracy of σ₁ (below 1), which fixes the number of steps.
        max_iters: most iterations (blocks of ``AᵀA`` applications); default 1000 for Krylov, 10000 for
            PowerQR.
        dtype: compute dtype (float32 by default, float64 when the module holds float64 tensors).
        block_size: vectors per ``AᵀA`` application for Krylov (default ``k``).
        basis_size: largest Krylov basis before a thick restart (default ``max(20, 4·block + 2k)``).
        check_affine: refuse a non-affine ``op`` (see :meth:`ImplicitLinear.check_affine`) and a non-finite
            ``init``. ``False`` skips these checks, which wait for the device: for a training loop's hot path.
        seed: seed of the random starting vectors (the result is deterministic for a given seed).
        left: also compute the left singular vectors (one more application of ``A``).
        failure: gap-free only: the probability allowed of missing σ₁ by more than ``tol`` (fixes the number of
            steps with ``tol``; see :func:`gap_free_steps`).

    Returns:
        Spectrum: values, right and left singular vectors, the work spent and whether it converged.

    Raises:
        ValueError: unknown ``solver``; ``k`` not in ``[1, dim]``; a bad ``input_shape`` or ``init``; ``tol``
            or ``max_iters`` not positive; ``op`` not affine (see :class:`ImplicitLinear`).

    Example:
        >>> conv = torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        >>> s = spectrum(conv, (3, 16, 16), k=2)
        >>> s.values.shape, s.right.shape, s.converged
        (torch.Size([2]), torch.Size([2, 3, 16, 16]), True)
    """
    A = _checked_operator(op, input_shape, k, solver, init, tol, max_iters, dtype, block_size, check_affine)
    block = block_size or k
    if solver == "gap_free":
        return _gap_free_one(A, k, init, tol, max_iters, seed, left, failure)
    if solver == "power_qr":
        solved = power_qr(A, k, init, tol, max_iters or 10000, seed)
    elif solver == "subspace":
        solved = subspace_iteration(A, k, init, tol, max_iters or 10000, seed)
    else:
        basis = basis_size or max(20, 4 * block + 2 * k)
        if basis < k + block:
            raise ValueError(f"basis_size must be at least k + block_size = {k + block}, got {basis}")
        budget = max(max_iters or 1000, -(-k // block))  # enough iterations to hold k vectors, whatever max_iters says
        solved = krylov(A, k, init, tol, budget, block, basis, seed)
    return _spectrum(A, solved, left, solver)


def _checked_operator(
    op: Op | ImplicitLinear,
    input_shape: Sequence[int] | None,
    k: int,
    solver: str,
    init: Tensor | None,
    tol: float,
    max_iters: int | None,
    dtype: torch.dtype | None,
    block_size: int | None,
    check_affine: bool,
) -> ImplicitLinear:
    """The operator :func:`spectrum` measures, after checking its arguments (see its Raises)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    if not (isinstance(tol, float | int) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if max_iters is not None and max_iters < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    if isinstance(op, ImplicitLinear):
        A = op
    else:
        if input_shape is None:
            raise ValueError("input_shape is required (the shape of one input, without the batch dimension)")
        A = ImplicitLinear(op, input_shape, dtype=dtype, check_affine=check_affine)
    if isinstance(k, bool) or not (isinstance(k, int) and 1 <= k <= A.in_features):
        raise ValueError(f"k must be an integer with 1 <= k <= {A.in_features} (the input dimension), got {k!r}")
    block = block_size or k
    if init is not None and init.numel() % A.in_features != 0:
        raise ValueError(f"init must have shape (j, {', '.join(map(str, A.input_shape))}); got {tuple(init.shape)}")
    if init is not None and check_affine and not torch.isfinite(init).all():
        raise ValueError("init contains non-finite values")
    if init is not None and init.numel() // A.in_features > max(block, k):
        raise ValueError(f"init holds {init.numel() // A.in_features} vectors; at most {max(block, k)} are used")
    return A


def _gap_free_one(
    A: ImplicitLinear,
    k: int,
    init: Tensor | None,
    tol: float,
    max_iters: int | None,
    seed: int,
    left: bool,
    failure: float,
) -> Spectrum:
    """``spectrum(A, solver="gap_free", ...)``: checks what the gap-free solver needs, then measures ``A`` alone."""
    if k != 1 or init is not None:
        raise ValueError(
            f"the gap_free solver measures σ₁ from a random start: it needs k=1 and no init, got k={k} and "
            f"{'no init' if init is None else 'an init'}"
        )
    if not tol < 1:
        raise ValueError(f"the gap_free solver's tol is a relative accuracy below 1, got {tol!r}")
    steps = gap_free_steps(A.in_features, tol, failure)
    if max_iters is not None and max_iters < steps:
        raise ValueError(f"the gap_free solver needs {steps} steps for tol={tol:g}; max_iters={max_iters}")
    return gap_free_spectra([A], tol, failure=failure, seeds=[seed], left=left)[0]


def _spectrum(A: ImplicitLinear, solved: Solved, left: bool, solver: str) -> Spectrum:
    """The :class:`Spectrum` of what a solver found, with the left vectors ``A vᵢ / σᵢ`` if asked for."""
    right = solved.vectors.reshape(-1, *A.input_shape)
    values = solved.values.to(A.dtype).to(A.device)
    lefts = None
    if left:
        scale = values.clamp_min(torch.finfo(A.dtype).tiny).view(-1, *([1] * len(A.output_shape)))
        lefts = A.matvec(right) / scale
    residuals = solved.residuals.to(torch.float64)
    return Spectrum(values, right, lefts, solved.matvecs, solved.iters, solved.converged, residuals, solver)


@no_autocast()
def gap_free_spectra(
    operators: Sequence[ImplicitLinear],
    tol: float,
    *,
    failure: float = GAP_FREE_FAILURE,
    seeds: Sequence[int] | None = None,
    left: bool | Sequence[bool] = True,
) -> list[Spectrum]:
    """``spectrum(A, solver="gap_free", tol=tol, ...)`` for each operator, measured in lock-step.

    The same measurement of each map (σ₁ within ``tol`` with probability ``≥ 1 − failure`` whatever its
    spectrum, from the same seeded random start), but the Lanczos steps of all the maps of one input size run
    together: their products one after the other (direct kernel calls for plain convolutions), the recurrence and
    orthogonalizations as batched products. The work per step is then a few kernels for all of them besides the
    products, instead of a few dozen per map: what a training loop's clip event of every layer is made of.

    Args:
        operators: the maps (:class:`ImplicitLinear`), any mix of sizes, dtypes and devices.
        tol: relative accuracy of σ₁, in ``(0, 1)``.
        failure: probability allowed of missing σ₁ by more than ``tol``, per map.
        seeds: seed of each map's random start (default 0 for all).
        left: also compute the left singular vector (all maps, or per map).

    Returns:
        list[Spectrum]: one ``k = 1`` spectrum per operator, in order (``solver="gap_free"``).

    Raises:
        ValueError: ``tol`` or ``failure`` outside ``(0, 1)``, or ``seeds``/``left`` of another length.

    Example:
        >>> convs = [torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(4)]
        >>> ops = [ImplicitLinear(c, (3, 16, 16)) for c in convs]
        >>> together = gap_free_spectra(ops, 0.01, left=False)
        >>> alone = [spectrum(A, solver="gap_free", tol=0.01, left=False) for A in ops]
        >>> all(abs(a.sigma - b.sigma) <= 1e-5 * b.sigma for a, b in zip(together, alone))
        True
    """
    seeds = [0] * len(operators) if seeds is None else list(seeds)
    lefts = [left] * len(operators) if isinstance(left, bool) else list(left)
    if len(seeds) != len(operators) or len(lefts) != len(operators):
        raise ValueError(f"need one seed and one left flag per operator ({len(operators)})")
    results: list[Spectrum] = [None] * len(operators)  # type: ignore[list-item]
    batches: dict[tuple, list[int]] = {}
    for i, A in enumerate(operators):
        steps = gap_free_steps(A.in_features, tol, failure)
        if A.in_features <= GAP_FREE_DENSE_MAX:
            results[i] = _spectrum(A, dense_top(A), lefts[i], "gap_free")
        else:
            batches.setdefault((A.in_features, A.dtype, A.device, steps), []).append(i)
    for (*_, steps), batch in batches.items():
        found = gap_free_lanczos([operators[i] for i in batch], steps, [seeds[i] for i in batch])
        for i, measured in zip(batch, found, strict=True):
            results[i] = _spectrum(operators[i], measured, lefts[i], "gap_free")
    return results
