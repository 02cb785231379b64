"""FastClip (Ebrahimpour Boroojeny et al. 2024) as a clip method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from lightning_specclip.methods.base import ClipMethod
from lightning_specclip.spectral.clip import ClipResult, ClipSettings, clip_spectral_norms_
from lightning_specclip.tracked_map import TrackedMap

__all__ = ["FastClip"]


class FastClip(ClipMethod):
    """Clip with :func:`~lightning_specclip.clip_spectral_norm_`, warm-started from the tracked spectrum.

    Exact for every layer the core supports: Linear (SVD), convolutions of any padding, stride, dilation and
    groups, transposed convolutions, and conv∘BatchNorm compositions (block least squares, then an exact
    rescale if the rounds fall short).

    The defaults are the paper's training schedule: each clip moves the weights once so that the layer maps
    its tracked top right singular vector ``v`` to ``c/‖A v‖ · A v`` (one least-squares round on one vector),
    then a measurement from a random vector that finds σ₁ whatever the spectrum (``solver="gap_free"`` of
    :func:`~lightning_specclip.spectrum`) decides, and an exact rescale removes whatever is left above the
    target (for example a second singular value that was above it too). More rounds and a larger block move
    fewer other singular values, at about one measurement more per round.

    Args:
        max_rounds: least-squares rounds per clip before the exact rescale.
        block_size: singular vectors handled per round (the clipper tracks ``k`` vectors; the others start
            from random vectors, which costs more iterations).
        tol: relative tolerance on the clipped norm.

    Example:
        >>> FastClip(max_rounds=2).name
        'fastclip'
    """

    name: ClassVar[str] = "fastclip"
    kinds: ClassVar[tuple[str, ...]] = ("layer", "composition")
    #: least-squares clips, a second one of what the first left above its target, then a rescale (:meth:`clip_pass_`)
    passes: ClassVar[int] = 3

    def __init__(self, max_rounds: int = 1, block_size: int = 1, tol: float = 1e-2) -> None:
        if max_rounds < 0 or block_size < 1 or not tol > 0:
            raise ValueError(f"need max_rounds >= 0, block_size >= 1, tol > 0; got {max_rounds}, {block_size}, {tol}")
        self.max_rounds = max_rounds
        self.block_size = block_size
        self.tol = tol

    def clip_(
        self, tracked: TrackedMap, target: float, state: dict[str, Tensor], init: Tensor | None
    ) -> ClipResult | None:
        """Clip ``tracked`` to ``target`` (see :func:`~lightning_specclip.clip_spectral_norm_`).

        Args:
            tracked: a layer or composition map with its input shape.
            target: the spectral norm to clip to.
            state: unused (the warm start comes from ``init``).
            init: the tracked top right singular vectors.

        Returns:
            ClipResult | None: what was done.
        """
        return self.clip_all_([(tracked, target, state, init)])[0]

    def clip_all_(
        self, items: Sequence[tuple[TrackedMap, float, dict[str, Tensor], Tensor | None]]
    ) -> list[ClipResult | None]:
        """Clip maps that share no parameter as :meth:`clip_` would, their measurements in lock-step
        (:func:`~lightning_specclip.spectral.clip.clip_spectral_norms_`).

        Args:
            items: ``(tracked, target, state, init)`` per map.

        Returns:
            list[ClipResult | None]: per map, in order, what was done.

        Example:
            >>> from torch import nn
            >>> convs = [nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)]
            >>> maps = [TrackedMap(f"c{i}", "layer", c, c, (3, 8, 8)) for i, c in enumerate(convs)]
            >>> [round(r.after, 2) for r in FastClip().clip_all_([(m, 0.5, {}, None) for m in maps])]
            [0.5, 0.5]
        """
        return self._clip(items, max_rounds=self.max_rounds, block_size=self.block_size)

    def clip_pass_(
        self, items: Sequence[tuple[TrackedMap, float, dict[str, Tensor], Tensor | None]], index: int
    ) -> list[ClipResult | None]:
        """Pass ``index`` of a clip event: :meth:`clip_all_`, and in the last pass the exact rescale alone (the
        weights scaled onto the targets, which lowers every map of a layer by the same factor, so that each one
        lands at or below its target).

        Args:
            items: ``(tracked, target, state, init)`` per map.
            index: which pass (from 0, below :attr:`passes`).

        Returns:
            list[ClipResult | None]: per map, in order, what was done.

        Example:
            >>> from torch import nn
            >>> lin = nn.Linear(4, 4)
            >>> item = (TrackedMap("lin", "layer", lin, lin, (4,)), 0.5, {}, None)
            >>> [round(r.after, 3) for r in FastClip().clip_pass_([item], 2)]  # the last pass: a rescale
            [0.5]
        """
        if index < self.passes - 1:
            return self.clip_all_(items)
        return self._clip(items, max_rounds=0, block_size=ClipSettings.block_size)

    def _clip(
        self,
        items: Sequence[tuple[TrackedMap, float, dict[str, Tensor], Tensor | None]],
        max_rounds: int,
        block_size: int,
    ) -> list[ClipResult | None]:
        """The maps clipped together, warm-started from their tracked vectors, in at most ``max_rounds`` rounds of
        least squares on blocks of ``block_size`` vectors (``max_rounds=0``: the exact rescale alone)."""
        return list(
            clip_spectral_norms_(
                [m.module for m, *_ in items],
                [target for _, target, *_ in items],
                [m.input_shape for m, *_ in items],
                spectra=[init for *_, init in items],
                max_rounds=max_rounds,
                block_size=block_size,
                tol=self.tol,
            )
        )
