"""A small Deep Layer Aggregation network for 32×32 images (after the common CIFAR-10 DLA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_specclip.models._layers import make_normalize, norm2d
from lightning_specclip.models.resnet import BasicBlock

__all__ = ["DLA", "Root", "Tree"]


def _conv_bn_relu(in_channels: int, out_channels: int, batchnorm: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False),
        norm2d(out_channels, batchnorm),
        nn.ReLU(),
    )


class Root(nn.Module):
    """Aggregation node: concatenate the inputs along channels, then 1×1 conv → [BN] → ReLU.

    Args:
        in_channels: total channels of the concatenated inputs.
        out_channels: channels of the output.
        batchnorm: BatchNorm after the convolution, else ``Identity``.

    Example:
        >>> Root(8, 4)([torch.rand(1, 4, 2, 2), torch.rand(1, 4, 2, 2)]).shape
        torch.Size([1, 4, 2, 2])
    """

    def __init__(self, in_channels: int, out_channels: int, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = norm2d(out_channels, batchnorm)
        self.relu = nn.ReLU()

    def forward(self, xs: list[Tensor]) -> Tensor:
        """Aggregate feature maps of equal spatial size.

        Args:
            xs: the feature maps, concatenated in this order.

        Returns:
            ``(N, out_channels, H, W)``.
        """
        return self.relu(self.bn(self.conv(torch.cat(xs, dim=1))))


class Tree(nn.Module):
    """Hierarchical aggregation of :class:`BasicBlock` chains (the "Tree" of Deep Layer Aggregation).

    A level-1 tree is two chained blocks whose outputs a :class:`Root` aggregates. A level-``L`` tree
    (``L > 1``) also feeds its input to a projection block (``prev_root``) and to ``L - 1`` subtrees of
    levels ``L-1, …, 1`` applied in sequence, then two more blocks; the root aggregates all ``L + 2``
    outputs. Only the first block and the first subtree see the input, so only they change width and stride.

    Args:
        in_channels: channels of the input.
        out_channels: channels of every block and of the output.
        level: depth of the hierarchy, at least 1.
        stride: stride applied on entry (by ``prev_root`` and the first subtree or block).
        batchnorm: BatchNorm in every block and root, else ``Identity``.

    Raises:
        ValueError: if ``level < 1``.

    Example:
        >>> Tree(4, 8, level=2, stride=2)(torch.rand(1, 4, 8, 8)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(
        self, in_channels: int, out_channels: int, level: int = 1, stride: int = 1, batchnorm: bool = True
    ) -> None:
        super().__init__()
        if level < 1:
            raise ValueError(f"level must be at least 1, got {level}")
        self.level = level
        self.prev_root: nn.Module | None = None
        self.subtrees = nn.ModuleList()
        if level > 1:
            self.prev_root = BasicBlock(in_channels, out_channels, stride=stride, batchnorm=batchnorm)
            for i, sub_level in enumerate(reversed(range(1, level))):
                first = i == 0
                self.subtrees.append(
                    Tree(
                        in_channels if first else out_channels,
                        out_channels,
                        level=sub_level,
                        stride=stride if first else 1,
                        batchnorm=batchnorm,
                    )
                )
            left_in, left_stride = out_channels, 1
        else:
            left_in, left_stride = in_channels, stride
        self.left_node = BasicBlock(left_in, out_channels, stride=left_stride, batchnorm=batchnorm)
        self.right_node = BasicBlock(out_channels, out_channels, stride=1, batchnorm=batchnorm)
        n_inputs = level + 2 if level > 1 else 2
        self.root = Root(n_inputs * out_channels, out_channels, batchnorm=batchnorm)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the tree.

        Args:
            x: a batch ``(N, in_channels, H, W)``.

        Returns:
            ``(N, out_channels, H', W')`` with ``H' = ceil(H / stride)``.
        """
        xs: list[Tensor] = []
        if self.prev_root is not None:
            xs.append(self.prev_root(x))
        for subtree in self.subtrees:
            x = subtree(x)
            xs.append(x)
        x = self.left_node(x)
        xs.append(x)
        x = self.right_node(x)
        xs.append(x)
        return self.root(xs)


class DLA(nn.Module):
    """Deep Layer Aggregation for small images, the architecture of the common CIFAR-10 DLA.

    Three 3×3 conv → [BN] → ReLU layers (``width, width, 2·width`` channels), then trees of levels
    1, 2, 2, 1 with ``4·width, 8·width, 16·width, 32·width`` channels and strides 1, 2, 2, 2, global average
    pooling and a linear classifier. ``width=16`` is the reference network (512 features);
    ``batchnorm=False`` replaces every BatchNorm by ``Identity``. Convolutions have no bias.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        width: channels of the stem; scales the whole network (4 is enough for CPU tests).
        batchnorm: keep the BatchNorm layers.
        mean: per-channel input means for a :class:`~lightning_specclip.models.Normalize` first layer, so
            the model takes inputs in ``[0, 1]``; ``None`` (with ``std``) for no normalization.
        std: per-channel input standard deviations, or ``None``.

    Raises:
        ValueError: if a size is not positive or ``mean``/``std`` are inconsistent.

    Example:
        >>> model = DLA(num_classes=10, width=4)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        batchnorm: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        w = width
        self.normalize = make_normalize(mean, std, in_channels)
        self.base = _conv_bn_relu(in_channels, w, batchnorm)
        self.layer1 = _conv_bn_relu(w, w, batchnorm)
        self.layer2 = _conv_bn_relu(w, 2 * w, batchnorm)
        self.layer3 = Tree(2 * w, 4 * w, level=1, stride=1, batchnorm=batchnorm)
        self.layer4 = Tree(4 * w, 8 * w, level=2, stride=2, batchnorm=batchnorm)
        self.layer5 = Tree(8 * w, 16 * w, level=2, stride=2, batchnorm=batchnorm)
        self.layer6 = Tree(16 * w, 32 * w, level=1, stride=2, batchnorm=batchnorm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(32 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits.

        Args:
            x: images ``(N, in_channels, H, W)``, in ``[0, 1]`` when ``mean``/``std`` are set.

        Returns:
            Logits ``(N, num_classes)``.
        """
        out = self.layer2(self.layer1(self.base(self.normalize(x))))
        out = self.layer6(self.layer5(self.layer4(self.layer3(out))))
        return self.linear(self.flatten(self.pool(out)))
