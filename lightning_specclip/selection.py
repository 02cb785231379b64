"""Which modules of a model are tracked and clipped: selection by type and name, conv→BatchNorm pairs, attention."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "DEFAULT_TYPES",
    "LAYER_TYPES",
    "PROJECTIONS",
    "Selector",
    "attention_projection",
    "clean_name",
    "conv_bn_nodes",
    "find_conv_bn_pairs",
    "named_modules",
    "select_modules",
]

#: modules that are one linear map of their input (a ``Linear``, a convolution)
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd)
#: what is selected by default, and what name globs pick: the layers, and attention (its q, k, v projections)
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (*LAYER_TYPES, nn.MultiheadAttention)
PROJECTIONS = ("q_proj", "k_proj", "v_proj")

Selector = str | type[nn.Module]


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
        >>> import torch
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
        >>> import torch
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
            and isinstance(modules.get(str(source.target)), _ConvNd)
            and len(source.users) == 1
        ):
            pairs.append((source, node))
    return pairs
