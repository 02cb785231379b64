"""Clip (or set) the spectral norm of an affine layer in place: FastClip for any implicitly linear layer.

The paper's FastClip moves the weights so that the layer maps its top right singular vector ``v`` to
``(c/σ)·A v``. Here that idea is made robust for convolutions, where the published fixed-step gradient
update diverges:

* every round takes a *block* of the top right singular vectors ``V`` (all those above the target among
  them) and solves the least-squares problem ``min_Δ ‖A_{W+Δ} V − T‖`` for the weight change ``Δ``, where
  ``T`` maps each ``vᵢ`` to ``min(σᵢ, c)·uᵢ``. The problem is linear in ``Δ`` and is solved by conjugate
  gradients on the normal equations (CGLS, started from ``Δ = 0`` and stopped early, so it returns a small
  change); its residual never grows, so a round cannot diverge.
* rounds repeat (with warm-started spectra) until ``σ₁`` is within ``tol`` of the target. Whatever is left
  after ``max_rounds`` is removed by scaling the weight by ``c/σ₁`` (the map is linear in the weight), so
  the result always lands on the target; ``ClipResult.rescaled`` says when this fallback ran.

Dense layers (``Linear``, and ``Linear`` followed by ``BatchNorm1d``) are clipped exactly in one call by an
SVD of the (composed) weight matrix; ``BatchNorm`` alone by clamping ``|γᵢ|/√(varᵢ+ε)`` (Gouk et al., 2021).

The module is only written once, at the end, after the result was verified: every value finite, and the spectral
norm measured on exactly the weights that will be written (for the dense SVD path in float64, after checking that
the decomposition is orthogonal and reconstructs the matrix, with a float64 retry when it is not). If anything fails
the weights are exactly as they were. ``ClipResult.after`` is always that measurement, and ``ClipResult.changed``
says whether anything was written.

Parametrized weights (``torch.nn.utils.parametrizations.weight_norm``, the legacy hook-based
``torch.nn.utils.weight_norm``) are clipped through the parametrization: a plain copy of the layer is clipped and
the result assigned back (``right_inverse``), then read back and compared. Parametrizations that cannot represent
an arbitrary weight (``spectral_norm``) and layers that are not linear in their weight (weight standardization)
are refused before anything is written; :func:`check_clippable` tells in advance.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

from lightning_specclip.spectral.operator import (
    ImplicitLinear,
    NotLinearInWeightError,
    eval_mode,
    linear_part,
    no_autocast,
)
from lightning_specclip.spectral.power import _CONVS, _plain_conv
from lightning_specclip.spectral.spectrum import Spectrum, gap_free_spectra, spectrum

__all__ = [
    "MODES",
    "ClipResult",
    "NotLinearInWeightError",
    "batchnorm_scale",
    "check_clippable",
    "clip_spectral_norm_",
    "clip_spectral_norms_",
]


MODES = ("clip", "set")

Clippable = nn.Module | tuple[nn.Module, nn.Module]


@dataclass
class ClipResult:
    """What :func:`clip_spectral_norm_` (or a clipping method) did.

    Attributes:
        before: spectral norm before the call. With a warm start (``spectrum=``) on a map above the target it
            is the largest gain of the map on the warm vectors (one Rayleigh–Ritz step: a lower bound on σ₁,
            tight when they are a training loop's tracked vectors); otherwise measured to ``tol``. For the
            baselines in :mod:`lightning_specclip.methods`: the method's own estimate, which decides whether
            it writes.
        after: spectral norm after the call, measured on the weights as written (float64 SVD for dense layers,
            the exact clamp for BatchNorm, :func:`~lightning_specclip.spectrum` otherwise); never a predicted value.
        target: the requested value.
        rounds: least-squares rounds run (0 for the exact dense, BatchNorm and no-op cases).
        converged: whether ``after`` is within ``tol`` of the target (``after ≤ target·(1+tol)`` in clip mode).
        rescaled: whether the final scaling by ``target/σ₁`` was needed to land on the target.
        spectrum: top singular vectors of the map as written (a warm start for the next call), if computed.
        changed: whether the call wrote the weights (``False`` for a no-op: the weights are bit for bit as they
            were). Keyword-only.
        estimate: a method's own estimate of the spectral norm after its clip (e.g. Gouk's ``‖A′u‖``), next to
            the measured ``after``; ``None`` for :func:`clip_spectral_norm_`. Keyword-only.

    Example:
        >>> r = ClipResult(2.0, 1.0, 1.0, 0, True, changed=True)
        >>> r.changed, r.estimate
        (True, None)
    """

    before: float
    after: float
    target: float
    rounds: int
    converged: bool
    rescaled: bool = False
    spectrum: Spectrum | None = field(default=None, repr=False)
    changed: bool = field(kw_only=True)
    estimate: float | None = field(default=None, kw_only=True)


def batchnorm_scale(bn: _BatchNorm) -> Tensor:
    """Per-channel scale ``γᵢ/√(varᵢ+ε)`` of a BatchNorm in eval mode (its linear part is ``diag`` of it).

    Args:
        bn: a BatchNorm layer that tracks running statistics.

    Returns:
        Tensor: ``(num_features,)`` float32 (float64 if the layer is float64) scales.

    Raises:
        ValueError: the layer has no running statistics (its eval map would use batch statistics).

    Example:
        >>> bn = nn.BatchNorm1d(2).eval()
        >>> batchnorm_scale(bn)
        tensor([1.0000, 1.0000])
    """
    if bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has track_running_stats=False: it normalizes with batch statistics and "
            f"is not an affine map of one input; clipping needs running statistics"
        )
    return _batchnorm_scale(bn, None if bn.weight is None else bn.weight.detach())


def _batchnorm_scale(bn: _BatchNorm, gamma: Tensor | None) -> Tensor:
    """The scales of ``bn`` with ``gamma`` in place of its weight (``None``: no affine weight)."""
    dtype = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    scale = (bn.running_var.to(dtype) + bn.eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma.to(dtype)
    return scale


def _positive_finite(value: object, name: str = "target") -> float:
    """``value`` as a float, or a ``ValueError`` naming it unless it is a positive finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from err
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def _check_args(target: float, mode: str, tol: float) -> float:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    target = _positive_finite(target)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    return target


