"""A network's Lipschitz bound composed from the exact norms of its layers, and the accuracy it certifies.

:func:`lipschitz_bound` traces a model with ``torch.fx`` and walks its graph once, giving every node a bound on
the ℓ2 Lipschitz constant of *model input → node output* (in eval semantics: BatchNorm with its running
statistics, dropout off):

* a linear map (``Linear``, ``Conv*d``, ``ConvTranspose*d``, average pooling, interpolation, reflect/replicate
  padding, a mean, a functional conv or linear with constant weights, and a conv whose output feeds only a
  BatchNorm composed with it as one map): its input's bound times its *exact* spectral norm at the input shape it
  runs at in the traced forward;
* an element-wise activation: times its largest slope (ReLU 1, GELU 1.1290, SiLU 1.0999, Sigmoid 1/4 …);
* a sum ``a + b`` (a residual connection): the sum of the branches' bounds; a concatenation: ``√Σ Lᵢ²``;
* a product or quotient by a constant (a per-channel scale, the input normalization): times its largest
  ``|c|`` (``1/min |c|`` for a divisor); max pooling: ``√(windows that share an input)``;
* reshapes, permutations, slicing, identity, dropout: 1; values that do not depend on the input: 0.

Anything else — a product of two input-dependent values (squeeze-and-excitation), attention, LayerNorm, a
comparison — is refused with the node and its op named; ``constants=`` supplies a module type's (or a module
name glob's) constant. The bound is layer-wise: exact per layer, but the product over a deep residual network
is usually far above the network's true Lipschitz constant. ``lower`` is an empirical lower bound: the largest
difference quotient found at probe inputs along the top singular direction of the model's Jacobian.

:class:`CertifiedAccuracy` turns the bound into certificates: a sample whose logit margin exceeds ``√2·L·ε`` is
classified the same way for every perturbation of ℓ2 norm ``ε`` or less.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd
from torchmetrics import Metric

from lightning_specclip.spectral.clip import batchnorm_scale
from lightning_specclip.spectral.exact import dense_spectral_norm
from lightning_specclip.spectral.operator import ImplicitLinear, eval_mode
from lightning_specclip.spectral.spectrum import spectrum
from lightning_specclip.targets import clean_name, conv_bn_nodes

__all__ = [
    "ACTIVATION_CONSTANTS",
    "CertifiedAccuracy",
    "LipschitzBound",
    "NodeBound",
    "UnsupportedNodeError",
    "certified",
    "lipschitz_bound",
]

#: maps with at most this many inputs are measured by a dense float64 SVD (deterministic); larger ones by
#: gap-free Lanczos in float64 (σ₁ within ``tol`` with probability ``≥ 1 − failure``), refined by Krylov
DENSE_LIMIT = 2048
#: relative allowance for float64 rounding taken off the empirical lower bound's difference quotient
_ROUNDING = 1e-9


def _slope(attribute: str) -> Callable[[nn.Module], float]:
    return lambda m: max(1.0, abs(float(getattr(m, attribute))))


#: element-wise activations → their largest slope ``sup |f′|`` (the ℓ2 Lipschitz constant of the map), rounded up
ACTIVATION_CONSTANTS: dict[type[nn.Module], float | Callable[[nn.Module], float]] = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.LeakyReLU: _slope("negative_slope"),
    nn.ELU: _slope("alpha"),
    nn.CELU: 1.0,
    nn.SELU: 1.7581,
    nn.GELU: 1.1290,  # exact GELU 1.12890, tanh approximation 1.12899
    nn.SiLU: 1.0999,
    nn.Mish: 1.0885,
    nn.Hardswish: 1.5,
    nn.Hardsigmoid: 1 / 6,
    nn.Hardtanh: 1.0,
    nn.Tanh: 1.0,
    nn.Sigmoid: 0.25,
    nn.Softplus: 1.0,
    nn.LogSigmoid: 1.0,
    nn.Softsign: 1.0,
    nn.Tanhshrink: 1.0,
    nn.PReLU: lambda m: max(1.0, float(m.weight.detach().abs().max())),
}
_FUNCTIONAL_ACTIVATIONS: dict[Any, float] = {
    F.relu: 1.0,
    torch.relu: 1.0,
    F.relu6: 1.0,
    F.gelu: 1.1290,
    F.silu: 1.0999,
    F.mish: 1.0885,
    F.hardswish: 1.5,
    F.hardsigmoid: 1 / 6,
    F.hardtanh: 1.0,
    F.elu: 1.0,
    torch.tanh: 1.0,
    F.tanh: 1.0,
    torch.sigmoid: 0.25,
    F.sigmoid: 0.25,
    F.softplus: 1.0,
    "relu": 1.0,
    "tanh": 1.0,
    "sigmoid": 0.25,
}
#: modules and ops that only move, select or drop values (or are the identity in eval mode): constant 1
_ISOMETRIC_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
_ISOMETRIC_FUNCTIONS = {torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.reshape}
_ISOMETRIC_FUNCTIONS |= {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clone, operator.neg, torch.neg}
_ISOMETRIC_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}
_ISOMETRIC_METHODS |= {"clone", "float", "double", "to", "type_as", "neg", "detach"}
#: module types measured as the linear maps they are
_LINEAR_MODULES = (
    nn.Linear,
    _ConvNd,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    nn.Upsample,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
)
#: functions (first argument the input, the others constant) and methods measured as the linear maps they are
_LINEAR_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d}
_LINEAR_FUNCTIONS |= {F.conv_transpose3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d}
_LINEAR_FUNCTIONS |= {F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate, F.pad, torch.mean, torch.sum}
_LINEAR_METHODS = {"mean", "sum"}
_SUMS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "sub", "add_", "sub_"}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_QUOTIENTS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CONCATS = {torch.cat, torch.concat, torch.stack}
_SPLITS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split, "split", "chunk", "unbind", "tensor_split"}


class UnsupportedNodeError(ValueError):
    """A model holds an op that :func:`lipschitz_bound` cannot bound; the message names the node and its op.

    Example:
        >>> issubclass(UnsupportedNodeError, ValueError)
        True
    """


@dataclass
class NodeBound:
    """What one node of the traced model contributes to the bound.

    Attributes:
        name: the fx node's name.
        op: the op: a module's type name (``"Conv2d"``), a function's or method's name (``"add"``).
        kind: ``"input"``, ``"linear"`` (measured exactly), ``"composition"`` (a conv∘BatchNorm measured as one
            map; its node is the BatchNorm's), ``"activation"``, ``"sum"``, ``"concat"``, ``"scale"``,
            ``"max_pool"``, ``"isometry"``, ``"constant"`` (does not depend on the input), ``"user"`` (a
            constant from ``constants=``) or ``"output"``.
        factor: the node's own constant (its σ bound for a linear map); for a sum or a concatenation, the number
            of its input-dependent branches.
        lipschitz: the bound on the Lipschitz constant of model input → this node's output.
        sigma: for measured maps, the spectral norm measured (the factor is this, or this over ``1 − tol`` for a
            map too large for a dense SVD).
        module: the module's name for a ``call_module`` node (``"conv+bn"`` for a composition).
        input_shape: the shape of one input of a measured map.
    """

    name: str
    op: str
    kind: str
    factor: float
    lipschitz: float
    sigma: float | None = None
    module: str | None = None
    input_shape: tuple[int, ...] | None = None


@dataclass
class LipschitzBound:
    """A network's Lipschitz bound, an empirical lower bound, and where the bound comes from.

    Attributes:
        upper: an upper bound on the ℓ2 Lipschitz constant of model input → output (eval semantics). It holds
            with probability at least ``1 − failure`` (maps of at most ``DENSE_LIMIT`` inputs are exact; each larger
            one is measured by a method whose σ₁ misses by more than ``tol`` with probability at most its share).
        lower: the largest difference quotient ``‖f(x + δ) − f(x)‖ / ‖δ‖`` found at the probe inputs, in float64:
            a lower bound on the true constant.
        nodes: every node of the traced graph, in order, by node name.
        failure: the probability, over the measurements' random starts, that ``upper`` is not a bound.

    Example:
        >>> result = lipschitz_bound(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), (3,), samples=2)
        >>> result.lower <= result.upper, list(result.layers)
        (True, ['0'])
    """

    upper: float
    lower: float
    nodes: dict[str, NodeBound] = field(repr=False)
    failure: float = 0.0

    @property
    def layers(self) -> dict[str, float]:
        """Measured spectral norm of every ``Linear``, ``Conv*d`` and ``ConvTranspose*d`` layer, by module name (the
        largest of its calls, if it runs more than once)."""
        result: dict[str, float] = {}
        for node in self.nodes.values():
            if node.kind == "linear" and node.op in _LAYER_TYPE_NAMES and node.module is not None:
                result[node.module] = max(result.get(node.module, 0.0), node.sigma or 0.0)
        return result

    @property
    def compositions(self) -> dict[str, float]:
        """Measured spectral norm of every conv∘BatchNorm composition, by ``"conv+bn"``."""
        return {n.module: n.sigma for n in self.nodes.values() if n.kind == "composition" and n.module and n.sigma}


_LAYER_TYPE_NAMES = {
    cls.__name__
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
} | {"LazyLinear", "LazyConv1d", "LazyConv2d", "LazyConv3d"}


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


def _tensor_nodes(value: Any) -> list[fx.Node]:
    """The fx nodes inside an argument (nested lists, tuples and dicts included)."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


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


