"""One map the clipper tracks and clips (a layer at one input shape, as called), and what a call fixes."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

from torch import nn

__all__ = ["Call", "TrackedMap", "called_view", "known_shape"]

#: what a layer's call fixes besides its input shape, as ``((attribute, value), ...)``: empty for a call with the
#: input alone; ``(("output_padding", (1, 1)),)`` for a transposed convolution called with an ``output_size=``
#: that makes its output larger than its own ``output_padding`` does
Call = tuple[tuple[str, tuple[int, ...]], ...]


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
        >>> import torch
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


def known_shape(tracked: TrackedMap) -> tuple[int, ...]:
    """A map's input shape, which is known for every map a clipper tracks (from its first step).

    Args:
        tracked: the map.

    Returns:
        tuple[int, ...]: its input shape without the batch dimension.

    Raises:
        ValueError: the map's input shape is not known yet.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> known_shape(TrackedMap("lin", "layer", lin, lin, (3,)))
        (3,)
    """
    if tracked.input_shape is None:
        raise ValueError(f"the input shape of {tracked.name} is not known yet")
    return tracked.input_shape
