"""What one rank decides for every rank of a data-parallel job: messages said once, clipped weights sent from rank 0."""

from __future__ import annotations

import logging
import warnings

import torch

from lightning_specclip.tracked_map import TrackedMap

__all__ = ["broadcast", "distributed", "info", "warn"]

log = logging.getLogger("lightning_specclip.clipper")


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is running.

    Returns:
        bool: ``True`` inside DDP, Fabric or any initialized process group.

    Example:
        >>> distributed()
        False
    """
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_zero() -> bool:
    return not distributed() or torch.distributed.get_rank() == 0


def warn(message: str) -> None:
    """Warn ``"SpectralClipper: <message>"`` once per job: on rank 0 only when a process group is running.

    Args:
        message: what to say.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("a layer is frozen")
        >>> str(caught[0].message)
        'SpectralClipper: a layer is frozen'
    """
    if _rank_zero():
        warnings.warn(f"SpectralClipper: {message}", stacklevel=3)


def info(message: str) -> None:
    """Log ``"SpectralClipper: <message>"`` at INFO level, on rank 0 only when a process group is running.

    Args:
        message: what to say.

    Example:
        >>> info("3 maps tracked")
    """
    if _rank_zero():
        log.info("SpectralClipper: %s", message)


def broadcast(tracked: TrackedMap) -> None:
    """Send the parameters of a map from rank 0 to every rank (data-parallel training never re-broadcasts them).

    Args:
        tracked: the map whose module was just clipped.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 2)
        >>> broadcast(TrackedMap("lin", "layer", lin, lin))  # no process group: nothing to do
    """
    if not distributed() or torch.distributed.get_world_size() <= 1:
        return
    with torch.no_grad():
        for p in tracked.module.parameters():
            torch.distributed.broadcast(p.data, src=0)