def _ntuple(value: int | Sequence[int], d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (int(value),) * d


def _measure(
    op: Callable[[Tensor], Tensor], shape: tuple[int, ...], tol: float, failure: float, seed: int, device: torch.device
) -> tuple[float, float, bool]:
    """``(σ, bound, exact)`` of the linear part of ``op`` on inputs of ``shape``, in float64.

    Up to ``DENSE_LIMIT`` inputs: the dense matrix's largest singular value (``bound = σ``, exact). Above: σ is
    the larger of two Ritz values, each ≤ σ₁: gap-free Lanczos' (within ``tol`` of σ₁ with probability
    ``≥ 1 − failure``, whatever the spectrum) and a Krylov refinement from its vector; ``bound = σ / (1 − tol)``.
    """
    A = ImplicitLinear(op, shape, dtype=torch.float64, device=device, check_affine=False)
    if A.in_features <= DENSE_LIMIT:
        sigma = dense_spectral_norm(A)
        return sigma, sigma, True
    certified = spectrum(A, solver="gap_free", tol=tol, failure=failure, seed=seed, left=False)
    refined = spectrum(A, init=certified.right, tol=1e-10, max_iters=300, seed=seed, left=False)
    sigma = max(certified.sigma, refined.sigma)
    return sigma, sigma / (1 - tol), False


@dataclass
class _Job:
    """A linear map to measure for one node: what runs it, at which input shape, and how to name it."""

    op: Callable[[Tensor], Tensor]
    shape: tuple[int, ...]
    kind: str
    module: str | None


def lipschitz_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    samples: int = 8,
    data: Tensor | None = None,
    constants: Mapping[type[nn.Module] | str, float] | None = None,
    compose_batchnorm: bool = True,
    tol: float = 1e-3,
    failure: float = 1e-6,
    iters: int = 20,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> LipschitzBound:
    """Bound the ℓ2 Lipschitz constant of ``model`` (input → output, eval semantics) from its layers' exact norms.

    The model is traced with ``torch.fx`` and run once on a zero input of ``input_shape`` (in eval mode, without
    gradients; every module's mode is restored) to learn each node's input shape. Each linear node is measured
    as the map it is at that shape, in float64; the rules of the module docstring compose the nodes. A layer
    called at several shapes is measured at each. The module is not modified.

    Args:
        model: the model; its forward must take one tensor ``(N, *input_shape)`` and return one tensor.
        input_shape: the shape of one input without the batch dimension, e.g. ``(3, 32, 32)``: a convolution's
            norm depends on it, so the bound holds for inputs of this shape.
        samples: random inputs (uniform in ``[0, 1]``) at which to look for the lower bound, when ``data`` is
            not given.
        data: inputs ``(N, *input_shape)`` at which to look for the lower bound instead (e.g. a test batch).
        constants: Lipschitz constants for module types or module name globs the rules do not cover (their
            modules are kept whole when tracing): ``{MyBlock: 2.0, "head.*": 1.0}``.
        compose_batchnorm: measure a convolution whose output feeds only a BatchNorm together with it (tighter
            than the product of the two norms); ``False``: the BatchNorm by its largest gain.
        tol: relative accuracy of the measurement of maps above ``DENSE_LIMIT`` inputs; their bound is the
            measured σ over ``1 − tol``.
        failure: per large map, the probability allowed that its measurement misses σ₁ by more than ``tol``.
        iters: power iterations on the Jacobian at each probe input, for the lower bound.
        seed: seed of the measurements' random starts and of the probe inputs.
        progress: called as ``progress(done, total, what)`` after each linear map is measured.

    Returns:
        LipschitzBound: ``upper``, ``lower``, per-node ``nodes``, the measured ``layers`` and ``compositions``.

    Raises:
        UnsupportedNodeError: the model cannot be traced, returns something other than one tensor, or holds an
            op the rules do not cover (the message names the node and the op).
        ValueError: a bad ``input_shape``, ``data``, ``constants``, ``samples``, ``tol`` or ``failure``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
        >>> result = lipschitz_bound(model, (1, 8, 8), samples=4)
        >>> layers = result.layers
        >>> abs(result.upper - layers["0"] * layers["3"]) < 1e-9 * result.upper, result.lower <= result.upper
        (True, True)
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {tuple(input_shape)}")
    if not (0 < tol < 1 and 0 < failure < 1):
        raise ValueError(f"tol and failure must be in (0, 1), got tol={tol} and failure={failure}")
    if data is None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if data is not None and tuple(data.shape[1:]) != shape:
        raise ValueError(f"data must have shape (N, {', '.join(map(str, shape))}), got {tuple(data.shape)}")
    user = _check_constants(constants or {})
    if fx.Tracer().is_leaf_module(model, "") or _user_constant(user, model, ""):
        model = _Whole(model)
    modules = dict(model.named_modules())
    graph = _trace(model, user)
    device = _model_device(model)
    values, dependent = _run(model, graph, shape, device)

    jobs: dict[str, _Job] = {}
    rules: dict[str, tuple[str, Any]] = {}
    composed = {  # BatchNorm node name → the conv node it is measured with
        bn.name: conv
        for conv, bn in (conv_bn_nodes(graph, modules) if compose_batchnorm else [])
        if modules[str(bn.target)].running_var is not None
    }
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or node.name not in dependent:
            continue
        rules[node.name] = _rule(node, modules, user, values, dependent, composed, jobs)

    measured: dict[str, tuple[float, float, bool]] = {}
    for done, (name, job) in enumerate(jobs.items(), start=1):
        measured[name] = _measure(job.op, job.shape, tol, failure, seed, device)
        if progress is not None:
            progress(done, len(jobs), job.module or name)
    large = sum(1 for _, _, exact in measured.values() if not exact)

    nodes: dict[str, NodeBound] = {}
    bound: dict[str, float] = {}
    output: float | None = None
    for node in graph.nodes:
        op = _op_name(node, modules)
        if node.op == "placeholder":
            first = node is next(iter(graph.nodes))
            bound[node.name] = 1.0 if first else 0.0
            nodes[node.name] = NodeBound(node.name, op, "input" if first else "constant", 1.0, bound[node.name])
            continue
        if node.op == "output":
            outputs = _tensor_nodes(node.args[0])
            if not (isinstance(node.args[0], fx.Node) and isinstance(values.get(node.args[0].name), Tensor)):
                raise UnsupportedNodeError(
                    f"the model returns {type(values.get(outputs[0].name) if outputs else node.args[0]).__name__} "
                    f"from {', '.join(repr(o.name) for o in outputs) or 'constants'}; lipschitz_bound bounds a "
                    f"model that returns one tensor"
                )
            output = bound.get(node.args[0].name, 0.0)
            nodes[node.name] = NodeBound(node.name, op, "output", 1.0, output)
            continue
        if node.name not in rules:
            bound[node.name] = 0.0
            nodes[node.name] = NodeBound(node.name, op, "constant", 0.0, 0.0)
            continue
        kind, arg = rules[node.name]
        module = clean_name(str(node.target)) if node.op == "call_module" else None
        sigma = None
        job = jobs.get(node.name)
        if kind in ("linear", "composition"):
            sigma, factor, _ = measured[node.name]
            (source,) = arg
            lip = factor * bound[source.name]
            module = job.module if job is not None else module
        elif kind == "sum":
            terms = [(bound[n.name], abs(w)) for n, w in arg]
            factor = float(len(terms))
            lip = sum(b * w for b, w in terms)
        elif kind == "concat":
            factor = float(len(arg))
            lip = math.sqrt(sum(bound[n.name] ** 2 for n in arg))
        else:  # activation, scale, max_pool, isometry, user: one input, one factor
            source, factor = arg
            lip = factor * bound[source.name]
        bound[node.name] = lip
        nodes[node.name] = NodeBound(
            node.name, op, kind, factor, lip, sigma, module, job.shape if job is not None else None
        )
    assert output is not None  # a traced graph always ends in an output node
    lower = _lower_bound(model, shape, data, samples, iters, seed, device)
    return LipschitzBound(upper=output, lower=lower, nodes=nodes, failure=min(1.0, large * failure))


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
) -> tuple[dict[str, Any], set[str]]:
    """Run the graph once on a zero input of one sample: every node's value, and the names of the nodes whose
    value is a tensor that depends on the input (sizes, shapes and other Python values read off it are constants
    for a fixed input shape)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
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
    return values, dependent


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


def _rule(
    node: fx.Node,
    modules: Mapping[str, nn.Module],
    user: Mapping[type[nn.Module] | str, float],
    values: Mapping[str, Any],
    dependent: set[str],
    composed: Mapping[str, fx.Node],
    jobs: dict[str, _Job],
) -> tuple[str, Any]:
    """How one input-dependent node composes: ``(kind, argument)``; linear maps to measure go to ``jobs``."""
    args = [a for a in _tensor_nodes((node.args, dict(node.kwargs))) if a.name in dependent]
    value = values[node.name]

    def refuse(reason: str) -> UnsupportedNodeError:
        hint = (
            f"; pass constants={{{_op_name(node, modules)}: L}} (or a name glob) to supply its Lipschitz constant"
            if node.op == "call_module"
            else "; wrap it in a module and pass constants={ThatModule: L} to supply its Lipschitz constant"
        )
        return UnsupportedNodeError(f"lipschitz_bound cannot bound {_describe(node, modules)}: {reason}{hint}")

    if node.op == "call_module":
        constant = _user_constant(user, modules[str(node.target)], str(node.target))
        if constant is not None:
            return "user", (args[0], constant)
    if not isinstance(value, Tensor):
        if node.op != "call_module" and node.target in _SPLITS:  # pieces of the input; getitem picks one
            return "isometry", (args[0], 1.0)
        raise refuse(f"it returns a {type(value).__name__} of tensors made from the input")
    if not value.is_floating_point():
        raise refuse(f"it makes a {value.dtype} tensor from the input, which is not a Lipschitz map to real numbers")
    source = args[0]
    in_value = values[source.name]
    in_shape = tuple(in_value.shape[1:]) if isinstance(in_value, Tensor) else None

    if node.op == "call_module":
        module = modules[str(node.target)]
        name = clean_name(str(node.target))
        if len(args) != 1 or node.args[0] is not source:
            raise refuse("it takes more than one input-dependent argument")
        if node.name in composed:
            conv_node = composed[node.name]
            conv = modules[str(conv_node.target)]
            conv_in = values[conv_node.args[0].name]
            jobs[node.name] = _Job(
                nn.Sequential(conv, module),
                tuple(conv_in.shape[1:]),
                "composition",
                f"{clean_name(str(conv_node.target))}+{name}",
            )
            return "composition", (conv_node.args[0],)
        if isinstance(module, _LINEAR_MODULES):
            jobs[node.name] = _Job(module, in_shape, "linear", name)
            return "linear", (source,)
        if isinstance(module, _BatchNorm):
            if module.running_var is None:
                raise refuse("a BatchNorm without running statistics normalizes with batch statistics")
            return "scale", (source, float(batchnorm_scale(module).abs().max()))
        if isinstance(module, _ISOMETRIC_MODULES):
            return "isometry", (source, 1.0)
        for cls, constant_or_rule in ACTIVATION_CONSTANTS.items():
            if isinstance(module, cls):
                c = constant_or_rule(module) if callable(constant_or_rule) else constant_or_rule
                return "activation", (source, float(c))
        if isinstance(module, _MaxPoolNd):
            d = len(in_shape) - 1
            kernel = _ntuple(module.kernel_size, d)
            stride = _ntuple(module.stride or module.kernel_size, d)
            overlap = _max_pool_overlap(kernel, stride, _ntuple(module.dilation, d))
            return "max_pool", (source, math.sqrt(overlap))
        if isinstance(module, _AdaptiveMaxPoolNd):
            d = len(in_shape) - 1
            out = _ntuple(module.output_size, d) if module.output_size is not None else in_shape[1:]
            return "max_pool", (source, math.sqrt(_adaptive_overlap(in_shape[1:], out)))
        raise refuse(f"no rule for {type(module).__name__}")

    target = node.target
    if target in _SUMS:
        if node.op == "call_function" and target in (torch.add, torch.sub) and "alpha" in node.kwargs:
            weights = [1.0, float(node.kwargs["alpha"])]
        else:
            weights = [1.0, 1.0]
        terms = [(a, w) for a, w in zip(node.args[:2], weights, strict=False) if isinstance(a, fx.Node)]
        return "sum", [(a, w) for a, w in terms if a.name in dependent]
    if target in _CONCATS:
        return "concat", args
    if target in _PRODUCTS or target in _QUOTIENTS:
        operands = list(node.args[:2])
        if len(args) != 1 or (target in _QUOTIENTS and operands[0] is not source):
            raise refuse(
                "a product or quotient of input-dependent values (e.g. squeeze-and-excitation gating) is not "
                "Lipschitz with a constant known from the weights"
            )
        other = operands[1] if operands[0] is source else operands[0]
        c = values.get(other.name) if isinstance(other, fx.Node) else other
        c = torch.as_tensor(c, dtype=torch.float64).abs()
        if target in _QUOTIENTS:
            smallest = float(c.min()) if c.numel() else 0.0
            if smallest == 0.0:
                raise refuse("it divides by a value that can be zero")
            return "scale", (source, 1.0 / smallest)
        return "scale", (source, float(c.max()) if c.numel() else 0.0)
    if len(args) != 1 or not (node.args and node.args[0] is source):
        raise refuse("its input-dependent argument is not its first, or it has several")
    rest_args, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_function" and target in _FUNCTIONAL_ACTIVATIONS:
        return "activation", (source, _FUNCTIONAL_ACTIVATIONS[target])
    if node.op == "call_function" and target is F.leaky_relu:
        slope = kwargs.get("negative_slope", rest_args[0] if rest_args else 0.01)
        return "activation", (source, max(1.0, abs(float(slope))))
    if node.op == "call_method" and target in _FUNCTIONAL_ACTIVATIONS:
        return "activation", (source, _FUNCTIONAL_ACTIVATIONS[target])
    if target in _ISOMETRIC_FUNCTIONS or (node.op == "call_method" and target in _ISOMETRIC_METHODS):
        return "isometry", (source, 1.0)
    if target is operator.getitem:
        index = rest_args[0] if rest_args else None
        if _is_basic_index(index):
            return "isometry", (source, 1.0)
        raise refuse("indexing by a tensor or a list may repeat elements")
    if target in _LINEAR_FUNCTIONS or (node.op == "call_method" and target in _LINEAR_METHODS):
        constant_args = [fx.node.map_arg(a, lambda n: values[n.name]) for a in rest_args]
        constant_kwargs = {k: fx.node.map_arg(v, lambda n: values[n.name]) for k, v in kwargs.items()}
        method = node.op == "call_method"

        def op(x: Tensor, _target: Any = target) -> Tensor:
            args = [_cast(a, x) for a in constant_args]
            kwargs = {k: _cast(v, x) for k, v in constant_kwargs.items()}
            return getattr(x, _target)(*args, **kwargs) if method else _target(x, *args, **kwargs)

        jobs[node.name] = _Job(op, in_shape, "linear", None)
        return "linear", (source,)
    raise refuse("no rule for this op")


def _cast(value: Any, like: Tensor) -> Any:
    """A constant tensor argument in the measured input's dtype and device (the measurement runs in float64)."""
    return value.to(like) if isinstance(value, Tensor) and value.is_floating_point() else value


def _is_basic_index(index: Any) -> bool:
    """Whether indexing selects each element at most once: ints, slices, ``None`` and ``...`` only."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items)


def _lower_bound(
    model: nn.Module, shape: tuple[int, ...], data: Tensor | None, samples: int, iters: int, seed: int, device: Any
) -> float:
    """The largest difference quotient ``‖f(x + δ) − f(x)‖ / ‖δ‖`` at the probe inputs, in float64 and eval mode,
    with ``δ`` along the top right singular vector of the Jacobian at ``x`` found by power iteration on ``JᵀJ``
    (``J v`` as a forward difference, ``Jᵀ`` by autograd: a forward-mode ``jvp`` is ~10× slower here). A quotient
    is a lower bound on the Lipschitz constant by definition, whatever the power iteration found."""
    generator = torch.Generator().manual_seed(seed)
    if data is None:
        x = torch.rand((samples, *shape), generator=generator, dtype=torch.float64)
    else:
        x = data.detach().to(torch.float64).cpu()
    x = x.to(device)
    tensors = {
        name: t.detach().to(torch.float64) if t.is_floating_point() else t
        for name, t in (*model.named_parameters(), *model.named_buffers())
    }

    def f(inputs: Tensor) -> Tensor:
        return torch.func.functional_call(model, tensors, (inputs,))

    def unit(v: Tensor, previous: Tensor) -> Tensor:
        """``v`` normalized per sample; where it vanished (a zero Jacobian: every ReLU off) the previous direction."""
        norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
        return torch.where(norm > 0, v / norm.clamp_min(1e-300), previous)

    # a step small against the input and large against float64 rounding: the quotient's rounding error is about
    # 1e-16/1e-3 relative, which the (1 − ROUNDING) below takes off, so that a linear map's quotient stays ≤ its σ
    step = 1e-3 * x.flatten(1).norm(dim=1).clamp_min(1.0).view(-1, *([1] * len(shape)))
    start = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device)
    v = start / torch.linalg.vector_norm(start, dim=tuple(range(1, x.dim())), keepdim=True)
    with eval_mode(model):
        fx0, pullback = torch.func.vjp(f, x)
        fx0 = fx0.detach()
        for _ in range(iters):
            with torch.no_grad():
                jv = (f(x + step * v) - fx0) / step.flatten(1)[:, :1].view(-1, *([1] * (fx0.dim() - 1)))
            v = unit(pullback(jv)[0], v)
        with torch.no_grad():
            delta = step * v
            quotient = (f(x + delta) - fx0).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
    return float(quotient.max()) * (1 - _ROUNDING)


def certified(logits: Tensor, target: Tensor, lipschitz: float, eps: Tensor) -> Tensor:
    """Which samples are certified at each radius: correct, with a logit margin above ``√2·L·ε``.

    For a perturbation ``δ`` with ``‖δ‖₂ ≤ ε`` the logits move by at most ``L·ε`` in ℓ2, so the gap between the true
    class's logit and any other moves by at most ``√2·L·ε``: a margin above that cannot be closed (Tsuzuku et al.,
    2018). At ``ε = 0`` a sample is certified exactly when it is classified correctly.

    Args:
        logits: ``(N, C)`` logits.
        target: ``(N,)`` true labels.
        lipschitz: an upper bound on the ℓ2 Lipschitz constant of input → logits.
        eps: ``(R,)`` radii.

    Returns:
        Tensor: ``(N, R)`` booleans.

    Raises:
        ValueError: the shapes do not match.

    Example:
        >>> certified(torch.tensor([[3.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]), 1.0, torch.tensor([0.0, 1.0, 2.0]))
        tensor([[ True,  True, False],
                [False, False, False]])
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    true = logits.gather(1, target.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, target.view(-1, 1), float("-inf")).amax(dim=1)
    margin = (true - others).unsqueeze(1)
    correct = (logits.argmax(dim=1) == target).unsqueeze(1)
    threshold = math.sqrt(2) * lipschitz * eps.to(logits.device, logits.dtype).view(1, -1)
    return correct & ((margin > threshold) | (threshold == 0))


class CertifiedAccuracy(Metric):
    """Accuracy certified at ℓ2 radii ``eps`` by a Lipschitz bound: the fraction of samples classified correctly
    whose logit margin (true logit minus the largest other) exceeds ``√2·L·ε`` — no perturbation of ℓ2 norm at
    most ``ε`` can change their class (:func:`certified`). Counts are summed over processes (correct under DDP).

    It is a lower bound on the robust accuracy at ``ε`` (any attack's robust accuracy is an upper bound on it),
    as good as ``lipschitz`` is tight: with :func:`lipschitz_bound`'s ``upper``, a layer-wise bound.

    Args:
        lipschitz: an upper bound on the ℓ2 Lipschitz constant of input → logits (in the units of the inputs the
            radii are measured in).
        eps: one radius, or a sequence of radii (``≥ 0``).
        **kwargs: forwarded to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``lipschitz`` not a finite number ``> 0``, or a radius negative or not finite.

    Example:
        >>> metric = CertifiedAccuracy(lipschitz=1.0, eps=[0.0, 1.0, 2.0])
        >>> metric.update(torch.tensor([[3.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1]))
        >>> metric.compute()
        tensor([1.0000, 0.5000, 0.0000])
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, lipschitz: float, eps: float | Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (isinstance(lipschitz, int | float) and math.isfinite(lipschitz) and lipschitz > 0):
            raise ValueError(f"lipschitz must be a finite number > 0, got {lipschitz!r}")
        self.scalar = not isinstance(eps, Iterable)
        radii = [float(eps)] if self.scalar else [float(e) for e in eps]
        if not radii or not all(math.isfinite(e) and e >= 0 for e in radii):
            raise ValueError(f"eps must be one or more finite radii >= 0, got {eps!r}")
        self.lipschitz = float(lipschitz)
        self.eps = torch.tensor(radii, dtype=torch.float64)
        self.add_state("correct", default=torch.zeros(len(radii), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count the certified samples of a batch at every radius.

        Args:
            preds: logits ``(N, C)`` on the clean inputs.
            target: true labels ``(N,)``.

        Raises:
            ValueError: the shapes do not match.
        """
        self.correct += certified(preds.detach().double(), target, self.lipschitz, self.eps).sum(dim=0)
        self.total += target.numel()

    def compute(self) -> Tensor:
        """Certified accuracy at each radius (a 0-dim tensor when ``eps`` was one number); NaN before any sample.

        Returns:
            Tensor: ``(len(eps),)`` fractions in ``[0, 1]``, or a scalar.
        """
        if self.total == 0:
            result = torch.full(self.correct.shape, float("nan"), device=self.correct.device)
        else:
            result = self.correct.float() / self.total
        return result[0] if self.scalar else result
