"""Clip (or set) the spectral norm of an affine layer in place: FastClip for any implicitly linear layer.

The paper's FastClip moves the weights so that the layer maps its top right singular vector ``v`` to
``(c/σ)·A v``. Here that idea is made robust for convolutions, where the published fixed-step gradient
update diverges:

* every round takes a *block* of the top right singular vectors ``V`` (all those above the target among
  them) and solves the least-squares problem ``min_Δ ‖A_{W+Δ} V − T‖`` for the weight change ``Δ``, where
  ``T`` maps each ``vᵢ`` to ``min(σᵢ, c)·uᵢ``. The problem is linear in ``Δ`` and is solved by conjugate
  gradients on the normal equations (CGLS, started from ``Δ = 0``, so it returns a small change); its
  residual never grows, so a round cannot diverge.
* rounds repeat (with warm-started spectra) until ``σ₁`` is within ``tol`` of the target. Whatever is left
  after ``max_rounds`` is removed by scaling the weight by ``c/σ₁`` (the map is linear in the weight), so
  the result always lands on the target; ``ClipResult.rescaled`` says when this fallback ran.

Dense layers (``Linear``, and ``Linear`` followed by ``BatchNorm1d``) are clipped exactly in one call by an
SVD of the (composed) weight matrix; ``BatchNorm`` alone by clamping ``|γᵢ|/√(varᵢ+ε)`` (Gouk et al., 2021).

The module is only written once, at the end, after every value was checked to be finite: if anything fails
the weights are exactly as they were.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.spectrum import Spectrum, spectrum

__all__ = ["MODES", "ClipResult", "batchnorm_scale", "clip_spectral_norm_"]

MODES = ("clip", "set")

Clippable = nn.Module | tuple[nn.Module, nn.Module]


@dataclass
class ClipResult:
    """What :func:`clip_spectral_norm_` did.

    Attributes:
        before: spectral norm before the call.
        after: spectral norm after the call (measured on the written weights).
        target: the requested value.
        rounds: least-squares rounds run (0 for the exact dense, BatchNorm and no-op cases).
        converged: whether ``after`` is within ``tol`` of the target (``after ≤ target·(1+tol)`` in clip mode).
        rescaled: whether the final scaling by ``target/σ₁`` was needed to land on the target.
        spectrum: top singular vectors of the clipped map (a warm start for the next call), if computed.
    """

    before: float
    after: float
    target: float
    rounds: int
    converged: bool
    rescaled: bool = False
    spectrum: Spectrum | None = None


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
    dtype = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    scale = (bn.running_var.to(dtype) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    return scale


def _check_args(target: float, mode: str, tol: float) -> float:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    try:
        target = float(target)
    except (TypeError, ValueError) as err:
        raise ValueError(f"target must be a positive finite number, got {target!r}") from err
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target must be a positive finite number, got {target!r}")
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
    factor = (target / scale.abs()).clamp(max=1.0)
    if mode == "set" and before < target:
        factor[scale.abs().argmax()] = target / before
    gamma = bn.weight.detach().to(scale.dtype) * factor
    _write(bn.weight, gamma)
    after = float(batchnorm_scale(bn).abs().max())
    return ClipResult(before, after, target, 0, _within(after, target, mode, tol))


def _within(sigma: float, target: float, mode: str, tol: float) -> bool:
    if mode == "clip":
        return sigma <= target * (1 + tol)
    return abs(sigma / target - 1) <= tol


def _clip_dense(layer: nn.Linear, bn: _BatchNorm | None, target: float, mode: str, tol: float) -> ClipResult:
    dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
    weight = layer.weight.detach().to(dtype)
    row_scale = batchnorm_scale(bn).to(dtype) if bn is not None else None
    matrix = weight if row_scale is None else row_scale[:, None] * weight
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    before = float(S[0])
    if mode == "set" and before == 0.0:
        raise ValueError("the layer's weight is zero: its spectral norm cannot be set")
    if mode == "clip" and before <= target:  # nothing to do: leave the weights exactly as they are
        return ClipResult(before, before, target, 0, True)
    new_s = _clip_values(S, target, mode)
    clipped = (U * new_s) @ Vh
    if row_scale is not None:
        # Rows with a zero BatchNorm scale contribute nothing to the map: keep them as they were.
        nonzero = row_scale != 0
        clipped = torch.where(nonzero[:, None], clipped / torch.where(nonzero, row_scale, 1)[:, None], weight)
    _write(layer.weight, clipped)
    after = float(new_s.max())
    if layer.weight.dtype != dtype:  # rounding to the module's dtype moved the norm a little: measure that
        written = layer.weight.detach().to(dtype)
        after = float(torch.linalg.matrix_norm(written if row_scale is None else row_scale[:, None] * written, 2))
    return ClipResult(before, after, target, 0, _within(after, target, mode, tol))


def _cgls(A: ImplicitLinear, param: str, right: Tensor, rhs: Tensor, iters: int) -> Tensor:
    """Least-squares weight change ``Δ`` with ``A_Δ V ≈ rhs`` (the map is linear in the weight), by CGLS."""
    tensors = A.tensors

    def apply(delta: Tensor) -> Tensor:
        return A.apply(right, {**tensors, param: delta})

    delta = torch.zeros_like(tensors[param])
    _, vjp = torch.func.vjp(apply, delta)
    residual = rhs.clone()
    (grad,) = vjp(residual)
    direction = grad.clone()
    gamma = grad.pow(2).sum()
    for _ in range(iters):
        if gamma <= 0:
            break
        image = apply(direction)
        denom = image.pow(2).sum()
        if denom <= 0:
            break
        step = gamma / denom
        delta = delta + step * direction
        residual = residual - step * image
        (grad,) = vjp(residual)
        gamma_new = grad.pow(2).sum()
        direction = grad + (gamma_new / gamma) * direction
        gamma = gamma_new
    return delta


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
) -> ClipResult:
    weight = module.get_parameter(param)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    work = weight.detach().to(dtype).clone()
    A = ImplicitLinear(module, input_shape, dtype=dtype, overrides={param: work})
    block = max(1, min(block_size, A.in_features - 1))
    extra = min(4, A.in_features - block)  # random vectors beside the warm start, so no new top is missed
    if init is not None:
        init = init.reshape(-1, *A.input_shape)[:block]

    # Every measurement stops at a residual ‖AᵀA v − σ²v‖ ≤ tol·σ₁²: its σ is then within tol/2 of a singular
    # value (in practice far closer: the error of a Ritz value is about the squared residual over the gap),
    # and the decisions below leave a margin of tol/4 on the target, so what is written is within tol.
    def measure(start: Tensor | None, round_seed: int, k: int, extra_: int) -> Spectrum:
        return spectrum(A, k=k, init=start, block_size=k + extra_, tol=tol, seed=round_seed)

    # A warm start needs no random vectors beside it here: the cold final measurement below decides what is
    # written, and a warm "already below the target" is confirmed cold before the weights are left alone.
    warm = init is not None
    current = measure(init, seed, block, 0 if warm else extra)
    if mode == "clip" and warm and current.sigma <= target * (1 + tol / 4):
        current = measure(None, seed, block, extra)
    before = current.sigma
    if mode == "set" and before == 0.0:
        raise ValueError("the layer's linear map is zero: its spectral norm cannot be set")
    if mode == "clip" and before <= target * (1 + tol / 4):  # nothing to do: the weights stay as they are
        return ClipResult(before, before, target, 0, True, False, current)
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
        delta = _cgls(A, param, current.right[moving], rhs[moving], cg_iters)
        if not torch.isfinite(delta).all():
            raise RuntimeError("the least-squares step produced non-finite values; the module was left unchanged")
        work.add_(delta)
        rounds += 1
        fresh = rounds < max_rounds
        if not fresh:  # the last round: the final check below measures its result
            break
        current = measure(current.right, seed + rounds, block, 0)  # direction finding: the final check decides
    # A cold start (random vectors only) for the final measurement: a warm start can miss a new top.
    final = measure(None, seed + rounds + 1, 1, extra)
    if fresh and current.sigma > final.sigma:
        final = current
    # The map is linear in the weight: scaling it lands σ₁ on the target from either side, and scales the
    # whole spectrum by the same factor (same singular vectors), so nothing needs measuring again.
    rescaled = not _within(final.sigma, target, "set", tol / 4)
    if rescaled:
        factor = target / final.sigma
        work.mul_(factor)
        final = dataclasses.replace(final, values=final.values * factor)
    backup = weight.detach().clone()
    _write(weight, work)
    if weight.dtype != dtype:  # rounding to the module's dtype moves the norm a little: measure that
        try:
            final = spectrum(module, input_shape, k=1, init=final.right[:1], tol=tol / 10, seed=seed)
        except BaseException:
            with torch.no_grad():
                weight.copy_(backup)
            raise
    return ClipResult(before, final.sigma, target, rounds, _within(final.sigma, target, mode, tol), rescaled, final)


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
    * any other module that is linear in one weight: the same, naming the weight with ``param``.

    Args:
        module: the layer, a ``Sequential(layer, batchnorm)``, or a ``(layer, batchnorm)`` pair.
        target: the spectral norm to clip to (``> 0``).
        input_shape: shape of one input without the batch dimension (required for convolutions: their
            spectrum depends on it; ignored for dense layers and BatchNorm).
        mode: ``"clip"`` lowers a norm above ``target`` to it and leaves a smaller one alone; ``"set"``
            makes the norm equal to ``target`` from either side.
        spectrum: a :class:`~lightning_specclip.Spectrum` (or just its ``.right`` vectors, ``(j, *input_shape)``)
            from :func:`~lightning_specclip.spectrum` or a previous result, to warm-start from.
        tol: relative tolerance on the final norm.
        max_rounds: least-squares rounds before the exact-scaling fallback.
        block_size: singular vectors handled per round.
        cg_iters: conjugate-gradient iterations per round.
        param: name of the weight to move, for modules other than the supported ones.
        seed: seed of the random starting vectors (results are deterministic for a seed).

    Returns:
        ClipResult: norms before and after, rounds, whether it converged or needed the fallback.

    Raises:
        ValueError: ``target`` or ``tol`` not positive and finite; unknown ``mode``; non-finite weights;
            missing ``input_shape`` for a convolution; a BatchNorm without running statistics or weight.
        TypeError: an unsupported module without ``param``.
        RuntimeError: the computation produced non-finite values (the weights are then left unchanged).

    Example:
        >>> conv = nn.Conv2d(4, 4, 3, padding=1)
        >>> result = clip_spectral_norm_(conv, 0.5, (4, 8, 8))
        >>> result.converged, round(result.after, 2)
        (True, 0.5)
    """
    with torch.inference_mode(False):  # autograd is needed even inside Lightning's validation/test loops
        return _clip(module, target, input_shape, mode, spectrum, tol, max_rounds, block_size, cg_iters, param, seed)


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
) -> ClipResult:
    target = _check_args(target, mode, tol)
    module = _as_module(module)
    _check_finite(module)
    if isinstance(module, _BatchNorm):
        return _clip_batchnorm(module, target, mode, tol)
    pair = _layer_and_bn(module)
    if param is None and pair is not None and isinstance(pair[0], nn.Linear):
        return _clip_dense(pair[0], pair[1], target, mode, tol)
    param = _default_param(module, param)
    if input_shape is None:
        raise ValueError(
            f"input_shape is required to clip {type(module).__name__}: the spectrum of a convolution depends "
            f"on the input size (pass the shape of one input without the batch dimension, e.g. (C, H, W))"
        )
    init = spectrum.right if isinstance(spectrum, Spectrum) else spectrum
    return _clip_iterative(module, param, target, input_shape, mode, init, tol, max_rounds, block_size, cg_iters, seed)
