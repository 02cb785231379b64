"""The interface every clipping method implements, and the track-only method ``none``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_specclip.spectral.clip import ClipResult, clip_spectral_norm_
from lightning_specclip.spectral.spectrum import spectrum
from lightning_specclip.tracked_map import TrackedMap, known_shape

__all__ = ["ClipMethod", "NoClip", "measured_result"]


def measured_result(
    tracked: TrackedMap,
    target: float,
    before: float,
    estimate: float,
    changed: bool,
    init: Tensor | None = None,
    *,
    tol: float = 1e-2,
) -> ClipResult:
    """The :class:`~lightning_specclip.ClipResult` of a method's clip, with ``after`` measured on the written weights.

    A method's own estimate (Gouk's power iteration through a zero-padded convolution, Miyato's reshaped kernel,
    the circular surrogate of the FFT clip) is not the layer's spectral norm. This measures the layer as it
    now is with :func:`~lightning_specclip.spectrum` (Krylov, on the layer at its input shape, warm-started
    from ``init``; residual ``1e-4``, so ``σ₁`` is accurate to about ``5e-5`` relative at worst) and reports
    that as ``after`` and its spectrum as ``spectrum`` (so the clipper need not measure again); the method's
    number goes to ``estimate``.

    Args:
        tracked: the clipped map, with its input shape.
        target: the spectral norm clipped to.
        before: the method's estimate before the clip (it decided whether the method wrote).
        estimate: the method's own estimate after the clip.
        changed: whether the method wrote the weights.
        init: vectors to warm-start from, ``(j, *input_shape)`` (e.g. the clipper's tracked ones); ``j``
            vectors are measured (one when ``None`` or of another shape).
        tol: relative tolerance of ``converged`` (``after ≤ target·(1 + tol)``).

    Returns:
        ClipResult: ``rounds=1`` if ``changed`` else 0, ``converged`` from the measured ``after``.

    Example:
        >>> import torch
        >>> from lightning_specclip.tracked_map import TrackedMap, known_shape
        >>> lin = torch.nn.Linear(4, 3)
        >>> t = TrackedMap("lin", "layer", lin, lin, input_shape=(4,))
        >>> r = measured_result(t, 10.0, 0.9, 0.9, False)
        >>> r.changed, abs(r.after - torch.linalg.matrix_norm(lin.weight.double(), 2).item()) < 1e-4
        (False, True)
    """
    shape = tuple(known_shape(tracked))
    if init is not None and tuple(init.shape[1:]) != shape:
        init = None
    k = 1 if init is None else max(1, min(init.shape[0], math.prod(shape)))
    fresh = spectrum(tracked.module, shape, k=k, init=None if init is None else init[:k], tol=1e-4, left=False)
    after = fresh.sigma
    return ClipResult(
        before,
        after,
        target,
        1 if changed else 0,
        after <= target * (1 + tol),
        spectrum=fresh,
        changed=changed,
        estimate=estimate,
    )


class ClipMethod:
    """How one method keeps a layer's spectral norm at a target; the clipper decides when.

    (The clipper is :class:`~lightning_specclip.SpectralClipper`.)

    A method holds no schedule and no per-layer state of its own: per-layer tensors live in the ``state``
    dict the clipper passes in (and saves in checkpoints). Tracking the true spectral norm for logging is
    the clipper's job (it uses :func:`~lightning_specclip.spectrum`); a method only clips.

    BatchNorm targets (``clip_batchnorm=True``) are clamped the same way by every method (Gouk et al. 2021),
    through :meth:`clip_batchnorm_`.

    Example:
        >>> NoClip().name
        'none'
    """

    name: ClassVar[str] = ""
    #: target kinds the method can clip (``"layer"``, ``"composition"``); BatchNorm is handled by all.
    kinds: ClassVar[tuple[str, ...]] = ("layer",)
    #: clip passes of one clip event (:meth:`clip_pass_`): after each pass the maps still above their target
    #: (by more than ``tol / 2``) are clipped again by the next. An exact method (FastClip) takes several: a clip of
    #: one map of a layer moves the layer's other maps (other input shapes, its conv∘BN composition).
    passes: ClassVar[int] = 1
    #: whether the method only tracks (never clips nor penalizes): no target applies, nothing is refused
    track_only: ClassVar[bool] = False
    #: relative tolerance of a clip
    tol: float = 1e-2

    def supports(self, tracked: TrackedMap) -> bool:
        """Whether the method can act on ``tracked``.

        Args:
            tracked: a layer, composition or BatchNorm map.

        Returns:
            bool: ``True`` if :meth:`clip_` (or :meth:`penalty`) handles it.
        """
        return tracked.kind == "batchnorm" or tracked.kind in self.kinds

    def step(self, tracked: TrackedMap, state: dict[str, Tensor]) -> None:
        """Cheap per-step work (e.g. one power iteration); default nothing.

        Args:
            tracked: the map, with its input shape known.
            state: the map's persistent tensors, updated in place.
        """

    def clip_(
        self, tracked: TrackedMap, target: float, state: dict[str, Tensor], init: Tensor | None
    ) -> ClipResult | None:
        """Clip ``tracked`` to ``target`` in place; ``None`` if the method does not clip (tracking, regularizer).

        Args:
            tracked: the map, with its input shape known.
            target: the spectral norm to clip to.
            state: the map's persistent tensors, updated in place.
            init: the tracked top right singular vectors of the map (a warm start), if any.

        Returns:
            ClipResult | None: what was done.
        """
        return None

    def clip_all_(
        self, items: Sequence[tuple[TrackedMap, float, dict[str, Tensor], Tensor | None]]
    ) -> list[ClipResult | None]:
        """Clip several maps that share no parameter (a clip event of a training loop); default :meth:`clip_` on
        each in turn. A method that can do them together (FastClip measures them in lock-step) overrides it.

        Args:
            items: ``(tracked, target, state, init)`` per map, as :meth:`clip_` takes them.

        Returns:
            list[ClipResult | None]: per map, in order, what :meth:`clip_` returns.

        Example:
            >>> NoClip().clip_all_([])
            []
        """
        return [self.clip_(*item) for item in items]

    def clip_pass_(
        self, items: Sequence[tuple[TrackedMap, float, dict[str, Tensor], Tensor | None]], index: int
    ) -> list[ClipResult | None]:
        """Pass ``index`` (from 0, below :attr:`passes`) of a clip event over maps that share no parameter; default
        :meth:`clip_all_` in every pass. A method whose last resort differs (FastClip rescales) overrides it.

        Args:
            items: ``(tracked, target, state, init)`` per map, as :meth:`clip_` takes them.
            index: which pass of the event this is.

        Returns:
            list[ClipResult | None]: per map, in order, what was done.

        Example:
            >>> NoClip().clip_pass_([], 0)
            []
        """
        return self.clip_all_(items)

    @property
    def penalizes(self) -> bool:
        """Whether the method is a regularizer: it overrides :meth:`penalty` (``penalize()`` must then run
        before every optimizer step).

        Example:
            >>> NoClip().penalizes
            False
        """
        return type(self).penalty is not ClipMethod.penalty

    def clip_batchnorm_(self, tracked: TrackedMap, target: float) -> ClipResult | None:
        """Clamp a BatchNorm map: ``|γᵢ|/√(varᵢ+ε) ≤ target`` (exact).

        Args:
            tracked: a ``"batchnorm"`` map.
            target: the bound.

        Returns:
            ClipResult | None: what was done.
        """
        return clip_spectral_norm_(tracked.module, target)

    def penalize_(self, tracked: TrackedMap, target: float) -> None:
        """Add the gradient of :meth:`penalty` to the ``.grad`` of the map's trainable parameters (set it where
        there is none); nothing for a method without a penalty.

        Args:
            tracked: the map, with its input shape known.
            target: the target spectral norm.

        Example:
            >>> NoClip().penalize_(None, 1.0)  # no penalty: nothing to add
        """
        penalty = self.penalty(tracked, target)
        if penalty is None:
            return
        params = [p for p in tracked.module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))

    def penalty(self, tracked: TrackedMap, target: float) -> Tensor | None:
        """A differentiable penalty on the weights to add to the loss's gradient; default none.

        Args:
            tracked: the map, with its input shape known.
            target: the target spectral norm.

        Returns:
            Tensor | None: a scalar, or ``None``.
        """
        return None


class NoClip(ClipMethod):
    """Track only: the clipper measures spectral norms and changes nothing.

    Example:
        >>> NoClip().clip_(None, 1.0, {}, None) is None
        True
    """

    name: ClassVar[str] = "none"
    kinds: ClassVar[tuple[str, ...]] = ("layer", "composition")
    track_only: ClassVar[bool] = True

    def clip_batchnorm_(self, tracked: TrackedMap, target: float) -> ClipResult | None:
        """Leave the BatchNorm alone (track only).

        Args:
            tracked: a ``"batchnorm"`` map.
            target: ignored.

        Returns:
            None: nothing is clipped.
        """
        return None
