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
from lightning_specclip.spectral.power import Grams

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


def _project_out(rows: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """``rows`` with their components along the (orthonormal) rows of ``basis`` removed, twice ("twice is
    enough" in finite precision), and the coefficients removed: the new column of the projected matrix."""
    coeffs = rows @ basis.T
    rows = rows - coeffs @ basis
    again = rows @ basis.T
    return rows - again @ basis, coeffs + again


def _orthonormalize(rows: Tensor, basis: Tensor, drop: float) -> Tensor:
    """Rows of ``rows`` projected off the rows of ``basis`` (twice: "twice is enough") and orthonormalized.

    A row whose projection keeps less than ``drop`` of its norm lies in the span of ``basis`` up to rounding:
    it is dropped, since normalizing rounding noise would give a vector that is not orthogonal.
    """
    before = rows.norm(dim=1)
    if basis.shape[0] > 0:
        rows = _project_out(rows, basis)[0]
    rows = rows[rows.norm(dim=1) > drop * before.clamp_min(torch.finfo(rows.dtype).tiny)]
    if rows.shape[0] <= 1:  # one row: a normalization is its QR
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    scale = rows.norm(dim=1)
    q, r = torch.linalg.qr(rows.T)
    q = q[:, r.diagonal().abs() > drop * scale].T
    if basis.shape[0] > 0 and q.shape[0] > 0:
        q = q - (q @ basis.T) @ basis
        q = torch.linalg.qr(q.T)[0].T
    return q


def _random(A: ImplicitLinear, k: int, seed: int) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((A.in_features, k), generator=gen, dtype=A.dtype).to(A.device)


def _init_block(A: ImplicitLinear, k: int, init: Tensor | None, seed: int) -> Tensor:
    """``(n, k)`` starting block: the given vectors (if any), topped up with seeded random ones."""
    if init is None:
        return _random(A, k, seed)
    given = init.detach().to(A.device, A.dtype).reshape(-1, A.in_features).T
    if given.shape[1] >= k:
        return given
    return torch.cat([given, _random(A, k - given.shape[1], seed)], dim=1)


def _krylov(
    A: ImplicitLinear, k: int, init: Tensor | None, tol: float, max_iters: int, block: int, basis_size: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, int, int, bool]:
    """Thick-restart block Lanczos (Krylov–Schur) on ``AᵀA`` with full reorthogonalization.

    The basis ``V`` (rows) satisfies ``AᵀA Vᵀ = Vᵀ H + Wᵀ Eᵀ`` where ``W`` is the orthogonalized remainder of
    the last block's product: the next block is ``W`` normalized, the Ritz pairs come from ``H``, and the
    residual of Ritz vector ``i`` is ``‖R S[last rows, i]‖`` (``W = Q R``), with no extra pass over the basis.
    """
    n = A.in_features
    drop = 1e3 * torch.finfo(A.dtype).eps
    tiny = torch.finfo(A.dtype).tiny
    basis_size = min(basis_size, n)
    block = min(block, n)
    keep = min(max(k + block, basis_size // 2), basis_size - block) if basis_size > k + block else k
    V = torch.empty((basis_size, n), dtype=A.dtype, device=A.device)  # one basis vector per row
    H = torch.zeros((basis_size, basis_size), dtype=torch.float64)
    m = 0
    P = _orthonormalize(_init_block(A, block, init, seed).T, V[:0], drop)
    matvecs = iters = 0
    converged = False
    # Ritz pairs of H in ascending order (eigh's): the largest values are the last columns.
    theta = torch.zeros(0, dtype=torch.float64)
    S = torch.zeros((0, 0), dtype=torch.float64)
    res = torch.full((k,), math.inf, dtype=torch.float64)
    while iters < max_iters:
        p = P.shape[0]
        if p == 0:  # the basis spans an invariant subspace (to working precision): its Ritz pairs are exact
            converged = m >= k
            break
        if m + p > basis_size:  # thick restart on the best Ritz vectors: H becomes diagonal
            V[:keep] = S[:, m - keep :].T.to(A.device, A.dtype) @ V[:m]
            H.zero_()
            H[:keep, :keep] = torch.diag(theta[m - keep :])
            m = keep
            P = P[: basis_size - m]  # when the space is nearly exhausted (k + block > n) the block may not fit
            p = P.shape[0]
            if p == 0:
                converged = m >= k
                break
        V[m : m + p] = P
        W, _ = A.gram(P.reshape(p, *A.input_shape))
        W = W.reshape(p, n)
        matvecs += p
        iters += 1
        basis = V[: m + p]
        size = W.norm(dim=1)
        W, coeffs = _project_out(W, basis)
        column = coeffs.double().cpu()
        H[m : m + p, : m + p] = column
        H[: m + p, m : m + p] = column.T
        m += p
        theta, S = torch.linalg.eigh(H[:m, :m])  # H is symmetric: eigh reads one triangle
        top = max(float(theta[-1]), 1e-300)
        if p == 1:  # no QR, and the scalars stay on the host
            beta = float(W.norm())
            last = S[m - 1, max(m - k, 0) :].flip(0)
            res = last.abs() * (beta / top)
            alive = beta > 10 * torch.finfo(A.dtype).eps * float(size)
            Q = W / max(beta, tiny)
        else:
            Q, R = torch.linalg.qr(W.T)
            Q = Q.T
            res = (R.double().cpu() @ S[m - p : m, max(m - k, 0) :].flip(1)).norm(dim=0) / top
            alive = R.diagonal().abs() > 10 * torch.finfo(A.dtype).eps * size.clamp_min(tiny)
        # A basis of the whole input space (k + block may reach n) makes the Ritz pairs exact singular pairs.
        if m >= k and (m >= n or bool((res <= tol).all())):
            converged = True
            break
        # The next block is the remainder; directions it lost to rounding (the space is nearly invariant
        # there) are dropped rather than normalized into non-orthogonal noise.
        if p == 1:
            P = Q if alive else Q[:0]
        else:
            P = Q if bool(alive.all()) else _orthonormalize(Q[alive], V[:m], drop)
    w = min(k, m)
    theta, S = theta.flip(0), S.flip(1)
    vecs = S[:, :w].T.to(A.device, A.dtype) @ V[:m]
    return theta[:w].clamp_min(0).sqrt(), vecs, res[:w].clone(), matvecs, iters, converged


def _power_qr(
    A: ImplicitLinear, k: int, init: Tensor | None, tol: float, max_iters: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, int, int, bool]:
    X, _ = torch.linalg.qr(_init_block(A, k, init, seed)[:, :k])
    values = torch.full((k,), math.inf, dtype=torch.float64)
    matvecs = iters = 0
    converged = False
    while iters < max_iters:
        G, _ = A.gram(X.T.reshape(k, *A.input_shape))
        matvecs += k
        iters += 1
        X, R = torch.linalg.qr(X + G.reshape(k, -1).T)
        new = (R.diagonal().double().cpu() - 1).abs().sqrt()
        change = ((new - values).abs() / new[0].clamp_min(1e-300)).max()
        values = new
        if change <= tol:
            converged = True
            break
    # QR leaves the columns in the order the iteration found them; report them descending.
    order = torch.argsort(values, descending=True)
    values, X = values[order], X[:, order.to(X.device)]
    res = torch.full((k,), math.nan, dtype=torch.float64)
    return values, X.T, res, matvecs, iters, converged


def _gap_free(
    ops: Sequence[ImplicitLinear], steps: int, seeds: Sequence[int]
) -> list[tuple[Tensor, Tensor, Tensor, int, int, bool]]:
    """``steps`` Lanczos steps on ``AᵀA`` from one seeded Gaussian vector, then the top Ritz vector ``y`` and, as
    the value, its Rayleigh quotient ``‖A y‖/‖y‖`` computed anew: the gain of an explicit vector, so a lower bound
    on σ₁ whatever rounding did to the recurrence. For several operators of one input size, dtype and device in
    lock-step (their products one after the other, the rest batched: a few kernels per step for all of them).

    The recurrence is the three-term one, each new vector orthogonalized twice against the two before it; the
    basis is not reorthogonalized against the older vectors (that costs two passes over the whole basis per step,
    most of a measurement's time on a CPU). In finite precision the Lanczos vectors then lose orthogonality once a
    Ritz value converges, which duplicates converged values ("ghosts") but does not slow the largest one's
    convergence (Paige 1980; Greenbaum 1989), so the steps of :func:`gap_free_steps` keep their meaning; what a
    lost orthogonality could still do, a Ritz value above σ₁², the Rayleigh quotient of the explicit vector
    cannot. No restart: the bound is for the whole Krylov space. Nothing is read back to the host until the end:
    once a remainder is down to rounding (the space is invariant) the next vectors are zero rows instead of
    normalized rounding noise."""
    first = ops[0]
    n, dtype, device = first.in_features, first.dtype, first.device
    tiny = torch.finfo(dtype).tiny
    drop = 1e3 * torch.finfo(dtype).eps
    grams = Grams(ops, group=False, fixed=True)
    V = torch.empty((len(ops), steps, n), dtype=dtype, device=device)  # row j of each map written at step j
    rows = [[V[i, j].view(1, *A.input_shape) for i, A in enumerate(ops)] for j in range(steps)]
    coeffs = torch.zeros((len(ops), steps, 2), dtype=dtype, device=device)  # (T's βⱼ₋₁, αⱼ) per step
    V[:, 0] = torch.cat([_random(A, 1, seed).T for A, seed in zip(ops, seeds, strict=True)])
    V[:, 0] /= V[:, 0].norm(dim=1, keepdim=True).clamp_min(tiny)
    for j in range(steps):
        W = torch.cat([g.view(1, n) for g, _ in grams(rows[j])]).unsqueeze(1)  # (maps, 1, n)
        local = V[:, max(j - 1, 0) : j + 1]  # the vectors before this one and this one
        # The three-term recurrence as a projection on both (coefficients computed, not carried), then once more
        # ("twice is enough"); T's entries are the sums of both passes' coefficients.
        first_pass = torch.bmm(W, local.transpose(1, 2))
        W = torch.baddbmm(W, first_pass, local, alpha=-1)
        again = torch.bmm(W, local.transpose(1, 2))
        W = torch.baddbmm(W, again, local, alpha=-1)
        found = (first_pass + again).squeeze(1)
        coeffs[:, j, 2 - found.shape[1] :] = found
        if j + 1 == steps:
            break
        beta = torch.linalg.vector_norm(W, dim=2)
        # AᵀA vⱼ is its components along vⱼ₋₁ and vⱼ plus the remainder: when the remainder is rounding next to them
        # (the space is invariant) the next rows are zero instead of normalized noise.
        scale = (beta > drop * torch.linalg.vector_norm(first_pass, dim=2)) / beta.clamp_min(tiny)
        torch.mul(W.squeeze(1), scale, out=V[:, j + 1])
    diagonal, above = coeffs[:, :, 1], coeffs[:, 1:, 0]
    T = torch.diag_embed(diagonal) + torch.diag_embed(above, 1) + torch.diag_embed(above, -1)
    theta, S = torch.linalg.eigh(T.double().cpu())
    Y = torch.bmm(S[:, :, -1:].transpose(1, 2).to(device, dtype), V).squeeze(1)
    Y = Y / Y.norm(dim=1, keepdim=True).clamp_min(tiny)
    products = grams([y.view(1, *A.input_shape) for y, A in zip(Y, ops, strict=True)])
    gains = torch.cat([image.reshape(1, -1).norm(dim=1) for _, image in products]).double().cpu()
    last = torch.linalg.vector_norm(W, dim=(1, 2)).double().cpu()
    results = []
    for i in range(len(ops)):
        top = max(float(theta[i, -1]), 1e-300)
        res = torch.tensor([abs(float(S[i, -1, -1])) * float(last[i]) / top], dtype=torch.float64)
        results.append((gains[i : i + 1], Y[i : i + 1], res, steps + 1, steps, True))
    return results


def _dense_top(A: ImplicitLinear) -> tuple[Tensor, Tensor, Tensor, int, int, bool]:
    """The exact top singular pair of a small map: ``AᵀA`` from one batch of products on the unit vectors, then a
    float64 symmetric eigensolver."""
    n = A.in_features
    eye = torch.eye(n, dtype=A.dtype, device=A.device).reshape(n, *A.input_shape)
    gram, _ = A.gram(eye)
    G = gram.reshape(n, n).double().cpu()
    theta, S = torch.linalg.eigh((G + G.T) / 2)
    vec = S[:, -1:].T.to(A.device, A.dtype)
    return theta[-1:].clamp_min(0).sqrt(), vec, torch.zeros(1, dtype=torch.float64), n, 1, True


def _normalize(X: Tensor) -> Tensor:
    return X / X.norm(dim=0).clamp_min(torch.finfo(X.dtype).tiny)


def _subspace(
    A: ImplicitLinear, k: int, init: Tensor | None, tol: float, max_iters: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, int, int, bool]:
    # k = 1 needs no QR or eigh, and nothing here reads a value back to the host unless another iteration
    # has to decide whether to run: the per-step update of a training loop never waits for the device.
    start = _init_block(A, k, init, seed)[:, :k]
    X = _normalize(start) if k == 1 else torch.linalg.qr(start)[0]
    matvecs = iters = 0
    converged = False
    while True:
        G, _ = A.gram(X.T.reshape(k, *A.input_shape))
        G = G.reshape(k, -1).T
        matvecs += k
        iters += 1
        if k == 1:
            theta = (X * G).sum(dim=0)
        else:
            H = (X.T @ G).double().cpu()
            theta64, S = torch.linalg.eigh((H + H.T) / 2)
            theta, S = theta64.flip(0).to(A.device, A.dtype), S.flip(1).to(A.device, A.dtype)
            X, G = X @ S, G @ S
        res = (G - X * theta).norm(dim=0) / theta[0].abs().clamp_min(torch.finfo(A.dtype).tiny)
        # The power step's vectors are better than the Ritz vectors the values belong to: return those.
        X = _normalize(G) if k == 1 else torch.linalg.qr(G)[0]
        if iters >= max_iters:
            break
        if bool((res <= tol).all()):
            converged = True
            break
    return theta.clamp_min(0).sqrt(), X.T, res, matvecs, iters, converged


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
    if solver == "gap_free":
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
    if solver == "power_qr":
        values, vecs, res, matvecs, iters, converged = _power_qr(A, k, init, tol, max_iters or 10000, seed)
    elif solver == "subspace":
        values, vecs, res, matvecs, iters, converged = _subspace(A, k, init, tol, max_iters or 10000, seed)
    else:
        basis = basis_size or max(20, 4 * block + 2 * k)
        if basis < k + block:
            raise ValueError(f"basis_size must be at least k + block_size = {k + block}, got {basis}")
        budget = max(max_iters or 1000, -(-k // block))  # enough iterations to hold k vectors, whatever max_iters says
        values, vecs, res, matvecs, iters, converged = _krylov(A, k, init, tol, budget, block, basis, seed)
    return _spectrum(A, values, vecs, res, matvecs, iters, converged, left, solver)


def _spectrum(
    A: ImplicitLinear,
    values: Tensor,
    vecs: Tensor,
    res: Tensor,
    matvecs: int,
    iters: int,
    converged: bool,
    left: bool,
    solver: str,
) -> Spectrum:
    right = vecs.reshape(-1, *A.input_shape)
    values = values.to(A.dtype).to(A.device)
    lefts = None
    if left:
        scale = values.clamp_min(torch.finfo(A.dtype).tiny).view(-1, *([1] * len(A.output_shape)))
        lefts = A.matvec(right) / scale
    return Spectrum(values, right, lefts, matvecs, iters, converged, res.to(torch.float64), solver)


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
            results[i] = _spectrum(A, *_dense_top(A), lefts[i], "gap_free")
        else:
            batches.setdefault((A.in_features, A.dtype, A.device, steps), []).append(i)
    for (*_, steps), batch in batches.items():
        found = _gap_free([operators[i] for i in batch], steps, [seeds[i] for i in batch])
        for i, measured in zip(batch, found, strict=True):
            results[i] = _spectrum(operators[i], *measured, lefts[i], "gap_free")
    return results
