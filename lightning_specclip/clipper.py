"""SpectralClipper: hold the spectral norm of a model's layers at a target in any PyTorch training loop."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_specclip.methods import METHODS, ClipMethod
from lightning_specclip.spectral.clip import (
    ClipResult,
    NotLinearInWeightError,
    _positive_finite,
    check_clippable,
    clip_spectral_norms_,
)
from lightning_specclip.spectral.operator import ImplicitLinear, no_autocast
from lightning_specclip.spectral.power import PowerStep
from lightning_specclip.spectral.spectrum import Spectrum, gap_free_spectra, spectrum
from lightning_specclip.targets import (
    LAYER_TYPES,
    PROJECTIONS,
    Call,
    InputShapeRecorder,
    Selector,
    TrackedMap,
    attention_projection,
    called_view,
    find_conv_bn_pairs,
    named_modules,
    select_modules,
)

__all__ = ["SpectralClipper"]

log = logging.getLogger(__name__)


@dataclass
class _MapState:
    """What the clipper keeps per map (saved by :meth:`SpectralClipper.state_dict`)."""

    right: Tensor | None = None
    values: Tensor | None = None
    clips: int = 0
    method_state: dict[str, Tensor] = field(default_factory=dict)


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _shapes_argument(
    input_shapes: Mapping[str, Sequence[int] | Sequence[Sequence[int]]] | None,
) -> dict[str, list[tuple[int, ...]]]:
    """``{glob: shape or [shapes]}`` → ``{glob: [shapes]}``, each shape a tuple of positive sizes."""
    result: dict[str, list[tuple[int, ...]]] = {}
    for pattern, value in (input_shapes or {}).items():
        shapes = [value] if value and all(isinstance(s, int) for s in value) else list(value)
        checked = []
        for shape in shapes:
            if not (
                isinstance(shape, Sequence)
                and shape
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
            ):
                raise ValueError(
                    f"input_shapes[{pattern!r}] must be an input shape without the batch dimension, e.g. (3, 64, 64), "
                    f"or a list of them; got {value!r}"
                )
            checked.append(tuple(shape))
        result[str(pattern)] = checked
    return result


def _method_argument(method: str | ClipMethod, compose_batchnorm: bool) -> ClipMethod:
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        method = METHODS[method]()
    elif not isinstance(method, ClipMethod):
        raise ValueError(f"method must be one of {', '.join(METHODS)} or a ClipMethod, got {type(method).__name__}")
    if compose_batchnorm and "composition" not in method.kinds:
        allowed = [n for n, cls in METHODS.items() if "composition" in cls.kinds]
        raise ValueError(
            f"method {method.name!r} cannot clip conv∘BatchNorm compositions; with compose_batchnorm=True "
            f"use one of: {', '.join(allowed)}"
        )
    return method


def check_options(
    target: float | Mapping[str, float] = 1.0,
    *,
    modules: Sequence[Selector] | None = None,
    exclude: Sequence[Selector] = (),
    method: str | ClipMethod = "fastclip",
    compose_batchnorm: bool = False,
    clip_batchnorm: bool = False,
    input_shapes: Mapping[str, Sequence[int] | Sequence[Sequence[int]]] | None = None,
    clip_frozen: bool = False,
    warmup_iters: int = 100,
    iters_per_step: int = 1,
    track_every_n_steps: int = 1,
    k: int = 1,
    every_n_steps: int = 100,
    start_step: int = 0,
) -> dict[str, Any]:
    """Check the options of a :class:`SpectralClipper` (all but the model and optimizer) without a model.

    Args:
        target: see :class:`SpectralClipper` (as every argument here).
        modules: layer types and/or name globs to act on.
        exclude: types and/or name globs to leave out.
        method: the clip method, by name or as a :class:`~lightning_specclip.ClipMethod`.
        compose_batchnorm: also clip conv∘BatchNorm compositions.
        clip_batchnorm: also clamp BatchNorm gains.
        input_shapes: more input shapes by layer-name glob.
        clip_frozen: also clip frozen layers.
        warmup_iters: most Krylov iterations refining a map's measurement to convergence.
        iters_per_step: warm-started iterations per tracked step.
        track_every_n_steps: the per-step update every this many steps.
        k: singular values tracked per map.
        every_n_steps: clip every this many steps.
        start_step: first step at which clipping may happen.

    Returns:
        dict[str, Any]: the options, normalized: the target a float or ``{glob: float}``, the method a
        :class:`~lightning_specclip.ClipMethod`, input shapes ``{glob: [shapes]}``.

    Raises:
        ValueError: what :class:`SpectralClipper` refuses before it looks at the model.

    Example:
        >>> check_options(0.5, method="gouk")["method"].name
        'gouk'
    """
    if isinstance(target, Mapping):
        if not target:
            raise ValueError("target mapping is empty; give at least one pattern: value")
        target = {str(p): _positive_finite(v, f"target[{p!r}]") for p, v in target.items()}
    else:
        target = _positive_finite(target)
    return {
        "target": target,
        "modules": list(modules) if modules is not None else None,
        "exclude": list(exclude),
        "method": _method_argument(method, compose_batchnorm),
        "compose_batchnorm": bool(compose_batchnorm),
        "clip_batchnorm": bool(clip_batchnorm),
        "input_shapes": _shapes_argument(input_shapes),
        "clip_frozen": bool(clip_frozen),
        "warmup_iters": _count("warmup_iters", warmup_iters, 1),
        "iters_per_step": _count("iters_per_step", iters_per_step, 1),
        "track_every_n_steps": _count("track_every_n_steps", track_every_n_steps, 1),
        "k": _count("k", k, 1),
        "every_n_steps": _count("every_n_steps", every_n_steps, 1),
        "start_step": _count("start_step", start_step, 0),
    }


def _listing(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names) - most} more)"


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside the wrappers of data-parallel training and of Fabric, so that names are its own."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_original_module", None), nn.Module):  # Lightning Fabric's _FabricModule
            model = model._original_module
        else:
            return model


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _warn(message: str) -> None:
    """Warn once per job: on rank 0 only when a process group is running."""
    if not _distributed() or torch.distributed.get_rank() == 0:
        warnings.warn(f"SpectralClipper: {message}", stacklevel=3)


def _info(message: str) -> None:
    if not _distributed() or torch.distributed.get_rank() == 0:
        log.info("SpectralClipper: %s", message)


def _map_name(name: str, shape: tuple[int, ...], call: Call) -> str:
    """``"<layer>@CxHxW"``, with ``",<attribute>=AxB"`` for what the call fixes besides the input shape."""
    fixed = "".join(f",{attribute}={'x'.join(map(str, value))}" for attribute, value in call)
    return f"{name}@{'x'.join(map(str, shape))}{fixed}"


def _named(tracked: TrackedMap, err: Exception) -> Exception:
    """``err`` with the map it happened on in front of its message (same class where it takes one message)."""
    message = (
        f"clipping {tracked.name} ({type(tracked.layer).__name__}, input shape {tracked.input_shape}) failed: "
        f"{type(err).__name__}: {err}"
    )
    try:
        named = type(err)(message)
    except Exception:  # noqa: BLE001 - an exception class that takes other arguments
        named = RuntimeError(message)
    return named if str(named) == message else RuntimeError(message)


def _disjoint(due: Sequence[tuple[TrackedMap, float]]) -> list[list[tuple[TrackedMap, float]]]:
    """``due`` in batches of maps that share no parameter: a map goes in the batch after the last one holding a map
    it shares a parameter with (the order of ``due`` among maps that share parameters is kept)."""
    batches: list[list[tuple[TrackedMap, float]]] = []
    last: dict[int, int] = {}  # parameter -> the latest batch holding a map of it
    for item in due:
        params = [id(p) for p in item[0].module.parameters()]
        index = 1 + max((last[p] for p in params if p in last), default=-1)
        if index == len(batches):
            batches.append([])
        batches[index].append(item)
        for p in params:
            last[p] = index
    return batches


class SpectralClipper:
    r"""Track and clip the spectral norm of every selected layer of a model, in any training loop.

    Create it for the model, call :meth:`step` after every optimizer step (or pass ``optimizer=`` and it
    steps itself), and :meth:`clip` before you save the weights you keep. For each selected layer it keeps
    the top singular values of the layer as the linear map it really is (convolutions with their padding,
    stride and input size; see :func:`~lightning_specclip.spectrum`), warm-started from the previous step's
    vectors, and every ``every_n_steps`` steps clips the layers whose norm exceeds the target with the chosen
    method. Weights are edited in place under ``torch.no_grad()``, so optimizers and compiled graphs keep
    their references. Pure PyTorch: :class:`~lightning_specclip.SpectralClipCallback` drives one of these
    from a Lightning ``Trainer``.

    Schedule (the paper's): ``warmup_iters`` solver iterations the first time a map is measured, then
    ``iters_per_step`` warm-started iterations after every step (every ``track_every_n_steps`` steps), and a
    clip at each step :meth:`should_clip` accepts (every ``every_n_steps`` steps from ``start_step``;
    override it for another schedule). After a clip every map whose weights moved is measured to
    convergence; an exact method (FastClip) clips again what a clip of another map of the same layer pushed
    above its value, finally by rescaling the weight.

    Input shapes: a convolution's map depends on its input size and on how it is called, so every way a layer
    runs in training mode between the clipper's creation and the first :meth:`step` (the first training step)
    is its own map, tracked and clipped: each input shape, and for a transposed convolution each
    ``output_size=`` that changes its output (``"<layer>@CxHxW"`` for the ways after the first); evaluation-mode
    forwards do not count. Compiled models are recorded too (``torch.compile``'s cached code is dropped once
    so that it calls the recording hooks). Name further shapes, such as the test resolution, with
    ``input_shapes``. A shape first seen later is not bounded. A ``Linear``'s norm is the same at every input
    shape and needs none. Every selected layer the clipper cannot bound is listed in :attr:`not_clipped` and
    :meth:`summary` with the reason, and warned about: one that did not run in training before the first step
    (and has no named shape), one called with arguments whose map it cannot rebuild, one not linear in its
    weight (such as a weight-standardized conv; tracked), and frozen layers (no parameter requiring grad;
    tracked, clipped with ``clip_frozen``).

    When a ``torch.distributed`` process group is running (DDP, Fabric), clipped weights are broadcast from
    rank 0 so every rank holds bit-identical weights (data-parallel training never re-broadcasts parameters);
    every rank must call :meth:`step` and :meth:`clip` alike. Spectral math runs in float32 whatever the
    dtype of the model, and outside any autocast region the step or clip is called from (a step inside
    ``optimizer.step()`` under ``torch.autocast``, a Lightning hook under ``precision="bf16-mixed"``).

    Args:
        model: the model whose layers are controlled (inside a ``DistributedDataParallel`` or Fabric wrapper
            the layers keep the model's own names).
        target: the spectral norm to clip to, or a mapping from module-name glob to target. Patterns are
            ``fnmatch`` globs on the layer's full name (``"layer1.*"``; a conv∘BN composition also by
            ``"conv+bn"``), tried in the mapping's order: the first that matches gives the target, so put
            specific patterns before catch-alls (a pattern all of whose layers an earlier one takes is warned
            about). Layers matching none are tracked but not clipped.
        optimizer: step automatically right after every ``optimizer.step()`` (see :meth:`attach`): a GAN's
            discriminator is then clipped after its own step, before the generator trains against it.
        modules: module types and/or name globs to act on; default every ``Linear``, ``Conv*d`` and
            ``ConvTranspose*d``, and the query, key and value projections of every ``MultiheadAttention``
            (``<attn>.q_proj``, ``.k_proj``, ``.v_proj``; its ``out_proj`` is a ``Linear``). Names are those of
            the eager model also when it is compiled (without ``_orig_mod``).
        exclude: types and/or name globs to leave out.
        method: ``"fastclip"`` (exact; the default), ``"gouk"``, ``"miyato"``, ``"senderovich"``, ``"gram"``
            (a regularizer: call :meth:`penalize` before each optimizer step), ``"none"`` (track only), or a
            :class:`~lightning_specclip.methods.ClipMethod`.
        compose_batchnorm: also clip each conv→BatchNorm composition (pairs found by tracing the model with
            ``torch.fx``; module order when it cannot be traced), after the conv alone, as the paper does.
        clip_batchnorm: also clamp every BatchNorm's per-channel gain ``|γ|/√(var+ε)`` to the target.
        input_shapes: more input shapes (without the batch dimension) to bound layers at, by layer-name glob:
            ``{"features.0": (3, 64, 64)}`` or ``{"features.*": [(16, 32, 32), (16, 64, 64)]}``
            (:func:`~lightning_specclip.tracking.input_shapes` gives every layer's shape for a model input).
        clip_frozen: also clip layers none of whose parameters require gradients.
        warmup_iters: most Krylov iterations that refine a measurement of a map to convergence (the first one,
            and those after a clip moved it): it starts from a gap-free Lanczos measurement (a fixed number of
            steps, ~50 for a layer of 16k inputs) that finds σ₁ whatever the spectrum.
        iters_per_step: warm-started solver iterations per tracked step.
        track_every_n_steps: do the per-step update only every this many steps (and right before each clip);
            1 is the paper's schedule, more trades tracking resolution for speed on fast accelerators.
        k: how many top singular values to track per map.
        every_n_steps: clip every this many steps.
        start_step: first step at which clipping may happen.

    Raises:
        ValueError: a non-positive or non-finite target, an unknown method, a count below its minimum, a
            malformed input shape, ``compose_batchnorm`` with a method that cannot clip compositions, a
            pattern that matches no selected layer, or a layer whose weight is parametrized in a way that
            cannot take a clipped weight (``spectral_norm``); at the first step, a selected module that is not
            affine in its input.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> clipper = SpectralClipper(model, target=1.0, every_n_steps=2, warmup_iters=20)
        >>> for _ in range(4):
        ...     model(torch.randn(8, 1, 8, 8)).square().mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     clipper.step()
        >>> clipper.clip()
        >>> all(sigma <= 1.01 for sigma in clipper.sigmas.values())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        target: float | Mapping[str, float] = 1.0,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        modules: Sequence[Selector] | None = None,
        exclude: Sequence[Selector] = (),
        method: str | ClipMethod = "fastclip",
        compose_batchnorm: bool = False,
        clip_batchnorm: bool = False,
        input_shapes: Mapping[str, Sequence[int] | Sequence[Sequence[int]]] | None = None,
        clip_frozen: bool = False,
        warmup_iters: int = 100,
        iters_per_step: int = 1,
        track_every_n_steps: int = 1,
        k: int = 1,
        every_n_steps: int = 100,
        start_step: int = 0,
    ) -> None:
        options = check_options(
            target,
            modules=modules,
            exclude=exclude,
            method=method,
            compose_batchnorm=compose_batchnorm,
            clip_batchnorm=clip_batchnorm,
            input_shapes=input_shapes,
            clip_frozen=clip_frozen,
            warmup_iters=warmup_iters,
            iters_per_step=iters_per_step,
            track_every_n_steps=track_every_n_steps,
            k=k,
            every_n_steps=every_n_steps,
            start_step=start_step,
        )
        self.target: float | dict[str, float] = options["target"]
        self.method: ClipMethod = options["method"]
        self.compose_batchnorm: bool = options["compose_batchnorm"]
        self.clip_batchnorm: bool = options["clip_batchnorm"]
        self.input_shapes: dict[str, list[tuple[int, ...]]] = options["input_shapes"]
        self.clip_frozen: bool = options["clip_frozen"]
        self.warmup_iters: int = options["warmup_iters"]
        self.iters_per_step: int = options["iters_per_step"]
        self.track_every_n_steps: int = options["track_every_n_steps"]
        self.k: int = options["k"]
        self.every_n_steps: int = options["every_n_steps"]
        self.start_step: int = options["start_step"]
        #: every tracked map, one per input shape its layer runs at (known at the first step)
        self.maps: list[TrackedMap] = []
        #: maps and selected layers that are not clipped, with the reason: layers the clipper cannot bound (never
        #: ran in training, called in a way whose map it cannot rebuild; neither tracked nor clipped) and maps
        #: that are tracked only (frozen, not linear in the weight, a kind the method cannot clip)
        self.not_clipped: dict[str, str] = {}
        self._layers = self._select(_unwrap(model), options["modules"], options["exclude"])
        self._check_patterns()
        self._check_clippable()
        self._states: dict[str, _MapState] = {}
        self._operators: dict[str, ImplicitLinear] = {}  # per-step operators, kept while they see the weights
        self._power: PowerStep | None = None  # the per-step update of the standard layers (a CUDA graph on GPUs)
        watched = {id(m.layer): (m.parts[0], m.layer) for m in self._layers if m.kind != "projection"}
        self._recorder: InputShapeRecorder | None = InputShapeRecorder(watched.values(), training_only=True)
        self._num_steps = 0
        self._clipped_step = -1  # the step the weights were last clipped after
        self._penalized = False  # whether penalize() ran since the last step (methods with a penalty)
        self._handles: list[RemovableHandle] = []
        if optimizer is not None:
            self.attach(optimizer)

    # ------------------------------------------------------------------ selection
    def _select(
        self, model: nn.Module, modules: Sequence[Selector] | None, exclude: Sequence[Selector]
    ) -> list[TrackedMap]:
        selected = select_modules(model, modules, exclude)
        maps = []
        for name, module in selected:
            if isinstance(module, nn.MultiheadAttention):  # its q, k, v maps; out_proj is a Linear of its own
                maps += [TrackedMap(f"{name}.{which}", "projection", module, module) for which in PROJECTIONS]
            else:
                maps.append(TrackedMap(name, "layer", module, module))
        named = named_modules(model)
        if self.compose_batchnorm:
            for conv_name, bn_name in find_conv_bn_pairs(model):
                conv, bn = named[conv_name], named[bn_name]
                pair = nn.Sequential(conv, bn)
                maps.append(TrackedMap(f"{conv_name}+{bn_name}", "composition", pair, conv, parts=(conv_name, bn_name)))
        if self.clip_batchnorm:
            for name, module in named.items():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    maps.append(TrackedMap(name, "batchnorm", module, module))
        return maps

    def _check_patterns(self) -> None:
        names = [m.name for m in self._layers]
        patterns = [("target", p) for p in self.target] if isinstance(self.target, dict) else []
        for group, pattern in [*patterns, *(("input_shapes", p) for p in self.input_shapes)]:
            if not any(m.matches(pattern) for m in self._layers):
                raise ValueError(f"{group} pattern {pattern!r} matches no selected layer; selected: {', '.join(names)}")
        for i, (_, pattern) in enumerate(patterns):
            earlier = [p for _, p in patterns[:i]]
            taken = [next((p for p in earlier if m.matches(p)), None) for m in self._layers if m.matches(pattern)]
            if all(p is not None for p in taken):
                _warn(
                    f"target pattern {pattern!r} sets no layer's target: every layer it matches is taken by an "
                    f"earlier pattern ({', '.join(repr(p) for p in dict.fromkeys(taken))}); the first matching "
                    f"pattern wins, so put specific patterns before catch-alls"
                )

    def _check_clippable(self) -> None:
        if self.method.name == "none":
            return
        for m in self._layers:
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
        """The value one map is clipped to (``None`` if the per-layer mapping does not cover it).

        Args:
            tracked: one of :attr:`maps`.

        Returns:
            float | None: the value to clip to.

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
            >>> clipper = SpectralClipper(model, {"1": 0.5, "*": 2.0})
            >>> [clipper.target_of(m) for m in clipper._layers]
            [2.0, 0.5]
        """
        if not isinstance(self.target, dict):
            return self.target
        for pattern, value in self.target.items():
            if tracked.matches(pattern):
                return value
        return None

    # ------------------------------------------------------------------ input shapes
    def _calls_of(
        self, layer: TrackedMap, recorded: Mapping[str, list[tuple[tuple[int, ...], Call]]]
    ) -> list[tuple[tuple[int, ...], Call]]:
        """Every way a layer is bounded at: the (input shape, call) pairs it ran with before the first step, and
        the shapes named in ``input_shapes`` (called with the input alone). A Linear's norm is the same at every
        shape: it is measured on one input vector."""
        module, name = layer.layer, layer.parts[0]
        if layer.kind == "batchnorm":  # the clamp of the gains holds at every shape
            return recorded.get(name, [])[:1]
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and module.in_features > 0:
            return [((module.in_features,), ())]
        calls = list(recorded.get(name, []))
        for pattern, extra in self.input_shapes.items():
            if layer.matches(pattern):
                calls += [(s, ()) for s in extra if (s, ()) not in calls]
        return calls

    def _ensure_maps(self) -> None:
        """At the first step: turn the selected layers into maps, one per input shape, and decide which are clipped."""
        if self._recorder is None:
            return
        recorded, unsupported = self._recorder.all_calls, self._recorder.unsupported
        self._recorder.remove()
        self._recorder = None
        self.maps, unbounded = [], {}
        for layer in self._layers:
            if layer.kind == "projection":  # built now, on the device and in the dtype the model trains in
                view = attention_projection(layer.layer, layer.name.rsplit(".", 1)[1])
                layer = dataclasses.replace(layer, kind="layer", module=view, layer=view)
            if layer.parts[0] in unsupported:
                unbounded[layer.name] = f"{unsupported[layer.parts[0]]}: its map as called cannot be rebuilt"
                continue
            calls = self._calls_of(layer, recorded)
            if not calls:
                unbounded[layer.name] = self._why_unrecorded(layer)
            for i, (shape, call) in enumerate(calls):
                name = layer.name if i == 0 else _map_name(layer.name, shape, call)
                module = self._called(layer, call)
                self.maps.append(dataclasses.replace(layer, name=name, input_shape=shape, call=call, module=module))
        for reason in dict.fromkeys(unbounded.values()):
            names = [n for n, r in unbounded.items() if r == reason]
            _warn(f"neither tracked nor clipped, {reason}: {_listing(names)}")
        for m in self.maps:
            self._check_affine(m)
        self.not_clipped = {**unbounded, **self._decide_not_clipped()}
        self._states = {m.name: self._states.get(m.name) or _MapState() for m in self.maps}

    @staticmethod
    def _called(layer: TrackedMap, call: Call) -> nn.Module:
        """What runs a layer's map as called: the layer's :func:`~lightning_specclip.targets.called_view`, inside
        the conv∘BatchNorm pair of a composition."""
        if not call:
            return layer.module
        view = called_view(layer.layer, call)
        return nn.Sequential(view, layer.module[1]) if layer.kind == "composition" else view

    @staticmethod
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

    @staticmethod
    def _check_affine(tracked: TrackedMap) -> None:
        if tracked.kind == "batchnorm":
            return
        try:
            ImplicitLinear(tracked.module, tracked.input_shape, check_affine=True)
        except ValueError as err:
            raise ValueError(
                f"{tracked.name} ({type(tracked.layer).__name__}) at input shape {tracked.input_shape} is not a "
                f"linear map of its input, so it has no spectral norm: {err}. Select only layers affine in their "
                f"input (modules=, exclude=)."
            ) from err

    def _decide_not_clipped(self) -> dict[str, str]:
        reasons: dict[str, str] = {}
        details: dict[str, str] = {}  # reason → what the first layer's check said
        if self.method.name == "none":
            return reasons
        for m in self.maps:
            if self.target_of(m) is None:
                continue
            if not self.method.supports(m):
                reasons[m.name] = f"method {self.method.name!r} cannot clip a {m.kind}"
            elif not self.clip_frozen and not any(p.requires_grad for p in m.layer.parameters()):
                reasons[m.name] = "frozen (requires_grad=False)"
            elif isinstance(m.layer, LAYER_TYPES) and m.kind != "batchnorm":
                try:
                    check_clippable(m.module, m.input_shape)
                except NotLinearInWeightError as err:
                    reasons[m.name] = "not linear in its weight"
                    details.setdefault(reasons[m.name], str(err))
        frozen = [n for n, r in reasons.items() if r.startswith("frozen")]
        if frozen:
            _info(
                f"{len(frozen)} frozen layers (requires_grad=False) are tracked, not clipped: {_listing(frozen)}; "
                f"pass clip_frozen=True to clip them too"
            )
        grouped: dict[str, list[str]] = {}
        for name, reason in reasons.items():
            if name not in frozen:
                grouped.setdefault(reason, []).append(name)
        for reason, names in grouped.items():
            detail = f" ({details[reason]})" if reason in details else ""
            _warn(f"tracked but not clipped, {reason}{detail}: {_listing(names)}")
        return reasons

    # ------------------------------------------------------------------ the training-loop API
    @property
    def num_steps(self) -> int:
        """Optimizer steps counted so far (by :meth:`step`); a loop that counts its own may set it.

        Example:
            >>> clipper = SpectralClipper(nn.Sequential(nn.Linear(3, 3)))
            >>> clipper.num_steps
            0
        """
        return self._num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self._num_steps = _count("num_steps", value, 0)
        if self._clipped_step > value:  # a clip "after" a step that has not happened in this count
            self._clipped_step = -1

    @property
    def dirty(self) -> bool:
        """Whether an optimizer step moved the weights since they were last clipped.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).dirty
            False
        """
        return self._num_steps > 0 and self._clipped_step != self._num_steps

    def should_clip(self, step: int) -> bool:
        """Whether to clip after optimizer step ``step`` (counted from 1); override for another schedule.

        Args:
            step: the step just taken.

        Returns:
            bool: ``True`` every ``every_n_steps`` steps from ``start_step``.

        Example:
            >>> clipper = SpectralClipper(nn.Sequential(nn.Linear(3, 3)), every_n_steps=10, start_step=5)
            >>> [s for s in range(1, 40) if clipper.should_clip(s)]
            [5, 15, 25, 35]
        """
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0

    def step(self, *, final: bool = False) -> None:
        """Count one optimizer step: track the spectra, and clip if :meth:`should_clip` says so.

        Call it right after ``optimizer.step()`` (the weights it reads are those the step wrote). The first
        call fixes the maps from the input shapes seen in training mode since the clipper was created.

        Args:
            final: the last step of training: clip whatever the schedule, and measure every map (also those
                not clipped) to convergence, as :meth:`clip` does.

        Raises:
            ValueError: at the first step, a selected module that is not affine in its input.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> clipper = SpectralClipper(model, target=0.1, every_n_steps=1)
            >>> clipper.step()  # (after an optimizer step) the first step, and a clip step
            >>> round(torch.linalg.matrix_norm(model[0].weight.detach().double(), 2).item(), 3)
            0.1
        """
        with no_autocast():
            self._step(final)

    def _step(self, final: bool) -> None:
        self._ensure_maps()
        if type(self.method).penalty is not ClipMethod.penalty and not self._penalized and self._num_steps == 0:
            _warn(
                f"method {self.method.name!r} is a regularizer: call penalize() after backward() and before "
                f"optimizer.step(), or it has no effect"
            )
        self._penalized = False
        self._num_steps += 1
        clip_now = final or self.should_clip(self._num_steps)
        if clip_now or self._num_steps % self.track_every_n_steps == 0:
            self._track_all()
        if clip_now:
            self._clip_all(final=final)

    def clip(self) -> None:
        """Clip every map above its target now and measure every map to convergence (e.g. before saving).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> with torch.no_grad():
            ...     _ = model[0].weight.mul_(10)
            >>> clipper = SpectralClipper(model, target=1.0)
            >>> clipper.clip()
            >>> round(torch.linalg.matrix_norm(model[0].weight.detach().double(), 2).item(), 3)
            1.0
            >>> {name: round(sigma, 3) for name, sigma in clipper.sigmas.items()}
            {'0': 1.0}
        """
        with no_autocast():
            self._ensure_maps()
            self._track_all()
            self._clip_all(final=True)

    def penalize(self) -> None:
        """Add the gradient of the method's penalty (the ``gram`` regularizer) to the weights' gradients.

        Call it after ``backward()`` and before ``optimizer.step()``; it does nothing for methods without a
        penalty (every clipping method).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> clipper = SpectralClipper(model, target=0.1, method="gram")
            >>> clipper.penalize()
            >>> bool(model[0].weight.grad.abs().sum() > 0)
            True
        """
        self._penalized = True
        if type(self.method).penalty is ClipMethod.penalty:
            return
        with no_autocast():
            self._penalize()

    def _penalize(self) -> None:
        self._ensure_maps()
        for m in self.maps:
            value = self.target_of(m)
            penalty = None if value is None or m.name in self.not_clipped else self.method.penalty(m, value)
            if penalty is None:
                continue
            params = [p for p in m.module.parameters() if p.requires_grad]
            grads = torch.autograd.grad(penalty, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = g.to(p.dtype)
                    else:
                        p.grad.add_(g.to(p.grad.dtype))

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call :meth:`step` right after every ``optimizer.step()`` (``Optimizer.register_step_post_hook``).

        A step an optimizer skips (a mixed-precision ``GradScaler`` that found inf gradients) is not counted.

        Args:
            optimizer: the optimizer whose steps drive the clipper.

        Returns:
            RemovableHandle: removes the hook (:meth:`remove` removes it too).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> clipper = SpectralClipper(model, 0.1, every_n_steps=1)
            >>> handle = clipper.attach(opt)  # the same as SpectralClipper(model, 0.1, optimizer=opt, ...)
            >>> model(torch.randn(2, 4)).sum().backward()
            >>> opt.step()
            >>> clipper.num_steps, round(torch.linalg.matrix_norm(model[0].weight.detach(), 2).item(), 3)
            (1, 0.1)
        """
        handle = optimizer.register_step_post_hook(lambda *_: self.step())
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook the clipper put on the model and optimizers, and let go of its operators.

        Example:
            >>> clipper = SpectralClipper(nn.Sequential(nn.Linear(3, 3)))
            >>> clipper.remove()
        """
        if self._recorder is not None:
            self._recorder.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._operators, self._power = {}, None

    # ------------------------------------------------------------------ tracking
    @staticmethod
    def _finite(tracked: TrackedMap) -> bool:
        return all(torch.isfinite(p).all() for p in tracked.module.parameters())

    def _k(self, tracked: TrackedMap) -> int:
        return min(self.k, math.prod(tracked.input_shape))

    def _operator(self, tracked: TrackedMap) -> tuple[ImplicitLinear, bool]:
        """The map's operator and whether it reads the live weights; only such a one is kept across steps
        (in float32 models; other dtypes are read through converted copies, made anew each time)."""
        A = self._operators.get(tracked.name)
        if A is not None and A.op is tracked.module and A.live:
            return A, True
        A = ImplicitLinear(tracked.module, tracked.input_shape, check_affine=False)
        live = A.live
        if live:
            self._operators[tracked.name] = A
        else:
            self._operators.pop(tracked.name, None)
        return A, live

    def _warm(self, tracked: TrackedMap) -> bool:
        right = self._states[tracked.name].right
        return right is not None and right.shape[1:] == tracked.input_shape

    def _track_all(self) -> None:
        """The per-step update of every map; one power step each for the warm single-vector standard layers
        together (:class:`~lightning_specclip.spectral.PowerStep`: one CUDA graph replay on GPUs); maps not yet
        measured (the warm-up) are measured together."""
        together: list[tuple[TrackedMap, ImplicitLinear]] = []
        cold: list[TrackedMap] = []
        for m in self.maps:
            if not self._warm(m):
                cold.append(m)
                continue
            A, live = self._operator(m) if self._k(m) == 1 else (None, False)
            if A is not None and live and A.closed_form:
                together.append((m, A))
            else:
                self._track(m, operator=A)
        self._measure_all(cold)
        if not together:
            return
        operators = [A for _, A in together]
        if self._power is None or self._power.operators != operators:  # by identity: an operator was rebuilt
            self._power = PowerStep(operators)
        values, vectors = self._power([self._states[m.name].right for m, _ in together])
        for (m, _), value, vector in zip(together, values, vectors, strict=True):
            state = self._states[m.name]
            state.right, state.values = vector, value
            self.method.step(m, state.method_state)

    def _track(self, tracked: TrackedMap, *, operator: ImplicitLinear | None = None) -> None:
        """The paper's per-step update of one warm map: warm-started subspace iterations (one AᵀA block each)."""
        state = self._states[tracked.name]
        result = spectrum(
            operator if operator is not None else self._operator(tracked)[0],
            k=self._k(tracked),
            solver="subspace",
            init=state.right,
            max_iters=self.iters_per_step,
            tol=1e-12,
            check_affine=False,
            left=False,
        )
        state.right, state.values = result.right, result.values
        self.method.step(tracked, state.method_state)

    def _measure_all(self, maps: Sequence[TrackedMap]) -> None:
        """Measure maps anew (the warm-up, after a clip moved them, at the end), so that σ₁ is found whatever the
        spectrum: the gap-free Lanczos of :func:`~lightning_specclip.spectral.spectrum.gap_free_spectra` from a
        random vector (σ₁ within 0.75%; all the maps in lock-step), then Krylov from its vector (and the warm ones)
        to a residual of 1e-3 (σ to ~1e-6 where σ₁ stands apart). Starting from the warm vectors alone could miss a
        new top, and a residual test alone can stop below σ₁ when many values crowd there. Maps with non-finite
        weights are skipped (the clip warns about them)."""
        maps = [m for m in maps if self._finite(m)]
        if not maps:
            return
        operators = [ImplicitLinear(m.module, m.input_shape, check_affine=False) for m in maps]  # affinity: probed once
        for m, A, found in zip(maps, operators, gap_free_spectra(operators, 0.0075, left=False), strict=True):
            state = self._states[m.name]
            warm = state.right if self._warm(m) else None
            k = self._k(m)
            start = found.right if warm is None or k == 1 else torch.cat([found.right, warm[: k - 1].to(found.right)])
            result = spectrum(A, k=k, init=start, max_iters=self.warmup_iters, tol=1e-3, left=False)
            if result.values[0] < found.values[0]:  # both are lower bounds on σ₁: keep the better one
                result = dataclasses.replace(result, values=torch.cat([found.values, result.values[1:]]))
            state.right, state.values = result.right, result.values
            self.method.step(m, state.method_state)

    def _drop_non_finite(self) -> None:
        """Forget tracked spectra that are not finite (the weights were, for a while): they are measured anew."""
        states = [s for s in self._states.values() if s.values is not None]
        if not states:
            return
        finite = torch.stack([torch.isfinite(s.values).all() & torch.isfinite(s.right).all() for s in states])
        for state, ok in zip(states, finite.tolist(), strict=True):
            if not ok:
                state.right = state.values = None

    # ------------------------------------------------------------------ clipping
    def _clip_all(self, final: bool) -> None:
        """Clip every map above its value, then make sure every map of every clipped layer holds its bound.

        A layer can be several maps (one per input shape, and its composition with a BatchNorm): clipping one
        moves the others. An exact method (FastClip) therefore checks them all afterwards, clips again those
        still above their value, and in a last pass rescales the weight (which lowers every map of the layer
        by the same factor) so that each one lands at or below its value. ``final`` also measures to
        convergence the maps no clip moved, so that what is reported is measured.
        """
        self._drop_non_finite()  # and measure anew what was dropped (or never measured), where the weights allow
        self._measure_all([m for m in self.maps if self._states[m.name].values is None])
        due = []
        for m in self.maps:
            value = self.target_of(m)
            if value is None or m.name in self.not_clipped or not self.method.supports(m):
                continue
            if not self._finite(m):
                _warn(f"{m.name} has non-finite weights; not clipped")
                self._states[m.name].right = self._states[m.name].values = None
                continue
            due.append((m, value))
        changed: set[str] = set()
        measured: set[str] = set()  # maps whose spectrum was measured on their present weights in this event
        pending = due
        for attempt in range(3 if self.method.exact else 1):
            measured |= self._clip_pass(pending, changed, rescale=attempt == 2)
            pending = [(m, v) for m, v in due if self._sigma(m) > v * (1 + self.method.tol / 2)]
            if not pending:
                break
        for name in changed:
            self._states[name].clips += 1
        if final:  # the per-step estimates of the other maps (a clip that wrote nothing) can lag behind: measure them
            self._measure_all([m for m in self.maps if m.name not in measured])
        self._clipped_step = self._num_steps

    def _sigma(self, tracked: TrackedMap) -> float:
        values = self._states[tracked.name].values
        return math.inf if values is None else float(values[0])

    def _reusable(self, tracked: TrackedMap, measured: Spectrum | None) -> bool:
        """Whether a clip's own measurement of the weights it wrote can stand for the map's tracked spectrum."""
        return measured is not None and measured.right.shape[0] >= self._k(tracked)

    def _clip_pass(self, due: Sequence[tuple[TrackedMap, float]], changed: set[str], rescale: bool) -> set[str]:
        """Clip the due maps: in batches of maps that share no parameter, each batch in one call of the method
        (FastClip measures a batch's maps in lock-step), in the order of ``due`` where maps share parameters.
        Returns the names of the maps whose spectrum was measured on their present weights (by a clip, or anew)."""
        moved_params: set[int] = set()  # parameters some clip moved
        fresh: dict[str, Spectrum] = {}  # spectra the clips measured on the weights they wrote
        for batch in _disjoint(due):
            for (m, _), result in zip(batch, self._clip_batch(batch, rescale), strict=True):
                if result is None or not result.changed:
                    if result is not None and self._reusable(m, result.spectrum):
                        fresh[m.name] = result.spectrum
                    continue
                changed.add(m.name)
                self._broadcast(m)
                moved = {id(p) for p in m.module.parameters()}
                moved_params |= moved
                for other in self.maps:  # a spectrum measured before this clip is stale if the clip moved it
                    if other.name in fresh and any(id(p) in moved for p in other.module.parameters()):
                        del fresh[other.name]
                if self._reusable(m, result.spectrum):
                    fresh[m.name] = result.spectrum
        # Re-measure every other map whose weights moved (clipping a conv∘BN composition also moves the conv, a
        # layer run at two input sizes is two maps): a clip can hand the top of the spectrum to another direction,
        # which one warm iteration would miss.
        stale = []
        for m in self.maps:
            if m.name in fresh:
                state = self._states[m.name]
                state.right = fresh[m.name].right[: self._k(m)]
                state.values = fresh[m.name].values[: self._k(m)]
            elif any(id(p) in moved_params for p in m.module.parameters()):
                stale.append(m)
        self._measure_all(stale)
        return set(fresh) | {m.name for m in stale}

    def _clip_batch(self, batch: Sequence[tuple[TrackedMap, float]], rescale: bool) -> list[ClipResult | None]:
        """Clip maps that share no parameter; BatchNorm maps by the method's clamp. An error names the map it
        happened on: a batch that fails is clipped again one map at a time (its maps share no parameter, so
        the order does not matter), and the map that fails raises."""
        try:
            return self._clip_together(batch, rescale)
        except Exception as err:
            if len(batch) == 1:
                raise _named(batch[0][0], err) from err
        results: list[ClipResult | None] = []
        for item in batch:
            try:
                results += self._clip_together([item], rescale)
            except Exception as err:
                raise _named(item[0], err) from err
        return results

    def _clip_together(self, batch: Sequence[tuple[TrackedMap, float]], rescale: bool) -> list[ClipResult | None]:
        results = [self.method.clip_batchnorm_(m, value) if m.kind == "batchnorm" else None for m, value in batch]
        layers = [i for i, (m, _) in enumerate(batch) if m.kind != "batchnorm"]
        maps, values = [batch[i][0] for i in layers], [batch[i][1] for i in layers]
        if rescale:  # the last resort of an exact method: scale the weights onto the targets
            found = clip_spectral_norms_(
                [m.module for m in maps],
                values,
                [m.input_shape for m in maps],
                spectra=[self._states[m.name].right for m in maps],
                max_rounds=0,
                tol=self.method.tol,
            )
        else:
            states = [self._states[m.name] for m in maps]
            found = self.method.clip_all_(
                [(m, value, s.method_state, s.right) for m, value, s in zip(maps, values, states, strict=True)]
            )
        for i, result in zip(layers, found, strict=True):
            results[i] = result
        return results

    @staticmethod
    def _broadcast(tracked: TrackedMap) -> None:
        if not _distributed() or torch.distributed.get_world_size() <= 1:
            return
        with torch.no_grad():
            for p in tracked.module.parameters():
                torch.distributed.broadcast(p.data, src=0)

    # ------------------------------------------------------------------ what it knows
    @property
    def spectra(self) -> dict[str, Tensor]:
        """The tracked top-``k`` singular values of every map measured so far (tensors on the model's device).

        Returns:
            dict[str, Tensor]: ``{map name: values}``, largest first.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).spectra  # nothing measured before the first step
            {}
        """
        return {m.name: self._states[m.name].values for m in self.maps if self._states[m.name].values is not None}

    @property
    def sigmas(self) -> dict[str, float]:
        """The tracked spectral norm σ₁ of every map measured so far, by map name.

        Between clips these come from one warm-started iteration per step (close, from below); right after a
        clip, and after :meth:`clip` or a final :meth:`step`, every map whose weights moved is measured to
        convergence.

        Returns:
            dict[str, float]: ``{map name: σ₁}``.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).sigmas
            {}
        """
        return {name: float(values[0]) for name, values in self.spectra.items()}

    @property
    def clips(self) -> dict[str, int]:
        """How many clips changed the weights of each map.

        Returns:
            dict[str, int]: ``{map name: count}``.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).clips
            {}
        """
        return {name: state.clips for name, state in self._states.items()}

    def summary(self) -> str:
        """A table of every map: kind, input shape, tracked spectral norm, target, clips that changed the
        weights, and why a map is not clipped (frozen, not linear in its weight, ...).

        Returns:
            str: the table, one line per map.

        Example:
            >>> print(SpectralClipper(nn.Sequential(nn.Linear(3, 3))).summary())  # before the first step: no maps yet
            Spectral norms (method=fastclip)
            layer  kind  input shape  sigma  target  clips  note
        """
        rows = [("layer", "kind", "input shape", "sigma", "target", "clips", "note")]
        for m in self.maps:
            state = self._states.get(m.name, _MapState())
            sigma = f"{float(state.values[0]):.4f}" if state.values is not None else "-"
            value = None if self.method.name == "none" or m.name in self.not_clipped else self.target_of(m)
            rows.append(
                (
                    m.name,
                    m.kind,
                    str(m.input_shape),
                    sigma,
                    "-" if value is None else f"{value:g}",
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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: step counters, tracked vectors and values, method state.

        Spectra that are not finite (the weights were not, for a while) are left out: a resumed run measures
        those maps anew.

        Returns:
            dict[str, Any]: the clipper's state.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).state_dict()
            {'num_steps': 0, 'clipped_step': -1, 'maps': {}}
        """
        self._drop_non_finite()

        def copy(t: Tensor | None) -> Tensor | None:  # the per-step update overwrites its vectors in place
            return None if t is None else t.clone()

        return {
            "num_steps": self._num_steps,
            "clipped_step": self._clipped_step,
            "maps": {
                name: {
                    "right": copy(s.right),
                    "values": copy(s.values),
                    "clips": s.clips,
                    "method_state": dict(s.method_state),
                }
                for name, s in self._states.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, merged by map: a map this model does not have any more is
        dropped, a new one starts fresh, a non-finite spectrum is measured anew.

        Args:
            state_dict: the saved state.

        Example:
            >>> clipper = SpectralClipper(nn.Sequential(nn.Linear(3, 3)))
            >>> clipper.load_state_dict({"num_steps": 4, "clipped_step": 4, "maps": {}})
            >>> clipper.num_steps, clipper.dirty
            (4, False)
        """
        self._num_steps = state_dict["num_steps"]
        self._clipped_step = state_dict["clipped_step"]
        loaded = {
            name: _MapState(s["right"], s["values"], s["clips"], dict(s["method_state"]))
            for name, s in state_dict["maps"].items()
        }
        if self._recorder is None:  # the maps are known: keep theirs only
            loaded = {m.name: loaded.get(m.name) or _MapState() for m in self.maps}
        self._states = loaded
        self._drop_non_finite()
