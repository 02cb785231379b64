"""Clips through how a weight is computed: ``weight_norm`` (new and legacy) written through, the rest refused.

Parametrized weights (``torch.nn.utils.parametrizations.weight_norm``, the legacy hook-based
``torch.nn.utils.weight_norm``) are clipped through the parametrization: a plain copy of the layer is clipped and
the result assigned back (``right_inverse``), then read back and compared. Parametrizations that cannot represent
an arbitrary weight (``spectral_norm``) and layers that are not linear in their weight (weight standardization)
are refused before anything is written; :func:`check_clippable` tells in advance.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

from lightning_specclip.spectral.clip.base import (
    Clippable,
    ClipResult,
    ClipSettings,
    as_module,
    batchnorm_scale,
    default_param,
    layer_and_bn,
    within,
)
from lightning_specclip.spectral.clip.dense import dense_sigma, is_dense
from lightning_specclip.spectral.closed_form import linear_part
from lightning_specclip.spectral.modes import eval_mode
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.spectrum import Spectrum, spectrum

_Hook = TypeVar("_Hook", _LegacyWeightNorm, _LegacySpectralNorm)

__all__ = [
    "check_clippable",
    "computed_weight",
    "plain_copy",
    "reparametrization",
    "reparametrization_problem",
    "write_through",
]


def _legacy_hook(layer: nn.Module, kind: type[_Hook]) -> _Hook | None:
    """The legacy ``weight_norm``/``spectral_norm`` forward pre-hook of ``layer.weight``, if it has one."""
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, kind) and getattr(hook, "name", None) == "weight":
            return hook
    return None


def reparametrization(layer: nn.Module) -> str | None:
    """``"parametrize"`` (torch.nn.utils.parametrize), ``"legacy_weight_norm"``, or ``None`` for a plain weight."""
    if parametrize.is_parametrized(layer, "weight"):
        return "parametrize"
    if _legacy_hook(layer, _LegacyWeightNorm) is not None:
        return "legacy_weight_norm"
    return None


def _tensor(module: nn.Module, name: str) -> Tensor:
    """The tensor attribute ``name`` of ``module`` (a parametrized or hook-computed weight, ``weight_g``, ...)."""
    t = getattr(module, name)
    assert isinstance(t, Tensor)
    return t


def _parametrizations(layer: nn.Module) -> nn.ModuleDict:
    """The ``parametrizations`` container of a layer parametrized with ``torch.nn.utils.parametrize``."""
    container = layer.parametrizations
    assert isinstance(container, nn.ModuleDict)
    return container


def _tolerance(dtype: torch.dtype) -> float:
    """Relative (Frobenius) difference allowed between a weight and its round trip through a parametrization."""
    return 16 * torch.finfo(dtype).eps


def _relative(got: Tensor, want: Tensor) -> float:
    diff = float((got.to(torch.float64) - want.to(torch.float64)).norm())
    return diff / max(float(want.to(torch.float64).norm()), 1e-300)


def reparametrization_problem(layer: nn.Module) -> str | None:
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
    chain = _parametrizations(layer)["weight"]
    assert isinstance(chain, nn.ModuleList)  # a ParametrizationList
    names = ", ".join(type(p).__name__ for p in chain)
    advice = (
        "Remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')) or "
        "track the layer only"
    )
    try:
        probe = copy.deepcopy(layer)
        probe.eval()
        with torch.no_grad():
            weight = _tensor(probe, "weight").detach().clone()
            want = 0.5 * weight
            probe.weight = want.clone()
            got = _tensor(probe, "weight").detach()
    except Exception as err:  # no right_inverse, a copy that fails, dtypes that do not match, ...
        return f"its weight is parametrized by {names}, which cannot be assigned a weight ({err}). {advice}"
    if got.shape != want.shape or not (_relative(got, want) <= _tolerance(want.dtype)):
        return (
            f"its weight is parametrized by {names}, which cannot represent an arbitrary weight (assigning 0.5·W "
            f"and reading it back does not give 0.5·W, e.g. it normalizes the weight itself). {advice}"
        )
    return None


def plain_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` without the weight's parametrization, holding the computed (eval) weight as a parameter."""
    if reparametrization(layer) == "parametrize":
        # Not parametrize.remove_parametrizations on a deep copy: the copy shares the layer's generated class, and
        # removing deletes the property from that class, i.e. from the layer too. Re-class the copy instead.
        with eval_mode(layer), torch.no_grad():
            values = {name: (_tensor(layer, name).detach().clone(), name) for name in _parametrizations(layer)}
        plain = copy.deepcopy(layer)
        originals = _parametrizations(plain)
        del plain._modules["parametrizations"]
        object.__setattr__(plain, "__class__", type(layer).__bases__[0])
        for name, (value, _) in values.items():
            grad = any(p.requires_grad for p in originals[name].parameters())
            plain._parameters[name] = nn.Parameter(value, requires_grad=grad)
        return plain
    # Legacy weight_norm: `weight` is a plain attribute computed from weight_g and weight_v (not deep-copyable).
    weight = _tensor(layer, "weight")
    memo = {id(weight): weight.detach().clone()}
    plain = copy.deepcopy(layer, memo)
    torch.nn.utils.remove_weight_norm(plain)
    return plain


def computed_weight(layer: nn.Module) -> Tensor:
    """The weight ``layer`` computes (eval mode), read back after a write-through."""
    with eval_mode(layer), torch.no_grad():
        if reparametrization(layer) == "parametrize":
            return _tensor(layer, "weight").detach().clone()
        hook = _legacy_hook(layer, _LegacyWeightNorm)
        assert hook is not None  # a layer clipped through a parametrization has one or the other
        return hook.compute_weight(layer).detach().clone()


