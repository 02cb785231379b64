"""scikit-learn's bundled handwritten digits: 1,797 real 8×8 images, no download."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.functional import interpolate

from lightning_specclip.data._base import ImageDataModule, ImageTensorDataset, check_declared, split_sizes

__all__ = ["DigitsDataModule"]

#: Mean and standard deviation of all 1,797 digit images after scaling to [0, 1].
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


class DigitsDataModule(ImageDataModule):
    """The UCI handwritten digits shipped with scikit-learn (``sklearn.datasets.load_digits``).

    1,797 grayscale 8×8 images of the digits 0–9 with 17 gray levels (0…16), scaled to ``[0, 1]`` by
    dividing by 16 and shaped ``(1, 8, 8)``. The data are part of the scikit-learn package, so nothing is
    downloaded. The split is a permutation drawn from ``seed`` and is the same on every machine and rank:
    ``round(test_fraction · 1797)`` test images, ``round(val_fraction · 1797)`` validation images, the rest
    for training (1258 / 180 / 359 with the defaults).

    Args:
        batch_size: samples per batch.
        val_fraction: fraction of all images held out for validation, in ``[0, 1)``.
        test_fraction: fraction of all images held out for testing, in ``[0, 1)``.
        seed: seed of the split permutation.
        num_workers: ``DataLoader`` worker processes.
        pin_memory: pin batches in page-locked memory.
        mean: normalization statistics published for the model (the dataset's by default); ``None``
            together with ``std`` for a model without normalization. The images are never normalized here.
        std: see ``mean``.
        num_classes: declared number of classes (for config interpolation); checked to be 10.
        image_shape: declared image shape (for config interpolation); checked to be ``(1, size, size)``.
        image_size: side of the images: 8 (as scanned) or larger, upsampled bilinearly (32 for the CIFAR-style
            ResNet-18, whose four stages then see 32, 16, 8 and 4 pixels as on CIFAR-10).

    Raises:
        ValueError: for out-of-range fractions or arguments, or a declared value that is wrong.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.dtype, 0 <= float(x.min()) <= float(x.max()) <= 1
        (torch.Size([32, 1, 8, 8]), torch.float32, torch.int64, True)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: Sequence[float] | None = DIGITS_MEAN,
        std: Sequence[float] | None = DIGITS_STD,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
        image_size: int = 8,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8 (the digits are scanned at 8×8), got {image_size!r}")
        check_declared("num_classes", num_classes, 10)
        check_declared("image_shape", image_shape, (1, image_size, image_size))
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            num_classes=10,
            image_shape=(1, image_size, image_size),
            mean=mean,
            std=std,
        )
        split_sizes(1797, [val_fraction, test_fraction])  # validate early
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.image_size = image_size
        self._save_init_args(locals())

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and split them (once; later calls do nothing).

        Args:
            stage: the Lightning stage (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``); all splits
                are built whatever the stage.
        """
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)  # values 0..16
        if self.image_size != 8:  # float values in [0, 16]: bilinear upsampling stays in range
            size = (self.image_size, self.image_size)
            images = interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        n_train, n_val, n_test = split_sizes(len(targets), [self.val_fraction, self.test_fraction])
        perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(self.seed))
        parts = torch.split(perm, [n_train, n_val, n_test])
        self.train_set, self.val_set, self.test_set = (
            ImageTensorDataset(images[idx], targets[idx], scale=1 / 16) for idx in parts
        )
