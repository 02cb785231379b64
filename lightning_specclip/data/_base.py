"""What every datamodule of the package shares: an in-memory image dataset, deterministic splits, loaders."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["ImageDataModule", "ImageTensorDataset", "split_sizes"]


class ImageTensorDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images held in one tensor, returned as float32 in ``[0, 1]`` one at a time.

    Storing the raw integer pixels (``uint8`` for MNIST and CIFAR-10) and converting per item keeps memory
    at one byte per pixel; ``scale`` maps the stored values to ``[0, 1]``.

    Args:
        images: ``(N, C, H, W)`` pixels, any real dtype.
        targets: ``(N,)`` integer class labels.
        scale: factor that maps the stored pixels to ``[0, 1]`` (``1/255`` for bytes, ``1/16`` for digits).
        transform: optional callable applied to each float image ``(C, H, W)`` (augmentation).

    Raises:
        ValueError: if the shapes do not match.

    Example:
        >>> pixels = torch.full((2, 1, 2, 2), 255, dtype=torch.uint8)
        >>> ds = ImageTensorDataset(pixels, torch.tensor([0, 1]), scale=1 / 255)
        >>> x, y = ds[1]
        >>> x.dtype, float(x.max()), int(y)
        (torch.float32, 1.0, 1)
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        scale: float = 1.0,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must be (N,) with N={images.shape[0]}, got shape {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.long()
        self.scale = float(scale)
        self.transform = transform

    def __len__(self) -> int:
        """Return the number of images."""
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Return ``(image, target)``: a float32 ``(C, H, W)`` image in ``[0, 1]`` and a long scalar."""
        image = self.images[index].to(torch.float32) * self.scale
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Sizes of the held-out parts (rounded) and of the remainder, for ``n`` items.

    Args:
        n: number of items.
        fractions: fraction of ``n`` for each held-out part, each in ``[0, 1)``, summing below 1.

    Returns:
        ``[remainder, *parts]`` with ``f · n`` rounded half up items per part; the remainder is at least 1.

    Raises:
        ValueError: if a fraction is out of range or nothing is left for the remainder.

    Example:
        >>> split_sizes(1797, [0.1, 0.2])
        [1258, 180, 359]
    """
    for f in fractions:
        if not 0.0 <= float(f) < 1.0:
            raise ValueError(f"split fractions must be in [0, 1), got {list(fractions)}")
    parts = [math.floor(float(f) * n + 0.5) for f in fractions]  # round half up
    rest = n - sum(parts)
    if rest < 1:
        raise ValueError(f"fractions {list(fractions)} of {n} items leave nothing to train on")
    return [rest, *parts]


def check_declared(name: str, declared: object, actual: object) -> None:
    """Raise if a value declared in a config disagrees with the dataset's real one.

    Args:
        name: the argument's name, for the message.
        declared: the value given (``None`` means not declared).
        actual: the dataset's value.

    Raises:
        ValueError: if ``declared`` is given and differs from ``actual``.

    Example:
        >>> check_declared("num_classes", 10, 10)
    """
    if declared is None:
        return
    if isinstance(actual, tuple):
        declared = tuple(int(v) for v in cast(Iterable[Any], declared))
    if declared != actual:
        raise ValueError(f"{name}={declared} was declared but the dataset has {name}={actual}")


def plain(value: Any) -> Any:
    """Convert config containers (OmegaConf ``ListConfig``/``DictConfig``, tuples, paths) to plain Python.

    Checkpoints store the datamodule's hyperparameters, and ``torch.load(weights_only=True)`` (the default
    since PyTorch 2.6, used when Lightning resumes) refuses OmegaConf objects.

    Args:
        value: a scalar, path, mapping or iterable (nested).

    Returns:
        The same data as ``None``/``bool``/``int``/``float``/``str``, ``list`` and ``dict``.

    Example:
        >>> plain({"shape": (1, 8, 8), "root": __import__("pathlib").Path("data")})
        {'shape': [1, 8, 8], 'root': 'data'}
    """
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [plain(v) for v in value]
    return value


def _stats(values: Sequence[float] | None, channels: int, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    out = tuple(float(v) for v in values)
    if len(out) not in (1, channels) or any(not math.isfinite(v) for v in out):
        raise ValueError(f"{name} needs 1 or {channels} finite values, got {list(values)}")
    return out


class ImageDataModule(LightningDataModule):
    """Base of the package's datamodules: metadata for the model, and the three dataloaders.

    Subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup``. Images come
    out as float32 ``(N, C, H, W)`` in ``[0, 1]`` and targets as ``long``; the datamodule never normalizes,
    it only publishes ``mean``/``std`` for the model's own normalization layer (so attacks see ``[0, 1]``).

    Args:
        batch_size: samples per batch for all three loaders.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process).
        pin_memory: pin batches in page-locked memory (useful on GPU).
        num_classes: number of classes.
        image_shape: ``(C, H, W)`` of one image.
        mean: per-channel mean of the training images in ``[0, 1]`` units, or ``None``.
        std: per-channel standard deviation, or ``None``.

    Raises:
        ValueError: for a non-positive ``batch_size``, a negative ``num_workers``, or bad ``mean``/``std``.

    Example:
        >>> dm = ImageDataModule(batch_size=8, num_workers=0, pin_memory=False, num_classes=10,
        ...                      image_shape=(1, 8, 8), mean=None, std=None)
        >>> dm.num_classes, dm.image_shape
        (10, (1, 8, 8))
    """

    train_set: Dataset[tuple[Tensor, Tensor]] | None
    val_set: Dataset[tuple[Tensor, Tensor]] | None
    test_set: Dataset[tuple[Tensor, Tensor]] | None

    def __init__(
        self,
        *,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        num_classes: int,
        image_shape: Sequence[int],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.num_classes = int(num_classes)
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {list(image_shape)}")
        self.mean = _stats(mean, self.image_shape[0], "mean")
        self.std = _stats(std, self.image_shape[0], "std")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"give both mean and std or neither, got mean={mean} and std={std}")
        self.train_set = self.val_set = self.test_set = None

    def _save_init_args(self, init_locals: dict[str, Any]) -> None:
        """Save the ``__init__`` arguments as (plain-Python) hyperparameters, not sent to loggers."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        self.save_hyperparameters({n: plain(init_locals[n]) for n in names if n in init_locals}, logger=False)

    def _loader(self, dataset: Dataset[tuple[Tensor, Tensor]] | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}: the {split} split is not set up; call setup() first "
                "(the Trainer does it for you)"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the training split.

        Returns:
            A ``DataLoader`` yielding ``(images, targets)``.

        Raises:
            RuntimeError: if ``setup`` has not run.
        """
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the validation split, in a fixed order.

        Returns:
            A ``DataLoader`` yielding ``(images, targets)``.

        Raises:
            RuntimeError: if ``setup`` has not run.
        """
        return self._loader(self.val_set, "validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over the test split, in a fixed order.

        Returns:
            A ``DataLoader`` yielding ``(images, targets)``.

        Raises:
            RuntimeError: if ``setup`` has not run.
        """
        return self._loader(self.test_set, "test", shuffle=False)
