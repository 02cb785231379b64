"""Which modules of a model are tracked and clipped: selection, conv→BatchNorm pairs, input shapes."""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

__all__ = [
    "DEFAULT_TYPES",
    "LAYER_TYPES",
    "PROJECTIONS",
    "Call",
    "attention_projection",
    "called_view",
    "clean_name",
    "conv_bn_nodes",
    "named_modules",
    "TrackedMap",
    "InputShapeRecorder",
    "find_conv_bn_pairs",
    "select_modules",
]

#: modules that are one linear map of their input (a ``Linear``, a convolution)
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd)
#: what is selected by default, and what name globs pick: the layers, and attention (its q, k, v projections)
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (*LAYER_TYPES, nn.MultiheadAttention)
PROJECTIONS = ("q_proj", "k_proj", "v_proj")

Selector = str | type[nn.Module]
#: what a layer's call fixes besides its input shape, as ``((attribute, value), ...)``: empty for a call with the
#: input alone; ``(("output_padding", (1, 1)),)`` for a transposed convolution called with an ``output_size=``
#: that makes its output larger than its own ``output_padding`` does
Call = tuple[tuple[str, tuple[int, ...]], ...]

log = logging.getLogger(__name__)

_CONV_TRANSPOSE_FORWARDS = (nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward)


@dataclass
class TrackedMap:
    """One implicitly linear map that is tracked and clipped: a layer at one input shape, a conv∘BatchNorm
    composition, or a BatchNorm.

    Attributes:
        name: unique name: the layer's name in the model, ``"<conv>+<bn>"`` for a composition, with
            ``"@CxHxW"`` appended for the input shapes of a layer after its first.
        kind: ``"layer"`` (a Linear or convolution), ``"composition"`` (conv followed by BatchNorm, with the
            BatchNorm's running statistics), ``"batchnorm"``, or ``"projection"`` (a query, key or value map of
            a ``MultiheadAttention``, before its weights are viewed as a ``Linear``).
        module: what is run to apply the map: the layer, a ``Sequential(conv, bn)`` sharing the model's
            modules, or the BatchNorm.
        layer: the module whose input defines ``input_shape`` (the conv of a composition).
        input_shape: shape of one input without the batch dimension, once seen.
        parts: names of the model's modules the map is made of (the conv and the BatchNorm of a composition);
            default ``(name,)``.
        call: what the layer's call fixes besides the input shape (see :data:`Call`); ``module`` then runs the
            layer as so called (:func:`called_view`).

    Example:
        >>> conv, bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        >>> pair = TrackedMap("c+b", "composition", nn.Sequential(conv, bn), conv, parts=("c", "b"))
        >>> pair.matches("b"), pair.matches("c+*"), pair.matches("x")
        (True, True, False)
    """

    name: str
    kind: str
    module: nn.Module
    layer: nn.Module
    input_shape: tuple[int, ...] | None = None
    parts: tuple[str, ...] = ()
    call: Call = ()

    def __post_init__(self) -> None:
        if not self.parts:
            self.parts = (self.name,)

    def matches(self, pattern: str) -> bool:
        """Whether a name glob names this map: the map's modules together (``"conv+bn"``) or any one of them.

        Args:
            pattern: a glob on module names.

        Returns:
            bool: whether it matches.
        """
        return any(fnmatch.fnmatchcase(n, pattern) for n in ("+".join(self.parts), *self.parts))


