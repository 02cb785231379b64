"""Random images with learnable labels, for tests and smoke runs of any image shape."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.functional import interpolate

from lightning_specclip.data._base import ImageDataModule, ImageTensorDataset, split_sizes

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(ImageDataModule):
    """Random images in ``[0, 1]`` around one random pattern per class: learnable, any shape, nothing on disk.

    Each class ``k`` has a fixed random pattern ``P_k`` (uniform values on a grid of at most 4×4 cells per
    channel, upsampled to ``H×W`` by nearest neighbour). A sample draws its label ``y`` uniformly, then
    its image is ``(1 − noise) · P_y + noise · U`` with ``U`` uniform noise, so pixels stay in ``[0, 1]``.
    Classes are balanced in expectation, the label is recoverable from the image (up to the noise), the
    training loss drops within a few steps and models generalize to the validation and test splits.
    Everything, including the split, is a function of ``seed``.

    Args:
        num_samples: total number of images (before the split).
        image_shape: ``(C, H, W)`` of one image.
        num_classes: number of classes (at least 2).
        batch_size: samples per batch.
        seed: seed of the patterns, labels, images and the split.
        val_fraction: fraction held out for validation, in ``[0, 1)``.
        test_fraction: fraction held out for testing, in ``[0, 1)``.
        noise: weight of the uniform noise in each image, in ``[0, 1]`` (1: labels are unlearnable).
        num_workers: ``DataLoader`` worker processes.
        pin_memory: pin batches in page-locked memory.
        mean: normalization statistics published for the model, or ``None`` (default: no normalization).
        std: see ``mean``.

    Raises:
        ValueError: for a non-positive size, fewer than 2 classes, or out-of-range fractions or noise.

    Example:
        >>> dm = SyntheticDataModule(num_samples=64, image_shape=(1, 4, 4), num_classes=3, batch_size=16)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, int(y.max()) < 3
        (torch.Size([16, 1, 4, 4]), True)
    """

    def __init__(
        self,
        num_samples: int = 1024,
        image_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        noise: float = 0.5,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0.0 <= float(noise) <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            num_classes=num_classes,
            image_shape=image_shape,
            mean=mean,
            std=std,
        )
        split_sizes(int(num_samples), [val_fraction, test_fraction])  # validate early
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.noise = float(noise)
        self._save_init_args(locals())

    def setup(self, stage: str | None = None) -> None:
        """Generate the images and labels and split them (once; later calls do nothing).

        Args:
            stage: the Lightning stage; all splits are built whatever the stage.
        """
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        channels, height, width = self.image_shape
        cells = (min(height, 4), min(width, 4))
        patterns = torch.rand(self.num_classes, channels, *cells, generator=gen)
        patterns = interpolate(patterns, size=(height, width), mode="nearest")
        targets = torch.randint(self.num_classes, (self.num_samples,), generator=gen)
        uniform = torch.rand(self.num_samples, *self.image_shape, generator=gen)
        images = (1.0 - self.noise) * patterns[targets] + self.noise * uniform
        sizes = split_sizes(self.num_samples, [self.val_fraction, self.test_fraction])
        perm = torch.randperm(self.num_samples, generator=gen)
        parts = torch.split(perm, sizes)
        self.train_set, self.val_set, self.test_set = (ImageTensorDataset(images[idx], targets[idx]) for idx in parts)
