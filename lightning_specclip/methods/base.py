"""The interface every clipping method implements, and the track-only method ``none``."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from lightning_specclip.spectral.clip import ClipResult, clip_spectral_norm_
from lightning_specclip.targets import Target

__all__ = ["ClipMethod", "NoClip"]


class ClipMethod:
    """How one method keeps a layer's spectral norm at a target; the callback decides when.

    A method holds no schedule and no per-layer state of its own: per-layer tensors live in the ``state``
    dict the callback passes in (and saves in checkpoints). Tracking the true spectral norm for logging is
    the callback's job (it uses :func:`~lightning_specclip.spectrum`); a method only clips.

    BatchNorm targets (``clip_batchnorm=True``) are clamped the same way by every method (Gouk et al. 2021),
    through :meth:`clip_batchnorm_`.

    Example:
        >>> NoClip().name
        'none'
    """

    name: ClassVar[str] = ""
    #: target kinds the method can clip (``"layer"``, ``"composition"``); BatchNorm is handled by all.
    kinds: ClassVar[tuple[str, ...]] = ("layer",)

    def supports(self, target: Target) -> bool:
        """Whether the method can act on ``target``.

        Args:
            target: a layer, composition or BatchNorm target.

        Returns:
            bool: ``True`` if :meth:`clip_` (or :meth:`penalty`) handles it.
        """
        return target.kind == "batchnorm" or target.kind in self.kinds

    def step(self, target: Target, state: dict[str, Tensor]) -> None:
        """Cheap per-step work (e.g. one power iteration); default nothing.

        Args:
            target: the target, with its input shape known.
            state: the target's persistent tensors, updated in place.
        """

    def clip_(self, target: Target, value: float, state: dict[str, Tensor], init: Tensor | None) -> ClipResult | None:
        """Clip ``target`` to ``value`` in place; ``None`` if the method does not clip (tracking, regularizer).

        Args:
            target: the target, with its input shape known.
            value: the spectral norm to clip to.
            state: the target's persistent tensors, updated in place.
            init: the callback's tracked top right singular vectors of the target (a warm start), if any.

        Returns:
            ClipResult | None: what was done.
        """
        return None

    def clip_batchnorm_(self, target: Target, value: float) -> ClipResult | None:
        """Clamp a BatchNorm target: ``|γᵢ|/√(varᵢ+ε) ≤ value`` (exact).

        Args:
            target: a ``"batchnorm"`` target.
            value: the bound.

        Returns:
            ClipResult | None: what was done.
        """
        return clip_spectral_norm_(target.module, value)

    def penalty(self, target: Target, value: float) -> Tensor | None:
        """A differentiable penalty on the weights to add to the loss's gradient; default none.

        Args:
            target: the target, with its input shape known.
            value: the target spectral norm.

        Returns:
            Tensor | None: a scalar, or ``None``.
        """
        return None


class NoClip(ClipMethod):
    """Track only: the callback logs spectral norms and changes nothing.

    Example:
        >>> NoClip().clip_(None, 1.0, {}, None) is None
        True
    """

    name: ClassVar[str] = "none"
    kinds: ClassVar[tuple[str, ...]] = ("layer", "composition")

    def clip_batchnorm_(self, target: Target, value: float) -> ClipResult | None:
        """Leave the BatchNorm alone (track only).

        Args:
            target: a ``"batchnorm"`` target.
            value: ignored.

        Returns:
            None: nothing is clipped.
        """
        return None
