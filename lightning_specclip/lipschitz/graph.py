"""The traced graph: tracing with ``torch.fx``, the one run that records every node's value and call, which nodes
depend on the input, and how a node is named in an error."""

from __future__ import annotations

import fnmatch
import inspect
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_specclip.selection import clean_name
from lightning_specclip.spectral.operator import eval_mode

__all__ = ["UnsupportedNodeError"]


class UnsupportedNodeError(ValueError):
    """A model holds an op that :func:`lipschitz_bound` cannot bound; the message names the node and its op.

    Example:
        >>> issubclass(UnsupportedNodeError, ValueError)
        True
    """


class _Tracer(fx.Tracer):
    """fx's tracer, with the modules that ``constants=`` names kept whole (leaves)."""

    def __init__(self, leaf: Callable[[nn.Module, str], bool]) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102 - fx's hook
        return self._leaf(m, module_qualified_name) or super().is_leaf_module(m, module_qualified_name)


def _user_constant(constants: Mapping[type[nn.Module] | str, float], module: nn.Module, name: str) -> float | None:
    for key, value in constants.items():
        if (isinstance(key, str) and fnmatch.fnmatchcase(clean_name(name), key)) or (
            isinstance(key, type) and isinstance(module, key)
        ):
            return float(value)
    return None


def _check_constants(constants: Mapping[Any, Any]) -> dict[type[nn.Module] | str, float]:
    checked: dict[type[nn.Module] | str, float] = {}
    for key, value in constants.items():
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
            raise ValueError(f"constants keys must be nn.Module types or module name globs (str), got {key!r}")
        number = float(value)
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"constants[{key!r}] must be a finite number >= 0, got {value!r}")
        checked[key] = number
    return checked


def _op_name(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__
    if node.op in ("call_function", "call_method"):
        return str(getattr(node.target, "__name__", node.target))
    return node.op


def _describe(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        where = f" (module {clean_name(str(node.target))!r})"
    else:  # the innermost module whose forward made the node, as fx records it
        stack = list(node.meta.get("nn_module_stack", {}).values())
        where = f" in the forward of {clean_name(stack[-1][0])!r} ({stack[-1][1].__name__})" if stack else ""
    return f"node {node.name!r}: {node.op} {_op_name(node, modules)}{where}"


#: Python's in-place operators (``a += b`` on a tensor writes ``a``)
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv}
_IN_PLACE_OPERATORS |= {operator.ipow, operator.imod, operator.imatmul, operator.iand, operator.ior, operator.ixor}


def _in_place_method(name: Any) -> bool:
    """Whether a name is an in-place tensor method's: one trailing underscore (``mul_``, not ``__mul__``)."""
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _writes_in_place(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether a function or module call writes its first argument: an in-place function (``F.relu_``), an
    in-place operator, ``inplace=True`` given to a function (by keyword or position), a module whose ``inplace``
    attribute is true."""
    if node.op == "call_module":
        return getattr(modules[str(node.target)], "inplace", False) is True
    if node.op != "call_function":
        return False
    if node.target in _IN_PLACE_OPERATORS or _in_place_method(getattr(node.target, "__name__", None)):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature, calls it does not fit
        return False
    return bound.arguments.get("inplace") is True


def _tensor_nodes(value: Any) -> list[fx.Node]:
    """The fx nodes inside an argument (nested lists, tuples and dicts included)."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _trace(model: nn.Module, user: Mapping[type[nn.Module] | str, float]) -> fx.Graph:
    """The model's fx graph, traced in eval mode (so that ``self.training`` branches take their eval path)."""

    def leaf(module: nn.Module, name: str) -> bool:
        return _user_constant(user, module, name) is not None

    try:
        with eval_mode(model):
            return _Tracer(leaf).trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure is reported as one error with its cause
        raise UnsupportedNodeError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); lipschitz_bound "
            f"composes the bound from the traced graph. Keep the untraceable module whole with "
            f"constants={{TheModule: its_lipschitz_constant}}"
        ) from err


class _Whole(nn.Module):
    """Holds a model that is one standard layer, so that tracing keeps it whole (fx traces into its root: a
    reflect-padded conv would become a pad and a conv, measured apart). The attribute is named as
    ``torch.compile`` names the module it wraps, so :func:`~lightning_specclip.targets.clean_name` gives the
    layer the root's name ``""``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._orig_mod = layer

    def forward(self, x: Tensor) -> Tensor:
        return self._orig_mod(x)


def _run(
    model: nn.Module, graph: fx.Graph, shape: tuple[int, ...], device: torch.device
) -> tuple[dict[str, Any], set[str], dict[str, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Run the graph once on a zero input of one sample: every node's value, the names of the nodes whose value
    is a tensor that depends on the input (sizes, shapes and other Python values read off it are constants for a
    fixed input shape), and every module call's arguments as they were at run time (a transposed convolution's
    ``output_size=skip.size()`` as the sizes it ran with)."""
    values: dict[str, Any] = {}
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.op == "call_module":
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                calls[n.name] = (tuple(args), dict(kwargs))
            result = super().run_node(n)
            values[n.name] = result
            return result

    x = torch.zeros((1, *shape), device=device, dtype=_model_dtype(model))
    with eval_mode(model), torch.no_grad():
        Recorder(fx.GraphModule(model, graph)).run(x)
    dependent: set[str] = set()
    for index, node in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        if index == 0:
            dependent.add(node.name)
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or not _holds_tensor(values.get(node.name)):
            continue
        if any(n.name in dependent for n in _tensor_nodes((node.args, dict(node.kwargs)))):
            dependent.add(node.name)
    return values, dependent, calls


def _holds_tensor(value: Any) -> bool:
    """Whether a value is a tensor or a list, tuple or dict holding one (a split's pieces, attention's outputs)."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, dict) and any(_holds_tensor(v) for v in value.values())


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
