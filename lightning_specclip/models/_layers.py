"""Small layers shared by the models: input normalization and the BatchNorm-or-Identity switch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize", "make_normalize", "norm2d"]


class Normalize(nn.Module):
    """Per-channel standardization ``(x - mean) / std`` with the statistics stored as buffers.

    Placing it first in a model lets the model take inputs in ``[0, 1]`` (what torchattacks requires)
    while the layers after it see standardized inputs. The buffers are saved in the ``state_dict`` and
    follow the model across devices; there are no parameters, so no optimizer or clipping method touches it.

    Args:
        mean: one value per input channel.
        std: one value per input channel, all strictly positive.

    Raises:
        ValueError: if ``mean`` and ``std`` have different lengths, are empty, hold non-finite values, or
            ``std`` has a value that is not strictly positive.

    Example:
        >>> norm = Normalize([0.5], [0.25])
        >>> norm(torch.full((1, 1, 2, 2), 1.0)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_list = [float(m) for m in mean]
        std_list = [float(s) for s in std]
        if not mean_list or len(mean_list) != len(std_list):
            raise ValueError(
                f"mean and std need one value per channel and the same length, got {mean_list} and {std_list}"
            )
        if not all(math.isfinite(v) for v in mean_list + std_list):
            raise ValueError(f"mean and std must be finite, got {mean_list} and {std_list}")
        if any(s <= 0 for s in std_list):
            raise ValueError(f"std must be strictly positive, got {std_list}")
        self.register_buffer("mean", torch.tensor(mean_list).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std_list).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Standardize a batch ``(N, C, H, W)``.

        Args:
            x: the batch, ``C`` equal to the number of statistics.

        Returns:
            ``(x - mean) / std`` with the statistics broadcast over the channel dimension.
        """
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        """Return the statistics for ``print(model)``."""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def make_normalize(
    mean: Sequence[float] | None, std: Sequence[float] | None, in_channels: int
) -> Normalize | nn.Identity:
    """Build the model's first layer: :class:`Normalize` for given statistics, ``Identity`` for none.

    Args:
        mean: per-channel means, or ``None`` for no normalization. A single value is used for every channel.
        std: per-channel standard deviations, or ``None`` (must be ``None`` exactly when ``mean`` is).
        in_channels: the number of input channels the statistics must match.

    Returns:
        ``Normalize(mean, std)``, or ``nn.Identity()`` when both are ``None``.

    Raises:
        ValueError: if only one of ``mean`` and ``std`` is given, or their length is neither 1 nor
            ``in_channels``, or :class:`Normalize` rejects them.

    Example:
        >>> make_normalize(None, None, 3)
        Identity()
        >>> make_normalize([0.5], [0.5], 3)
        Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    """
    if mean is None and std is None:
        return nn.Identity()
    if mean is None or std is None:
        raise ValueError(f"give both mean and std or neither, got mean={mean} and std={std}")
    mean_list, std_list = list(mean), list(std)
    if len(mean_list) == 1:
        mean_list = mean_list * in_channels
    if len(std_list) == 1:
        std_list = std_list * in_channels
    if len(mean_list) != in_channels or len(std_list) != in_channels:
        raise ValueError(
            f"mean and std need 1 or in_channels={in_channels} values, got {len(mean_list)} and {len(std_list)}"
        )
    return Normalize(mean_list, std_list)


def norm2d(channels: int, batchnorm: bool) -> nn.BatchNorm2d | nn.Identity:
    """A ``BatchNorm2d`` when ``batchnorm`` is true, else ``Identity`` (the paper's "without BN" mode).

    Args:
        channels: the number of channels normalized.
        batchnorm: whether to build a BatchNorm layer.

    Returns:
        ``nn.BatchNorm2d(channels)`` or ``nn.Identity()``.

    Example:
        >>> norm2d(4, False)
        Identity()
    """
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