def _as_module(module: Clippable) -> nn.Module:
    if isinstance(module, tuple):
        if len(module) != 2 or not all(isinstance(m, nn.Module) for m in module):
            raise TypeError("a pair must be (layer, batchnorm): two nn.Modules")
        return nn.Sequential(*module)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module or a (layer, batchnorm) pair, got {type(module).__name__}")
    return module


def _layer_and_bn(module: nn.Module) -> tuple[nn.Module, _BatchNorm | None] | None:
    """``(layer, bn)`` for a bare conv/linear or a two-element ``Sequential(layer, bn)``; else ``None``."""
    if isinstance(module, _ConvNd | nn.Linear):
        return module, None
    if isinstance(module, nn.Sequential) and len(module) == 2:
        layer, bn = module[0], module[1]
        if isinstance(layer, _ConvNd | nn.Linear) and isinstance(bn, _BatchNorm):
            return layer, bn
    return None


def _default_param(module: nn.Module, param: str | None) -> str:
    if param is not None:
        try:
            module.get_parameter(param)
        except AttributeError as err:
            names = [n for n, _ in module.named_parameters()]
            raise ValueError(f"param {param!r} is not a parameter of the module; it has: {names}") from err
        return param
    pair = _layer_and_bn(module)
    if pair is not None:
        return "weight" if pair[1] is None else "0.weight"
    raise TypeError(
        f"cannot tell which weight of {type(module).__name__} to move: supported are Linear, Conv*d, "
        f"ConvTranspose*d, BatchNorm*d, Sequential(conv or linear, batchnorm) and (conv, batchnorm) pairs; "
        f"for another module that is linear in one of its weights, name it with param="
    )


def _check_finite(module: nn.Module) -> None:
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"the module's {name} holds non-finite values; refusing to clip it")


def _write(dst: Tensor, src: Tensor) -> None:
    if not torch.isfinite(src).all():
        raise RuntimeError("clipping produced non-finite weights; the module was left unchanged")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def _clip_values(values: Tensor, target: float, mode: str) -> Tensor:
    new = values.clamp(max=target)
    if mode == "set":
        new[0] = target
    return new


def _clip_batchnorm(bn: _BatchNorm, target: float, mode: str, tol: float) -> ClipResult:
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
    after = float(_batchnorm_scale(bn, candidate).abs().max())  # measured on exactly what is written
    _write(bn.weight, candidate)
    return ClipResult(before, after, target, 0, _within(after, target, mode, tol), changed=True)


def _within(sigma: float, target: float, mode: str, tol: float) -> bool:
    if mode == "clip":
        return sigma <= target * (1 + tol)
    return abs(sigma / target - 1) <= tol


def _dense(layer: nn.Module) -> bool:
    """Whether ``layer`` is a plain ``nn.Linear`` (exact class, no hooks): its map is its weight matrix."""
    return isinstance(layer, nn.Linear) and linear_part(layer) is not None


# Largest max|UᵀU − I|, max|V Vᵀ − I| and relative reconstruction error accepted from an SVD, by dtype.
_SVD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


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


def _dense_sigma(weight: Tensor, row_scale: Tensor | None) -> float:
    """σ₁ of ``diag(row_scale) · weight`` in float64 (a values-only SVD: the ground truth for what is written)."""
    return float(torch.linalg.svdvals(_row_scaled(weight, row_scale, torch.float64))[0])


def _clip_dense(layer: nn.Linear, bn: _BatchNorm | None, target: float, mode: str, tol: float) -> ClipResult:
    wdtype = layer.weight.dtype
    dtype = torch.float64 if wdtype == torch.float64 else torch.float32
    weight = layer.weight.detach().to(dtype)
    row_scale = batchnorm_scale(bn).to(dtype) if bn is not None else None
    matrix = _row_scaled(weight, row_scale, dtype)
    # A decomposition is never trusted: one that raises, is not orthogonal or does not reconstruct the matrix
    # (float32 LAPACK can do either on many repeated singular values) is redone in float64, and the candidate
    # weight is measured in float64 before it is written.
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
        new_s = _clip_values(S, target, mode)
        clipped = (U * new_s) @ Vh
        if row_scale is not None:
            # Rows with a zero BatchNorm scale contribute nothing to the map: keep them as they were.
            scale, old = row_scale.to(work), weight.to(work)
            nonzero = scale != 0
            clipped = torch.where(nonzero[:, None], clipped / torch.where(nonzero, scale, 1)[:, None], old)
        candidate = clipped.to(wdtype)
        if not torch.isfinite(candidate).all():
            raise RuntimeError("clipping produced non-finite weights; the module was left unchanged")
        after = _dense_sigma(candidate, row_scale)
        # In float32/float64 an exact clip lands within tol; a low-precision weight may miss by its rounding.
        if _within(after, target, mode, tol) or wdtype not in (torch.float32, torch.float64):
            _write(layer.weight, candidate)
            return ClipResult(before, after, target, 0, _within(after, target, mode, tol), changed=True)
        reasons.append(
            f"the weight clipped by the {str(work).replace('torch.', '')} SVD measures σ₁ = {after:.6g} "
            f"(target {target:g})"
        )
    raise RuntimeError(
        f"clipping the {tuple(weight.shape)} weight of {type(layer).__name__} failed: {'; '.join(reasons)}. "
        f"The module was left unchanged."
    )


