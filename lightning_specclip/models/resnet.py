"""ResNet-18 for 32×32 images (CIFAR style: 3×3 stem, no max-pool)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_specclip.models._layers import make_normalize, norm2d

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """The two-convolution residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1×1 strided convolution (followed by BatchNorm when ``batchnorm``)
    where the shape changes. Convolutions have no bias. The sum is out of place, so forward hooks that keep
    a layer's output see it unmodified.

    Args:
        in_channels: channels of the block's input.
        out_channels: channels of its output.
        stride: stride of the first convolution (and of the projection shortcut).
        batchnorm: BatchNorm after each convolution, else ``Identity``.

    Example:
        >>> import torch
        >>> BasicBlock(4, 8, stride=2)(torch.rand(1, 4, 8, 8)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm2d(out_channels, batchnorm)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(out_channels, batchnorm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm2d(out_channels, batchnorm),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: a batch ``(N, in_channels, H, W)``.

        Returns:
            ``(N, out_channels, H', W')`` with ``H' = ceil(H / stride)``.
        """
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3×3 stem without max-pool, four stages of two :class:`BasicBlock`.

    Stage widths are ``width, 2·width, 4·width, 8·width`` (64…512 at the default, the CIFAR-10 model of
    the paper); strides 1, 2, 2, 2; then global average pooling and a linear classifier. Global pooling is
    adaptive, so 28×28 (MNIST) or 8×8 (digits) inputs work too. ``batchnorm=False`` replaces every
    BatchNorm by ``Identity`` — the paper's "without BN" mode; convolutions have no bias in either mode.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        width: channels of the stem and first stage; scales the whole network (8 is enough for CPU tests).
        batchnorm: keep the BatchNorm layers.
        mean: per-channel input means for a :class:`~lightning_specclip.models.Normalize` first layer, so
            the model takes inputs in ``[0, 1]``; ``None`` (with ``std``) for no normalization.
        std: per-channel input standard deviations, or ``None``.

    Raises:
        ValueError: if a size is not positive or ``mean``/``std`` are inconsistent.

    Example:
        >>> import torch
        >>> model = ResNet18(num_classes=10, width=8)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        batchnorm: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.normalize = make_normalize(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm2d(width, batchnorm)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(width, width, stride=1, batchnorm=batchnorm)
        self.layer2 = self._stage(width, 2 * width, stride=2, batchnorm=batchnorm)
        self.layer3 = self._stage(2 * width, 4 * width, stride=2, batchnorm=batchnorm)
        self.layer4 = self._stage(4 * width, 8 * width, stride=2, batchnorm=batchnorm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(8 * width, num_classes)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int, batchnorm: bool) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, out_channels, stride=stride, batchnorm=batchnorm),
            BasicBlock(out_channels, out_channels, stride=1, batchnorm=batchnorm),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits.

        Args:
            x: images ``(N, in_channels, H, W)``, in ``[0, 1]`` when ``mean``/``std`` are set.

        Returns:
            Logits ``(N, num_classes)``.
        """
        out = self.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.flatten(self.pool(out)))