class _Originals:
    """The tensors a write-through changes (the parametrization's originals, or legacy ``weight_g``/``weight_v`` and
    the ``weight`` attribute the hook sets), saved so that :meth:`restore` puts them back exactly."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.hook: _LegacyWeightNorm | None = None
        self.tensors: dict[str, Tensor]
        if reparametrization(layer) == "parametrize":
            holder = _parametrizations(layer)["weight"]
            self.tensors = dict((*holder.named_parameters(), *holder.named_buffers()))
            self.old_attr: Tensor | None = None
        else:
            self.hook = _legacy_hook(layer, _LegacyWeightNorm)
            self.tensors = {"g": _tensor(layer, "weight_g"), "v": _tensor(layer, "weight_v")}
            self.old_attr = _tensor(layer, "weight")
        self.saved = {name: t.detach().clone() for name, t in self.tensors.items()}

    def assign(self, new: Tensor) -> None:
        """Write ``new`` as the layer's weight through how it is computed."""
        with torch.no_grad():
            if self.hook is None:
                self.layer.weight = new.clone()  # calls right_inverse; the originals stay the same Parameter objects
            else:
                g, v = self.tensors["g"], self.tensors["v"]
                v.copy_(new.to(v.dtype))
                g.copy_(torch.norm_except_dim(new, 2, self.hook.dim).to(g.dtype))
                self.layer.weight = self.hook.compute_weight(self.layer).detach()  # what the hook sets before forward

    def restore(self) -> None:
        """Put every saved tensor back (in place where shape and dtype allow), and the legacy ``weight`` attribute."""
        with torch.no_grad():
            for name, t in self.tensors.items():
                if t.shape == self.saved[name].shape and t.dtype == self.saved[name].dtype:
                    t.copy_(self.saved[name])
                else:
                    t.set_(self.saved[name])  # type: ignore[call-overload]  # set_(Tensor) exists; the stubs miss it
            if self.old_attr is not None:
                self.layer.weight = self.old_attr


def _measure_written(
    module: nn.Module, bn: _BatchNorm | None, got: Tensor, result: ClipResult, dense: bool, settings: ClipSettings
) -> tuple[float, Spectrum | None]:
    """σ₁ of the module with the weight read back (``got``), and the spectrum measured (``None`` for dense layers)."""
    if dense:
        row_scale = batchnorm_scale(bn) if bn is not None else None
        return dense_sigma(got, row_scale), None
    assert settings.input_shape is not None
    init = result.spectrum.right if result.spectrum is not None else None
    k = 1 if init is None else init.shape[0]
    fresh = spectrum(
        module, settings.input_shape, k=k, init=init, tol=settings.tol / 10, check_affine=False, seed=settings.seed
    )
    return fresh.sigma, fresh


def write_through(
    module: nn.Module,
    layer: nn.Module,
    bn: _BatchNorm | None,
    new: Tensor,
    result: ClipResult,
    dense: bool,
    settings: ClipSettings,
) -> ClipResult:
    """Write the clipped weight ``new`` through ``layer``'s parametrization, verify it, measure the module.

    Args:
        module: what was clipped (the layer, or the layer before ``bn``).
        layer: the layer whose weight is parametrized.
        bn: the BatchNorm after it, or ``None``.
        new: the clipped weight (of the plain copy that was clipped).
        result: the plain copy's clip.
        dense: whether the layer is dense (measured by a float64 SVD, else by :func:`~lightning_specclip.spectrum`).
        settings: the clip's settings.

    Returns:
        ClipResult: ``result`` with ``after``, ``converged`` and ``spectrum`` measured on the module as written.

    Raises:
        RuntimeError: the weight read back is not ``new``; the originals are then restored exactly, as on any error.
    """
    originals = _Originals(layer)
    try:
        originals.assign(new)
        got = computed_weight(layer)
        defect = _relative(got, new)
        if got.shape != new.shape or not defect <= _tolerance(new.dtype):
            raise RuntimeError(
                f"writing the clipped weight of {type(layer).__name__} through its parametrization did not give "
                f"it back (relative difference {defect:.3g}); the layer was restored as it was"
            )
        after, fresh = _measure_written(module, bn, got, result, dense, settings)
    except BaseException:
        originals.restore()
        raise
    converged = within(after, result.target, settings.mode, settings.tol)
    return dataclasses.replace(result, after=after, converged=converged, spectrum=fresh)


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
        module = as_module(module)
    except TypeError as err:
        raise ValueError(str(err)) from err
    if isinstance(module, _BatchNorm):
        batchnorm_scale(module)  # raises without running statistics
        if module.weight is None:
            raise ValueError(f"{type(module).__name__} has affine=False: it has no weight to clip")
        return
    pair = layer_and_bn(module) if param is None else None
    if pair is not None:
        layer, bn = pair
        problem = reparametrization_problem(layer)
        if problem is not None:
            raise ValueError(f"cannot clip {type(layer).__name__}: {problem}")
        if bn is not None:
            batchnorm_scale(bn)
        if reparametrization(layer) is not None:
            with torch.no_grad():
                plain_layer = plain_copy(layer)
            module = plain_layer if bn is None else nn.Sequential(plain_layer, bn)
            pair = (plain_layer, bn)
    if pair is not None and is_dense(pair[0]):
        return
    try:
        name = default_param(module, param)
    except TypeError as err:
        raise ValueError(str(err)) from err
    if input_shape is not None and linear_part(module) is None:
        ImplicitLinear(module, input_shape, check_affine=False).check_linear_in(name)
