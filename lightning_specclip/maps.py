"""From a selection and the calls recorded in training to the maps a clipper bounds, with their targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import cast

from torch import nn

from lightning_specclip.options import ClipperOptions
from lightning_specclip.rank_zero import info, warn
from lightning_specclip.recorder import InputShapeRecorder
from lightning_specclip.selection import (
    LAYER_TYPES,
    PROJECTIONS,
    attention_projection,
    find_conv_bn_pairs,
    named_modules,
    select_modules,
)
from lightning_specclip.spectral.clip import NotLinearInWeightError, check_clippable
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.tracked_map import Call, TrackedMap, called_view, known_shape
from lightning_specclip.tracker import MapState

__all__ = ["MapSet"]

#: every way a layer ran: ``name → [(input shape without the batch dimension, call)]``
Calls = Mapping[str, list[tuple[tuple[int, ...], Call]]]


def _listing(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names) - most} more)"


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside the wrappers of data-parallel training and of Fabric, so that names are its own."""
    while True:
        inner = getattr(model, "_original_module", None)  # Lightning Fabric's _FabricModule
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def _map_name(name: str, shape: tuple[int, ...], call: Call) -> str:
    """``"<layer>@CxHxW"``, with ``",<attribute>=AxB"`` for what the call fixes besides the input shape."""
    fixed = "".join(f",{attribute}={'x'.join(map(str, value))}" for attribute, value in call)
    return f"{name}@{'x'.join(map(str, shape))}{fixed}"


def _called(layer: TrackedMap, call: Call) -> nn.Module:
    """What runs a layer's map as called: the layer's :func:`~lightning_specclip.tracked_map.called_view`, inside
    the conv∘BatchNorm pair of a composition."""
    if not call:
        return layer.module
    view = called_view(layer.layer, call)
    return nn.Sequential(view, cast(nn.Sequential, layer.module)[1]) if layer.kind == "composition" else view


def _why_unrecorded(layer: TrackedMap) -> str:
    """Why a selected layer has no input shape at the first step."""
    if any(p.grad is not None for p in layer.layer.parameters()):
        return (
            "ran in training but its input shape was not recorded (its forward pre-hooks did not run: "
            "code that skips hooks, such as a compiled region traced before the clipper existed); name its "
            "input shapes with input_shapes= to bound it"
        )
    return (
        "never ran in training before the first step (no forward in training mode, e.g. a branch not "
        "taken); name its input shapes with input_shapes= to bound it"
    )


def _check_affine(tracked: TrackedMap) -> None:
    if tracked.kind == "batchnorm":
        return
    try:
        ImplicitLinear(tracked.module, known_shape(tracked), check_affine=True)
    except ValueError as err:
        raise ValueError(
            f"{tracked.name} ({type(tracked.layer).__name__}) at input shape {tracked.input_shape} is not a "
            f"linear map of its input, so it has no spectral norm: {err}. Select only layers affine in their "
            f"input (modules=, exclude=)."
        ) from err


def _layers_of(model: nn.Module, options: ClipperOptions) -> list[TrackedMap]:
    """The selected layers as maps without input shapes: layers, attention projections, compositions, BatchNorms."""
    maps = []
    for name, module in select_modules(model, options.modules, options.exclude):
        if isinstance(module, nn.MultiheadAttention):  # its q, k, v maps; out_proj is a Linear of its own
            maps += [TrackedMap(f"{name}.{which}", "projection", module, module) for which in PROJECTIONS]
        else:
            maps.append(TrackedMap(name, "layer", module, module))
    named = named_modules(model)
    if options.compose_batchnorm:
        for conv_name, bn_name in find_conv_bn_pairs(model):
            conv, bn = named[conv_name], named[bn_name]
            pair = nn.Sequential(conv, bn)
            maps.append(TrackedMap(f"{conv_name}+{bn_name}", "composition", pair, conv, parts=(conv_name, bn_name)))
    if options.clip_batchnorm:
        for name, module in named.items():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                maps.append(TrackedMap(name, "batchnorm", module, module))
    return maps


