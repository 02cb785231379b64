"""CIFAR-10 from a local folder (``cifar-10-batches-py``), read by ``torchvision.datasets.CIFAR10``."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_specclip.data._base import check_declared
from lightning_specclip.data.local import LocalVisionDataModule

__all__ = ["CIFAR10DataModule"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@functools.cache
def _unchecked_cifar10() -> type:
    """``torchvision.datasets.CIFAR10`` with the MD5 checks turned into presence checks.

    torchvision keeps the expected MD5 sums in the class attributes ``train_list``, ``test_list`` and
    ``meta`` (the same mechanism its own ``CIFAR100`` uses to point at other files) and passes them to
    ``check_integrity``, which only tests that the file exists when the sum is ``None``. It offers no
    argument to skip the check, so this subclass overrides exactly those attributes; the reading code is
    torchvision's own.
    """
    from torchvision.datasets import CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10


class CIFAR10DataModule(LocalVisionDataModule):
    """CIFAR-10 from ``<root>/cifar-10-batches-py``, read by ``torchvision.datasets.CIFAR10``.

    The folder must hold the python-pickle release: ``data_batch_1`` … ``data_batch_5``, ``test_batch`` and
    ``batches.meta``. torchvision verifies each against the MD5 sum of the official release; with
    ``verify_checksums=False`` the files are only required to exist (and torchvision's reader still parses
    them), for a re-packed or subset copy in the same format — such as the tiny files in this package's
    tests. ``download=True`` fetches and extracts ``cifar-10-python.tar.gz`` into ``root`` (an already
    present, verified archive is only extracted, offline). Images are ``(3, 32, 32)`` in ``[0, 1]``; the
    validation split is ``val_fraction`` of the 50,000 training images drawn with ``seed``; the test split is
    the official 10,000. ``augment=True`` adds the standard random 32×32 crop of the 4-pixel zero-padded
    image and a random horizontal flip to the training split only.

    Args:
        root: the data folder that contains (or will contain) ``cifar-10-batches-py/``.
        batch_size: samples per batch.
        download: download the archive when files are missing (needs internet access).
        val_fraction: fraction of the training images held out for validation, in ``[0, 1)``.
        seed: seed of the validation split.
        augment: random crop (padding 4) and horizontal flip on training images.
        verify_checksums: check the official MD5 sums (turn off only for a custom copy of the format).
        num_workers: ``DataLoader`` worker processes.
        pin_memory: pin batches in page-locked memory.
        mean: normalization statistics published for the model (CIFAR-10's by default), or ``None``.
        std: see ``mean``.
        num_classes: declared number of classes (for config interpolation); checked to be 10.
        image_shape: declared image shape (for config interpolation); checked to be ``(3, 32, 32)``.

    Raises:
        ValueError: for bad arguments or a wrong declared value.

    Example:
        >>> dm = CIFAR10DataModule(root="/nonexistent", batch_size=128, augment=True)
        >>> try:
        ...     dm.setup()
        ... except FileNotFoundError as err:
        ...     print(str(err).splitlines()[0])
        CIFAR-10 not found: searched /nonexistent/cifar-10-batches-py (folder does not exist).
    """

    name = "CIFAR-10"
    config_name = "cifar10"

    def __init__(
        self,
        root: str | Path = "data",
        batch_size: int = 128,
        download: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = False,
        verify_checksums: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: Sequence[float] | None = CIFAR10_MEAN,
        std: Sequence[float] | None = CIFAR10_STD,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
    ) -> None:
        check_declared("num_classes", num_classes, 10)
        check_declared("image_shape", image_shape, (3, 32, 32))
        super().__init__(
            root,
            batch_size,
            download,
            val_fraction,
            seed,
            num_workers,
            pin_memory,
            10,
            (3, 32, 32),
            mean,
            std,
        )
        self.augment = bool(augment)
        self.verify_checksums = bool(verify_checksums)
        self._save_init_args(locals())

    def _folder(self) -> Path:
        return self.root / "cifar-10-batches-py"

    def _expected_files(self) -> tuple[str, ...]:
        return tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

    def _files_hint(self) -> str:
        return "the CIFAR-10 python version, extracted from cifar-10-python.tar.gz"

    def _extra_hint(self) -> str:
        if (self.root / "cifar-10-python.tar.gz").is_file():
            return (
                f"Found {self.root.resolve() / 'cifar-10-python.tar.gz'}: extract it there (tar xzf), or "
                "pass download=True, which verifies and extracts it without downloading again."
            )
        return ""

    def _fetch(self) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(self.root), train=True, download=True)

    def _dataset_class(self) -> type:
        if self.verify_checksums:
            from torchvision.datasets import CIFAR10

            return CIFAR10
        return _unchecked_cifar10()

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity

        files = ", ".join(n for n, _ in (CIFAR10.train_list if train else CIFAR10.test_list)) + ", batches.meta"
        try:
            ds = self._dataset_class()(str(self.root), train=train, download=False)
        except Exception as err:  # checksum mismatch, truncated pickle, missing keys...
            folder = self._folder()
            if self.verify_checksums:
                expected = [
                    *CIFAR10.train_list,
                    *CIFAR10.test_list,
                    [CIFAR10.meta["filename"], CIFAR10.meta["md5"]],
                ]
                bad = [name for name, md5 in expected if not check_integrity(str(folder / name), md5)]
                if bad:
                    raise RuntimeError(
                        f"{self.name} files in {folder.resolve()} do not match the official MD5 checksums: "
                        f"{', '.join(bad)}. They are corrupt or not the official release: delete them and "
                        "pass download=True (Hydra: data.download=true), or, for a custom copy in the same "
                        "format, pass verify_checksums=False (Hydra: data.verify_checksums=false)."
                    ) from None
            raise RuntimeError(
                f"{self.name} files {files} in {folder.resolve()} cannot be read "
                f"({type(err).__name__}: {err}); they are corrupt or not the CIFAR-10 python format "
                "(pickled dicts with 'data' and 'labels'). "
                "Replace them, or delete them and pass download=True (Hydra: data.download=true)."
            ) from None
        images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()
        return self._check_read(images, torch.as_tensor(ds.targets), files)

    def _train_transform(self) -> Any:
        if not self.augment:
            return None
        from torchvision.transforms import v2

        return v2.Compose([v2.RandomCrop(self.image_shape[1:], padding=4), v2.RandomHorizontalFlip()])
