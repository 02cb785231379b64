"""MNIST from a local folder (the idx files), read by ``torchvision.datasets.MNIST``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_specclip.data._base import check_declared
from lightning_specclip.data.local import LocalVisionDataModule

__all__ = ["MNISTDataModule"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class MNISTDataModule(LocalVisionDataModule):
    """MNIST from ``<root>/MNIST/raw``, read by ``torchvision.datasets.MNIST``.

    torchvision (0.29) looks for the four *uncompressed* idx files ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` in
    ``<root>/MNIST/raw`` (only their presence is checked, not checksums; the legacy
    ``MNIST/processed/{training,test}.pt`` are accepted too). ``download=True`` fetches and extracts the
    ``.gz`` archives there — if verified archives are already in that folder it only extracts them, which
    works offline. Images are ``(1, 28, 28)`` in ``[0, 1]``; the validation split is ``val_fraction`` of the
    60,000 training images, drawn with ``seed``; the test split is the official 10,000.

    Args:
        root: the data folder that contains (or will contain) ``MNIST/``.
        batch_size: samples per batch.
        download: download the files when missing (needs internet access).
        val_fraction: fraction of the training images held out for validation, in ``[0, 1)``.
        seed: seed of the validation split.
        num_workers: ``DataLoader`` worker processes.
        pin_memory: pin batches in page-locked memory.
        mean: normalization statistics published for the model (MNIST's by default), or ``None``.
        std: see ``mean``.
        num_classes: declared number of classes (for config interpolation); checked to be 10.
        image_shape: declared image shape (for config interpolation); checked to be ``(1, 28, 28)``.

    Raises:
        ValueError: for bad arguments or a wrong declared value.

    Example:
        >>> dm = MNISTDataModule(root="/nonexistent", batch_size=128)
        >>> try:
        ...     dm.setup()
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0])
        MNIST not found: searched /nonexistent/MNIST/raw (folder does not exist).
    """

    name = "MNIST"
    config_name = "mnist"

    def __init__(
        self,
        root: str | Path = "data",
        batch_size: int = 128,
        download: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: Sequence[float] | None = MNIST_MEAN,
        std: Sequence[float] | None = MNIST_STD,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
    ) -> None:
        check_declared("num_classes", num_classes, 10)
        check_declared("image_shape", image_shape, (1, 28, 28))
        super().__init__(
            root,
            batch_size,
            download,
            val_fraction,
            seed,
            num_workers,
            pin_memory,
            10,
            (1, 28, 28),
            mean,
            std,
        )
        self._save_init_args(locals())

    def _folder(self) -> Path:
        return self.root / "MNIST" / "raw"

    def _expected_files(self) -> tuple[str, ...]:
        return (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )

    def _files_hint(self) -> str:
        return "the uncompressed MNIST idx files"

    def _present_alternative(self) -> bool:
        processed = self.root / "MNIST" / "processed"
        return (processed / "training.pt").is_file() and (processed / "test.pt").is_file()

    def _extra_hint(self) -> str:
        gz = [f + ".gz" for f in self._expected_files() if (self._folder() / (f + ".gz")).is_file()]
        if not gz:
            return ""
        return (
            f"Found compressed {', '.join(gz)}: torchvision reads the uncompressed files; run gunzip on "
            "them, or pass download=True, which verifies and extracts them without downloading again."
        )

    def _fetch(self) -> None:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(str(self.root), train=train, download=True)

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import MNIST

        prefix = "train" if train else "t10k"
        files = f"{prefix}-images-idx3-ubyte, {prefix}-labels-idx1-ubyte"
        try:
            ds = MNIST(str(self.root), train=train, download=False)
        except Exception as err:  # torchvision's parser raises AssertionError, TypeError, ValueError...
            raise RuntimeError(
                f"{self.name} files {files} in {self._folder().resolve()} cannot be read "
                f"({type(err).__name__}: {str(err) or 'bad header'}); "
                "they are corrupt or not in the idx format. "
                "Replace them, or delete them and pass download=True (Hydra: data.download=true)."
            ) from None
        return self._check_read(ds.data.unsqueeze(1), torch.as_tensor(ds.targets), files)
