"""LightningDataModules for the experiments: images as float32 ``(N, C, H, W)`` in ``[0, 1]``, long targets.

Every datamodule exposes ``num_classes``, ``image_shape`` and ``mean``/``std`` (normalization statistics for
the model's own first layer; the data are never normalized, so adversarial attacks work in ``[0, 1]``).
"""

from lightning_specclip.data._base import ImageDataModule, ImageTensorDataset
from lightning_specclip.data.cifar10 import CIFAR10DataModule
from lightning_specclip.data.digits import DigitsDataModule
from lightning_specclip.data.mnist import MNISTDataModule
from lightning_specclip.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageTensorDataset",
    "MNISTDataModule",
    "SyntheticDataModule",
]