def _weight_products(A: ImplicitLinear, param: str, right: Tensor) -> tuple[Callable[[Tensor], Tensor], ...]:
    """``Δ ↦ A_Δ V`` (the map is linear in the weight) and its adjoint: for a plain zero-padded convolution's weight
    the convolution and the kernel autograd runs for its weight gradient, called directly; otherwise through
    ``torch.func.vjp``."""
    m = A.op
    if param == "weight" and _plain_conv(A):
        conv, zeros, weight = _CONVS[type(m)], (0,) * len(m.kernel_size), A.tensors[param]
        geometry = (m.stride, m.padding, m.dilation)
        mask = (False, True, False)

        def conv_apply(delta: Tensor) -> Tensor:
            return conv(right, delta, None, *geometry, m.groups)

        def conv_adjoint(r: Tensor) -> Tensor:
            return torch.ops.aten.convolution_backward(r, right, weight, None, *geometry, False, zeros, m.groups, mask)[
                1
            ]

        return conv_apply, conv_adjoint
    tensors = A.tensors

    def apply(delta: Tensor) -> Tensor:
        return A.apply(right, {**tensors, param: delta})

    _, vjp = torch.func.vjp(apply, torch.zeros_like(tensors[param]))
    return apply, lambda r: vjp(r)[0]


def _cgls(A: ImplicitLinear, param: str, right: Tensor, rhs: Tensor, iters: int, atol: float) -> Tensor:
    """Least-squares weight change ``Δ`` with ``A_Δ V ≈ rhs`` (the map is linear in the weight), by CGLS from
    ``Δ = 0``.

    Stops after ``iters`` iterations, as soon as ``‖A_Δ V − rhs‖ ≤ atol`` (the images of ``V`` are then within
    ``atol`` of where they should go: more accuracy would be rounding on top of the final check's tolerance, and
    stopping early keeps ``Δ`` small and on the top of the spectrum — for a convolution with more output positions
    than taps the exact solution is the rescale of the whole weight, ``A_{εW} v = εσu``, which moves every singular
    value: solved exactly, the step moved the rest of the spectrum three times as much in ``bench_clip.py``), or
    once the solution is reached to rounding, with 100 machine epsilons
    ``ε``: the gradient ``‖Aᵀr‖`` below ``ε·‖A‖·‖r‖`` (a least-squares solution; ``‖A‖`` estimated from below by
    the largest ``‖A d‖/‖d‖`` of the search directions) or below ``ε`` times its start (a consistent system
    solved). Past that point more iterations only amplify the rounding: without these tests the iterates drifted
    off the solution, by orders of magnitude in float32 within a hundred iterations.
    """
    apply, adjoint = _weight_products(A, param, right)

    def squared(t: Tensor) -> float:
        return float(torch.linalg.vecdot(t.flatten(), t.flatten()))

    delta = torch.zeros_like(A.tensors[param])
    limit = (100 * torch.finfo(delta.dtype).eps) ** 2
    residual = rhs.clone()
    grad = adjoint(residual)
    direction = grad.clone()
    gamma = squared(grad)
    solved = limit * gamma  # the gradient at rounding relative to its start
    scale = 0.0  # the largest ‖A d‖²/‖d‖² so far
    for _ in range(iters):
        if gamma <= 0:
            break
        image = apply(direction)
        denom = squared(image)
        if denom <= 0:
            break
        step = gamma / denom
        delta.add_(direction, alpha=step)
        residual.add_(image, alpha=-step)
        left = squared(residual)
        if left <= atol**2:
            break
        scale = max(scale, denom / max(squared(direction), math.ulp(0.0)))
        grad = adjoint(residual)
        gamma_new = squared(grad)
        if gamma_new <= max(limit * scale * left, solved):
            break
        direction = torch.add(grad, direction, alpha=gamma_new / gamma)
        gamma = gamma_new
    return delta


def _gain(A: ImplicitLinear, vector: Tensor) -> Spectrum:
    """The Rayleigh–Ritz step of one vector ``v``: the value ``‖A v‖`` (``v`` normalized), and ``A v`` normalized as
    its left vector, from one product."""
    tiny = torch.finfo(A.dtype).tiny
    right = vector.detach().to(A.device, A.dtype).reshape(1, *A.input_shape)
    right = right / torch.linalg.vector_norm(right).clamp_min(tiny)
    image = A.matvec(right)
    value = torch.linalg.vector_norm(image).reshape(1)
    residuals = torch.full((1,), math.nan, dtype=torch.float64)
    return Spectrum(value, right, image / value.clamp_min(tiny), 1, 1, False, residuals, "subspace")


@dataclass(frozen=True)
class _Certify:
    """A gap-free measurement of σ₁ that a clip waits for (see :func:`_run`)."""

    A: ImplicitLinear
    tol: float
    seed: int
    left: bool = False


#: a clip in progress: yields the measurements it needs, is sent their results, returns what it did
_Steps = Generator[_Certify, Spectrum, ClipResult]