class MapSet:
    """The layers a clipper acts on and, from the first step, their maps: one per way each layer ran in training.

    Made with the model, it selects the layers (refusing patterns that match none and layers that cannot take a
    clipped weight) and records how they run in training mode; :meth:`build`, at the first step, turns each
    layer into one map per recorded call (and named input shape), and decides which maps are not clipped, and why.

    A convolution's map depends on its input size and on how it is called, so every way a layer runs in training
    mode between the clipper's creation and the first :meth:`SpectralClipper.step` (the first training step) is its
    own map, tracked and clipped: each input shape, and for a transposed convolution each ``output_size=`` that
    changes its output (``"<layer>@CxHxW"`` for the ways after the first); evaluation-mode forwards do not count.
    Compiled models are recorded too (``torch.compile``'s cached code is dropped once so that it calls the recording
    hooks). Name further shapes, such as the test resolution, with ``input_shapes``. A shape first seen later is not
    bounded. A ``Linear``'s norm is the same at every input shape and needs none. Every selected layer the clipper
    cannot bound is listed in :attr:`not_clipped` and :meth:`summary` with the reason, and warned about: one that
    did not run in training before the first step (and has no named shape), one called with arguments whose map it
    cannot rebuild, one not linear in its weight (such as a weight-standardized conv; tracked), and frozen layers
    (no parameter requiring grad; tracked, clipped with ``clip_frozen``).

    Args:
        model: the model (inside a ``DistributedDataParallel`` or Fabric wrapper the layers keep its own names).
        options: the clipper's options (the selection, the targets, the input shapes, ``clip_frozen``).

    Attributes:
        layers: the selected layers, as maps without input shapes.
        maps: every map, once built (see :attr:`SpectralClipper.maps`).
        not_clipped: maps and layers not clipped, with the reason (see :attr:`SpectralClipper.not_clipped`).
        recorder: what records the layers' calls until :meth:`build`; ``None`` after.

    Raises:
        ValueError: a pattern that matches no selected layer, or a layer that cannot take a clipped weight.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
        >>> maps = MapSet(net, ClipperOptions({"1": 0.5, "*": 2.0}))
        >>> maps.build(), [(m.name, m.input_shape, maps.target_of(m)) for m in maps.maps]
        (True, [('0', (2,), 2.0), ('1', (3,), 0.5)])
    """

    def __init__(self, model: nn.Module, options: ClipperOptions) -> None:
        self.method = options.clip_method
        self._targets = options.target
        self._shapes = cast(dict[str, list[tuple[int, ...]]], options.input_shapes)
        self._clip_frozen = options.clip_frozen
        self.layers = _layers_of(_unwrap(model), options)
        self._check_patterns()
        self._check_clippable()
        watched = {id(m.layer): (m.parts[0], m.layer) for m in self.layers if m.kind != "projection"}
        self.recorder: InputShapeRecorder | None = InputShapeRecorder(watched.values(), training_only=True)
        self.maps: list[TrackedMap] = []
        self.not_clipped: dict[str, str] = {}

    def _check_patterns(self) -> None:
        names = [m.name for m in self.layers]
        patterns = [("target", p) for p in self._targets] if isinstance(self._targets, Mapping) else []
        for group, pattern in [*patterns, *(("input_shapes", p) for p in self._shapes)]:
            if not any(m.matches(pattern) for m in self.layers):
                raise ValueError(f"{group} pattern {pattern!r} matches no selected layer; selected: {', '.join(names)}")
        for i, (_, pattern) in enumerate(patterns):
            earlier = [p for _, p in patterns[:i]]
            taken = [next((p for p in earlier if m.matches(p)), None) for m in self.layers if m.matches(pattern)]
            if all(p is not None for p in taken):
                warn(
                    f"target pattern {pattern!r} sets no layer's target: every layer it matches is taken by an "
                    f"earlier pattern ({', '.join(repr(p) for p in dict.fromkeys(taken))}); the first matching "
                    f"pattern wins, so put specific patterns before catch-alls"
                )

    def _check_clippable(self) -> None:
        if self.method.track_only:
            return
        for m in self.layers:
            if not isinstance(m.layer, LAYER_TYPES) or not self.method.supports(m):
                continue
            try:
                check_clippable(m.module)
            except ValueError as err:
                raise ValueError(
                    f"cannot clip {m.name} ({type(m.layer).__name__}): {err}. Leave it out "
                    f"(exclude=[{m.parts[0]!r}]), or track it only (method='none')."
                ) from err

    def target_of(self, tracked: TrackedMap) -> float | None:
        """The target one map is clipped to (``None`` if the per-layer mapping does not cover it).

        Args:
            tracked: one of :attr:`maps` (or :attr:`layers`).

        Returns:
            float | None: the spectral norm to clip to.

        Example:
            >>> maps = MapSet(nn.Sequential(nn.Linear(2, 2)), ClipperOptions({"0": 0.5}))
            >>> maps.target_of(maps.layers[0])
            0.5
        """
        if not isinstance(self._targets, Mapping):
            return self._targets
        for pattern, target in self._targets.items():
            if tracked.matches(pattern):
                return target
        return None

    def _calls_of(self, layer: TrackedMap, recorded: Calls) -> list[tuple[tuple[int, ...], Call]]:
        """Every way a layer is bounded at: the (input shape, call) pairs it ran with before the first step, and
        the shapes named in ``input_shapes`` (called with the input alone). A Linear's norm is the same at every
        shape: it is measured on one input vector."""
        module, name = layer.layer, layer.parts[0]
        if layer.kind == "batchnorm":  # the clamp of the gains holds at every shape
            return recorded.get(name, [])[:1]
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and module.in_features > 0:
            return [((module.in_features,), ())]
        calls = list(recorded.get(name, []))
        for pattern, extra in self._shapes.items():
            if layer.matches(pattern):
                calls += [(s, ()) for s in extra if (s, ()) not in calls]
        return calls

    def build(self) -> bool:
        """At the first step: turn the selected layers into maps, one per way each ran, and decide which are
        clipped (warning about those that are not). Later calls do nothing.

        Returns:
            bool: whether the maps were built now.

        Raises:
            ValueError: a map that is not affine in its input.

        Example:
            >>> maps = MapSet(nn.Sequential(nn.Linear(2, 2)), ClipperOptions())
            >>> maps.build(), maps.build()
            (True, False)
        """
        if self.recorder is None:
            return False
        recorded, unsupported = self.recorder.all_calls, self.recorder.unsupported
        self.recorder.remove()
        self.recorder = None
        self.maps, unbounded = [], {}
        for layer in self.layers:
            if layer.kind == "projection":  # built now, on the device and in the dtype the model trains in
                view = attention_projection(cast(nn.MultiheadAttention, layer.layer), layer.name.rsplit(".", 1)[1])
                layer = dataclasses.replace(layer, kind="layer", module=view, layer=view)
            if layer.parts[0] in unsupported:
                unbounded[layer.name] = f"{unsupported[layer.parts[0]]}: its map as called cannot be rebuilt"
                continue
            calls = self._calls_of(layer, recorded)
            if not calls:
                unbounded[layer.name] = _why_unrecorded(layer)
            for i, (shape, call) in enumerate(calls):
                name = layer.name if i == 0 else _map_name(layer.name, shape, call)
                module = _called(layer, call)
                self.maps.append(dataclasses.replace(layer, name=name, input_shape=shape, call=call, module=module))
        for reason in dict.fromkeys(unbounded.values()):
            names = [n for n, r in unbounded.items() if r == reason]
            warn(f"neither tracked nor clipped, {reason}: {_listing(names)}")
        for m in self.maps:
            _check_affine(m)
        self.not_clipped = {**unbounded, **self._decide_not_clipped()}
        return True

    def _reasons(self) -> tuple[dict[str, str], dict[str, str]]:
        """Why each clippable-looking map is not clipped, and per reason what the first layer's check said."""
        reasons: dict[str, str] = {}
        details: dict[str, str] = {}
        for m in self.maps:
            if self.target_of(m) is None:
                continue
            if not self.method.supports(m):
                reasons[m.name] = f"method {self.method.name!r} cannot clip a {m.kind}"
            elif not self._clip_frozen and not any(p.requires_grad for p in m.layer.parameters()):
                reasons[m.name] = "frozen (requires_grad=False)"
            elif isinstance(m.layer, LAYER_TYPES) and m.kind != "batchnorm":
                try:
                    check_clippable(m.module, m.input_shape)
                except NotLinearInWeightError as err:
                    reasons[m.name] = "not linear in its weight"
                    details.setdefault(reasons[m.name], str(err))
        return reasons, details

    def _decide_not_clipped(self) -> dict[str, str]:
        if self.method.track_only:
            return {}
        reasons, details = self._reasons()
        frozen = [n for n, r in reasons.items() if r.startswith("frozen")]
        if frozen:
            info(
                f"{len(frozen)} frozen layers (requires_grad=False) are tracked, not clipped: {_listing(frozen)}; "
                f"pass clip_frozen=True to clip them too"
            )
        grouped: dict[str, list[str]] = {}
        for name, reason in reasons.items():
            if name not in frozen:
                grouped.setdefault(reason, []).append(name)
        for reason, names in grouped.items():
            detail = f" ({details[reason]})" if reason in details else ""
            warn(f"tracked but not clipped, {reason}{detail}: {_listing(names)}")
        return reasons

    def summary(self, states: Mapping[str, MapState]) -> str:
        """A table of every map: kind, input shape, tracked spectral norm, target, clips that changed the
        weights, and why a map is not clipped (see :meth:`SpectralClipper.summary`).

        Args:
            states: the tracked state of each map.

        Returns:
            str: a title line and the table, one line per map.

        Example:
            >>> print(MapSet(nn.Sequential(nn.Linear(3, 3)), ClipperOptions()).summary({}))
            Spectral norms (method=fastclip)
            layer  kind  input shape  sigma  target  clips  note
        """
        rows = [("layer", "kind", "input shape", "sigma", "target", "clips", "note")]
        for m in self.maps:
            state = states.get(m.name, MapState())
            sigma = f"{float(state.values[0]):.4f}" if state.values is not None else "-"
            target = None if self.method.track_only or m.name in self.not_clipped else self.target_of(m)
            rows.append(
                (
                    m.name,
                    m.kind,
                    str(m.input_shape),
                    sigma,
                    "-" if target is None else f"{target:g}",
                    str(state.clips),
                    self.not_clipped.get(m.name, ""),
                )
            )
        names = {m.name for m in self.maps}
        unbounded = [(name, reason) for name, reason in self.not_clipped.items() if name not in names]
        rows += [(name, "-", "-", "-", "-", "0", reason) for name, reason in unbounded]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        table = "\n".join(lines)
        return f"Spectral norms (method={self.method.name})\n{table}"

    def remove(self) -> None:
        """Stop recording the layers' calls (the maps, if built, stay).

        Example:
            >>> MapSet(nn.Sequential(nn.Linear(2, 2)), ClipperOptions()).remove()
        """
        if self.recorder is not None:
            self.recorder.remove()
