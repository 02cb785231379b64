"""The options of a :class:`~lightning_specclip.SpectralClipper`, as one frozen settings object checked once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from lightning_specclip.methods import METHODS, ClipMethod
from lightning_specclip.selection import Selector
from lightning_specclip.spectral.clip import _positive_finite

__all__ = ["ClipperOptions", "check_options"]

InputShapes = Mapping[str, Sequence[int] | Sequence[Sequence[int]]]


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _at_least(minimum: int) -> dict[str, Callable[[str, Any], Any]]:
    """Field metadata: the value must be an integer of at least ``minimum``."""
    return {"check": lambda name, value: _count(name, value, minimum)}


#: field metadata: the value is read as a flag
_FLAG: dict[str, Callable[[str, Any], Any]] = {"check": lambda name, value: bool(value)}


def _target_argument(name: str, target: Any) -> float | dict[str, float]:
    """A positive finite float, or a non-empty ``{glob: positive finite float}``."""
    if isinstance(target, Mapping):
        if not target:
            raise ValueError(f"{name} mapping is empty; give at least one pattern: value")
        return {str(p): _positive_finite(v, f"{name}[{p!r}]") for p, v in target.items()}
    return _positive_finite(target)


def _shapes_argument(name: str, input_shapes: InputShapes | None) -> dict[str, list[tuple[int, ...]]]:
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
                    f"{name}[{pattern!r}] must be an input shape without the batch dimension, e.g. (3, 64, 64), "
                    f"or a list of them; got {value!r}"
                )
            checked.append(tuple(shape))
        result[str(pattern)] = checked
    return result


def _method_argument(method: str | ClipMethod, compositions: bool) -> ClipMethod:
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        method = METHODS[method]()
    elif not isinstance(method, ClipMethod):
        raise ValueError(f"method must be one of {', '.join(METHODS)} or a ClipMethod, got {type(method).__name__}")
    if compositions and "composition" not in method.kinds:
        allowed = [n for n, cls in METHODS.items() if "composition" in cls.kinds]
        raise ValueError(
            f"method {method.name!r} cannot clip conv∘BatchNorm compositions; with compose_batchnorm=True "
            f"use one of: {', '.join(allowed)}"
        )
    return method


@dataclass(frozen=True)
class ClipperOptions:
    r"""Everything a :class:`~lightning_specclip.SpectralClipper` is told besides its model and optimizer.

    Checked once, when made: what is wrong raises before any model is looked at, and what is kept is normalized
    (the target a float or ``{glob: float}``, the method a :class:`~lightning_specclip.ClipMethod`, the input
    shapes ``{glob: [shapes]}``, ``remeasure_iters`` an integer). ``SpectralClipper(model, target, **options)``
    and ``SpectralClipCallback(target, **options)`` build one from their keyword arguments, or take one as
    ``options=``. Fields read with ``options["name"]`` too.

    The schedule (the paper's): ``warmup_iters`` solver iterations the first time a map is measured, then
    ``iters_per_step`` warm-started iterations after every ``track_every_n_steps``-th step, and a clip every
    ``every_n_steps`` steps from ``start_step`` (:meth:`SpectralClipper.should_clip`). After a clip every map
    whose weights moved is measured to convergence anew, in at most ``remeasure_iters`` iterations.

    Args:
        target: the spectral norm to clip to, or a mapping from module-name glob to target. Patterns are
            ``fnmatch`` globs on the layer's full name (``"layer1.*"``; a conv∘BN composition also by
            ``"conv+bn"``), tried in the mapping's order: the first that matches gives the target, so put
            specific patterns before catch-alls (a pattern all of whose layers an earlier one takes is warned
            about). Layers matching none are tracked but not clipped.
        modules: module types and/or name globs to act on; default every ``Linear``, ``Conv*d`` and
            ``ConvTranspose*d``, and the query, key and value projections of every ``MultiheadAttention``
            (``<attn>.q_proj``, ``.k_proj``, ``.v_proj``; its ``out_proj`` is a ``Linear``). Names are those of
            the eager model also when it is compiled (without ``_orig_mod``).
        exclude: types and/or name globs to leave out.
        method: ``"fastclip"`` (exact; the default), ``"gouk"``, ``"miyato"``, ``"senderovich"``, ``"gram"``
            (a regularizer: call :meth:`SpectralClipper.penalize` before each optimizer step), ``"none"`` (track
            only), or a :class:`~lightning_specclip.methods.ClipMethod`.
        compose_batchnorm: also clip each conv→BatchNorm composition (pairs found by tracing the model with
            ``torch.fx``; module order when it cannot be traced), after the conv alone, as the paper does.
        clip_batchnorm: also clamp every BatchNorm's per-channel gain ``|γ|/√(var+ε)`` to the target.
        input_shapes: more input shapes (without the batch dimension) to bound layers at, by layer-name glob:
            ``{"features.0": (3, 64, 64)}`` or ``{"features.*": [(16, 32, 32), (16, 64, 64)]}``
            (:func:`~lightning_specclip.tracking.input_shapes` gives every layer's shape for a model input).
        clip_frozen: also clip layers none of whose parameters require gradients.
        warmup_iters: most Krylov iterations of a map's first measurement (the warm-up): it starts from a
            gap-free Lanczos measurement (a fixed number of steps, ~50 for a layer of 16k inputs) that finds σ₁
            whatever the spectrum, and refines it to convergence.
        remeasure_iters: most Krylov iterations of a measurement anew after a clip moved a map's weights, and of
            the final measurement of :meth:`SpectralClipper.clip`; default ``warmup_iters``.
        iters_per_step: warm-started solver iterations per tracked step.
        track_every_n_steps: do the per-step update only every this many steps (and right before each clip);
            1 is the paper's schedule, more trades tracking resolution for speed on fast accelerators.
        k: how many top singular values to track per map.
        every_n_steps: clip every this many steps.
        start_step: first step at which clipping may happen.

    Raises:
        ValueError: a non-positive or non-finite target, an unknown method, a count below its minimum, a
            malformed input shape, ``compose_batchnorm`` with a method that cannot clip compositions.

    Example:
        >>> options = ClipperOptions(0.5, method="gouk", warmup_iters=20)
        >>> options.method.name, options.remeasure_iters, options["target"]
        ('gouk', 20, 0.5)
    """

    target: float | Mapping[str, float] = field(default=1.0, metadata={"check": _target_argument})
    _: KW_ONLY
    modules: Sequence[Selector] | None = field(
        default=None, metadata={"check": lambda name, value: None if value is None else list(value)}
    )
    exclude: Sequence[Selector] = field(default=(), metadata={"check": lambda name, value: list(value)})
    method: str | ClipMethod = "fastclip"
    compose_batchnorm: bool = field(default=False, metadata=_FLAG)
    clip_batchnorm: bool = field(default=False, metadata=_FLAG)
    input_shapes: InputShapes | None = field(default=None, metadata={"check": _shapes_argument})
    clip_frozen: bool = field(default=False, metadata=_FLAG)
    warmup_iters: int = field(default=100, metadata=_at_least(1))
    remeasure_iters: int | None = field(
        default=None, metadata={"check": lambda name, value: value if value is None else _count(name, value, 1)}
    )
    iters_per_step: int = field(default=1, metadata=_at_least(1))
    track_every_n_steps: int = field(default=1, metadata=_at_least(1))
    k: int = field(default=1, metadata=_at_least(1))
    every_n_steps: int = field(default=100, metadata=_at_least(1))
    start_step: int = field(default=0, metadata=_at_least(0))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "check" in f.metadata:  # frozen: the normalized value is written past the dataclass's guard
                object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        object.__setattr__(self, "method", _method_argument(self.method, self.compose_batchnorm))
        if self.remeasure_iters is None:  # by default a re-measurement runs as long as the warm-up may
            object.__setattr__(self, "remeasure_iters", self.warmup_iters)

    @classmethod
    def of(
        cls, options: ClipperOptions | None, target: float | Mapping[str, float] | None, **kwargs: Any
    ) -> ClipperOptions:
        """The options an entry point is given: ``options`` (default all defaults) with ``target`` (unless
        ``None``) and ``kwargs`` replacing the fields they name.

        Args:
            options: the options as one object, if given.
            target: the target, if given.
            **kwargs: other fields by name.

        Returns:
            ClipperOptions: the checked options.

        Raises:
            TypeError: a name that is not a field.
            ValueError: what the fields refuse.

        Example:
            >>> ClipperOptions.of(ClipperOptions(0.5, k=2), None, k=3)["target"], ClipperOptions.of(None, 2.0).target
            (0.5, 2.0)
        """
        named = kwargs if target is None else {"target": target, **kwargs}
        return cls(**named) if options is None else dataclasses.replace(options, **named)

    @property
    def clip_method(self) -> ClipMethod:
        """The method as the checked :class:`~lightning_specclip.ClipMethod` (the field, typed as it is after the
        check).

        Example:
            >>> ClipperOptions(method="none").clip_method.track_only
            True
        """
        assert isinstance(self.method, ClipMethod)  # __post_init__ made it one
        return self.method

    def __getitem__(self, name: str) -> Any:
        """One option by name, as the dict of :func:`check_options` gives it.

        Args:
            name: the option's name.

        Returns:
            Any: its checked value.

        Raises:
            KeyError: not an option.

        Example:
            >>> ClipperOptions(every_n_steps=7)["every_n_steps"]
            7
        """
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(name)
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        """The options by name (shallow: the method is the object itself).

        Returns:
            dict[str, Any]: ``{name: checked value}``, in field order.

        Example:
            >>> list(ClipperOptions().as_dict())[:3]
            ['target', 'modules', 'exclude']
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_options(target: float | Mapping[str, float] = 1.0, **options: Any) -> dict[str, Any]:
    """Check the options of a :class:`SpectralClipper` (all but the model and optimizer) without a model.

    Args:
        target: the spectral norm to clip to, or ``{glob: target}``.
        **options: the other fields of :class:`ClipperOptions` (each one documented there).

    Returns:
        dict[str, Any]: the options, normalized: the target a float or ``{glob: float}``, the method a
        :class:`~lightning_specclip.ClipMethod`, input shapes ``{glob: [shapes]}``.

    Raises:
        ValueError: what :class:`SpectralClipper` refuses before it looks at the model.
        TypeError: an option :class:`ClipperOptions` does not have.

    Example:
        >>> check_options(0.5, method="gouk")["method"].name
        'gouk'
    """
    return ClipperOptions(target, **options).as_dict()
