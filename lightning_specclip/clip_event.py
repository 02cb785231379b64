"""One clip event: clip every due map, make sure every map of every clipped layer holds its bound, re-measure."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lightning_specclip.rank_zero import broadcast, warn
from lightning_specclip.spectral.clip import ClipResult
from lightning_specclip.spectral.spectrum import Spectrum
from lightning_specclip.tracked_map import TrackedMap
from lightning_specclip.tracker import Tracker, finite

__all__ = ["ClipEvent", "ClipReport"]

#: a map to clip and the target it is clipped to
Due = Sequence[tuple[TrackedMap, float]]


@dataclass(frozen=True)
class ClipReport:
    """What one clip event did.

    Attributes:
        changed: the maps whose weights a clip wrote.
        measured: the maps whose tracked spectrum was measured on their present weights in the event (by a clip,
            or anew after a clip moved them, or at a final event).
        passes: the clip passes run (see :attr:`ClipMethod.passes <lightning_specclip.ClipMethod.passes>`).

    Example:
        >>> ClipReport(frozenset({"0"}), frozenset({"0"}), 1).changed
        frozenset({'0'})
    """

    changed: frozenset[str]
    measured: frozenset[str]
    passes: int


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


def disjoint(due: Due) -> list[list[tuple[TrackedMap, float]]]:
    """``due`` in batches of maps that share no parameter: a map goes in the batch after the last one holding a map
    it shares a parameter with (the order of ``due`` among maps that share parameters is kept).

    Args:
        due: ``(map, target)`` pairs.

    Returns:
        list[list[tuple[TrackedMap, float]]]: the batches, in order.

    Example:
        >>> from torch import nn
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> maps = [TrackedMap("a", "layer", a, a), TrackedMap("a@4", "layer", a, a), TrackedMap("b", "layer", b, b)]
        >>> [[m.name for m, _ in batch] for batch in disjoint([(m, 1.0) for m in maps])]
        [['a', 'b'], ['a@4']]
    """
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


class ClipEvent:
    """One clip event over a clipper's maps: the method's clip passes, then the measurements they call for.

    A layer can be several maps (one per input shape, and its composition with a BatchNorm): clipping one moves
    the others. After each of the method's passes (:attr:`~lightning_specclip.ClipMethod.passes`) every map whose
    weights moved is measured anew, and the maps still above their target are clipped again by the next pass
    (FastClip's last one rescales the weight, which lowers every map of the layer by the same factor). A final
    event also measures to convergence the maps no clip moved, so that what is reported is measured.

    Args:
        tracker: the tracked spectra (read for warm starts, written with what is measured).
        maps: every map of the clipper (those sharing weights with a clipped one are re-measured).
        on_clip: called with each map whose weights a clip wrote; default: broadcast them from rank 0.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_specclip.options import ClipperOptions
        >>> lin = nn.Linear(4, 4)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(10)
        >>> m = TrackedMap("lin", "layer", lin, lin, (4,))
        >>> tracker = Tracker(ClipperOptions(warmup_iters=50))
        >>> tracker.adopt([m])
        >>> event = ClipEvent(tracker, [m])
        >>> report = event.run(event.due(lambda m: 1.0, {}))
        >>> report.changed, round(tracker.sigma(m), 3)
        (frozenset({'lin'}), 1.0)
    """

    def __init__(
        self, tracker: Tracker, maps: Sequence[TrackedMap], on_clip: Callable[[TrackedMap], None] = broadcast
    ) -> None:
        self.tracker = tracker
        self.method = tracker.method
        self.maps = list(maps)
        self.on_clip = on_clip

    def due(self, target_of: Callable[[TrackedMap], float | None], not_clipped: Mapping[str, str]) -> Due:
        """The maps to clip and their targets; first measures what is not measured (where the weights allow).

        Maps without a target, not clipped for a reason, or of a kind the method cannot clip are left out; a map
        with non-finite weights too, with a warning (its tracked spectrum is dropped).

        Args:
            target_of: a map's target (``None``: not clipped).
            not_clipped: ``{map name: reason}`` of the maps not to clip.

        Returns:
            Sequence[tuple[TrackedMap, float]]: ``(map, target)`` pairs, in the order of the maps.
        """
        self.tracker.drop_non_finite()  # and measure anew what was dropped (or never measured)
        self.tracker.warm_up([m for m in self.maps if self.tracker.states[m.name].values is None])
        due = []
        for m in self.maps:
            target = target_of(m)
            if target is None or m.name in not_clipped or not self.method.supports(m):
                continue
            if not finite(m):
                warn(f"{m.name} has non-finite weights; not clipped")
                self.tracker.forget(m)
                continue
            due.append((m, target))
        return due

    def run(self, due: Due, *, final: bool = False) -> ClipReport:
        """Clip the due maps in the method's passes, each pass over those still above their target.

        Args:
            due: ``(map, target)`` pairs (see :meth:`due`).
            final: also measure to convergence every map no clip measured.

        Returns:
            ClipReport: what the event did.
        """
        changed: set[str] = set()
        measured: set[str] = set()
        pending, passes = due, 0
        for index in range(self.method.passes):
            passes += 1
            measured |= self._clip_pass(pending, changed, index)
            pending = [(m, t) for m, t in due if self.tracker.sigma(m) > t * (1 + self.method.tol / 2)]
            if not pending:
                break
        for name in changed:
            self.tracker.states[name].clips += 1
        if final:  # the per-step estimates of the other maps (a clip that wrote nothing) can lag behind: measure them
            remeasured = [m for m in self.maps if m.name not in measured]
            self.tracker.remeasure(remeasured)
            measured |= {m.name for m in remeasured}
        return ClipReport(frozenset(changed), frozenset(measured), passes)

    def _clip_pass(self, due: Due, changed: set[str], index: int) -> set[str]:
        """Clip the due maps: in batches of maps that share no parameter, each batch in one call of the method
        (FastClip measures a batch's maps in lock-step), in the order of ``due`` where maps share parameters.
        Returns the names of the maps whose spectrum was measured on their present weights (by a clip, or anew)."""
        moved_params: set[int] = set()  # parameters some clip moved
        fresh: dict[str, Spectrum] = {}  # spectra the clips measured on the weights they wrote
        for batch in disjoint(due):
            for (m, _), result in zip(batch, self._clip_batch(batch, index), strict=True):
                if result is None or not result.changed:
                    if result is not None and result.spectrum is not None and self.tracker.reusable(m, result.spectrum):
                        fresh[m.name] = result.spectrum
                    continue
                changed.add(m.name)
                self.on_clip(m)
                moved = {id(p) for p in m.module.parameters()}
                moved_params |= moved
                for other in self.maps:  # a spectrum measured before this clip is stale if the clip moved it
                    if other.name in fresh and any(id(p) in moved for p in other.module.parameters()):
                        del fresh[other.name]
                if result.spectrum is not None and self.tracker.reusable(m, result.spectrum):
                    fresh[m.name] = result.spectrum
        # Re-measure every other map whose weights moved (clipping a conv∘BN composition also moves the conv, a
        # layer run at two input sizes is two maps): a clip can hand the top of the spectrum to another direction,
        # which one warm iteration would miss.
        stale = []
        for m in self.maps:
            if m.name in fresh:
                self.tracker.accept(m, fresh[m.name])
            elif any(id(p) in moved_params for p in m.module.parameters()):
                stale.append(m)
        self.tracker.remeasure(stale)
        return set(fresh) | {m.name for m in stale}

    def _clip_batch(self, batch: Due, index: int) -> list[ClipResult | None]:
        """Clip maps that share no parameter; BatchNorm maps by the method's clamp. An error names the map it
        happened on: a batch that fails is clipped again one map at a time (its maps share no parameter, so
        the order does not matter), and the map that fails raises."""
        try:
            return self._clip_together(batch, index)
        except Exception as err:
            if len(batch) == 1:
                raise _named(batch[0][0], err) from err
        results: list[ClipResult | None] = []
        for item in batch:
            try:
                results += self._clip_together([item], index)
            except Exception as err:
                raise _named(item[0], err) from err
        return results

    def _clip_together(self, batch: Due, index: int) -> list[ClipResult | None]:
        results = [self.method.clip_batchnorm_(m, target) if m.kind == "batchnorm" else None for m, target in batch]
        layers = [i for i, (m, _) in enumerate(batch) if m.kind != "batchnorm"]
        states = [self.tracker.states[batch[i][0].name] for i in layers]
        items = [(*batch[i], s.method_state, s.right) for i, s in zip(layers, states, strict=True)]
        for i, result in zip(layers, self.method.clip_pass_(items, index), strict=True):
            results[i] = result
        return results