def attention_projection(attention: nn.MultiheadAttention, which: str) -> nn.Linear:
    """The query, key or value projection of a ``MultiheadAttention`` as a bias-free ``Linear`` whose weight is a
    view of the attention's own weight (the rows of the packed ``in_proj_weight``, or ``q/k/v_proj_weight`` when
    the key and value sizes differ): measuring it reads the attention's weights, and clipping it writes them.

    ``MultiheadAttention`` never calls these maps as modules (nor its ``out_proj``, which is a ``Linear`` already),
    so they are built from the weights. Build them after the model is on its device and in its dtype: the view
    follows the storage it was made from.

    Args:
        attention: the attention module.
        which: ``"q_proj"``, ``"k_proj"`` or ``"v_proj"``.

    Returns:
        nn.Linear: the projection, sharing its weight's storage with ``attention``.

    Raises:
        ValueError: ``which`` is not one of the three.

    Example:
        >>> attention = nn.MultiheadAttention(8, 2)
        >>> q = attention_projection(attention, "q_proj")
        >>> with torch.no_grad():
        ...     _ = q.weight.mul_(2.0)  # writes the first 8 rows of the packed in_proj_weight
        >>> q.weight.shape, torch.equal(attention.in_proj_weight[:8], q.weight)
        (torch.Size([8, 8]), True)
    """
    if which not in PROJECTIONS:
        raise ValueError(f"which must be one of {', '.join(PROJECTIONS)}, got {which!r}")
    if attention._qkv_same_embed_dim:
        size, index = attention.embed_dim, PROJECTIONS.index(which)
        source = attention.in_proj_weight
        weight = source.detach()[index * size : (index + 1) * size]
    else:
        source = getattr(attention, f"{which}_weight")
        weight = source.detach()
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=source.requires_grad)
    return layer


def called_view(layer: nn.Module, call: Call) -> nn.Module:
    """The layer as one particular call runs it: a shallow copy that shares the layer's parameters, buffers and
    hooks (the same dictionaries, so it reads and writes the live weights) with the attributes of ``call`` set.

    A transposed convolution called with ``output_size=`` runs the map of its own class with another
    ``output_padding`` (one more output row or column per unit): measuring and clipping the view measures and
    clips the map that runs.

    Args:
        layer: the layer.
        call: ``((attribute, value), ...)`` as recorded by :class:`InputShapeRecorder`; empty returns ``layer``.

    Returns:
        nn.Module: ``layer`` itself, or its view.

    Example:
        >>> up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
        >>> view = called_view(up, (("output_padding", (1, 1)),))
        >>> x = torch.randn(1, 4, 5, 5)
        >>> view.weight is up.weight, torch.equal(view(x), up(x, output_size=(10, 10)))
        (True, True)
    """
    if not call:
        return layer
    view = copy.copy(layer)
    for attribute, value in call:
        setattr(view, attribute, value)
    return view


