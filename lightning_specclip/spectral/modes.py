"""The modes a spectral computation runs in, whatever the caller's: eval mode and no autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "no_autocast"]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration of the block, then restore each one's flag.

    Args:
        module: the module whose submodules are switched; its ``training`` flags are restored exactly,
            also when the block raises.

    Example:
        >>> bn = nn.BatchNorm1d(3).train()
        >>> with eval_mode(bn):
        ...     bn.training
        False
        >>> bn.training
        True
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# The device types torch.autocast knows; an autocast region of any of them is turned off by no_autocast.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextmanager
def no_autocast() -> Iterator[None]:
    """Turn off every ``torch.autocast`` region the block runs in (the caller's mixed precision), and restore it.

    Spectral math is exact only in the dtype it asks for: under autocast a convolution or a matrix product
    would run in bfloat16 or float16, and mix those results with float32 vectors. Usable as a decorator too.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with no_autocast():
        ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    active = [device for device in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]
    with contextlib.ExitStack() as stack:
        for device in active:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield
