"""What every clip shares: its settings, its result, the layers it knows, and the checks before anything is written."""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.spectrum import Spectrum

__all__ = ["MODES", "ClipResult", "ClipSettings", "Clippable", "batchnorm_scale"]

#: what a clip does with the target: ``"clip"`` lowers σ₁ to it, ``"set"`` makes σ₁ equal to it
MODES = ("clip", "set")

#: what can be clipped: a module, or a ``(layer, batchnorm)`` pair whose composition is clipped
Clippable = nn.Module | tuple[nn.Module, nn.Module]


@dataclass(frozen=True, eq=False)
class ClipSettings:
    """What one clip of one map is asked to do: the options of :func:`clip_spectral_norm_`, travelling together.

    The public functions take these as keyword arguments and build one per module; the paths of a clip (dense SVD,
    BatchNorm clamp, least-squares rounds, write-through) read what they need from it. Checked where the clip starts
    (``target``, ``mode``, ``tol``), not on construction.

    Attributes:
        target: the spectral norm to clip (or set) to.
        input_shape: the shape of one input without the batch dimension (``None`` where none is needed).
        mode: one of :data:`MODES`.
        warm: warm start of the least-squares rounds: a :class:`~lightning_specclip.Spectrum` or its right vectors.
        tol: relative tolerance on the final norm.
        max_rounds: least-squares rounds before the exact-scaling fallback.
        block_size: singular vectors handled per round.
        cg_iters: conjugate-gradient iterations per round.
        param: the name of the weight to move, for modules other than the supported ones.
        seed: seed of the random starting vectors.

    Example:
        >>> settings = ClipSettings(0.5, (4, 8, 8))
        >>> settings.mode, settings.tol, settings.max_rounds
        ('clip', 0.01, 6)
    """

    target: float
    input_shape: Sequence[int] | None = None
    mode: str = "clip"
    warm: Spectrum | Tensor | None = None
    tol: float = 1e-2
    max_rounds: int = 6
    block_size: int = 8
    cg_iters: int = 10
    param: str | None = None
    seed: int = 0


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


@dataclass(frozen=True)
class Certify:
    """A gap-free measurement of σ₁ that a clip waits for (answered by :func:`~.lockstep.run_clips`)."""

    A: ImplicitLinear
    tol: float
    seed: int
    left: bool = False


#: a clip in progress: yields the measurements it needs, is sent their results, returns what it did
Steps = Generator[Certify, Spectrum, ClipResult]


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
    return batchnorm_scale_with(bn, None if bn.weight is None else bn.weight.detach())


def batchnorm_scale_with(bn: _BatchNorm, gamma: Tensor | None) -> Tensor:
    """The scales of ``bn`` (which has running statistics) with ``gamma`` in place of its weight (``None``: no
    affine weight)."""
    var = bn.running_var
    assert var is not None  # callers check (batchnorm_scale raises without running statistics)
    dtype = torch.float64 if var.dtype == torch.float64 else torch.float32
    scale = (var.to(dtype) + bn.eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma.to(dtype)
    return scale


def positive_finite(value: object, name: str = "target") -> float:
    """``value`` as a float, or a ``ValueError`` naming it unless it is a positive finite number."""
    try:
        number = float(value)  # type: ignore[arg-type]  # anything float() takes; the rest raises below
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from err
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_settings(settings: ClipSettings) -> float:
    """The target as a float, after checking the mode, the target and the tolerance (in that order)."""
    if settings.mode not in MODES:
        raise ValueError(f"unknown mode {settings.mode!r}; allowed: {', '.join(MODES)}")
    target = positive_finite(settings.target)
    tol = settings.tol
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    return target


def as_module(module: Clippable) -> nn.Module:
    """``module``, or a ``(layer, batchnorm)`` pair as ``Sequential(layer, batchnorm)``; ``TypeError`` otherwise."""
    if isinstance(module, tuple):
        if len(module) != 2 or not all(isinstance(m, nn.Module) for m in module):
            raise TypeError("a pair must be (layer, batchnorm): two nn.Modules")
        return nn.Sequential(*module)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module or a (layer, batchnorm) pair, got {type(module).__name__}")
    return module


def layer_and_bn(module: nn.Module) -> tuple[nn.Module, _BatchNorm | None] | None:
    """``(layer, bn)`` for a bare conv/linear or a two-element ``Sequential(layer, bn)``; else ``None``."""
    if isinstance(module, _ConvNd | nn.Linear):
        return module, None
    if isinstance(module, nn.Sequential) and len(module) == 2:
        layer, bn = module[0], module[1]
        if isinstance(layer, _ConvNd | nn.Linear) and isinstance(bn, _BatchNorm):
            return layer, bn
    return None


def default_param(module: nn.Module, param: str | None) -> str:
    """The name of the weight a clip moves: ``param`` if the module has it, else that of a supported layer."""
    if param is not None:
        try:
            module.get_parameter(param)
        except AttributeError as err:
            names = [n for n, _ in module.named_parameters()]
            raise ValueError(f"param {param!r} is not a parameter of the module; it has: {names}") from err
        return param
    pair = layer_and_bn(module)
    if pair is not None:
        return "weight" if pair[1] is None else "0.weight"
    raise TypeError(
        f"cannot tell which weight of {type(module).__name__} to move: supported are Linear, Conv*d, "
        f"ConvTranspose*d, BatchNorm*d, Sequential(conv or linear, batchnorm) and (conv, batchnorm) pairs; "
        f"for another module that is linear in one of its weights, name it with param="
    )


def check_finite(module: nn.Module) -> None:
    """Refuse a module holding non-finite parameters or buffers."""
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"the module's {name} holds non-finite values; refusing to clip it")


def write(dst: Tensor, src: Tensor) -> None:
    """Copy ``src`` into the weight ``dst`` in place (its dtype), unless ``src`` holds non-finite values."""
    if not torch.isfinite(src).all():
        raise RuntimeError("clipping produced non-finite weights; the module was left unchanged")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def clip_values(values: Tensor, target: float, mode: str) -> Tensor:
    """The singular values a clip aims for: each clamped at the target; in set mode the largest is the target."""
    new = values.clamp(max=target)
    if mode == "set":
        new[0] = target
    return new


def within(sigma: float, target: float, mode: str, tol: float) -> bool:
    """Whether ``sigma`` meets the target: at most ``target·(1 + tol)`` in clip mode, within ``tol`` in set mode."""
    if mode == "clip":
        return sigma <= target * (1 + tol)
    return abs(sigma / target - 1) <= tol