def _run(clips: Sequence[_Steps]) -> list[ClipResult]:
    """Run clips to the end, answering the measurements they ask for at one time together, in lock-step
    (:func:`~lightning_specclip.spectral.spectrum.gap_free_spectra`). If one raises, the others are closed where
    they are (each writes its module only as its last act) and the error propagates."""
    results: list[ClipResult] = [None] * len(clips)  # type: ignore[list-item]
    asked: dict[int, _Certify] = {}

    def advance(i: int, answer: Spectrum | None) -> None:
        try:
            asked[i] = clips[i].send(answer)  # type: ignore[arg-type]
        except StopIteration as stop:
            results[i] = stop.value

    try:
        for i in range(len(clips)):
            advance(i, None)
        while asked:
            batch, by_tol = list(asked.items()), {}
            asked.clear()
            for i, request in batch:
                by_tol.setdefault(request.tol, []).append((i, request))
            for tol, requests in by_tol.items():
                answers = gap_free_spectra(
                    [r.A for _, r in requests],
                    tol,
                    seeds=[r.seed for _, r in requests],
                    left=[r.left for _, r in requests],
                )
                for (i, _), answer in zip(requests, answers, strict=True):
                    advance(i, answer)
    finally:
        for clip in clips:
            clip.close()
    return results


def _clip_iterative(
    module: nn.Module,
    param: str,
    target: float,
    input_shape: Sequence[int],
    mode: str,
    init: Tensor | None,
    tol: float,
    max_rounds: int,
    block_size: int,
    cg_iters: int,
    seed: int,
) -> _Steps:
    weight = module.get_parameter(param)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    work = weight.detach().to(dtype).clone()
    A = ImplicitLinear(module, input_shape, dtype=dtype, overrides={param: work})
    if linear_part(module) is None:  # standard layers are linear in their weight by construction
        A.check_linear_in(param)
    block = max(1, min(block_size, A.in_features))
    extra = min(4, A.in_features - block)  # random vectors beside a block of k > 1, which converges faster with them
    if init is not None:
        init = init.reshape(-1, *A.input_shape)[:block]

    # What is written is decided by measurements that find σ₁ whatever the spectrum: gap-free Lanczos from a random
    # vector (within `certain` relative, with probability ≥ 1 − GAP_FREE_FAILURE). A measurement stopped by a residual
    # test can settle on a singular value below σ₁ when many crowd there, and one started from warm vectors can
    # stay on them while another singular value is above the target; nothing either returns would show it. The
    # decisions leave a margin of tol/4 on the target, and `certain` is what keeps the result within tol of it.
    # (Each one is a `_Certify` request yielded to the caller, which answers it alone or with other clips'.)
    certain = 0.75 * tol / (1 + tol)

    # The least-squares rounds only need directions to move: a residual test (‖AᵀA v − σ²v‖ ≤ tol·σ₁²) is enough.
    def measure(start: Tensor | None, round_seed: int, k: int, iters: int | None = None) -> Spectrum:
        size = k + extra if start is None and k > 1 else k  # a warm block needs no random vectors beside it
        return spectrum(A, k=k, init=start, block_size=size, tol=tol, max_iters=iters, seed=round_seed)

    # A warm start (the tracked vectors of a training loop) is used as it is: one Rayleigh–Ritz step gives the
    # values and images the first round moves, as the paper's FastClip moves its tracked vector.
    if init is None:
        current = measure(None, seed, block)
    else:
        current = _gain(A, init) if block == 1 else measure(init, seed, block, iters=1)
    if mode == "clip" and current.sigma <= target * (1 + tol / 4):  # perhaps nothing to do: make sure
        confirmed = yield _Certify(A, certain, seed, left=True)  # (its images, for a round if it is above)
        if confirmed.sigma <= target * (1 + tol / 4):
            return ClipResult(confirmed.sigma, confirmed.sigma, target, 0, True, False, confirmed, changed=False)
        current = confirmed if block == 1 else measure(confirmed.right, seed, block)
    before = current.sigma
    if mode == "set" and before == 0.0 and (yield _Certify(A, certain, seed)).sigma == 0.0:
        raise ValueError("the layer's linear map is zero: its spectral norm cannot be set")
    rounds = 0
    fresh = True  # whether `current` was measured on the present working weight
    # Least-squares rounds while σ₁ is above the target (or, in set mode, away from it).
    while rounds < max_rounds and not _within(current.sigma, target, "set", tol / 4):
        if current.sigma < target and mode == "clip":  # overshot below: the rescale below lifts it back
            break
        new_values = _clip_values(current.values, target, mode)
        shape = (-1, *[1] * len(A.output_shape))
        rhs = (new_values - current.values).view(shape) * current.left
        moving = new_values != current.values
        delta = _cgls(A, param, current.right[moving], rhs[moving], cg_iters, atol=tol / 8 * target)
        if not torch.isfinite(delta).all():
            raise RuntimeError("the least-squares step produced non-finite values; the module was left unchanged")
        work.add_(delta)
        rounds += 1
        fresh = rounds < max_rounds
        if not fresh:  # the last round: the final check below measures its result
            break
        current = measure(current.right, seed + rounds, block)  # direction finding: the final check decides
    final = yield _Certify(A, certain, seed + rounds + 1)
    if fresh and current.sigma > final.sigma:
        final = current
    # The map is linear in the weight: scaling it lands σ₁ on the target from either side (and scales the whole
    # spectrum by the same factor, same singular vectors, so the warm start below is the answer).
    rescaled = not _within(final.sigma, target, "set", tol / 4)
    factor = target / final.sigma if rescaled else 1.0
    if rescaled:
        work.mul_(factor)
    candidate = work.to(weight.dtype)
    if not torch.isfinite(candidate).all():
        raise RuntimeError("clipping produced non-finite weights; the module was left unchanged")
    if weight.dtype != dtype:  # rounding to the module's dtype moves the norm a little: measure what is written
        work.copy_(candidate.to(dtype))
        final = spectrum(A, k=1, init=final.right[:1], tol=tol / 10, seed=seed)
    elif rescaled:  # A is linear in the weight: A(f·W) = f·A(W), the same singular vectors and f times the values
        # (rounding the product to float32 moves σ₁ by ~1e-7 relative, far inside the tol/4 margin)
        final = dataclasses.replace(final, values=final.values * factor)
    _write(weight, candidate)
    after = final.sigma
    return ClipResult(before, after, target, rounds, _within(after, target, mode, tol), rescaled, final, changed=True)