def _call_of(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Call | str:
    """What a forward call fixes besides the input shape, or a description of arguments the map cannot be
    rebuilt from. A transposed convolution's ``output_size`` (positional or keyword) becomes the
    ``output_padding`` its forward computes from it."""
    rest, extra = args[1:], dict(kwargs)
    if isinstance(module, _ConvTransposeNd) and type(module).forward in _CONV_TRANSPOSE_FORWARDS:
        size = extra.pop("output_size", rest[0] if rest else None)
        if rest[1:] or extra:
            return f"called with arguments {rest[1:]!r} {extra!r} besides its input and output_size"
        if size is None:
            return ()
        m, dims = module, len(module.kernel_size)
        # what the layer's forward computes from output_size (and its checks of it)
        padding = m._output_padding(args[0], list(size), m.stride, m.padding, m.kernel_size, dims, m.dilation)
        padding = tuple(int(p) for p in padding)
        return () if padding == tuple(module.output_padding) else (("output_padding", padding),)
    if rest or extra:
        return f"called with arguments besides its input ({len(rest)} positional, keywords {sorted(extra)})"
    return ()


def clean_name(name: str) -> str:
    """A module's name without the ``_orig_mod`` segments ``torch.compile`` inserts, so that globs, targets and
    logged names are those of the eager model.

    Args:
        name: a name from ``model.named_modules()``.

    Returns:
        str: the name without ``_orig_mod`` segments.

    Example:
        >>> clean_name("net._orig_mod.layer1.0.conv1")
        'net.layer1.0.conv1'
    """
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` by :func:`clean_name` (a compiled wrapper and the module it wraps share a name:
    the outer one is kept).

    Args:
        model: the model, compiled or not.

    Returns:
        dict[str, nn.Module]: cleaned name → module, in model order (the root is ``""``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> list(named_modules(torch.compile(net)))
        ['', '0']
    """
    result: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        result.setdefault(clean_name(name), module)
    return result


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` → ``["a.b.c", "a.b", "a"]``: the module and the containers holding it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _matches(name: str, module: nn.Module, selector: Selector) -> bool:
    """A type matches instances; a glob matches the module's name or the name of a container holding it."""
    if isinstance(selector, str):
        return any(fnmatch.fnmatchcase(n, selector) for n in _ancestors(name))
    return isinstance(module, selector)


def select_modules(
    model: nn.Module, modules: Sequence[Selector] | None = None, exclude: Sequence[Selector] = ()
) -> list[tuple[str, nn.Module]]:
    """Named submodules chosen by type and/or name glob, minus the excluded ones.

    A type selects its instances, whatever they are. A name glob selects the *layers* among the modules it
    names and the modules inside them: ``Linear``, ``Conv*d``, ``ConvTranspose*d`` and ``MultiheadAttention``
    (so ``"disc.*"`` or ``"disc"`` picks the discriminator's layers, not its activations or containers). An
    excluding glob leaves out the modules it names and everything inside them.

    Args:
        model: the model.
        modules: module types and/or glob patterns on module names (``"layer1.*"``); default every
            ``Linear``, ``Conv*d``, ``ConvTranspose*d`` and ``MultiheadAttention``.
        exclude: types and/or patterns to leave out.

    Returns:
        list[tuple[str, nn.Module]]: the selected ``(name, module)`` pairs in model order.

    Raises:
        ValueError: a pattern (in ``modules`` or ``exclude``) matches no module name, or nothing is selected;
            the message lists the available names.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        >>> [name for name, _ in select_modules(model, exclude=["3"])]
        ['0']
        >>> [name for name, _ in select_modules(model, modules=["*"])]  # layers only, not ReLU or Flatten
        ['0', '3']
    """
    named = [(n, m) for n, m in named_modules(model).items() if n]
    for group, selectors in (("modules", modules or ()), ("exclude", exclude)):
        for s in selectors:
            if isinstance(s, str) and not any(fnmatch.fnmatchcase(n, s) for n, _ in named):
                raise ValueError(
                    f"{group} pattern {s!r} matches no module of the model; available names: "
                    f"{', '.join(n for n, _ in named)}"
                )
            if not isinstance(s, str) and not (isinstance(s, type) and issubclass(s, nn.Module)):
                raise ValueError(f"{group} entries must be module types or name patterns (str), got {s!r}")
    chosen = modules or DEFAULT_TYPES

    def chosen_by(name: str, module: nn.Module, selector: Selector) -> bool:
        if isinstance(selector, str):
            return isinstance(module, DEFAULT_TYPES) and _matches(name, module, selector)
        return isinstance(module, selector)

    selected = [
        (n, m)
        for n, m in named
        if any(chosen_by(n, m, s) for s in chosen) and not any(_matches(n, m, s) for s in exclude)
    ]
    if not selected:
        raise ValueError(
            f"no layer selected by modules={list(chosen)} exclude={list(exclude)} (name patterns select "
            f"Linear, Conv*d, ConvTranspose*d and MultiheadAttention modules); available names: "
            f"{', '.join(f'{n} ({type(m).__name__})' for n, m in named)}"
        )
    return selected


def _pairs_by_order(model: nn.Module) -> list[tuple[str, str]]:
    pairs, previous = [], None
    for name, module in named_modules(model).items():
        if isinstance(module, _BatchNorm) and previous is not None:
            conv_name, conv = previous
            if getattr(conv, "out_channels", None) == module.num_features:
                pairs.append((conv_name, name))
        if isinstance(module, _ConvNd):
            previous = (name, module)
        elif not isinstance(module, _BatchNorm) and len(list(module.children())) == 0:
            previous = None
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Find every convolution whose output feeds only a BatchNorm, by tracing the model with ``torch.fx``.

    Falls back to module order (a BatchNorm registered right after a conv with matching channels) with a
    warning when the model cannot be traced.

    Args:
        model: the model.

    Returns:
        list[tuple[str, str]]: ``(conv_name, bn_name)`` pairs.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> find_conv_bn_pairs(model)
        [('0', '1')]
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure means: use the fallback
        warnings.warn(
            f"could not trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); pairing "
            f"each BatchNorm with the convolution registered just before it",
            stacklevel=2,
        )
        return _pairs_by_order(model)
    pairs = conv_bn_nodes(graph, dict(model.named_modules()))
    return [(clean_name(str(conv.target)), clean_name(str(bn.target))) for conv, bn in pairs]


def conv_bn_nodes(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[tuple[fx.Node, fx.Node]]:
    """The ``(conv, bn)`` node pairs of a traced graph where a convolution's output feeds only a BatchNorm.

    Args:
        graph: the graph of a traced model.
        modules: the model's ``named_modules()`` by the names the graph's ``call_module`` nodes use.

    Returns:
        list[tuple[fx.Node, fx.Node]]: the pairs, in graph order.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> pairs = conv_bn_nodes(fx.symbolic_trace(model).graph, dict(model.named_modules()))
        >>> [(conv.target, bn.target) for conv, bn in pairs]
        [('0', '1')]
    """
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), _ConvNd)
            and len(source.users) == 1
        ):
            pairs.append((source, node))
    return pairs


