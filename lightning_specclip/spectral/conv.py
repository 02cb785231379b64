"""What a convolution is, in closed form: its products, its adjoint, its products in the weight, its geometry.

A convolution ``y = conv(x, W)`` is linear in ``x`` and in ``W``. Its adjoint in ``x`` is the kernel autograd runs
for the input gradient (``aten.convolution_backward``), or, at stride 1, a forward convolution with the kernel
flipped and each group's channels swapped (:func:`adjoint_kernel`); its adjoint in ``W`` is the kernel autograd runs
for the weight gradient. A transposed convolution is the adjoint of a plain one. These are the kernels every
closed-form product of the package calls: :func:`~lightning_specclip.spectral.operator.linear_part` and
:func:`~lightning_specclip.spectral.operator.linear_adjoint` (one layer's ``A`` and ``Aᵀ``),
:class:`~lightning_specclip.spectral.power.Grams` (``AᵀA`` of many layers at once) and FastClip's least-squares
rounds (:func:`weight_products`). The circular-convolution helpers (:mod:`~lightning_specclip.spectral.exact`, the
Senderovich and Gram methods) validate their arguments with :func:`conv_geometry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

if TYPE_CHECKING:
    from lightning_specclip.spectral.closed_form import LinearAdjoint, LinearPart
    from lightning_specclip.spectral.operator import ImplicitLinear

__all__ = [
    "CONVS",
    "CONV_TRANSPOSES",
    "adjoint_kernel",
    "conv_adjoint",
    "conv_geometry",
    "conv_part",
    "conv_transpose_adjoint",
    "conv_transpose_part",
    "ints",
    "plain_conv",
    "stride_one_adjoint_padding",
    "weight_products",
]

#: the convolution classes with their functional kernels
CONVS: dict[type[_ConvNd], Callable[..., Tensor]] = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
#: the transposed convolution classes with their functional kernels
CONV_TRANSPOSES: dict[type[_ConvNd], Callable[..., Tensor]] = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


def conv_part(module: _ConvNd, weight: str) -> LinearPart:
    """``x ↦ A x`` of a convolution of an exact class: its own functional call without the bias (every padding mode).

    Args:
        module: the convolution.
        weight: the name of its weight in the mapping the returned function receives.

    Returns:
        LinearPart: ``f(x, tensors)``.

    Example:
        >>> conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        >>> x = torch.ones(1, 1, 4)
        >>> torch.allclose(conv_part(conv, "weight")(x, {"weight": conv.weight}), conv(x))
        True
    """
    # Every Conv*d class defines _conv_forward (_ConvNd does not: the stubs read it as a submodule or a tensor).
    forward = cast(Callable[..., Tensor], module._conv_forward)
    return lambda x, tensors: forward(x, tensors[weight], None)


def conv_transpose_part(module: _ConvTransposeNd, weight: str) -> LinearPart:
    """``x ↦ A x`` of a transposed convolution of an exact class, without the bias.

    Args:
        module: the transposed convolution.
        weight: the name of its weight in the mapping the returned function receives.

    Returns:
        LinearPart: ``f(x, tensors)``.

    Example:
        >>> conv = nn.ConvTranspose1d(1, 1, 3, stride=2, bias=False)
        >>> x = torch.ones(1, 1, 4)
        >>> torch.allclose(conv_transpose_part(conv, "weight")(x, {"weight": conv.weight}), conv(x))
        True
    """
    conv_t, m = CONV_TRANSPOSES[type(module)], module
    args = (m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    return lambda x, tensors: conv_t(x, tensors[weight], None, *args)


def conv_adjoint(module: _ConvNd, weight: str) -> LinearAdjoint | None:
    """``y ↦ Aᵀ y`` of a convolution: the kernel autograd would run for its input gradient, called directly.

    Args:
        module: the convolution (an exact ``Conv*d`` class).
        weight: the name of its weight in the mapping the returned function receives.

    Returns:
        LinearAdjoint | None: ``f(y, tensors, input_shape)``; ``None`` for a padding other than zeros or ``"same"``.

    Example:
        >>> conv = nn.Conv1d(2, 3, 3, stride=2)
        >>> y, x = torch.randn(1, 3, 3), torch.randn(1, 2, 8)
        >>> Aty = conv_adjoint(conv, "weight")(y, {"weight": conv.weight}, (2, 8))
        >>> torch.allclose((Aty * x).sum(), (y * nn.functional.conv1d(x, conv.weight, stride=2)).sum(), atol=1e-5)
        True
    """
    m = module
    if m.padding_mode != "zeros" or m.padding == "same":
        return None
    dims = len(m.kernel_size)
    padding = (0,) * dims if m.padding == "valid" else m.padding
    args = (m.stride, padding, m.dilation, False, (0,) * dims, m.groups, (True, False, False))

    def adjoint(y: Tensor, tensors: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        x = y.new_empty(1).expand(y.shape[0], *shape)  # only its shape is read
        return torch.ops.aten.convolution_backward(y, x, tensors[weight], None, *args)[0]

    return adjoint


def conv_transpose_adjoint(module: _ConvTransposeNd, weight: str) -> LinearAdjoint | None:
    """``y ↦ Aᵀ y`` of a transposed convolution: the plain convolution with its weight.

    Args:
        module: the transposed convolution (an exact ``ConvTranspose*d`` class).
        weight: the name of its weight in the mapping the returned function receives.

    Returns:
        LinearAdjoint | None: ``f(y, tensors, input_shape)``; ``None`` when ``output_padding`` is not below the
        stride (the plain convolution would produce more positions than the input has).

    Example:
        >>> conv = nn.ConvTranspose1d(2, 3, 3, stride=2)
        >>> y, x = torch.randn(1, 3, 9), torch.randn(1, 2, 4)
        >>> Aty = conv_transpose_adjoint(conv, "weight")(y, {"weight": conv.weight}, (2, 4))
        >>> torch.allclose((Aty * x).sum(), (y * (conv(x) - conv.bias.view(1, 3, 1))).sum(), atol=1e-5)
        True
    """
    m = module
    if any(op >= s for op, s in zip(m.output_padding, m.stride, strict=True)):
        return None
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(m.kernel_size) - 1]
    return lambda y, tensors, shape: conv(y, tensors[weight], None, m.stride, m.padding, m.dilation, m.groups)


def plain_conv(A: ImplicitLinear) -> _ConvNd | None:
    """The convolution behind ``A`` if it is an exact convolution class without hooks
    (:attr:`~lightning_specclip.spectral.operator.ImplicitLinear.closed_form`), zero-padded with numeric padding:
    its products (:class:`~lightning_specclip.spectral.power.Grams`) and weight products (:func:`weight_products`)
    are then the bare kernels, called directly. ``None`` otherwise.

    Args:
        A: the operator.

    Returns:
        _ConvNd | None: the convolution, or ``None``.

    Example:
        >>> from lightning_specclip.spectral.operator import ImplicitLinear
        >>> plain_conv(ImplicitLinear(nn.Conv2d(1, 1, 3, padding=1), (1, 4, 4))) is not None
        True
        >>> plain_conv(ImplicitLinear(nn.Conv2d(1, 1, 3, padding="same"), (1, 4, 4))) is None
        True
    """
    m = A.op
    if isinstance(m, _ConvNd) and type(m) in CONVS and A.closed_form:
        if m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return m
    return None


def adjoint_kernel(weight: Tensor, groups: int) -> Tensor:
    """The kernel whose stride-1 convolution (padding :func:`stride_one_adjoint_padding`) is the adjoint of the one
    of ``weight``: each group's input and output channels swapped, the taps reversed.

    Args:
        weight: the kernel ``(c_out, c_in / groups, k_1, ..., k_d)``.
        groups: its convolution's groups.

    Returns:
        Tensor: ``(c_in, c_out / groups, k_1, ..., k_d)``, contiguous.

    Example:
        >>> adjoint_kernel(torch.randn(6, 1, 3, 3), groups=2).shape
        torch.Size([2, 3, 3, 3])
    """
    out_channels, per_group, *taps = weight.shape
    swapped = weight.reshape(groups, out_channels // groups, per_group, *taps).transpose(1, 2)
    flipped = swapped.reshape(groups * per_group, out_channels // groups, *taps).flip(list(range(2, 2 + len(taps))))
    return flipped.contiguous()


def stride_one_adjoint_padding(conv: _ConvNd) -> list[int] | None:
    """The padding ``dilation·(k − 1) − padding`` with which :func:`adjoint_kernel`'s forward convolution is the
    adjoint of ``conv``; ``None`` unless ``conv`` has stride 1 and that padding is not negative.

    Args:
        conv: a zero-padded convolution with numeric padding.

    Returns:
        list[int] | None: the padding per dimension, or ``None``.

    Example:
        >>> stride_one_adjoint_padding(nn.Conv2d(1, 1, 3, padding=1)), stride_one_adjoint_padding(nn.Conv2d(1, 1, 3))
        ([1, 1], [2, 2])
    """
    assert not isinstance(conv.padding, str)  # numeric: a plain convolution's
    padding = [d * (k - 1) - p for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation, strict=True)]
    if all(s == 1 for s in conv.stride) and min(padding) >= 0:
        return padding
    return None


def weight_products(conv: _ConvNd, weight: Tensor, right: Tensor) -> tuple[Callable[[Tensor], Tensor], ...]:
    """``Δ ↦ conv(V, Δ)`` (a convolution is linear in its weight) and its adjoint, the kernel autograd runs for the
    weight gradient, called directly: the products of FastClip's least-squares rounds for a plain convolution.

    Args:
        conv: a zero-padded convolution with numeric padding (:func:`plain_conv`).
        weight: its weight as the operator holds it (only its shape and dtype are read).
        right: the inputs ``V``, ``(k, *input_shape)``.

    Returns:
        tuple[Callable[[Tensor], Tensor], ...]: ``apply(Δ)``, ``(k, *output_shape)``, and ``adjoint(r)``, shaped
        as the weight.

    Example:
        >>> conv = nn.Conv1d(2, 3, 3, padding=1)
        >>> V = torch.randn(2, 2, 5)
        >>> apply, adjoint = weight_products(conv, conv.weight.detach(), V)
        >>> apply(conv.weight.detach()).shape, adjoint(torch.randn(2, 3, 5)).shape
        (torch.Size([2, 3, 5]), torch.Size([3, 2, 3]))
    """
    m = conv
    kernel, zeros = CONVS[type(m)], (0,) * len(m.kernel_size)
    geometry = (m.stride, m.padding, m.dilation)
    mask = (False, True, False)

    def apply(delta: Tensor) -> Tensor:
        return kernel(right, delta, None, *geometry, m.groups)

    def adjoint(r: Tensor) -> Tensor:
        return torch.ops.aten.convolution_backward(r, right, weight, None, *geometry, False, zeros, m.groups, mask)[1]

    return apply, adjoint


def ints(value: int | Sequence[int], d: int, name: str) -> tuple[int, ...]:
    """Broadcast an int or check a sequence of ``d`` ints (a stride, a dilation, an input size).

    Args:
        value: an int or ``d`` ints.
        d: the number of spatial dimensions.
        name: what ``value`` is, for the message.

    Returns:
        tuple[int, ...]: ``d`` ints.

    Raises:
        ValueError: a sequence of another length.

    Example:
        >>> ints(2, 3, "stride"), ints((1, 2), 2, "stride")
        ((2, 2, 2), (1, 2))
    """
    out = (int(value),) * d if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != d:
        raise ValueError(f"{name} must be an int or a sequence of {d} ints for a {d}-D kernel, got {value}")
    return out


def conv_geometry(
    weight: Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Validate the geometry of a circular convolution: ``d, n, s, dil`` (dimensions, input size, stride, dilation).

    Args:
        weight: the kernel ``(c_out, c_in / groups, k_1, ..., k_d)``.
        input_size: spatial input size (an int for every dimension, or ``d`` ints).
        stride: stride per dimension; must divide ``input_size``.
        dilation: dilation per dimension.
        groups: convolution groups; must divide ``c_out``.

    Returns:
        tuple: ``(d, n, s, dil)``.

    Raises:
        ValueError: not a kernel, sizes not positive, ``groups`` not dividing ``c_out``, or a stride that does not
            divide the input size.

    Example:
        >>> conv_geometry(torch.zeros(4, 2, 3, 3), 8, 2, 1, 1)
        (2, (8, 8), (2, 2), (1, 1))
    """
    if not isinstance(weight, Tensor) or weight.dim() < 3:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be a convolution kernel (c_out, c_in / groups, k_1, ..., k_d) with d >= 1, got {shape}"
        )
    d = weight.dim() - 2
    n = ints(input_size, d, "input_size")
    s = ints(stride, d, "stride")
    dil = ints(dilation, d, "dilation")
    if any(v <= 0 for v in (*n, *s, *dil)) or groups <= 0:
        raise ValueError(
            f"input_size, stride, dilation and groups must be positive, got input_size={n}, stride={s}, "
            f"dilation={dil}, groups={groups}"
        )
    if weight.shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide c_out={weight.shape[0]}")
    if any(nj % sj for nj, sj in zip(n, s, strict=True)):
        raise ValueError(
            f"the stride must divide the input size for the circular block structure, got input_size={n}, stride={s}"
        )
    return d, n, s, dil