@no_autocast()
def clip_spectral_norm_(
    module: Clippable,
    target: float,
    input_shape: Sequence[int] | None = None,
    *,
    mode: str = "clip",
    spectrum: Spectrum | Tensor | None = None,
    tol: float = 1e-2,
    max_rounds: int = 6,
    block_size: int = 8,
    cg_iters: int = 10,
    param: str | None = None,
    seed: int = 0,
) -> ClipResult:
    """Clip (or set) the spectral norm of ``x ↦ module(x) − module(0)`` to ``target``, in place.

    The weights are changed in place (same ``Parameter`` objects, so optimizers keep their state), under no
    autograd, with all math in float32 (float64 for float64 modules). What is exact for what:

    * ``Linear`` and ``Sequential(Linear, BatchNorm1d)``: exact (SVD of the composed matrix, every singular
      value above the target set to it, the rest untouched).
    * ``BatchNorm*d``: exact (``γᵢ`` clamped so that ``|γᵢ|/√(varᵢ+ε) ≤ target``; Gouk et al. 2021).
    * convolutions of any dimension, padding mode, stride, dilation and groups, transposed convolutions, and
      ``Sequential(conv, BatchNorm)`` / ``(conv, bn)`` pairs (the composition with the BatchNorm's running
      statistics; only the conv weight moves): block least-squares rounds (FastClip), then an exact scaling
      if the rounds did not land on the target. ``after`` is within ``tol`` of ``target`` on return.
    * any other module that is linear in one weight: the same, naming the weight with ``param``. A module
      that is not a standard class is first probed for linearity in that weight
      (:meth:`~lightning_specclip.ImplicitLinear.check_linear_in`) and refused with
      :class:`NotLinearInWeightError` if it is not (e.g. a convolution that standardizes its weight).
    * layers whose weight is parametrized (``torch.nn.utils.parametrizations.weight_norm``, the legacy
      ``torch.nn.utils.weight_norm``), alone or before a BatchNorm: clipped through the parametrization (a plain
      copy with the computed weight is clipped, the result is assigned back through ``right_inverse`` and read
      back to check it; the originals are restored exactly if it does not match). Parametrizations that cannot
      represent an arbitrary weight (``spectral_norm``, new or legacy) are refused (see :func:`check_clippable`).

    Every path measures ``after`` on exactly the weights it writes, before writing them. A clip whose map is
    already within tolerance (``σ ≤ target·(1 + tol/4)`` in clip mode) writes nothing (``changed=False``).

    Args:
        module: the layer, a ``Sequential(layer, batchnorm)``, or a ``(layer, batchnorm)`` pair.
        target: the spectral norm to clip to (``> 0``).
        input_shape: shape of one input without the batch dimension (required for convolutions: their
            spectrum depends on it; ignored for plain dense layers and BatchNorm; ``(in_features,)`` by default
            for other ``Linear`` layers).
        mode: ``"clip"`` lowers a norm above ``target`` to it and leaves a smaller one alone; ``"set"``
            makes the norm equal to ``target`` from either side.
        spectrum: a :class:`~lightning_specclip.Spectrum` (or just its ``.right`` vectors, ``(j, *input_shape)``)
            from :func:`~lightning_specclip.spectrum` or a previous result, to warm-start the least-squares rounds
            from (the first round moves them as they are, after one Rayleigh–Ritz step; the measurements that
            decide what is written always start from random vectors).
        tol: relative tolerance on the final norm.
        max_rounds: least-squares rounds before the exact-scaling fallback.
        block_size: singular vectors handled per round.
        cg_iters: conjugate-gradient iterations per round.
        param: name of the weight to move, for modules other than the supported ones.
        seed: seed of the random starting vectors (results are deterministic for a seed).

    Returns:
        ClipResult: norms before and after (measured), rounds, whether it converged, needed the fallback, and
        changed the weights.

    Raises:
        ValueError: ``target`` or ``tol`` not positive and finite; unknown ``mode``; non-finite weights;
            missing ``input_shape`` for a convolution; a BatchNorm without running statistics or weight; a
            parametrization that cannot represent an arbitrary weight (nothing is changed, buffers included).
        NotLinearInWeightError: the module is not linear in the weight to move (a ``ValueError``).
        TypeError: an unsupported module without ``param``.
        RuntimeError: the computation produced non-finite values, the SVD failed in float32 and float64, or a
            parametrization did not give the clipped weight back (the weights are then left unchanged).

    Example:
        >>> conv = nn.Conv2d(4, 4, 3, padding=1)
        >>> result = clip_spectral_norm_(conv, 0.5, (4, 8, 8))
        >>> result.converged, round(result.after, 2), result.changed
        (True, 0.5, True)
        >>> clip_spectral_norm_(conv, 1.0, (4, 8, 8)).changed  # already below the target: nothing written
        False
    """
    with torch.inference_mode(False):  # autograd is needed even inside Lightning's validation/test loops
        return _run(
            [_clip(module, target, input_shape, mode, spectrum, tol, max_rounds, block_size, cg_iters, param, seed)]
        )[0]


