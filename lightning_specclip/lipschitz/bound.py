"""The network bound: :func:`lipschitz_bound` measures the linear maps the rules name and composes every node's
bound in graph order into :class:`LipschitzBound`."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_specclip.lipschitz.graph import (
    UnsupportedNodeError,
    _check_constants,
    _model_device,
    _op_name,
    _run,
    _tensor_nodes,
    _trace,
    _user_constant,
    _Whole,
)
from lightning_specclip.lipschitz.lower import _lower_bound
from lightning_specclip.lipschitz.rules import _Rules
from lightning_specclip.selection import clean_name, conv_bn_nodes
from lightning_specclip.spectral.certify import DENSE_LIMIT
from lightning_specclip.spectral.exact import dense_spectral_norm
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.spectrum import spectrum

__all__ = ["LipschitzBound", "NodeBound", "lipschitz_bound"]


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
    values, dependent, calls = _run(model, graph, shape, device)

    composed = {  # BatchNorm node name → the conv node it is measured with
        bn.name: conv
        for conv, bn in (conv_bn_nodes(graph, modules) if compose_batchnorm else [])
        if modules[str(bn.target)].running_var is not None
    }
    rules = _Rules(modules, user, values, composed, compose_batchnorm, calls)
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
