"""The linear map behind an affine layer, applied without ever forming its matrix.

A layer ``f`` that is affine in its input (``Linear``, any convolution, BatchNorm with running statistics,
conv followed by BatchNorm, ...) is ``f(x) = A x + b``. :class:`ImplicitLinear` exposes ``A`` through
``A x = f(x) - f(0)`` and ``Aᵀ y`` through autograd (in closed form for standard layers), for inputs of one
fixed shape (the matrix of a convolution depends on the input size, padding and stride, so the shape is part
of the operator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_specclip.spectral.closed_form import linear_adjoint, linear_part
from lightning_specclip.spectral.modes import eval_mode, no_autocast
from lightning_specclip.spectral.probes import NotLinearInWeightError, probe_affine, probe_linear_in

# NotLinearInWeightError, eval_mode and no_autocast: re-exported where the package has always offered them
__all__ = ["ImplicitLinear", "NotLinearInWeightError", "Op", "eval_mode", "no_autocast"]

Op = nn.Module | Callable[[Tensor], Tensor]


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
                # functional_call reads any mapping; its stubs ask for a dict
                out = torch.func.functional_call(self.op, tensors, (x,))  # type: ignore[arg-type]
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
    def closed_part(self) -> bool:
        """Whether ``A x`` runs in closed form (:func:`linear_part`; its adjoint may not: see :attr:`closed_form`).

        Example:
            >>> ImplicitLinear(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 8, 8)).closed_part
            True
        """
        return self._part is not None

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
            assert tensors is not None  # a closed form is a module's, which has its tensors
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

    def raw(self, x: Tensor, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        """``op(x)`` itself (bias included), in the compute dtype, without autograd: what the probes compare.

        Args:
            x: inputs of shape ``(B, *input_shape)`` in the compute dtype, on the operator's device.
            tensors: tensors to use instead of :attr:`tensors` (modules only).

        Returns:
            Tensor: ``op(x)``, ``(B, *output_shape)``.

        Example:
            >>> lin = nn.Linear(2, 1)
            >>> torch.allclose(ImplicitLinear(lin, (2,)).raw(torch.zeros(1, 2)), lin.bias)
            True
        """
        with torch.inference_mode(False), torch.no_grad():
            return self._call(x, tensors)

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
        probe_affine(self, atol, seed)

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
            lightning_specclip.spectral.probes.NotLinearInWeightError: Standardized is not linear in its weight ...
        """
        probe_linear_in(self, name, atol, seed)

    def __repr__(self) -> str:
        name = type(self.op).__name__ if isinstance(self.op, nn.Module) else getattr(self.op, "__name__", "op")
        return f"ImplicitLinear({name}, input_shape={self.input_shape}, output_shape={self.output_shape})"
