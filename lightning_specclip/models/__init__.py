"""Plain ``nn.Module`` models used in the paper's experiments (no Lightning inside).

All take images in ``[0, 1]`` when given ``mean``/``std`` (a :class:`Normalize` first layer standardizes
them), return logits, and have a ``batchnorm`` switch for the paper's with/without-BatchNorm studies.
"""

from lightning_specclip.models._layers import Normalize
from lightning_specclip.models.dla import DLA
from lightning_specclip.models.resnet import BasicBlock, ResNet18
from lightning_specclip.models.simple_conv import SimpleConv

__all__ = ["DLA", "BasicBlock", "Normalize", "ResNet18", "SimpleConv"]