def _drop_compiled_code() -> None:
    """Drop the code ``torch.compile`` cached in this process, if it compiled any since its last reset.

    Compiled code does not guard on forward hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): code
    traced before a hook was registered never calls it, and code traced with another model's hooks calls
    those (a second model of one class, as in cross-validation folds, would reuse the first one's). Dropping the
    cache makes the next call trace the hooks now registered; the price is one recompilation of what ran before.
    """
    from torch._dynamo import convert_frame

    if getattr(convert_frame, "FRAME_COUNTER", 1):
        log.info("dropping torch.compile's cached code so that compiled models call the input-shape hooks")
        torch.compiler.reset()


class InputShapeRecorder:
    """Record how modules are called, until :meth:`remove`: the per-sample input shape and what the call fixes
    besides it (a transposed convolution's ``output_size``).

    Works in compiled models too: code ``torch.compile`` cached before the recorder existed is dropped (it would
    skip the hooks; see ``torch._dynamo.config.skip_nnmodule_hook_guards``), so the next call recompiles once.

    Args:
        modules: ``(name, module)`` pairs to watch.
        training_only: record only calls made in training mode (``module.training``), so that validation and
            other evaluation-mode forwards do not count.

    Attributes:
        all_calls: ``name → every distinct (input shape without the batch dimension, call)``, in the order first
            seen; the call is ``()`` for a call with the input alone (see :data:`Call`).
        unsupported: ``name → how a module was called`` for calls whose map cannot be rebuilt (arguments
            besides the input that the recorder does not know).

    Example:
        >>> conv = nn.Conv2d(1, 2, 3)
        >>> with InputShapeRecorder([("conv", conv)]) as recorder:
        ...     _ = conv(torch.zeros(5, 1, 8, 8))
        ...     _ = conv(torch.zeros(5, 1, 16, 16))
        >>> recorder.shapes, recorder.all_shapes
        ({'conv': (1, 8, 8)}, {'conv': [(1, 8, 8), (1, 16, 16)]})
        >>> up = nn.ConvTranspose2d(2, 1, 3, stride=2, padding=1)
        >>> with InputShapeRecorder([("up", up)]) as recorder:
        ...     _ = up(torch.zeros(5, 2, 4, 4), output_size=(8, 8))
        >>> recorder.all_calls
        {'up': [((2, 4, 4), (('output_padding', (1, 1)),))]}
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]], *, training_only: bool = False) -> None:
        self.all_calls: dict[str, list[tuple[tuple[int, ...], Call]]] = {}
        self.unsupported: dict[str, str] = {}
        self.training_only = training_only
        modules = list(modules)
        if modules:
            _drop_compiled_code()
        self._handles = [
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, module in modules
        ]

    @property
    def all_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """``name → every distinct input shape seen``, in the order first seen."""
        result: dict[str, list[tuple[int, ...]]] = {}
        for name, calls in self.all_calls.items():
            shapes = result.setdefault(name, [])
            shapes += [shape for shape, _ in calls if shape not in shapes]
        return result

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``name → the first input shape seen``."""
        return {name: calls[0][0] for name, calls in self.all_calls.items()}

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self.training_only and not module.training:
                return
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                call = _call_of(module, args, kwargs)
                if isinstance(call, str):
                    self.unsupported.setdefault(name, call)
                    return
                seen = self.all_calls.setdefault(name, [])
                key = (tuple(args[0].shape[1:]), call)
                if key not in seen:
                    seen.append(key)

        return hook

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> InputShapeRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
