"""The exact clips: ``Linear`` (and ``Linear`` before ``BatchNorm1d``) by an SVD of the (composed) weight matrix,
``BatchNorm`` alone by clamping its channel scales ``|γᵢ|/√(varᵢ+ε)`` (Gouk et al., 2021).

A decomposition is never trusted: one that raises, is not orthogonal or does not reconstruct the matrix is redone in
float64, and the candidate weight is measured in float64 before it is written.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_specclip.spectral.clip.base import (
    ClipResult,
    batchnorm_scale,
    batchnorm_scale_with,
    clip_values,
    within,
    write,
)
from lightning_specclip.spectral.closed_form import linear_part

__all__ = ["clip_batchnorm", "clip_dense", "dense_sigma", "is_dense"]

# Largest max|UᵀU − I|, max|V Vᵀ − I| and relative reconstruction error accepted from an SVD, by dtype.
_SVD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def clip_batchnorm(bn: _BatchNorm, target: float, mode: str, tol: float) -> ClipResult:
    """Clamp the channel scales of ``bn`` at ``target`` (set mode: the largest to it); write, measured exactly."""
    if bn.weight is None:
        raise ValueError(f"{type(bn).__name__} has affine=False: it has no weight to clip")
    scale = batchnorm_scale(bn)
    before = float(scale.abs().max())
    if before == 0.0 and mode == "set":
        raise ValueError("every channel scale of the BatchNorm is zero: its norm cannot be set")
    if mode == "clip" and before <= target * (1 + tol / 4):  # nothing to do: leave the weights exactly as they are
        return ClipResult(before, before, target, 0, True, changed=False)
    factor = (target / scale.abs()).clamp(max=1.0)
    if mode == "set" and before < target:
        factor[scale.abs().argmax()] = target / before
    candidate = (bn.weight.detach().to(scale.dtype) * factor).to(bn.weight.dtype)
    if not torch.isfinite(candidate).all():
        raise RuntimeError("clipping produced non-finite weights; the module was left unchanged")
    after = float(batchnorm_scale_with(bn, candidate).abs().max())  # measured on exactly what is written
    write(bn.weight, candidate)
    return ClipResult(before, after, target, 0, within(after, target, mode, tol), changed=True)


def is_dense(layer: nn.Module) -> bool:
    """Whether ``layer`` is a plain ``nn.Linear`` (exact class, no hooks): its map is its weight matrix."""
    return isinstance(layer, nn.Linear) and linear_part(layer) is not None


def _checked_svd(matrix: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor] | None, str]:
    """The thin SVD of ``matrix`` if it is one (orthogonal factors that reconstruct it), else a reason."""
    name = str(matrix.dtype).replace("torch.", "")
    try:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    except RuntimeError as err:  # torch.linalg.LinAlgError: "failed to converge"
        return None, f"the {name} SVD raised ({err})"
    if not (torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()):
        return None, f"the {name} SVD returned non-finite values"
    tol = _SVD_TOL[matrix.dtype]
    eye = torch.eye(S.numel(), dtype=matrix.dtype, device=matrix.device)
    ortho = max(float((U.mT @ U - eye).abs().max()), float((Vh @ Vh.mT - eye).abs().max()))
    if not ortho <= tol:
        return None, f"the {name} SVD returned factors that are not orthogonal (max|UᵀU − I| = {ortho:.3g})"
    error = float(((U * S) @ Vh - matrix).norm()) / max(float(matrix.norm()), torch.finfo(matrix.dtype).tiny)
    if not error <= tol or not (S >= 0).all() or not (S[:-1] >= S[1:]).all():
        return None, f"the {name} SVD does not reconstruct the matrix (relative error {error:.3g})"
    return (U, S, Vh), ""


def _row_scaled(weight: Tensor, row_scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``diag(row_scale) · weight`` in ``dtype``."""
    matrix = weight.detach().to(dtype)
    return matrix if row_scale is None else row_scale.to(dtype)[:, None] * matrix


def dense_sigma(weight: Tensor, row_scale: Tensor | None) -> float:
    """σ₁ of ``diag(row_scale) · weight`` in float64 (a values-only SVD: the ground truth for what is written)."""
    return float(torch.linalg.svdvals(_row_scaled(weight, row_scale, torch.float64))[0])


def _unscaled(clipped: Tensor, row_scale: Tensor | None, weight: Tensor) -> Tensor:
    """The weight whose rows scaled by ``row_scale`` are ``clipped``; rows with a zero BatchNorm scale contribute
    nothing to the map and keep their values in ``weight``."""
    if row_scale is None:
        return clipped
    scale, old = row_scale.to(clipped.dtype), weight.to(clipped.dtype)
    nonzero = scale != 0
    return torch.where(nonzero[:, None], clipped / torch.where(nonzero, scale, 1)[:, None], old)


def clip_dense(layer: nn.Linear, bn: _BatchNorm | None, target: float, mode: str, tol: float) -> ClipResult:
    """Clip ``Linear`` (before ``bn``, if given) exactly: every singular value of ``diag(bn scale) · W`` above the
    target set to it, the rest untouched; in the weight's float dtype, redone in float64 when that SVD is not one.

    Raises:
        ValueError: set mode on a zero weight.
        RuntimeError: non-finite weights, or no SVD that clips within ``tol`` (nothing is written).
    """
    wdtype = layer.weight.dtype
    dtype = torch.float64 if wdtype == torch.float64 else torch.float32
    weight = layer.weight.detach().to(dtype)
    row_scale = batchnorm_scale(bn).to(dtype) if bn is not None else None
    matrix = _row_scaled(weight, row_scale, dtype)
    reasons = []
    for work in dict.fromkeys((dtype, torch.float64)):
        decomposition, reason = _checked_svd(matrix if work == dtype else _row_scaled(weight, row_scale, work))
        if decomposition is None:
            reasons.append(reason)
            continue
        U, S, Vh = decomposition
        before = float(S[0])
        if mode == "set" and before == 0.0:
            raise ValueError("the layer's weight is zero: its spectral norm cannot be set")
        if mode == "clip" and before <= target * (1 + tol / 4):  # nothing to do: the weights stay as they are
            return ClipResult(before, before, target, 0, True, changed=False)
        candidate = _unscaled((U * clip_values(S, target, mode)) @ Vh, row_scale, weight).to(wdtype)
        if not torch.isfinite(candidate).all():
            raise RuntimeError("clipping produced non-finite weights; the module was left unchanged")
        after = dense_sigma(candidate, row_scale)
        # In float32/float64 an exact clip lands within tol; a low-precision weight may miss by its rounding.
        if within(after, target, mode, tol) or wdtype not in (torch.float32, torch.float64):
            write(layer.weight, candidate)
            return ClipResult(before, after, target, 0, within(after, target, mode, tol), changed=True)
        reasons.append(
            f"the weight clipped by the {str(work).replace('torch.', '')} SVD measures σ₁ = {after:.6g} "
            f"(target {target:g})"
        )
    raise RuntimeError(
        f"clipping the {tuple(weight.shape)} weight of {type(layer).__name__} failed: {'; '.join(reasons)}. "
        f"The module was left unchanged."
    )
