"""The linear part ``x ↦ module(x) − module(0)`` of a standard layer and its adjoint, in closed form.

For ``Linear``, convolutions (:mod:`~lightning_specclip.spectral.conv`), BatchNorm with running statistics,
``Identity`` and ``Sequential`` containers of these, the map and its adjoint are the layers' own kernels without
their biases: no call of the module, no autograd graph. :class:`~lightning_specclip.spectral.operator.ImplicitLinear`
uses them where they exist and runs the module itself elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lightning_specclip.spectral.conv import (
    CONV_TRANSPOSES,
    CONVS,
    conv_adjoint,
    conv_part,
    conv_transpose_adjoint,
    conv_transpose_part,
)

__all__ = ["LinearAdjoint", "LinearPart", "hooked", "linear_adjoint", "linear_part"]

#: x ↦ A x of a module, computed from a mapping of its parameter and buffer names to the tensors to use
LinearPart = Callable[[Tensor, Mapping[str, Tensor]], Tensor]
#: y ↦ Aᵀ y, from the same mapping and the shape of one input of A (without the batch dimension)
LinearAdjoint = Callable[[Tensor, Mapping[str, Tensor], tuple[int, ...]], Tensor]

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def hooked(module: nn.Module) -> bool:
    """Whether forward hooks (the module's own or global ones) could change what the module computes."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks
    )


def linear_part(module: nn.Module, prefix: str = "") -> LinearPart | None:
    """The linear part ``x ↦ module(x) − module(0)`` (eval mode) of a standard layer, in closed form.

    For ``Linear``, ``Conv*d`` (every padding mode), ``ConvTranspose*d``, ``BatchNorm*d`` with running
    statistics, ``Identity``, and ``Sequential`` containers of these, the map is the layer's own functional
    call without its bias: no ``op(0)`` to compute and subtract, and none of the overhead of swapping tensors
    into the module. Only exact classes qualify (a subclass may override ``forward``), and only modules
    without forward hooks; anything else returns ``None`` and is run as the module itself.

    Args:
        module: the module.
        prefix: prefix of the module's tensor names in the mapping the returned function receives.

    Returns:
        LinearPart | None: ``f(x, tensors)`` computing ``A x`` from the named tensors, or ``None``.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> part = linear_part(lin)
        >>> torch.allclose(part(torch.eye(3), dict(lin.named_parameters())), lin.weight.T)
        True
    """
    if hooked(module):
        return None
    kind = type(module)
    weight = prefix + "weight"
    if kind is nn.Identity:
        return lambda x, tensors: x
    if kind is nn.Linear:
        return lambda x, tensors: F.linear(x, tensors[weight])
    if isinstance(module, _ConvTransposeNd) and kind in CONV_TRANSPOSES:
        return conv_transpose_part(module, weight)
    if isinstance(module, _ConvNd) and kind in CONVS:
        return conv_part(module, weight)
    if isinstance(module, _BatchNorm) and kind in _BATCHNORM and module.running_var is not None:
        var, affine, eps = prefix + "running_var", module.affine, module.eps

        def batchnorm(x: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
            module._check_input_dim(x)
            scale = (tensors[var] + eps).rsqrt()
            if affine:
                scale = scale * tensors[weight]
            return x * scale.view(1, -1, *[1] * (x.dim() - 2))

        return batchnorm
    if kind is nn.Sequential:
        found = [linear_part(child, f"{prefix}{name}.") for name, child in module.named_children()]
        parts = [part for part in found if part is not None]
        if len(parts) != len(found):
            return None

        def chain(x: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
            for part in parts:
                x = part(x, tensors)
            return x

        return chain
    return None


def linear_adjoint(module: nn.Module, prefix: str = "") -> LinearAdjoint | None:
    """The adjoint ``y ↦ Aᵀ y`` of :func:`linear_part`, in closed form: no autograd graph, no backward pass.

    A convolution's adjoint is the kernel autograd would run for its input gradient
    (``aten.convolution_backward``), a transposed convolution's is the plain convolution, ``Linear``'s is the
    product with the weight, BatchNorm's is itself; a ``Sequential`` runs its children's adjoints in reverse.
    Covered: what :func:`linear_part` covers, except convolutions whose padding is not zeros or is given as
    ``"same"``, and transposed convolutions whose ``output_padding`` is not below the stride; for these (and
    anything else) the result is ``None`` and the caller differentiates :func:`linear_part` instead.

    Args:
        module: the module.
        prefix: prefix of the module's tensor names in the mapping the returned function receives.

    Returns:
        LinearAdjoint | None: ``f(y, tensors, input_shape)`` computing ``Aᵀ y`` for a batch ``y`` of outputs,
        where ``input_shape`` is the shape of one input of ``A``; or ``None``.

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        >>> tensors = dict(conv.named_parameters())
        >>> y = torch.randn(1, 3, 4, 4)
        >>> x = torch.randn(1, 2, 8, 8)
        >>> Aty = linear_adjoint(conv)(y, tensors, (2, 8, 8))
        >>> torch.allclose((Aty * x).sum(), (y * linear_part(conv)(x, tensors)).sum(), atol=1e-4)
        True
    """
    part = linear_part(module, prefix)
    if part is None:
        return None
    kind = type(module)
    weight = prefix + "weight"
    if kind is nn.Identity or kind in _BATCHNORM:  # diagonal maps are their own adjoints
        return lambda y, tensors, shape: part(y, tensors)
    if kind is nn.Linear:
        return lambda y, tensors, shape: y @ tensors[weight]
    if isinstance(module, _ConvTransposeNd) and kind in CONV_TRANSPOSES:
        return conv_transpose_adjoint(module, weight)
    if isinstance(module, _ConvNd) and kind in CONVS:
        return conv_adjoint(module, weight)
    # A Sequential: the children's adjoints in reverse, each given the shape of its own input.
    children = [
        (linear_part(child, f"{prefix}{name}."), linear_adjoint(child, f"{prefix}{name}."))
        for name, child in module.named_children()
    ]
    closed = [(part, adjoint) for part, adjoint in children if part is not None and adjoint is not None]
    if len(closed) != len(children):
        return None
    shapes: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # input shape -> the input shape of every child

    def chain_adjoint(y: Tensor, tensors: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        if shape not in shapes:
            x, inputs = torch.zeros((1, *shape), dtype=y.dtype, device=y.device), []
            with torch.no_grad():
                for forward, _ in closed:
                    inputs.append(tuple(x.shape[1:]))
                    x = forward(x, tensors)
            shapes[shape] = inputs
        for (_, adjoint), child_shape in zip(reversed(closed), reversed(shapes[shape]), strict=True):
            y = adjoint(y, tensors, child_shape)
        return y

    return chain_adjoint
