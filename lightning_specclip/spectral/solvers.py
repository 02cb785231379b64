"""The eigensolvers on ``AᵀA`` that :func:`~lightning_specclip.spectral.spectrum.spectrum` runs, each returning a
:class:`Solved`: block Krylov (thick-restart block Lanczos), PowerQR as published, subspace iteration, gap-free
Lanczos of several maps in lock-step, and the dense top pair of a small map. Their stopping rules and derivations are
in their docstrings; :mod:`~lightning_specclip.spectral.spectrum` says which to use when.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.power import Grams

__all__ = ["Solved", "dense_top", "gap_free_lanczos", "krylov", "power_qr", "subspace_iteration"]


class Solved(NamedTuple):
    """What a solver found: the top singular values and right vectors of ``A`` and what they cost.

    Attributes:
        values: ``(k,)`` singular values, descending.
        vectors: ``(k, in_features)`` unit right singular vectors, one per row.
        residuals: ``(k,)`` ``‖AᵀA vᵢ − σᵢ² vᵢ‖ / σ₁²`` (NaN where the solver does not compute them).
        matvecs: applications of ``AᵀA`` to one vector.
        iters: iterations (blocks) run.
        converged: whether the solver's stopping rule was met.

    Example:
        >>> Solved(torch.ones(1), torch.ones(1, 3), torch.zeros(1), 3, 1, True).converged
        True
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    matvecs: int
    iters: int
    converged: bool


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


def krylov(
    A: ImplicitLinear, k: int, init: Tensor | None, tol: float, max_iters: int, block: int, basis_size: int, seed: int
) -> Solved:
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
            alive_one = beta > 10 * torch.finfo(A.dtype).eps * float(size)
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
            P = Q if alive_one else Q[:0]
        else:
            P = Q if bool(alive.all()) else _orthonormalize(Q[alive], V[:m], drop)
    w = min(k, m)
    theta, S = theta.flip(0), S.flip(1)
    vecs = S[:, :w].T.to(A.device, A.dtype) @ V[:m]
    return Solved(theta[:w].clamp_min(0).sqrt(), vecs, res[:w].clone(), matvecs, iters, converged)


def power_qr(A: ImplicitLinear, k: int, init: Tensor | None, tol: float, max_iters: int, seed: int) -> Solved:
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
    return Solved(values, X.T, res, matvecs, iters, converged)


def gap_free_lanczos(ops: Sequence[ImplicitLinear], steps: int, seeds: Sequence[int]) -> list[Solved]:
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
        results.append(Solved(gains[i : i + 1], Y[i : i + 1], res, steps + 1, steps, True))
    return results


def dense_top(A: ImplicitLinear) -> Solved:
    """The exact top singular pair of a small map: ``AᵀA`` from one batch of products on the unit vectors, then a
    float64 symmetric eigensolver."""
    n = A.in_features
    eye = torch.eye(n, dtype=A.dtype, device=A.device).reshape(n, *A.input_shape)
    gram, _ = A.gram(eye)
    G = gram.reshape(n, n).double().cpu()
    theta, S = torch.linalg.eigh((G + G.T) / 2)
    vec = S[:, -1:].T.to(A.device, A.dtype)
    return Solved(theta[-1:].clamp_min(0).sqrt(), vec, torch.zeros(1, dtype=torch.float64), n, 1, True)


def _normalize(X: Tensor) -> Tensor:
    return X / X.norm(dim=0).clamp_min(torch.finfo(X.dtype).tiny)


def subspace_iteration(A: ImplicitLinear, k: int, init: Tensor | None, tol: float, max_iters: int, seed: int) -> Solved:
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
    return Solved(theta.clamp_min(0).sqrt(), X.T, res, matvecs, iters, converged)
