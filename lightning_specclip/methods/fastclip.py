"""FastClip (Ebrahimpour Boroojeny et al. 2024) as a callback method."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from lightning_specclip.methods.base import ClipMethod
from lightning_specclip.spectral.clip import ClipResult, clip_spectral_norm_
from lightning_specclip.targets import Target

__all__ = ["FastClip"]


class FastClip(ClipMethod):
    """Clip with :func:`~lightning_specclip.clip_spectral_norm_`, warm-started from the tracked spectrum.

    Exact for every layer the core supports: Linear (SVD), convolutions of any padding, stride, dilation and
    groups, transposed convolutions, and conv∘BatchNorm compositions (block least squares, then an exact
    rescale if the rounds fall short).

    Args:
        max_rounds: least-squares rounds per clip before the exact rescale (few are needed in training,
            where each clip starts close to the target).
        block_size: singular vectors handled per round.
        tol: relative tolerance on the clipped norm.

    Example:
        >>> FastClip(max_rounds=2).name
        'fastclip'
    """

    name: ClassVar[str] = "fastclip"
    kinds: ClassVar[tuple[str, ...]] = ("layer", "composition")

    def __init__(self, max_rounds: int = 2, block_size: int = 2, tol: float = 1e-2) -> None:
        if max_rounds < 0 or block_size < 1 or not tol > 0:
            raise ValueError(f"need max_rounds >= 0, block_size >= 1, tol > 0; got {max_rounds}, {block_size}, {tol}")
        self.max_rounds = max_rounds
        self.block_size = block_size
        self.tol = tol

    def clip_(self, target: Target, value: float, state: dict[str, Tensor], init: Tensor | None) -> ClipResult:
        """Clip ``target`` to ``value`` (see :func:`~lightning_specclip.clip_spectral_norm_`).

        Args:
            target: a layer or composition target with its input shape.
            value: the spectral norm to clip to.
            state: unused (the warm start comes from ``init``).
            init: the tracked top right singular vectors.

        Returns:
            ClipResult: what was done.
        """
        return clip_spectral_norm_(
            target.module,
            value,
            target.input_shape,
            spectrum=init,
            max_rounds=self.max_rounds,
            block_size=self.block_size,
            tol=self.tol,
        )
