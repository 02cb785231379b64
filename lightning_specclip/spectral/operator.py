"""The linear map behind an affine layer, applied without ever forming its matrix.

A layer ``f`` that is affine in its input (``Linear``, any convolution, BatchNorm with running statistics,
conv followed by BatchNorm, ...) is ``f(x) = A x + b``. :class:`ImplicitLinear` exposes ``A`` through
``A x = f(x) - f(0)`` and ``Aᵀ y`` through autograd (in closed form for standard layers), for inputs of one
fixed shape (the matrix of a convolution depends on the input size, padding and stride, so the shape is part
of the operator).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

__all__ = [
    "ImplicitLinear",
    "LinearAdjoint",
    "LinearPart",
    "NotLinearInWeightError",
    "eval_mode",
    "linear_adjoint",
    "linear_part",
    "no_autocast",
]

Op = nn.Module | Callable[[Tensor], Tensor]
# x ↦ A x of a module, computed from a mapping of its parameter and buffer names to the tensors to use
LinearPart = Callable[[Tensor, Mapping[str, Tensor]], Tensor]
# y ↦ Aᵀ y, from the same mapping and the shape of one input of A (without the batch dimension)
LinearAdjoint = Callable[[Tensor, Mapping[str, Tensor], tuple[int, ...]], Tensor]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# The rounding noise the linearity probes allow, in units of eps times the norm of the raw outputs involved.
_NOISE = 32


class NotLinearInWeightError(ValueError):
    """A layer is affine in its input but not linear in the weight a clip would move (so it cannot be clipped).

    Raised by :meth:`ImplicitLinear.check_linear_in`, :func:`~lightning_specclip.spectral.clip.check_clippable`
    and :func:`~lightning_specclip.spectral.clip.clip_spectral_norm_` (before anything is written), e.g. for a
    convolution that standardizes its weight in ``forward`` (timm's ``StdConv2d``). Such layers can be tracked.

    Example:
        >>> issubclass(NotLinearInWeightError, ValueError)
        True
    """


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration of the block, then restore each one's flag.

    Args:
        module: the module whose submodules are switched; its ``training`` flags are restored exactly,
            also when the block raises.

    Example:
        >>> bn = nn.BatchNorm1d(3).train()
        >>> with eval_mode(bn):
        ...     bn.training
        False
        >>> bn.training
        True
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# The device types torch.autocast knows; an autocast region of any of them is turned off by no_autocast.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextmanager
def no_autocast() -> Iterator[None]:
    """Turn off every ``torch.autocast`` region the block runs in (the caller's mixed precision), and restore it.

    Spectral math is exact only in the dtype it asks for: under autocast a convolution or a matrix product
    would run in bfloat16 or float16, and mix those results with float32 vectors. Usable as a decorator too.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with no_autocast():
        ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    active = [device for device in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]
    with contextlib.ExitStack() as stack:
        for device in active:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _hooked(module: nn.Module) -> bool:
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
    if _hooked(module):
        return None
    kind = type(module)
    weight = prefix + "weight"
    if kind is nn.Identity:
        return lambda x, tensors: x
    if kind is nn.Linear:
        return lambda x, tensors: F.linear(x, tensors[weight])
    if kind in _CONV:
        return lambda x, tensors: module._conv_forward(x, tensors[weight], None)
    if kind in _CONV_TRANSPOSE:
        conv_t, m = _CONV_TRANSPOSE[kind], module
        args = (m.stride, m.padding, m.output_padding, m.groups, m.dilation)
        return lambda x, tensors: conv_t(x, tensors[weight], None, *args)
    if kind in _BATCHNORM and module.running_var is not None:
        var, affine, eps = prefix + "running_var", module.affine, module.eps

        def batchnorm(x: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
            module._check_input_dim(x)
            scale = (tensors[var] + eps).rsqrt()
            if affine:
                scale = scale * tensors[weight]
            return x * scale.view(1, -1, *[1] * (x.dim() - 2))

        return batchnorm
    if kind is nn.Sequential:
        parts = [linear_part(child, f"{prefix}{name}.") for name, child in module.named_children()]
        if any(part is None for part in parts):
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
    if kind in _CONV:
        m = module
        if m.padding_mode != "zeros" or m.padding == "same":
            return None
        dims = len(m.kernel_size)
        padding = (0,) * dims if m.padding == "valid" else m.padding
        args = (m.stride, padding, m.dilation, False, (0,) * dims, m.groups, (True, False, False))

        def conv_adjoint(y: Tensor, tensors: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
            x = y.new_empty(1).expand(y.shape[0], *shape)  # only its shape is read
            return torch.ops.aten.convolution_backward(y, x, tensors[weight], None, *args)[0]

        return conv_adjoint
    if kind in _CONV_TRANSPOSE:
        m = module
        if any(op >= s for op, s in zip(m.output_padding, m.stride, strict=True)):
            return None  # the plain convolution would produce more positions than the input has
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(m.kernel_size) - 1]
        return lambda y, tensors, shape: conv(y, tensors[weight], None, m.stride, m.padding, m.dilation, m.groups)
    # A Sequential: the children's adjoints in reverse, each given the shape of its own input.
    children = [
        (linear_part(child, f"{prefix}{name}."), linear_adjoint(child, f"{prefix}{name}."))
        for name, child in module.named_children()
    ]
    if any(adjoint is None for _, adjoint in children):
        return None
    shapes: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # input shape -> the input shape of every child

    def chain_adjoint(y: Tensor, tensors: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        if shape not in shapes:
            x, inputs = torch.zeros((1, *shape), dtype=y.dtype, device=y.device), []
            with torch.no_grad():
                for forward, _ in children:
                    inputs.append(tuple(x.shape[1:]))
                    x = forward(x, tensors)
            shapes[shape] = inputs
        for (_, adjoint), child_shape in zip(reversed(children), reversed(shapes[shape]), strict=True):
            y = adjoint(y, tensors, child_shape)
        return y

    return chain_adjoint


def _float_dtype(op: Op, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        return dtype
    if isinstance(op, nn.Module):
        for t in (*op.parameters(), *op.buffers()):
            if t.dtype == torch.float64:
                return torch.float64
    return torch.float32


def _device(op: Op, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(op, nn.Module):
        for t in (*op.parameters(), *op.buffers()):
            return t.device
    return torch.device("cpu")


class ImplicitLinear:
    """The linear part ``A: x ↦ op(x) − op(0)`` of an affine module or function, on inputs of one shape.

    The operator never writes to the module: parameters and buffers are read through detached copies in
    the compute dtype (``torch.func.functional_call``), every submodule is evaluated in eval mode (so
    BatchNorm uses its running statistics and Dropout is the identity) and the original modes are restored
    after each call; no ``.grad`` is left on any parameter. Math runs in ``dtype`` (float32 by default, or
    float64 if the module holds float64 tensors) on the module's device, whatever dtype the module holds.

    Args:
        op: an ``nn.Module`` or a callable mapping a batch ``(B, *input_shape)`` to a tensor ``(B, ...)``.
        input_shape: the shape of one input, without the batch dimension, e.g. ``(3, 32, 32)``.
        dtype: compute dtype; default float32 (float64 when the module holds float64 tensors).
        device: where to compute; default the module's device (CPU for a plain callable).
        check_affine: probe that ``op`` is affine in its input and refuse it otherwise.
        atol: relative tolerance of the affinity probe.
        overrides: tensors used in place of the module's parameters or buffers of the same names (for
            example a float32 working copy of a weight that is being edited); used as given, not copied.

    Raises:
        ValueError: ``input_shape`` is empty or not positive, ``op`` cannot take inputs of that shape,
            returns non-finite values, or is not affine (when ``check_affine``).
        TypeError: ``op`` does not return a tensor.

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> A = ImplicitLinear(conv, (2, 8, 8))
        >>> A.in_features, A.out_features
        (128, 192)
        >>> x = torch.randn(4, 2, 8, 8)
        >>> torch.allclose(A.matvec(x), conv(x) - conv.bias.view(1, 3, 1, 1), atol=1e-6)
        True
    """

    def __init__(
        self,
        op: Op,
        input_shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        check_affine: bool = True,
        atol: float = 1e-3,
        overrides: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not callable(op):
            raise TypeError(f"op must be an nn.Module or a callable, got {type(op).__name__}")
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 0 or any(s <= 0 for s in shape):
            raise ValueError(
                f"input_shape must be a non-empty tuple of positive sizes (without the batch dimension), "
                f"got {tuple(input_shape)}"
            )
        self.op = op
        self.input_shape: tuple[int, ...] = shape
        self.dtype = _float_dtype(op, dtype)
        self.device = _device(op, device)
        self.in_features = math.prod(shape)
        self._tensors: dict[str, Tensor] | None = None
        if isinstance(op, nn.Module):
            self._tensors = {
                name: (t.detach().to(self.dtype) if t.is_floating_point() else t)
                for name, t in (*op.named_parameters(), *op.named_buffers())
            }
            for name, t in (overrides or {}).items():
                if name not in self._tensors:
                    raise ValueError(f"overrides names {name!r}, which is not a parameter or buffer of op")
                self._tensors[name] = t
        elif overrides:
            raise ValueError("overrides need op to be an nn.Module")
        self._part = linear_part(op) if isinstance(op, nn.Module) else None
        self._adjoint = linear_adjoint(op) if isinstance(op, nn.Module) else None
        self._bias: Tensor | None = None
        # Overrides may be edited in place by the caller (a clip's working weight): op(0) can depend on them.
        self._cache_bias = not overrides
        self._output_shape: tuple[int, ...] | None = None
        if check_affine:
            self.check_affine(atol)

    def zeros(self, batch: int) -> Tensor:
        """Return a zero batch ``(batch, *input_shape)`` in the compute dtype and device.

        Args:
            batch: number of inputs.

        Returns:
            Tensor: zeros of shape ``(batch, *input_shape)``.

        Example:
            >>> ImplicitLinear(nn.Linear(3, 2), (3,)).zeros(2).shape
            torch.Size([2, 3])
        """
        return torch.zeros((batch, *self.input_shape), dtype=self.dtype, device=self.device)

    @property
    def bias(self) -> Tensor:
        """``op(0)`` as a batch of one, ``(1, *output_shape)`` (computed on first use; each time with overrides)."""
        if self._bias is not None:
            return self._bias
        with torch.inference_mode(False), torch.no_grad():
            bias = self._call(self.zeros(1))
        if self._cache_bias:
            self._bias = bias
        return bias

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one output, without the batch dimension."""
        if self._output_shape is None:
            with torch.no_grad():
                self._output_shape = tuple(self.apply(self.zeros(1)).shape[1:])
        return self._output_shape

    @property
    def out_features(self) -> int:
        """Number of outputs (the matrix's row count)."""
        return math.prod(self.output_shape)

    def _shape_error(self, err: Exception) -> ValueError:
        shape = ", ".join(map(str, self.input_shape))
        return ValueError(f"op cannot take inputs of shape (batch, {shape}) (input_shape={self.input_shape}): {err}")

    def _call(self, x: Tensor, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        try:
            return self._call_unchecked(x, self._tensors if tensors is None else tensors)
        except (RuntimeError, IndexError) as err:
            raise self._shape_error(err) from err

    def _call_unchecked(self, x: Tensor, tensors: Mapping[str, Tensor] | None) -> Tensor:
        if tensors is not None:
            assert isinstance(self.op, nn.Module)
            with eval_mode(self.op):
                out = torch.func.functional_call(self.op, tensors, (x,))
        else:
            out = self.op(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"op must return a tensor, got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"op must map a batch (B, *input_shape) to (B, ...): input batch {x.shape[0]} gave output "
                f"shape {tuple(out.shape)}"
            )
        if not out.is_floating_point():
            raise TypeError(f"op must return a floating point tensor, got {out.dtype}")
        return out.to(self.dtype)

    @property
    def live(self) -> bool:
        """Whether the operator reads the module's current parameters and buffers themselves (views, not copies).

        Then in-place updates of the weights (an optimizer step, a clip) are seen by the next product and the
        operator can be kept across training steps. ``False`` when the module holds another dtype than the
        compute dtype (the operator holds converted copies), after a parameter was replaced or moved, with
        overrides, and for plain callables.

        Example:
            >>> lin = nn.Linear(3, 2)
            >>> A = ImplicitLinear(lin, (3,))
            >>> A.live, ImplicitLinear(lin.double(), (3,), dtype=torch.float32).live
            (True, False)
        """
        if not isinstance(self.op, nn.Module) or self._tensors is None:
            return False
        current = dict((*self.op.named_parameters(), *self.op.named_buffers()))
        if current.keys() != self._tensors.keys():
            return False
        return all(
            t.data_ptr() == current[name].data_ptr()
            and t.dtype == current[name].dtype
            and t.shape == current[name].shape
            and t.device == current[name].device
            for name, t in self._tensors.items()
            if t.is_floating_point()
        )

    @property
    def closed_form(self) -> bool:
        """Whether ``A`` and ``Aᵀ`` run in closed form (:func:`linear_part`, :func:`linear_adjoint`): no call of
        the module, no autograd graph.

        Example:
            >>> ImplicitLinear(nn.Conv2d(2, 3, 3), (2, 8, 8)).closed_form
            True
            >>> ImplicitLinear(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 8, 8)).closed_form
            False
        """
        return self._adjoint is not None

    @property
    def tensors(self) -> Mapping[str, Tensor]:
        """The module's parameters and buffers as the operator uses them (compute dtype, detached, overrides
        applied), by name; empty for a plain callable."""
        return self._tensors or {}

    def apply(self, x: Tensor, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        """``A x`` for a batch, differentiable (the caller decides about autograd).

        Standard layers (see :func:`linear_part`) are applied in closed form without their bias; any other
        op is run on ``x`` and on a zero input in one batch (samples do not interact in eval mode) and the
        two are subtracted.

        Args:
            x: inputs of shape ``(B, *input_shape)`` in the compute dtype, on the operator's device.
            tensors: tensors to use instead of :attr:`tensors` (e.g. a different weight: ``A`` is linear in
                the weight of a conv, which the clipping solver uses); modules only.

        Returns:
            Tensor: ``A x`` of shape ``(B, *output_shape)``.

        Example:
            >>> conv = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular")
            >>> A = ImplicitLinear(conv, (2, 8))
            >>> x = torch.randn(4, 2, 8)
            >>> torch.allclose(A.apply(x), conv(x) - conv(torch.zeros(1, 2, 8)), atol=1e-6)
            True
        """
        tensors = self._tensors if tensors is None else tensors
        if self._part is not None:
            try:
                return self._part(x, tensors)
            except (RuntimeError, IndexError, ValueError) as err:
                raise self._shape_error(err) from err
        own = tensors is self._tensors
        if own and self._bias is not None:
            return self._call(x) - self._bias
        out = self._call(torch.cat([x, self.zeros(1)]), tensors)  # op(0) rides along in the same batch
        if own and self._cache_bias:  # op(0) of the operator's own tensors does not change: keep it
            self._bias = out[-1:].detach()
        return out[:-1] - out[-1:]

    @no_autocast()
    def matvec(self, x: Tensor) -> Tensor:
        """Apply ``A`` to a batch: ``op(x) − op(0)``.

        Args:
            x: inputs of shape ``(B, *input_shape)``.

        Returns:
            Tensor: ``A x`` of shape ``(B, *output_shape)``.

        Example:
            >>> lin = nn.Linear(3, 2)
            >>> A = ImplicitLinear(lin, (3,))
            >>> torch.allclose(A.matvec(torch.eye(3)), lin.weight.T)
            True
        """
        with torch.no_grad():
            return self.apply(x.to(self.device, self.dtype))

    @no_autocast()
    def rmatvec(self, y: Tensor) -> Tensor:
        """Apply ``Aᵀ`` to a batch of output-shaped tensors (a vector-Jacobian product).

        Args:
            y: tensors of shape ``(B, *output_shape)``.

        Returns:
            Tensor: ``Aᵀ y`` of shape ``(B, *input_shape)``.

        Example:
            >>> lin = nn.Linear(3, 2)
            >>> A = ImplicitLinear(lin, (3,))
            >>> torch.allclose(A.rmatvec(torch.eye(2)), lin.weight)
            True
        """
        if self._adjoint is not None:  # standard layers: the adjoint in closed form
            if tuple(y.shape[1:]) != self.output_shape:
                shape = ", ".join(map(str, self.output_shape))
                raise ValueError(f"Aᵀ takes outputs of shape (batch, {shape}); got {tuple(y.shape)}")
            with torch.no_grad():
                return self._adjoint(y.to(self.device, self.dtype), self.tensors, self.input_shape)
        # inference_mode(False): autograd must work even inside Lightning's validation/test loops.
        with torch.inference_mode(False), torch.enable_grad():
            y = y.to(self.device, self.dtype).clone()
            x = self.zeros(y.shape[0]).requires_grad_(True)
            (g,) = torch.autograd.grad(self.apply(x), x, grad_outputs=y)
        return g

    @no_autocast()
    def gram(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply ``AᵀA`` to a batch with one forward and one backward pass.

        Args:
            x: inputs of shape ``(B, *input_shape)``.

        Returns:
            tuple[Tensor, Tensor]: ``AᵀA x`` (input-shaped) and ``A x`` (output-shaped).

        Example:
            >>> lin = nn.Linear(3, 2)
            >>> g, _ = ImplicitLinear(lin, (3,)).gram(torch.eye(3))
            >>> torch.allclose(g, lin.weight.T @ lin.weight, atol=1e-6)
            True
        """
        if tuple(x.shape[1:]) != self.input_shape:
            raise self._shape_error(ValueError(f"AᵀA got a batch of shape {tuple(x.shape)}"))
        if self._adjoint is not None:  # standard layers: the adjoint in closed form, no autograd graph
            with torch.no_grad():
                y = self.apply(x.to(self.device, self.dtype))
                return self._adjoint(y, self.tensors, self.input_shape), y
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().to(self.device, self.dtype).clone().requires_grad_(True)  # clone: x may be an inference one
            y = self.apply(x)
            (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
        return g, y.detach()

    def _raw(self, x: Tensor, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return self._call(x, tensors)

    def _check_tensors_finite(self) -> None:
        for name, t in self.tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"op's {name} holds non-finite values; it cannot be analysed")

    def check_affine(self, atol: float = 1e-3, seed: int = 0) -> None:
        """Probe that ``op`` is affine: additive and homogeneous around ``op(0)`` on random inputs.

        The probes ``x, y, x + y, −2x`` run in one batch, so ops that mix the batch (BatchNorm with batch
        statistics) fail as well. A defect is allowed up to ``atol`` times the size of the linear part plus the
        rounding noise of the raw outputs it is computed from (``32·eps·‖op(·)‖`` summed over the outputs that
        enter the probe, ``op(0)`` included): a layer whose bias dwarfs its linear part (tiny weights with an
        ordinary bias) loses the linear part to cancellation in ``op(x) − op(0)``, which is rounding, not a
        nonlinearity. Standard layers with a closed form (see :func:`linear_part`) are affine by construction:
        for them only the finiteness of the tensors and the input shape are checked.

        Args:
            atol: largest allowed defect, relative to the size of the linear part's outputs.
            seed: seed of the random probes.

        Raises:
            ValueError: a probe failed (the message names it and the relative defect), or the op returned (or,
                in closed form, holds) non-finite values.

        Example:
            >>> ImplicitLinear(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), (3,), check_affine=False).check_affine()
            Traceback (most recent call last):
            ...
            ValueError: op is not affine in its input: ...
        """
        if self._part is not None:
            self._check_tensors_finite()
            _ = self.output_shape  # one product of a zero input: refuses an input shape the layer cannot take
            return
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x, y = torch.randn((2, *self.input_shape), generator=gen, dtype=self.dtype).to(self.device)
        raw = self._raw(torch.stack([x, y, x + y, -2 * x]))
        zero = self.bias[0]
        if not (torch.isfinite(raw).all() and torch.isfinite(zero).all()):
            raise ValueError("op returned non-finite values on random inputs; it cannot be analysed")
        rx, ry, rxy, r2x = raw
        fx, fy, fxy, f2x = raw - zero
        n = {name: float(t.norm()) for name, t in (("x", rx), ("y", ry), ("xy", rxy), ("2x", r2x), ("0", zero))}
        scale = max(float(fx.norm()), float(fy.norm()))
        noise = _NOISE * torch.finfo(self.dtype).eps
        probes = {
            "op(x+y) − op(0) = (op(x) − op(0)) + (op(y) − op(0))": (
                float((fxy - fx - fy).norm()),
                noise * (n["xy"] + n["x"] + n["y"] + n["0"]),
            ),
            "op(−2x) − op(0) = −2 (op(x) − op(0))": (
                float((f2x + 2 * fx).norm()),
                noise * (n["2x"] + 2 * n["x"] + 3 * n["0"]),
            ),
        }
        for probe, (defect, floor) in probes.items():
            if not defect <= atol * scale + floor:
                raise ValueError(
                    f"op is not affine in its input: the probe {probe} failed on random x, y with relative "
                    f"defect {defect / max(scale, 1e-30):.3g} > {atol:g} (rounding allows {floor:.3g} absolute). "
                    f"Spectra are defined for affine maps only (Linear, convolutions, BatchNorm with running "
                    f"statistics, their compositions); a nonlinearity such as ReLU makes the map non-affine. Pass "
                    f"check_affine=False to skip this check."
                )

    def check_linear_in(self, name: str, atol: float = 1e-3, seed: int = 0) -> None:
        """Probe that the linear part ``A_W`` is linear in the tensor ``name`` (``W``): ``A_{2W} = 2 A_W`` and
        ``A_{W+W'} = A_W + A_{W'}`` on random inputs, with a random ``W'`` of the size of ``W``.

        Clipping moves a weight by least squares and by scaling, which is only right when the map is linear in
        that weight. A layer that transforms its weight before using it (weight standardization, a
        normalization inside ``forward``) is linear in its input but not in its weight: this probe tells. The
        tolerance is that of :meth:`check_affine` (``atol`` relative to the outputs of ``A``, plus the rounding
        noise of the raw outputs they are computed from). Standard layers with a closed form (see
        :func:`linear_part`) are linear in their weight by construction and are not probed.

        Args:
            name: the parameter (or buffer) name, e.g. ``"weight"`` or ``"0.weight"``.
            atol: largest allowed defect, relative to the size of ``A``'s outputs.
            seed: seed of the random probes.

        Raises:
            NotLinearInWeightError: a probe failed; the message names the op's class, the tensor and the defect.
            ValueError: ``name`` is not a floating point tensor of the module, or ``op`` is a plain callable.

        Example:
            >>> class Standardized(nn.Linear):
            ...     def forward(self, x):
            ...         w = self.weight
            ...         return nn.functional.linear(x, (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True))
            >>> ImplicitLinear(nn.Linear(4, 3), (4,)).check_linear_in("weight")
            >>> ImplicitLinear(Standardized(4, 3), (4,)).check_linear_in("weight")
            Traceback (most recent call last):
            ...
            lightning_specclip.spectral.operator.NotLinearInWeightError: Standardized is not linear in its weight ...
        """
        if self._tensors is None:
            raise ValueError("check_linear_in needs op to be an nn.Module")
        weight = self._tensors.get(name)
        if weight is None or not weight.is_floating_point():
            names = [n for n, t in self._tensors.items() if t.is_floating_point()]
            raise ValueError(f"{name!r} is not a floating point tensor of the module; it has: {names}")
        if self._part is not None:
            return
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn((2, *self.input_shape), generator=gen, dtype=self.dtype).to(self.device)
        other = torch.randn(weight.shape, generator=gen, dtype=self.dtype).to(self.device)
        size = float(weight.norm())
        if size > 0:
            other = other * (size / float(other.norm()))
        batch = torch.cat([x, self.zeros(1)])
        raw = {}
        for key, w in (("W", weight), ("2W", 2 * weight), ("W'", other), ("W+W'", weight + other)):
            out = self._raw(batch, {**self._tensors, name: w})
            if not torch.isfinite(out).all():
                raise NotLinearInWeightError(
                    f"{type(self.op).__name__} returned non-finite values with the weight {name!r} changed "
                    f"(to {key}); it cannot be clipped through that weight (track it only)"
                )
            raw[key] = out
        lin = {key: out[:-1] - out[-1:] for key, out in raw.items()}
        norms = {key: float(out.norm()) for key, out in raw.items()}
        scale = max(float(lin["W"].norm()), float(lin["W'"].norm()))
        noise = _NOISE * torch.finfo(self.dtype).eps
        probes = {
            "A(2W) = 2 A(W)": (float((lin["2W"] - 2 * lin["W"]).norm()), noise * (norms["2W"] + 2 * norms["W"])),
            "A(W + W') = A(W) + A(W')": (
                float((lin["W+W'"] - lin["W"] - lin["W'"]).norm()),
                noise * (norms["W+W'"] + norms["W"] + norms["W'"]),
            ),
        }
        for probe, (defect, floor) in probes.items():
            if not defect <= atol * scale + 2 * floor:
                raise NotLinearInWeightError(
                    f"{type(self.op).__name__} is not linear in its weight {name!r}: the probe {probe} failed on "
                    f"random inputs with relative defect {defect / max(scale, 1e-30):.3g} > {atol:g}. Its forward "
                    f"transforms the weight before using it (e.g. weight standardization), so clipping cannot move "
                    f"that weight to a given spectral norm; it cannot be clipped (track it only)."
                )

    def __repr__(self) -> str:
        name = type(self.op).__name__ if isinstance(self.op, nn.Module) else getattr(self.op, "__name__", "op")
        return f"ImplicitLinear({name}, input_shape={self.input_shape}, output_shape={self.output_shape})"
