"""What the datamodules of real image datasets read from a local folder share: the folder, the download
policy, the split, and errors that say what to do.

The datasets' official file formats are read through ``torchvision.datasets`` and the pixels kept as ``uint8``
tensors, converted to float ``[0, 1]`` per sample. Nothing is downloaded unless ``download=True``. A missing
dataset raises ``FileNotFoundError`` naming the folder searched, the files expected there and how to get them; an
unreadable or corrupt one raises ``RuntimeError`` naming the files at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_specclip.data._base import ImageDataModule, ImageTensorDataset, split_sizes

__all__ = ["LocalVisionDataModule"]


class LocalVisionDataModule(ImageDataModule):
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