@no_autocast()
def clip_spectral_norms_(
    modules: Sequence[Clippable],
    targets: float | Sequence[float],
    input_shapes: Sequence[Sequence[int] | None],
    *,
    mode: str = "clip",
    spectra: Sequence[Spectrum | Tensor | None] | None = None,
    tol: float = 1e-2,
    max_rounds: int = 6,
    block_size: int = 8,
    cg_iters: int = 10,
    seed: int = 0,
) -> list[ClipResult]:
    """:func:`clip_spectral_norm_` of several layers at once, their measurements in lock-step.

    Each layer is clipped exactly as :func:`clip_spectral_norm_` would (same decisions, same seeds, the same
    guarantee on what is written), but the measurements that decide (gap-free Lanczos from random vectors) run
    for all the layers together (:func:`~lightning_specclip.spectral.spectrum.gap_free_spectra`): a few kernels
    per Lanczos step for all of them instead of a few dozen per layer, the cost of clipping a whole network.

    Args:
        modules: the layers (each as :func:`clip_spectral_norm_` takes it); no parameter may belong to two.
        targets: the spectral norm to clip each to (one for all, or one per layer).
        input_shapes: each layer's input shape (``None`` where :func:`clip_spectral_norm_` needs none).
        mode: ``"clip"`` or ``"set"``, for all.
        spectra: each layer's warm start (or ``None``), as ``spectrum=`` of :func:`clip_spectral_norm_`.
        tol: relative tolerance on each final norm.
        max_rounds: least-squares rounds per layer before the exact-scaling fallback.
        block_size: singular vectors handled per round.
        cg_iters: conjugate-gradient iterations per round.
        seed: seed of the random starting vectors (each layer's are those :func:`clip_spectral_norm_` uses).

    Returns:
        list[ClipResult]: per layer, in order, what :func:`clip_spectral_norm_` returns.

    Raises:
        ValueError: lists of different lengths, a parameter shared by two layers (clip them one after the
            other), or anything :func:`clip_spectral_norm_` raises for a layer. If one layer fails, the layers
            whose clip had finished are written and the others are left unchanged.
        NotLinearInWeightError: as :func:`clip_spectral_norm_`.
        TypeError: as :func:`clip_spectral_norm_`.
        RuntimeError: as :func:`clip_spectral_norm_`.

    Example:
        >>> convs = [nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)]
        >>> results = clip_spectral_norms_(convs, 0.5, [(4, 8, 8)] * 3)
        >>> [round(r.after, 2) for r in results]
        [0.5, 0.5, 0.5]
    """
    count = len(modules)
    targets = [targets] * count if isinstance(targets, float | int) else list(targets)
    spectra = [None] * count if spectra is None else list(spectra)
    if not len(targets) == len(input_shapes) == len(spectra) == count:
        raise ValueError(
            f"need one target, input shape and spectrum per module ({count}); got {len(targets)}, "
            f"{len(input_shapes)} and {len(spectra)}"
        )
    owner: dict[int, int] = {}
    for i, module in enumerate(modules):
        for p in _as_module(module).parameters():
            j = owner.setdefault(id(p), i)
            if j != i:
                raise ValueError(f"modules {j} and {i} share a parameter: clip them one after the other")
    with torch.inference_mode(False):
        return _run(
            [
                _clip(m, c, shape, mode, warm, tol, max_rounds, block_size, cg_iters, None, seed)
                for m, c, shape, warm in zip(modules, targets, input_shapes, spectra, strict=True)
            ]
        )


def _clip(
    module: Clippable,
    target: float,
    input_shape: Sequence[int] | None,
    mode: str,
    spectrum: Spectrum | Tensor | None,
    tol: float,
    max_rounds: int,
    block_size: int,
    cg_iters: int,
    param: str | None,
    seed: int,
) -> _Steps:
    target = _check_args(target, mode, tol)
    module = _as_module(module)
    _check_finite(module)
    if isinstance(module, _BatchNorm):
        return _clip_batchnorm(module, target, mode, tol)
    args = (target, input_shape, mode, spectrum, tol, max_rounds, block_size, cg_iters, param, seed)
    pair = _layer_and_bn(module) if param is None else None
    if pair is None:
        return (yield from _clip_plain(module, *args))
    layer, bn = pair
    problem = _reparametrization_problem(layer)
    if problem is not None:
        raise ValueError(f"cannot clip {type(layer).__name__}: {problem}")
    if _reparametrization(layer) is None:
        return (yield from _clip_plain(module, *args))
    # Clip a plain copy holding the computed weight, then write it back through the parametrization.
    plain_layer = _plain_copy(layer)
    plain = plain_layer if bn is None else nn.Sequential(plain_layer, bn)
    result = yield from _clip_plain(plain, *args)
    if not result.changed:
        return result
    dense = _dense(plain_layer)
    return _write_through(module, layer, bn, plain_layer.weight.detach(), result, dense, input_shape, mode, tol, seed)


