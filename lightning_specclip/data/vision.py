"""MNIST and CIFAR-10 from a local folder, read by torchvision, with errors that say what to do.

Both datamodules read the official file formats through ``torchvision.datasets`` and keep the pixels as
``uint8`` tensors, converted to float ``[0, 1]`` per sample. Nothing is downloaded unless ``download=True``.
A missing dataset raises ``FileNotFoundError`` naming the folder searched, the files expected there and
how to get them; an unreadable or corrupt one raises ``RuntimeError`` naming the files at fault.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_specclip.data._base import ImageDataModule, ImageTensorDataset, check_declared, split_sizes

__all__ = ["CIFAR10DataModule", "MNISTDataModule"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class _LocalVisionDataModule(ImageDataModule):
    """Shared logic: file checks with helpful errors, optional download, deterministic train/val split."""

    name = ""
    #: Hydra group name, for the hints in error messages.
    config_name = ""

    def __init__(
        self,
        root: str | Path,
        batch_size: int,
        download: bool,
        val_fraction: float,
        seed: int,
        num_workers: int,
        pin_memory: bool,
        num_classes: int,
        image_shape: Sequence[int],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            num_classes=num_classes,
            image_shape=image_shape,
            mean=mean,
            std=std,
        )
        split_sizes(1000, [val_fraction])  # validate early
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)

    # -- what subclasses provide ------------------------------------------------------------------------
    def _folder(self) -> Path:
        raise NotImplementedError

    def _expected_files(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _files_hint(self) -> str:
        raise NotImplementedError

    def _present_alternative(self) -> bool:
        return False

    def _extra_hint(self) -> str:
        return ""

    def _fetch(self) -> None:
        raise NotImplementedError

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _train_transform(self) -> Any:
        return None

    # -- shared ---------------------------------------------------------------------------------------
    def _missing(self) -> list[str]:
        if self._present_alternative():
            return []
        folder = self._folder()
        return [f for f in self._expected_files() if not (folder / f).is_file()]

    def _not_found(self, missing: list[str]) -> FileNotFoundError:
        folder = self._folder().resolve()
        where = "folder does not exist" if not folder.is_dir() else "missing " + ", ".join(missing)
        lines = [
            f"{self.name} not found: searched {folder} ({where}).",
            f"Expected there: {', '.join(self._expected_files())} ({self._files_hint()}).",
        ]
        extra = self._extra_hint()
        if extra:
            lines.append(extra)
        lines.append(
            f"Put the files there, or point root at the data folder that holds "
            f"{self._folder().relative_to(self.root).as_posix()}/ (Hydra: data.root=/path/to/data), "
            f"or pass download=True (Hydra: data={self.config_name} data.download=true) to fetch them."
        )
        return FileNotFoundError("\n".join(lines))

    def prepare_data(self) -> None:
        """Download the dataset when ``download=True`` and it is missing; otherwise check it is there.

        Lightning calls this once per node before ``setup``; nothing is assigned to ``self`` here.

        Raises:
            FileNotFoundError: if files are missing and ``download`` is false.
            RuntimeError: if the download fails.
        """
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise self._not_found(missing)
        try:
            self._fetch()
        except Exception as err:  # network, HTTP and archive errors all mean the same thing here
            raise RuntimeError(
                f"Could not download {self.name} into {self.root.resolve()}: {type(err).__name__}: {err}\n"
                f"Without internet access, copy the files by hand: {', '.join(self._expected_files())} "
                f"into {self._folder().resolve()}."
            ) from None
        missing = self._missing()
        if missing:
            raise self._not_found(missing)

    def setup(self, stage: str | None = None) -> None:
        """Read the train and test files and carve the validation split from train (once).

        The validation images are a permutation of the training set drawn from ``seed``, identical on
        every rank. If the files are missing and ``download=True``, ``prepare_data`` is run first.

        Args:
            stage: the Lightning stage; all splits are built whatever the stage.

        Raises:
            FileNotFoundError: if the files are missing (and ``download`` is false).
            RuntimeError: if the files are corrupt or cannot be read.
        """
        if self.train_set is not None:
            return
        missing = self._missing()
        if missing:
            if not self.download:
                raise self._not_found(missing)
            self.prepare_data()
        train_images, train_targets = self._read(train=True)
        test_images, test_targets = self._read(train=False)
        n_train, n_val = split_sizes(len(train_targets), [self.val_fraction])
        perm = torch.randperm(len(train_targets), generator=torch.Generator().manual_seed(self.seed))
        train_idx, val_idx = torch.split(perm, [n_train, n_val])
        self.train_set = ImageTensorDataset(
            train_images[train_idx], train_targets[train_idx], 1 / 255, transform=self._train_transform()
        )
        self.val_set = ImageTensorDataset(train_images[val_idx], train_targets[val_idx], 1 / 255)
        self.test_set = ImageTensorDataset(test_images, test_targets, 1 / 255)

    def _check_read(self, images: Tensor, targets: Tensor, files: str) -> tuple[Tensor, Tensor]:
        problem = ""
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.image_shape:
            problem = f"images of shape {tuple(images.shape[1:])} and dtype {images.dtype}"
            problem += f", expected {self.image_shape} uint8"
        elif len(images) != len(targets) or len(images) == 0:
            problem = f"{len(images)} images but {len(targets)} labels"
        elif int(targets.min()) < 0 or int(targets.max()) >= self.num_classes:
            problem = f"labels outside 0..{self.num_classes - 1}"
        if problem:
            raise RuntimeError(
                f"{self.name} files {files} in {self._folder().resolve()} are corrupt: {problem}. "
                f"Replace them, or delete them and pass download=True (Hydra: data.download=true)."
            )
        return images, targets.long()


class MNISTDataModule(_LocalVisionDataModule):
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


class CIFAR10DataModule(_LocalVisionDataModule):
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
