"""A network's Lipschitz bound composed from the exact norms of its layers, and the accuracy it certifies.

:func:`lipschitz_bound` traces a model with ``torch.fx`` and walks its graph once, giving every node a bound on
the ℓ2 Lipschitz constant of *model input → node output* (in eval semantics: BatchNorm with its running
statistics, dropout off):

* a linear map (``Linear``, ``Conv*d``, ``ConvTranspose*d``, average pooling, interpolation, reflect/replicate/
  circular padding, a mean, a BatchNorm called as ``F.batch_norm``, a functional conv or linear with constant
  weights, and a conv whose output feeds only a BatchNorm composed with it as one map): its input's bound times its
  *exact* spectral norm at the input shape it runs at in the traced forward;
* an element-wise activation: times its largest slope (ReLU 1, GELU 1.1290, SiLU 1.0999, Sigmoid 1/4 …);
* a linear map, an element-wise activation and a BatchNorm in a row (below): times the activation's largest slope
  and the exact spectral norm of the composed linear map ``BatchNorm∘linear``;
* a sum ``a + b`` (a residual connection): the sum of the branches' bounds; a concatenation: ``√Σ Lᵢ²``;
* a product or quotient by a constant (a per-channel scale, the input normalization): times its largest
  ``|c|`` (``1/min |c|`` for a divisor); max pooling: ``√(windows that share an input)``;
* reshapes, permutations, slicing, constant (zero) padding, identity, dropout: 1; values that do not depend on
  the input: 0. An operand that broadcasting repeats ``r`` times counts ``√r`` times its bound.

Functional forms go through the rule of their module: ``F.max_pool*d`` (with or without ``return_indices``),
``F.adaptive_max_pool*d``, ``F.avg_pool*d``, ``F.adaptive_avg_pool*d``, ``F.interpolate`` (``F.upsample``),
``F.pad`` (constant mode: 1; the other modes measured), ``F.relu``, ``F.leaky_relu``, ``F.elu`` and the other
activations (with their arguments: ``F.elu(x, alpha=2.0)`` has slope 2), ``torch.clamp``, ``torch.flatten`` and the
tensor methods ``flatten``/``view``/``reshape``, ``F.dropout`` with ``training=False``. Arguments the rules cannot
read (a tensor as a kernel size) and dropout that runs at inference are refused with the node named.

**A BatchNorm after an activation.** When a linear module (or a conv∘BatchNorm composition) feeds only an
element-wise activation ``σ`` and that activation feeds only a BatchNorm in eval mode, the three are bounded by
``c·σ₁(D·W)``, where ``W`` is the linear map, ``D`` the BatchNorm's per-channel scale ``γ/√(var+ε)`` and ``c`` the
activation's largest slope — instead of ``σ₁(W)·c·max|D|``. It is sound: for two inputs the activation's outputs
differ by ``Λ·W·δ``, ``Λ`` diagonal with the difference quotients ``(σ(uᵢ) − σ(u′ᵢ))/(uᵢ − u′ᵢ)``, each in
``[−c, c]``; ``D`` is diagonal in the same coordinates (every element of a channel scaled alike), and diagonal
matrices commute, so the BatchNorm's outputs differ by ``D·Λ·W·δ = Λ·D·W·δ``, of norm at most
``c·σ₁(D·W)·‖δ‖``. The sign of ``γ`` and of the slopes does not matter (GELU's negative slopes, LeakyReLU's
slope above 1 keep their ``c``); what matters is that the activation maps each element alone, so it applies to the
built-in activations above (``ReLU``, ``ReLU6``, ``LeakyReLU``, ``PReLU``, ``ELU``, ``GELU``, ``SiLU``, ``Tanh``,
``Sigmoid`` …, modules or functions, and ``torch.clamp``), not to a map added to :data:`ACTIVATION_CONSTANTS`
nor to a user constant, and not when a reshape, a pooling or a broadcast sits in between. As
``σ₁(D·W) ≤ max|D|·σ₁(W)``, it is never looser than the separate factors. The composition is listed in
:attr:`LipschitzBound.compositions` as ``"linear+activation+batchnorm"`` (module names; a function by its node's
name), next to the ``"conv+bn"`` compositions.

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
from types import SimpleNamespace
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


def _slope(attribute: str) -> Callable[[Any], float]:
    return lambda m: max(1.0, abs(float(getattr(m, attribute))))


#: element-wise activations → their largest slope ``sup |f′|`` (the ℓ2 Lipschitz constant of the map), rounded up;
#: a rule reads the module's attributes (for a functional call, its arguments of the same names)
ACTIVATION_CONSTANTS: dict[type[nn.Module], float | Callable[[Any], float]] = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.LeakyReLU: _slope("negative_slope"),
    nn.ELU: _slope("alpha"),
    nn.CELU: lambda m: 1.0 if float(m.alpha) > 0 else math.inf,  # slope exp(x/α) below 0: unbounded for α < 0
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
#: the activations above map each element alone (a diagonal Jacobian), which the BatchNorm-after-activation rule
#: needs; fixed here, so that a map added to ACTIVATION_CONSTANTS later (softmax is 1-Lipschitz, not element-wise)
#: is bounded by its constant but never composed through
_ELEMENTWISE = tuple(ACTIVATION_CONSTANTS)
_MAX_POOLS = (_MaxPoolNd, _AdaptiveMaxPoolNd)
_POOL_DIMS: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_POOL_DIMS |= {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
#: a function's (or a tensor method's) arguments after the input, in order, up to the last one a rule reads, named
#: as the attributes of the module that does the same, with their defaults
_MAX_POOL_ARGS = {"kernel_size": None, "stride": None, "padding": 0, "dilation": 1}
_ADAPTIVE_ARGS = {"output_size": None}
_DROPOUT_ARGS = {"p": 0.5, "training": True}
_PAD_ARGS = {"pad": None, "mode": "constant"}
_BATCHNORM_ARGS = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False}
#: functional forms of the pooling and activation modules → (that module type, its arguments): one rule bounds both
_FUNCTIONAL_FORMS: dict[Any, tuple[type[nn.Module], dict[str, Any]]] = {
    **{f: (nn.MaxPool1d, _MAX_POOL_ARGS) for f in (F.max_pool1d, F.max_pool1d_with_indices, torch.max_pool1d)},
    **{f: (nn.MaxPool2d, _MAX_POOL_ARGS) for f in (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d)},
    **{f: (nn.MaxPool3d, _MAX_POOL_ARGS) for f in (F.max_pool3d, F.max_pool3d_with_indices, torch.max_pool3d)},
    **{f: (nn.AdaptiveMaxPool1d, _ADAPTIVE_ARGS) for f in (F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices)},
    **{f: (nn.AdaptiveMaxPool2d, _ADAPTIVE_ARGS) for f in (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices)},
    **{f: (nn.AdaptiveMaxPool3d, _ADAPTIVE_ARGS) for f in (F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices)},
    **{f: (nn.ReLU, {}) for f in (F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_")},
    **{f: (nn.LeakyReLU, {"negative_slope": 0.01}) for f in (F.leaky_relu, F.leaky_relu_)},
    **{f: (nn.ELU, {"alpha": 1.0}) for f in (F.elu, F.elu_)},
    **{f: (nn.Hardtanh, {}) for f in (F.hardtanh, F.hardtanh_, torch.clamp, torch.clip, "clamp", "clip", "clamp_")},
    **{f: (nn.Tanh, {}) for f in (torch.tanh, F.tanh, "tanh", "tanh_")},
    **{f: (nn.Sigmoid, {}) for f in (torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_")},
    **{f: (nn.PReLU, {"weight": None}) for f in (F.prelu, torch.prelu)},
    **{f: (nn.SELU, {}) for f in (F.selu, torch.selu)},
    F.relu6: (nn.ReLU6, {}),
    F.celu: (nn.CELU, {"alpha": 1.0}),
    F.gelu: (nn.GELU, {}),
    F.silu: (nn.SiLU, {}),
    F.mish: (nn.Mish, {}),
    F.hardswish: (nn.Hardswish, {}),
    F.hardsigmoid: (nn.Hardsigmoid, {}),
    F.softplus: (nn.Softplus, {}),
    F.logsigmoid: (nn.LogSigmoid, {}),
    F.softsign: (nn.Softsign, {}),
    F.tanhshrink: (nn.Tanhshrink, {}),
}
#: dropout functions → their ``training`` default: the identity when it is off, like the modules in eval mode
_DROPOUTS = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True}
_DROPOUTS |= {F.alpha_dropout: False, F.feature_alpha_dropout: False}
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
_ISOMETRIC_FUNCTIONS |= {torch.movedim, torch.clone, operator.neg, torch.neg}
_ISOMETRIC_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "movedim", "contiguous"}
_ISOMETRIC_METHODS |= {"squeeze", "unsqueeze", "clone", "float", "double", "to", "type_as", "neg", "detach"}
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
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
#: functions (first argument the input, the others constant) and methods measured as the linear maps they are
_LINEAR_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d}
_LINEAR_FUNCTIONS |= {F.conv_transpose3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d}
_LINEAR_FUNCTIONS |= {F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.avg_pool1d, torch.adaptive_avg_pool1d}
_LINEAR_FUNCTIONS |= {F.interpolate, F.pad, F.batch_norm, torch.mean, torch.sum}
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
        kind: ``"input"``, ``"linear"`` (measured exactly), ``"composition"`` (a conv∘BatchNorm, or a linear
            map → activation → BatchNorm, measured as one map; its node is the BatchNorm's), ``"activation"``,
            ``"sum"``, ``"concat"``, ``"scale"``, ``"max_pool"``, ``"isometry"``, ``"constant"`` (does not depend on
            the input, or an unpacked value that is never read), ``"user"`` (a constant from ``constants=``) or
            ``"output"``.
        factor: the node's own constant (its σ bound for a linear map, times the activation's slope for a
            composition through one); for a sum or a concatenation, the number of its input-dependent branches.
        lipschitz: the bound on the Lipschitz constant of model input → this node's output.
        sigma: for measured maps, the spectral norm measured (the factor is this, or this over ``1 − tol`` for a
            map too large for a dense SVD).
        module: the module's name for a ``call_module`` node (``"conv+bn"`` or ``"linear+activation+batchnorm"``
            for a composition).
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
        """Measured spectral norm of every composition with a BatchNorm: ``"conv+bn"`` → σ₁ of the conv∘BatchNorm,
        ``"linear+activation+batchnorm"`` → σ₁ of BatchNorm∘linear (which, times the activation's slope, bounds the
        three; module docstring)."""
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
        compose_batchnorm: measure a BatchNorm together with the linear map before it: a convolution whose
            output feeds only a BatchNorm, and a linear module → element-wise activation → BatchNorm chain (module
            docstring); tighter than the product of the norms. ``False``: each BatchNorm by its largest gain.
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

    composed = {  # BatchNorm node name → the conv node it is measured with
        bn.name: conv
        for conv, bn in (conv_bn_nodes(graph, modules) if compose_batchnorm else [])
        if modules[str(bn.target)].running_var is not None
    }
    rules = _Rules(modules, user, values, composed, compose_batchnorm)
    for node in graph.nodes:
        unused = node.target is operator.getitem and not node.users  # an unpacked value never read: no effect
        if node.op in ("placeholder", "get_attr", "output") or node.name not in dependent or unused:
            continue
        rules.add(node, [a for a in _tensor_nodes((node.args, dict(node.kwargs))) if a.name in dependent])

    measured: dict[str, tuple[float, float, bool]] = {}
    for done, (name, job) in enumerate(rules.jobs.items(), start=1):
        measured[name] = _measure(job.op, job.shape, tol, failure, seed, device)
        if progress is not None:
            progress(done, len(rules.jobs), job.module or name)
    large = sum(1 for _, _, exact in measured.values() if not exact)
    nodes, output = _compose(graph, modules, values, rules, measured)
    lower = _lower_bound(model, shape, data, samples, iters, seed, device)
    return LipschitzBound(upper=output, lower=lower, nodes=nodes, failure=min(1.0, large * failure))


def _compose(
    graph: fx.Graph,
    modules: Mapping[str, nn.Module],
    values: Mapping[str, Any],
    rules: _Rules,
    measured: Mapping[str, tuple[float, float, bool]],
) -> tuple[dict[str, NodeBound], float]:
    """Every node's bound from its rule and its inputs' bounds, in graph order; and the output's bound."""
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
        if node.name not in rules.rules:
            bound[node.name] = 0.0
            nodes[node.name] = NodeBound(node.name, op, "constant", 0.0, 0.0)
            continue
        kind, arg = rules.rules[node.name]
        module = clean_name(str(node.target)) if node.op == "call_module" else None
        sigma = None
        job = rules.jobs.get(node.name)
        if kind in ("linear", "composition"):  # the measured bound, times a slope for a composition through one
            sigma, measured_bound, _ = measured[node.name]
            source, slope = arg
            factor = slope * measured_bound
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
    return nodes, output


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
    ) -> None:
        self.modules, self.user, self.values = modules, user, values
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
        """User constants first, then what the node returns, then the rules of modules or of functions."""
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
            conv, conv_source = self.modules[str(conv_node.target)], self.rules[conv_node.name][1][0]
            composition = f"{clean_name(str(conv_node.target))}+{name}"
            conv_shape = tuple(self.values[conv_source.name].shape[1:])
            return self._measured(
                node, _Job(nn.Sequential(conv, module), conv_shape, "composition", composition), conv_source
            )
        if isinstance(module, _LINEAR_MODULES):
            return self._measured(node, _Job(module, in_shape, "linear", name), source)
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
        fx0, pullback = torch.func.vjp(f, x)[:2]  # (output, pullback); a third item only with has_aux
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
        radii = [float(e) for e in eps] if isinstance(eps, Iterable) else [float(eps)]
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