def _clip_plain(
    module: nn.Module,
    target: float,
    input_shape: Sequence[int] | None,
    mode: str,
    spectrum: Spectrum | Tensor | None,
    tol: float,
    max_rounds: int,
    block_size: int,
    cg_iters: int,
    param: str | None,
    seed: int,
) -> _Steps:
    """Clip a module whose weight is an ordinary parameter (no parametrization)."""
    pair = _layer_and_bn(module)
    if param is None and pair is not None and _dense(pair[0]):
        return _clip_dense(pair[0], pair[1], target, mode, tol)
    param = _default_param(module, param)
    if input_shape is None and pair is not None and isinstance(pair[0], nn.Linear):
        input_shape = (pair[0].in_features,)
    if input_shape is None:
        raise ValueError(
            f"input_shape is required to clip {type(module).__name__}: the spectrum of a convolution depends "
            f"on the input size (pass the shape of one input without the batch dimension, e.g. (C, H, W))"
        )
    init = spectrum.right if isinstance(spectrum, Spectrum) else spectrum
    args = (target, input_shape, mode, init, tol, max_rounds, block_size, cg_iters, seed)
    return (yield from _clip_iterative(module, param, *args))


# Parametrized weights


def _legacy_hook(layer: nn.Module, kind: type) -> object | None:
    """The legacy ``weight_norm``/``spectral_norm`` forward pre-hook of ``layer.weight``, if it has one."""
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, kind) and getattr(hook, "name", None) == "weight":
            return hook
    return None


def _reparametrization(layer: nn.Module) -> str | None:
    """``"parametrize"`` (torch.nn.utils.parametrize), ``"legacy_weight_norm"``, or ``None`` for a plain weight."""
    if parametrize.is_parametrized(layer, "weight"):
        return "parametrize"
    if _legacy_hook(layer, _LegacyWeightNorm) is not None:
        return "legacy_weight_norm"
    return None


def _tolerance(dtype: torch.dtype) -> float:
    """Relative (Frobenius) difference allowed between a weight and its round trip through a parametrization."""
    return 16 * torch.finfo(dtype).eps


def _relative(got: Tensor, want: Tensor) -> float:
    diff = float((got.to(torch.float64) - want.to(torch.float64)).norm())
    return diff / max(float(want.to(torch.float64).norm()), 1e-300)


def _reparametrization_problem(layer: nn.Module) -> str | None:
    """Why ``layer``'s weight cannot be written through how it is computed (``None``: it can, or it is plain).

    The new-style parametrization is probed on a deep copy in eval mode under no_grad: assign ``0.5·W`` and
    read it back. Nothing of ``layer`` (parameters, buffers, modes) is touched.
    """
    if _legacy_hook(layer, _LegacySpectralNorm) is not None:
        return (
            "its weight is computed by the legacy torch.nn.utils.spectral_norm hook (SpectralNorm), which divides "
            "weight_orig by its own σ estimate at every forward, so no clipped weight can be written through it. "
            "Remove it (torch.nn.utils.remove_spectral_norm) or track the layer only"
        )
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    names = ", ".join(type(p).__name__ for p in layer.parametrizations["weight"])
    advice = (
        "Remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')) or "
        "track the layer only"
    )
    try:
        probe = copy.deepcopy(layer)
        probe.eval()
        with torch.no_grad():
            weight = probe.weight.detach().clone()
            want = 0.5 * weight
            probe.weight = want.clone()
            got = probe.weight.detach()
    except Exception as err:  # no right_inverse, a copy that fails, dtypes that do not match, ...
        return f"its weight is parametrized by {names}, which cannot be assigned a weight ({err}). {advice}"
    if got.shape != want.shape or not (_relative(got, want) <= _tolerance(want.dtype)):
        return (
            f"its weight is parametrized by {names}, which cannot represent an arbitrary weight (assigning 0.5·W "
            f"and reading it back does not give 0.5·W, e.g. it normalizes the weight itself). {advice}"
        )
    return None


