"""The rule of each input-dependent node of a traced graph (:class:`_Rules`), and the linear maps to measure."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.pooling import _AdaptiveMaxPoolNd

from lightning_specclip.lipschitz.graph import (
    UnsupportedNodeError,
    _describe,
    _in_place_method,
    _op_name,
    _user_constant,
    _writes_in_place,
)
from lightning_specclip.lipschitz.tables import (
    _BATCHNORM_ARGS,
    _CONCATS,
    _DROPOUT_ARGS,
    _DROPOUTS,
    _ELEMENTWISE,
    _FUNCTIONAL_FORMS,
    _ISOMETRIC_FUNCTIONS,
    _ISOMETRIC_METHODS,
    _ISOMETRIC_MODULES,
    _LINEAR_FUNCTIONS,
    _LINEAR_METHODS,
    _LINEAR_MODULES,
    _MAX_POOLS,
    _PAD_ARGS,
    _POOL_DIMS,
    _PRODUCTS,
    _QUOTIENTS,
    _SPLITS,
    _SUMS,
    ACTIVATION_CONSTANTS,
)
from lightning_specclip.recorder import call_of
from lightning_specclip.selection import clean_name
from lightning_specclip.spectral.clip import batchnorm_scale
from lightning_specclip.tracked_map import called_view


def _max_pool_overlap(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> int:
    """How many windows of a max pooling can share one input element: ``Π ⌈kᵢ / (sᵢ / gcd(sᵢ, dᵢ))⌉``."""
    count = 1
    for k, s, d in zip(kernel, stride, dilation, strict=True):
        period = s // math.gcd(s, d)
        count *= min(k, -(-k // period))
    return count


def _adaptive_overlap(in_sizes: Sequence[int], out_sizes: Sequence[int | None]) -> int:
    """The largest number of an adaptive pooling's windows holding one input element (exact, per dimension)."""
    count = 1
    for n, m in zip(in_sizes, out_sizes, strict=True):
        m = n if m is None else m
        cover = [0] * n
        for i in range(m):
            for j in range((i * n) // m, -(-((i + 1) * n) // m)):
                cover[j] += 1
        count *= max(cover)
    return count


def _sizes(value: Any, d: int, none: bool = False) -> tuple[Any, ...] | None:
    """A pooling's size argument as ``d`` sizes: an int repeated, or a tuple of 1 or ``d`` ints (``None`` entries
    too where ``none``); ``None`` for anything else, such as a tensor, which the rules do not read as a size."""
    items = tuple(value) if isinstance(value, list | tuple) else (value,)
    readable = all((isinstance(v, int) and not isinstance(v, bool)) or (none and v is None) for v in items)
    if not readable or len(items) not in (1, d):
        return None
    return items * d if len(items) == 1 else items


def _replication(operand: Tensor, result: Tensor) -> float:
    """``√r`` when broadcasting repeats each element of ``operand`` ``r`` times in ``result``: the norm of the
    repeated copies of a change (``1`` when the shapes agree)."""
    return math.sqrt(max(result.numel(), 1) / max(operand.numel(), 1))


@dataclass
class _Job:
    """A linear map to measure for one node: what runs it, at which input shape, and how to name it."""

    op: Callable[[Tensor], Tensor]
    shape: tuple[int, ...]
    kind: str
    module: str | None


class _Rules:
    """The rule of each input-dependent node of one traced graph, found in graph order (a BatchNorm after an
    activation looks back at the rules of the nodes before it), and the linear maps to measure in ``jobs``.

    A rule is ``(kind, argument)``: ``"linear"`` and ``"composition"`` → ``(source, slope)`` (``slope`` times the
    measured bound of ``jobs[node]``, from the bound of ``source``); ``"sum"`` → ``[(branch, weight)]``;
    ``"concat"`` → ``[branch]``; every other kind → ``(source, factor)``.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        user: Mapping[type[nn.Module] | str, float],
        values: Mapping[str, Any],
        composed: Mapping[str, fx.Node],
        compose_batchnorm: bool,
        calls: Mapping[str, tuple[tuple[Any, ...], dict[str, Any]]],
    ) -> None:
        self.modules, self.user, self.values, self.calls = modules, user, values, calls
        self.composed, self.compose_batchnorm = composed, compose_batchnorm
        self.rules: dict[str, tuple[str, Any]] = {}
        self.jobs: dict[str, _Job] = {}
        self.elementwise: set[str] = set()  # activations that map each element alone, at an unchanged shape
        self.affine: set[str] = set()  # nodes measured as one affine map of their rule's source

    def add(self, node: fx.Node, args: list[fx.Node]) -> None:
        """Find the rule of an input-dependent node whose input-dependent arguments are ``args``."""
        self.rules[node.name] = self._rule(node, args)

    def _refuse(self, node: fx.Node, reason: str) -> UnsupportedNodeError:
        hint = (
            f"; pass constants={{{_op_name(node, self.modules)}: L}} (or a name glob) to supply its Lipschitz constant"
            if node.op == "call_module"
            else "; wrap it in a module and pass constants={ThatModule: L} to supply its Lipschitz constant"
        )
        return UnsupportedNodeError(f"lipschitz_bound cannot bound {_describe(node, self.modules)}: {reason}{hint}")

    def _measured(self, node: fx.Node, job: _Job, source: fx.Node) -> tuple[str, Any]:
        """The rule of an affine map measured as ``job``."""
        self.jobs[node.name] = job
        self.affine.add(node.name)
        return job.kind, (source, 1.0)

    def _arguments(self, node: fx.Node, names: Mapping[str, Any]) -> SimpleNamespace:
        """A call's arguments after its input by name (``names``: in order, with their defaults), as values."""
        given = {**names, **dict(zip(names, node.args[1:], strict=False))}
        given |= {k: v for k, v in node.kwargs.items() if k in names}
        return SimpleNamespace(**{k: fx.node.map_arg(v, lambda n: self.values[n.name]) for k, v in given.items()})

    def _check_in_place(self, node: fx.Node) -> None:
        """Refuse a write in place that other references could read: the graph walk bounds the value a node returns,
        not what a write does to a tensor another node returned (``out = conv(x); out.mul_(100); return out``
        returns the conv's node). A tensor method ``x.op_()`` is refused; a function with ``inplace=True``, an
        in-place function or operator and a module with ``inplace=True`` are allowed where their result replaces
        their input: the value they write is no view and no other node reads it (``nn.ReLU(inplace=True)`` after a
        BatchNorm, as in torchvision's ResNet)."""
        if node.op == "call_method" and _in_place_method(node.target):
            raise self._refuse(
                node,
                f"it writes a value that depends on the input in place; use the out-of-place form "
                f"({str(node.target)[:-1]!r} for {node.target!r}) so that the value it writes is its own node",
            )
        written = node.args[0] if node.args else None
        if not (isinstance(written, fx.Node) and _writes_in_place(node, self.modules)):
            return
        value = self.values.get(written.name)
        if len(written.users) > 1 or (isinstance(value, Tensor) and value._base is not None):
            raise self._refuse(
                node,
                f"it writes {written.name!r} in place, which other nodes read (or which is a view of another value); "
                f"use the out-of-place form (inplace=False) so that the value it writes is its own node",
            )

    def _called(self, node: fx.Node) -> nn.Module:
        """A linear module as its call runs it: a transposed convolution called with ``output_size=`` runs the map
        with the ``output_padding`` its forward computes from it (:func:`~lightning_specclip.recorder.call_of`,
        :func:`~lightning_specclip.tracked_map.called_view`); other arguments besides the input are refused."""
        module = self.modules[str(node.target)]
        args, kwargs = self.calls[node.name]
        if len(args) <= 1 and not kwargs:
            return module
        call = call_of(module, args, kwargs)
        if isinstance(call, str):
            raise self._refuse(node, f"it is {call}, and the map that runs cannot be rebuilt from them")
        return called_view(module, call)

    def _form(self, node: fx.Node) -> tuple[type[nn.Module], Any] | None:
        """The module type whose rule bounds the node and what that rule reads attributes from: a module and itself,
        or a functional form's module type and the call's arguments (``None`` for other functions)."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            return type(module), module
        if node.target in _FUNCTIONAL_FORMS:
            cls, names = _FUNCTIONAL_FORMS[node.target]
            return cls, self._arguments(node, names)
        return None

    def _rule(self, node: fx.Node, args: list[fx.Node]) -> tuple[str, Any]:
        """In-place writes first, user constants, then what the node returns, then the rules of modules or of
        functions."""
        self._check_in_place(node)
        value = self.values[node.name]
        if node.op == "call_module":
            constant = _user_constant(self.user, self.modules[str(node.target)], str(node.target))
            if constant is not None:
                return "user", (args[0], constant)
        form = self._form(node)
        # a max pooling's (values, indices): its factor bounds the values, which a getitem picks
        with_indices = form is not None and issubclass(form[0], _MAX_POOLS) and isinstance(value, tuple)
        if not isinstance(value, Tensor) and not with_indices:
            if node.op != "call_module" and node.target in _SPLITS:  # pieces of the input; getitem picks one
                return "isometry", (args[0], 1.0)
            raise self._refuse(node, f"it returns a {type(value).__name__} of tensors made from the input")
        if isinstance(value, Tensor) and not value.is_floating_point():
            raise self._refuse(
                node, f"it makes a {value.dtype} tensor from the input, which is not a Lipschitz map to real numbers"
            )
        if node.op == "call_module":
            return self._module(node, args)
        return self._function(node, args, form)

    def _module(self, node: fx.Node, args: list[fx.Node]) -> tuple[str, Any]:
        """A module call: compositions with a BatchNorm, linear modules, BatchNorm, isometries, then ``_layer``."""
        module = self.modules[str(node.target)]
        name = clean_name(str(node.target))
        if len(args) != 1 or node.args[0] is not args[0]:
            raise self._refuse(node, "it takes more than one input-dependent argument")
        source = args[0]
        in_value = self.values[source.name]
        in_shape = tuple(in_value.shape[1:]) if isinstance(in_value, Tensor) else ()
        if node.name in self.composed:
            conv_node = self.composed[node.name]
            conv, conv_source = self._called(conv_node), self.rules[conv_node.name][1][0]
            composition = f"{clean_name(str(conv_node.target))}+{name}"
            conv_shape = tuple(self.values[conv_source.name].shape[1:])
            return self._measured(
                node, _Job(nn.Sequential(conv, module), conv_shape, "composition", composition), conv_source
            )
        if isinstance(module, _LINEAR_MODULES):
            return self._measured(node, _Job(self._called(node), in_shape, "linear", name), source)
        if isinstance(module, _BatchNorm):
            if module.running_var is None:
                raise self._refuse(node, "a BatchNorm without running statistics normalizes with batch statistics")
            gain = float(batchnorm_scale(module).abs().max())
            return self._after_activation(node, module, name, source) or ("scale", (source, gain))
        if isinstance(module, _ISOMETRIC_MODULES):
            return "isometry", (source, 1.0)
        return self._layer(node, type(module), module, source)

    def _layer(self, node: fx.Node, cls: type[nn.Module], params: Any, source: fx.Node) -> tuple[str, Any]:
        """The rules a module and its functional forms share (max pooling, activations), reading the module's
        attributes from ``params``: the module, or the call's arguments of the same names."""
        in_value, value = self.values[source.name], self.values[node.name]
        if issubclass(cls, _MAX_POOLS):
            return "max_pool", (source, math.sqrt(self._pool_overlap(node, cls, params, in_value)))
        for key, constant in ACTIVATION_CONSTANTS.items():
            if issubclass(cls, key):
                slope = float(constant(params) if callable(constant) else constant)
                if issubclass(cls, _ELEMENTWISE) and value.shape == in_value.shape:
                    self.elementwise.add(node.name)
                return "activation", (source, slope * _replication(in_value, value))  # clamp's bounds may broadcast
        raise self._refuse(node, f"no rule for {cls.__name__}")

    def _pool_overlap(self, node: fx.Node, cls: type[nn.Module], params: Any, in_value: Tensor) -> int:
        """How many windows of a max pooling can share one input element (its factor is the square root)."""
        d = next(n for pool, n in _POOL_DIMS.items() if issubclass(cls, pool))
        if issubclass(cls, _AdaptiveMaxPoolNd):
            out = _sizes(params.output_size, d, none=True)
            if out is None:
                raise self._refuse(node, f"its output_size {params.output_size!r} is not {d} sizes (ints or None)")
            return _adaptive_overlap(tuple(in_value.shape[-d:]), out)
        empty = params.stride is None or (isinstance(params.stride, list | tuple) and not params.stride)
        stride = params.kernel_size if empty else params.stride  # stride defaults to the kernel
        kernel, strides, dilation = (_sizes(v, d) for v in (params.kernel_size, stride, params.dilation))
        if kernel is None or strides is None or dilation is None:
            raise self._refuse(
                node,
                f"its kernel_size, stride and dilation ({params.kernel_size!r}, {stride!r}, {params.dilation!r}) "
                f"are not ints or tuples of {d} ints",
            )
        return _max_pool_overlap(kernel, strides, dilation)

    def _after_activation(self, node: fx.Node, bn: _BatchNorm, name: str, act: fx.Node) -> tuple[str, Any] | None:
        """``linear → element-wise activation → this BatchNorm`` bounded by the activation's slope times σ₁ of
        ``BatchNorm∘linear`` (module docstring), where the linear map (a module, or a conv∘BatchNorm) feeds only the
        activation and the activation (``act``) only the BatchNorm; ``None`` where the chain is not there."""
        if not (self.compose_batchnorm and act.name in self.elementwise and len(act.users) == 1):
            return None
        linear, slope = self.rules[act.name][1]
        job = self.jobs.get(linear.name)
        if job is None or linear.name not in self.affine or len(linear.users) != 1 or not isinstance(job.op, nn.Module):
            return None
        act_name = clean_name(str(act.target)) if act.op == "call_module" else act.name
        composition = f"{job.module or linear.name}+{act_name}+{name}"
        self.jobs[node.name] = _Job(nn.Sequential(job.op, bn), job.shape, "composition", composition)
        return "composition", (self.rules[linear.name][1][0], slope)

    def _function(
        self, node: fx.Node, args: list[fx.Node], form: tuple[type[nn.Module], Any] | None
    ) -> tuple[str, Any]:
        """A function or method call: sums, concatenations, scales; then, with one input-dependent argument first,
        the functional forms of modules (``form``), dropout, padding and the other functions."""
        target, value = node.target, self.values[node.name]
        if target in _SUMS:
            alpha = self._arguments(node, {"other": None, "alpha": 1.0}).alpha  # torch.add(a, b, alpha=w), a.add(…)
            weights = [1.0, abs(float(alpha))]
            terms = [(a, w) for a, w in zip(node.args[:2], weights, strict=False) if isinstance(a, fx.Node)]
            return "sum", [(a, w * _replication(self.values[a.name], value)) for a, w in terms if a in args]
        if target in _CONCATS:
            return "concat", args
        if target in _PRODUCTS or target in _QUOTIENTS:
            return self._scale(node, args)
        source = args[0]
        if len(args) != 1 or not (node.args and node.args[0] is source):
            raise self._refuse(node, "its input-dependent argument is not its first, or it has several")
        if form is not None:
            return self._layer(node, *form, source)
        if target in _DROPOUTS:
            call = self._arguments(node, {**_DROPOUT_ARGS, "training": _DROPOUTS[target]})
            if call.training and call.p > 0:
                raise self._refuse(node, "it drops values at inference (training=True); pass training=self.training")
            return "isometry", (source, 1.0)
        if target is F.pad and self._arguments(node, _PAD_ARGS).mode == "constant":
            return "isometry", (source, 1.0)  # each value kept once or cropped, constants added: as ConstantPad*d
        if target is F.batch_norm and self._arguments(node, _BATCHNORM_ARGS).training:
            raise self._refuse(node, "it normalizes with batch statistics (training=True)")
        if target in _ISOMETRIC_FUNCTIONS or (node.op == "call_method" and target in _ISOMETRIC_METHODS):
            return "isometry", (source, 1.0)
        if target is operator.getitem:
            if _is_basic_index(node.args[1] if len(node.args) > 1 else None):
                return "isometry", (source, 1.0)
            raise self._refuse(node, "indexing by a tensor or a list may repeat elements")
        if target in _LINEAR_FUNCTIONS or (node.op == "call_method" and target in _LINEAR_METHODS):
            return self._measured(node, self._linear_call(node, source), source)
        raise self._refuse(node, "no rule for this op")

    def _scale(self, node: fx.Node, args: list[fx.Node]) -> tuple[str, Any]:
        """A product or quotient by a constant: its largest ``|c|`` (``1/min |c|`` for a divisor)."""
        quotient = node.target in _QUOTIENTS
        operands = list(node.args[:2])
        if len(args) != 1 or (quotient and operands[0] is not args[0]):
            raise self._refuse(
                node,
                "a product or quotient of input-dependent values (e.g. squeeze-and-excitation gating) is not "
                "Lipschitz with a constant known from the weights",
            )
        source = args[0]
        other = operands[1] if operands[0] is source else operands[0]
        c = self.values.get(other.name) if isinstance(other, fx.Node) else other
        c = torch.as_tensor(c, dtype=torch.float64).abs()
        repeated = _replication(self.values[source.name], self.values[node.name])
        if quotient:
            smallest = float(c.min()) if c.numel() else 0.0
            if smallest == 0.0:
                raise self._refuse(node, "it divides by a value that can be zero")
            return "scale", (source, repeated / smallest)
        return "scale", (source, repeated * (float(c.max()) if c.numel() else 0.0))

    def _linear_call(self, node: fx.Node, source: fx.Node) -> _Job:
        """A linear function or method as called, its other arguments the constants they were in the traced run."""
        constant_args = [fx.node.map_arg(a, lambda n: self.values[n.name]) for a in node.args[1:]]
        constant_kwargs = {k: fx.node.map_arg(v, lambda n: self.values[n.name]) for k, v in node.kwargs.items()}
        target = node.target  # a method's name, or a function

        def op(x: Tensor) -> Tensor:
            args = [_cast(a, x) for a in constant_args]
            kwargs = {k: _cast(v, x) for k, v in constant_kwargs.items()}
            return getattr(x, target)(*args, **kwargs) if isinstance(target, str) else target(x, *args, **kwargs)

        return _Job(op, tuple(self.values[source.name].shape[1:]), "linear", None)


def _cast(value: Any, like: Tensor) -> Any:
    """A constant tensor argument in the measured input's dtype and device (the measurement runs in float64)."""
    return value.to(like) if isinstance(value, Tensor) and value.is_floating_point() else value


def _is_basic_index(index: Any) -> bool:
    """Whether indexing selects each element at most once: ints, slices, ``None`` and ``...`` only."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items)
