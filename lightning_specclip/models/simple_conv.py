"""The paper's smallest model: one convolution and one dense layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from lightning_specclip.models._layers import make_normalize, norm2d

__all__ = ["SimpleConv"]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        items = [int(v) for v in value]
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair (height, width), got {value}")
        pair = (items[0], items[1])
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return pair


class SimpleConv(nn.Module):
    """One convolution and one dense layer: ``[normalize] → conv → [BN] → ReLU → flatten → Linear``.

    This is the model of the paper's simple-conv study: the convolution is the layer whose spectrum is
    measured and clipped, the dense layer is the classifier. The convolution has no bias (as in the paper),
    so it is exactly linear; ``padding_mode`` selects zero, circular, reflect or replicate padding, which
    changes the convolution's matrix and hence its singular values.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        channels: output channels of the convolution.
        image_size: input height and width (an int for square images), needed to size the dense layer.
        kernel_size: the convolution's (square) kernel size.
        batchnorm: put a ``BatchNorm2d`` after the convolution (else ``Identity``).
        stride: the convolution's stride.
        padding: the convolution's padding; ``None`` for ``kernel_size // 2`` ("same" for odd kernels).
        padding_mode: ``"zeros"``, ``"circular"``, ``"reflect"`` or ``"replicate"``.
        mean: per-channel input means for a :class:`~lightning_specclip.models.Normalize` first layer, so
            the model takes inputs in ``[0, 1]``; ``None`` (with ``std``) for no normalization.
        std: per-channel input standard deviations, or ``None``.

    Raises:
        ValueError: if a size is not positive, the image is too small for the kernel, or ``mean``/``std``
            are inconsistent.

    Example:
        >>> import torch
        >>> model = SimpleConv(in_channels=1, num_classes=10, channels=4, image_size=8)
        >>> model(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: int = 16,
        image_size: int | Sequence[int] = 8,
        kernel_size: int = 3,
        batchnorm: bool = False,
        stride: int = 1,
        padding: int | None = None,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("channels", channels),
            ("kernel_size", kernel_size),
            ("stride", stride),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        height, width = _pair(image_size, "image_size")
        pad = kernel_size // 2 if padding is None else int(padding)
        out_h = (height + 2 * pad - kernel_size) // stride + 1
        out_w = (width + 2 * pad - kernel_size) // stride + 1
        if out_h < 1 or out_w < 1:
            raise ValueError(f"image_size {(height, width)} is too small for kernel_size={kernel_size}, padding={pad}")
        self.image_size = (height, width)
        self.normalize = make_normalize(mean, std, in_channels)
        self.conv = nn.Conv2d(
            in_channels,
            channels,
            kernel_size,
            stride=stride,
            padding=pad,
            padding_mode=padding_mode,
            bias=False,
        )
        self.bn = norm2d(channels, batchnorm)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * out_h * out_w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits.

        Args:
            x: images ``(N, in_channels, *image_size)``, in ``[0, 1]`` when ``mean``/``std`` are set.

        Returns:
            Logits ``(N, num_classes)``.
        """
        return self.fc(self.flatten(self.relu(self.bn(self.conv(self.normalize(x))))))
