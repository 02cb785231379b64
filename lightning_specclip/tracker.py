"""Per-map state and the per-step update: the tracked spectra, the operators kept across steps, measurements anew."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from lightning_specclip.options import ClipperOptions
from lightning_specclip.spectral.certify import certified_spectra
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.power import PowerStep
from lightning_specclip.spectral.spectrum import Spectrum, spectrum
from lightning_specclip.tracked_map import TrackedMap, known_shape

__all__ = ["MapState", "Tracker"]


@dataclass
class MapState:
    """What is kept per map (saved by :meth:`SpectralClipper.state_dict`).

    Attributes:
        right: the tracked top right singular vectors, ``(k, *input_shape)``; ``None`` before the first measurement.
        values: the tracked top singular values, largest first.
        clips: how many clips changed the map's weights.
        method_state: the method's persistent tensors for the map.

    Example:
        >>> MapState().clips
        0
    """

    right: Tensor | None = None
    values: Tensor | None = None
    clips: int = 0
    method_state: dict[str, Tensor] = field(default_factory=dict)


def finite(tracked: TrackedMap) -> bool:
    """Whether every parameter of a map is finite.

    Args:
        tracked: the map.

    Returns:
        bool: ``False`` if a weight holds an inf or a NaN.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 2)
        >>> finite(TrackedMap("lin", "layer", lin, lin, (2,)))
        True
    """
    return all(torch.isfinite(p).all() for p in tracked.module.parameters())


class Tracker:
    """The tracked spectra of a clipper's maps, and how they are kept up to date.

    Per step, the paper's update: ``iters_per_step`` warm-started iterations per map, those of the warm
    single-vector standard layers together (:class:`~lightning_specclip.spectral.PowerStep`: one CUDA graph replay
    on GPUs). A map not measured yet is measured anew (the warm-up, in at most ``warmup_iters`` Krylov
    iterations), as is one a clip moved (:meth:`remeasure`, in at most ``remeasure_iters``).

    Args:
        options: the clipper's options (the method, whose per-step work runs after each map's update; ``k``,
            ``iters_per_step``, ``warmup_iters``, ``remeasure_iters``).

    Attributes:
        states: ``{map name: MapState}``.
        group_convolutions: run the per-step products of same-geometry convolutions as one grouped convolution
            (``PowerStep(group=True)``; faster on CPUs with oneDNN); takes effect at the next update.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(3, 3)
        >>> tracker = Tracker(ClipperOptions(method="none", warmup_iters=50))
        >>> m = TrackedMap("lin", "layer", lin, lin, (3,))
        >>> tracker.adopt([m])
        >>> tracker.track_all([m])  # cold: measured anew
        >>> abs(tracker.sigma(m) - torch.linalg.matrix_norm(lin.weight.detach(), 2).item()) < 1e-4
        True
    """

    def __init__(self, options: ClipperOptions) -> None:
        self.method = options.clip_method
        self.states: dict[str, MapState] = {}
        self._k = options.k
        self._iters = options.iters_per_step
        self._warmup = options.warmup_iters
        self._remeasure = cast(int, options.remeasure_iters)  # set from warmup_iters when not given
        self._operators: dict[str, ImplicitLinear] = {}  # per-step operators, kept while they see the weights
        self._power: PowerStep | None = None  # the per-step update of the standard layers (a CUDA graph on GPUs)
        self._group = False

    @property
    def group_convolutions(self) -> bool:
        """Whether the per-step update runs same-geometry convolutions as one grouped convolution.

        Example:
            >>> Tracker(ClipperOptions()).group_convolutions
            False
        """
        return self._group

    @group_convolutions.setter
    def group_convolutions(self, group: bool) -> None:
        self._group = bool(group)
        self._power = None  # built anew, so grouped or not, at the next update

    def adopt(self, maps: Sequence[TrackedMap]) -> None:
        """Keep state for exactly these maps: what is known of each is kept, a new one starts empty.

        Args:
            maps: every map now tracked.
        """
        self.states = {m.name: self.states.get(m.name) or MapState() for m in maps}

    def release(self) -> None:
        """Let go of the operators and the per-step update (they reference the model's weights)."""
        self._operators, self._power = {}, None

    def k(self, tracked: TrackedMap) -> int:
        """How many singular values of a map are tracked: ``k``, at most the map's input size.

        Args:
            tracked: the map.

        Returns:
            int: the count.
        """
        return min(self._k, math.prod(known_shape(tracked)))

    def sigma(self, tracked: TrackedMap) -> float:
        """The tracked σ₁ of a map (``inf`` while it is unknown).

        Args:
            tracked: the map.

        Returns:
            float: the tracked spectral norm.
        """
        values = self.states[tracked.name].values
        return math.inf if values is None else float(values[0])

    def forget(self, tracked: TrackedMap) -> None:
        """Drop what is tracked of a map (it is measured anew when its weights allow).

        Args:
            tracked: the map.
        """
        self.states[tracked.name].right = self.states[tracked.name].values = None

    def reusable(self, tracked: TrackedMap, measured: Spectrum) -> bool:
        """Whether a clip's own measurement of the weights it wrote can stand for the map's tracked spectrum.

        Args:
            tracked: the map.
            measured: the spectrum the clip measured.

        Returns:
            bool: whether it holds at least :meth:`k` vectors.
        """
        return measured.right.shape[0] >= self.k(tracked)

    def accept(self, tracked: TrackedMap, measured: Spectrum) -> None:
        """Take a clip's own (:meth:`reusable`) measurement as the map's tracked spectrum.

        Args:
            tracked: the map.
            measured: the spectrum the clip measured on the weights it wrote.
        """
        k = self.k(tracked)
        state = self.states[tracked.name]
        state.right, state.values = measured.right[:k], measured.values[:k]

    def _operator(self, tracked: TrackedMap) -> tuple[ImplicitLinear, bool]:
        """The map's operator and whether it reads the live weights; only such a one is kept across steps
        (in float32 models; other dtypes are read through converted copies, made anew each time)."""
        A = self._operators.get(tracked.name)
        if A is not None and A.op is tracked.module and A.live:
            return A, True
        A = ImplicitLinear(tracked.module, known_shape(tracked), check_affine=False)
        live = A.live
        if live:
            self._operators[tracked.name] = A
        else:
            self._operators.pop(tracked.name, None)
        return A, live

    def _warm(self, tracked: TrackedMap) -> bool:
        right = self.states[tracked.name].right
        return right is not None and right.shape[1:] == tracked.input_shape

    def track_all(self, maps: Sequence[TrackedMap]) -> None:
        """The per-step update of every map; maps not yet measured (the warm-up) are measured together.

        Args:
            maps: the maps to update.
        """
        together: list[tuple[TrackedMap, ImplicitLinear]] = []
        cold: list[TrackedMap] = []
        for m in maps:
            if not self._warm(m):
                cold.append(m)
                continue
            A, live = self._operator(m) if self.k(m) == 1 else (None, False)
            if A is not None and live and A.closed_form:
                together.append((m, A))
            else:
                self._track(m, A)
        self.warm_up(cold)
        if not together:
            return
        operators = [A for _, A in together]
        if self._power is None or self._power.operators != operators:  # by identity: an operator was rebuilt
            self._power = PowerStep(operators, group=self._group)
        values, vectors = self._power([cast(Tensor, self.states[m.name].right) for m, _ in together])  # warm
        for (m, _), value, vector in zip(together, values, vectors, strict=True):
            state = self.states[m.name]
            state.right, state.values = vector, value
            self.method.step(m, state.method_state)

    def _track(self, tracked: TrackedMap, operator: ImplicitLinear | None) -> None:
        """The paper's per-step update of one warm map: warm-started subspace iterations (one AᵀA block each)."""
        state = self.states[tracked.name]
        result = spectrum(
            operator if operator is not None else self._operator(tracked)[0],
            k=self.k(tracked),
            solver="subspace",
            init=state.right,
            max_iters=self._iters,
            tol=1e-12,
            check_affine=False,
            left=False,
        )
        state.right, state.values = result.right, result.values
        self.method.step(tracked, state.method_state)

    def warm_up(self, maps: Sequence[TrackedMap]) -> None:
        """Measure maps for the first time (or after their spectrum was dropped), in at most ``warmup_iters``.

        Args:
            maps: the maps.
        """
        self._measure_all(maps, self._warmup)

    def remeasure(self, maps: Sequence[TrackedMap]) -> None:
        """Measure anew maps a clip moved (and all of them at a final clip), in at most ``remeasure_iters``.

        Args:
            maps: the maps.
        """
        self._measure_all(maps, self._remeasure)

    def _measure_all(self, maps: Sequence[TrackedMap], max_iters: int) -> None:
        """Measure maps anew by the certified recipe (:func:`~lightning_specclip.spectral.certify.certified_spectra`:
        σ₁ found whatever the spectrum, all the maps in lock-step), warm-started where ``k > 1``. Maps with
        non-finite weights are skipped (the clip warns about them)."""
        maps = [m for m in maps if finite(m)]
        if not maps:
            return
        # the affinity of each map was probed once, when the maps were made
        operators = [ImplicitLinear(m.module, known_shape(m), check_affine=False) for m in maps]
        warm = [self.states[m.name].right if self._warm(m) else None for m in maps]
        found = certified_spectra(operators, k=[self.k(m) for m in maps], warm=warm, max_iters=max_iters)
        for m, result in zip(maps, found, strict=True):
            state = self.states[m.name]
            state.right, state.values = result.right, result.values
            self.method.step(m, state.method_state)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The state of every map, copied, without spectra that are not finite (measured anew on resume).

        Returns:
            dict[str, dict[str, Any]]: ``{map name: {"right", "values", "clips", "method_state"}}``.

        Example:
            >>> Tracker(ClipperOptions()).state_dict()
            {}
        """
        self.drop_non_finite()

        def copy(t: Tensor | None) -> Tensor | None:  # the per-step update overwrites its vectors in place
            return None if t is None else t.clone()

        return {
            name: {
                "right": copy(s.right),
                "values": copy(s.values),
                "clips": s.clips,
                "method_state": dict(s.method_state),
            }
            for name, s in self.states.items()
        }

    def load_state_dict(self, maps: Mapping[str, Mapping[str, Any]], known: Sequence[TrackedMap] | None) -> None:
        """Restore what :meth:`state_dict` saved, merged by map.

        Args:
            maps: the saved state of each map.
            known: the maps now tracked, if known: a saved map not among them is dropped, a new one starts empty.

        Example:
            >>> tracker = Tracker(ClipperOptions())
            >>> tracker.load_state_dict({"lin": {"right": None, "values": None, "clips": 2, "method_state": {}}}, None)
            >>> tracker.states["lin"].clips
            2
        """
        self.states = {
            name: MapState(s["right"], s["values"], s["clips"], dict(s["method_state"])) for name, s in maps.items()
        }
        if known is not None:
            self.adopt(known)
        self.drop_non_finite()

    def drop_non_finite(self) -> None:
        """Forget tracked spectra that are not finite (the weights were, for a while): they are measured anew."""
        known = [(s, s.values, s.right) for s in self.states.values() if s.values is not None and s.right is not None]
        if not known:
            return
        finite_ = torch.stack(
            [torch.isfinite(values).all() & torch.isfinite(right).all() for _, values, right in known]
        )
        for (state, _, _), ok in zip(known, finite_.tolist(), strict=True):
            if not ok:
                state.right = state.values = None