def _plain_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` without the weight's parametrization, holding the computed (eval) weight as a parameter."""
    if _reparametrization(layer) == "parametrize":
        # Not parametrize.remove_parametrizations on a deep copy: the copy shares the layer's generated class, and
        # removing deletes the property from that class, i.e. from the layer too. Re-class the copy instead.
        with eval_mode(layer), torch.no_grad():
            values = {name: (getattr(layer, name).detach().clone(), name) for name in layer.parametrizations}
        plain = copy.deepcopy(layer)
        originals = plain.parametrizations
        del plain._modules["parametrizations"]
        object.__setattr__(plain, "__class__", type(layer).__bases__[0])
        for name, (value, _) in values.items():
            grad = any(p.requires_grad for p in originals[name].parameters())
            plain._parameters[name] = nn.Parameter(value, requires_grad=grad)
        return plain
    # Legacy weight_norm: `weight` is a plain attribute computed from weight_g and weight_v (not deep-copyable).
    memo = {id(layer.weight): layer.weight.detach().clone()}
    plain = copy.deepcopy(layer, memo)
    torch.nn.utils.remove_weight_norm(plain)
    return plain


def _computed_weight(layer: nn.Module) -> Tensor:
    with eval_mode(layer), torch.no_grad():
        if _reparametrization(layer) == "parametrize":
            return layer.weight.detach().clone()
        hook = _legacy_hook(layer, _LegacyWeightNorm)
        return hook.compute_weight(layer).detach().clone()


def _write_through(
    module: nn.Module,
    layer: nn.Module,
    bn: _BatchNorm | None,
    new: Tensor,
    result: ClipResult,
    dense: bool,
    input_shape: Sequence[int] | None,
    mode: str,
    tol: float,
    seed: int,
) -> ClipResult:
    """Write the clipped weight ``new`` through ``layer``'s parametrization, verify it, measure the layer."""
    if _reparametrization(layer) == "parametrize":
        holder = layer.parametrizations["weight"]
        saved = {name: t.detach().clone() for name, t in (*holder.named_parameters(), *holder.named_buffers())}
        tensors = dict((*holder.named_parameters(), *holder.named_buffers()))
        old_attr = None
    else:
        hook = _legacy_hook(layer, _LegacyWeightNorm)
        tensors = {"g": layer.weight_g, "v": layer.weight_v}
        saved = {name: t.detach().clone() for name, t in tensors.items()}
        old_attr = layer.weight

    def restore() -> None:
        with torch.no_grad():
            for name, t in tensors.items():
                if t.shape == saved[name].shape and t.dtype == saved[name].dtype:
                    t.copy_(saved[name])
                else:
                    t.set_(saved[name])
            if old_attr is not None:
                layer.weight = old_attr

    try:
        with torch.no_grad():
            if old_attr is None:
                layer.weight = new.clone()  # calls right_inverse; the originals stay the same Parameter objects
            else:
                tensors["v"].copy_(new.to(tensors["v"].dtype))
                tensors["g"].copy_(torch.norm_except_dim(new, 2, hook.dim).to(tensors["g"].dtype))
                layer.weight = hook.compute_weight(layer).detach()  # what the hook sets before each forward
        got = _computed_weight(layer)
        defect = _relative(got, new)
        if got.shape != new.shape or not defect <= _tolerance(new.dtype):
            raise RuntimeError(
                f"writing the clipped weight of {type(layer).__name__} through its parametrization did not give "
                f"it back (relative difference {defect:.3g}); the layer was restored as it was"
            )
        if dense:
            row_scale = batchnorm_scale(bn) if bn is not None else None
            after = _dense_sigma(got, row_scale)
            fresh = None
        else:
            assert input_shape is not None
            init = result.spectrum.right if result.spectrum is not None else None
            k = 1 if init is None else init.shape[0]
            fresh = spectrum(module, input_shape, k=k, init=init, tol=tol / 10, check_affine=False, seed=seed)
            after = fresh.sigma
    except BaseException:
        restore()
        raise
    return dataclasses.replace(result, after=after, converged=_within(after, result.target, mode, tol), spectrum=fresh)


def check_clippable(module: Clippable, input_shape: Sequence[int] | None = None, *, param: str | None = None) -> None:
    """Check, without changing anything, that :func:`clip_spectral_norm_` can clip ``module``; raise if not.

    Refused are: a weight computed by a parametrization that cannot represent an arbitrary weight
    (``torch.nn.utils.parametrizations.spectral_norm`` and the legacy ``torch.nn.utils.spectral_norm``: they
    divide by their own σ estimate at every forward; any parametrization whose ``right_inverse`` does not round
    trip ``0.5·W``, probed on a copy in eval mode), BatchNorm without running statistics or affine weight,
    modules with no weight to move, and, when ``input_shape`` is given, modules that are not linear in the
    weight a clip would move (probed on random inputs, see
    :meth:`~lightning_specclip.ImplicitLinear.check_linear_in`; standard layers are linear by construction and
    not probed). Weight-normalized layers (new and legacy ``weight_norm``) pass: they are clipped through the
    parametrization. Parameters, buffers and training modes of ``module`` are left exactly as they were.

    Args:
        module: what would be clipped: a layer, a ``Sequential(layer, batchnorm)`` or a ``(layer, batchnorm)`` pair.
        input_shape: the shape of one input without the batch dimension; when given, linearity in the weight is
            probed too (it needs inputs).
        param: the weight :func:`clip_spectral_norm_` would be told to move, for other modules.

    Raises:
        NotLinearInWeightError: the module is not linear in its weight (only probed with ``input_shape``).
        ValueError: any other reason the module cannot be clipped; the message says why and what to do.

    Example:
        >>> from torch.nn.utils import parametrizations
        >>> check_clippable(parametrizations.weight_norm(nn.Linear(4, 3)))  # clipped through weight_norm
        >>> check_clippable(parametrizations.spectral_norm(nn.Linear(4, 3)))
        Traceback (most recent call last):
        ...
        ValueError: cannot clip ParametrizedLinear: its weight is parametrized by _SpectralNorm, which cannot ...
    """
    try:
        module = _as_module(module)
    except TypeError as err:
        raise ValueError(str(err)) from err
    if isinstance(module, _BatchNorm):
        batchnorm_scale(module)  # raises without running statistics
        if module.weight is None:
            raise ValueError(f"{type(module).__name__} has affine=False: it has no weight to clip")
        return
    pair = _layer_and_bn(module) if param is None else None
    if pair is not None:
        layer, bn = pair
        problem = _reparametrization_problem(layer)
        if problem is not None:
            raise ValueError(f"cannot clip {type(layer).__name__}: {problem}")
        if bn is not None:
            batchnorm_scale(bn)
        if _reparametrization(layer) is not None:
            with torch.no_grad():
                plain_layer = _plain_copy(layer)
            module = plain_layer if bn is None else nn.Sequential(plain_layer, bn)
            pair = (plain_layer, bn)
    if pair is not None and _dense(pair[0]):
        return
    try:
        name = _default_param(module, param)
    except TypeError as err:
        raise ValueError(str(err)) from err
    if input_shape is not None and linear_part(module) is None:
        ImplicitLinear(module, input_shape, check_affine=False).check_linear_in(name)
