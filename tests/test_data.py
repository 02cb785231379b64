"""Datamodules: digits splits and ranges, synthetic learnability, and MNIST / CIFAR-10 read from tiny files.

The MNIST and CIFAR-10 files are written here in the exact on-disk formats torchvision 0.29 reads, and are
read back through torchvision itself (no download, no network):

* MNIST: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, uncompressed, as
  ``torchvision.datasets.MNIST._check_exists`` requires (it tests that the uncompressed files exist; it does
  not look at ``.gz`` files, which only its ``download`` extracts, and checks no checksum). idx format: a
  big-endian int32 magic ``0x0800 | ndim`` (2051 for images, 2049 for labels), one big-endian int32 per
  dimension, then the ``uint8`` values in row-major order.
* CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, pickled dicts with
  ``data`` (``uint8`` array ``(n, 3072)``, each row the 1024 red, then green, then blue values of a 32×32
  image in row-major order), ``labels`` (list of int), ``batch_label``, ``filenames``; the meta file has
  ``label_names``. torchvision unpickles them with ``encoding="latin1"``, so the Python 2 originals (str
  keys) and these Python 3 pickles (str keys) read the same. torchvision also compares each file's MD5
  with the official release, which generated files cannot match, and offers no argument to skip that: the
  tests read them with ``CIFAR10DataModule(verify_checksums=False)``, which only replaces the expected
  sums by ``None`` (presence check) and keeps torchvision's reader; the default, verifying path is tested
  to reject them with a message naming the files.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_specclip.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageTensorDataset,
    MNISTDataModule,
    SyntheticDataModule,
)
from lightning_specclip.data.digits import DIGITS_MEAN, DIGITS_STD
from lightning_specclip.models import SimpleConv

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format of the MNIST files."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Write tiny MNIST files under ``root/MNIST/raw`` and return the arrays written."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


def write_cifar10(root: Path, per_batch: int = 6, seed: int = 0) -> dict[str, dict]:
    """Write tiny CIFAR-10 python pickles under ``root/cifar-10-batches-py`` and return what was written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written: dict[str, dict] = {}
    for name in CIFAR_FILES[:-1]:
        entry = {
            "batch_label": f"tiny {name}",
            "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = entry
    meta = {
        "label_names": [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ],
        "num_cases_per_batch": per_batch,
        "num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def _all(dataset: ImageTensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.stack(ys)


# --- digits ------------------------------------------------------------------------------------------


def test_digits_split_sizes_ranges_and_determinism() -> None:
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1258, 180, 359)
    assert dm.num_classes == 10 and dm.image_shape == (1, 8, 8)
    x, y = _all(dm.train_set)
    assert x.shape == (1258, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # 17 gray levels: every value is a multiple of 1/16
    assert torch.equal(x * 16, (x * 16).round())
    assert set(y.tolist()) == set(range(10))
    # published statistics are those of the data
    assert abs(float(x.mean()) - DIGITS_MEAN[0]) < 0.02 and abs(float(x.std()) - DIGITS_STD[0]) < 0.02
    # the whole dataset is used exactly once
    all_x = torch.cat([_all(s)[0] for s in (dm.train_set, dm.val_set, dm.test_set)])
    assert len(all_x) == 1797
    # same seed → same split; other seed → other split
    again = DigitsDataModule(seed=0)
    again.setup()
    assert torch.equal(_all(again.test_set)[0], _all(dm.test_set)[0])
    other = DigitsDataModule(seed=1)
    other.setup()
    assert not torch.equal(_all(other.test_set)[0], _all(dm.test_set)[0])


def test_digits_loader_and_custom_fractions() -> None:
    dm = DigitsDataModule(batch_size=50, val_fraction=0.0, test_fraction=0.5)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (898, 0, 899)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,)


def test_digits_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes=100 was declared"):
        DigitsDataModule(num_classes=100)
    with pytest.raises(ValueError, match="image_shape"):
        DigitsDataModule(image_shape=[3, 8, 8])
    with pytest.raises(ValueError, match="leave nothing to train on"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="both mean and std"):
        DigitsDataModule(mean=None)
    with pytest.raises(RuntimeError, match="call setup"):
        DigitsDataModule().train_dataloader()


# --- synthetic ---------------------------------------------------------------------------------------


def test_synthetic_shapes_determinism_and_learnable() -> None:
    dm = SyntheticDataModule(num_samples=600, image_shape=(1, 8, 8), num_classes=4, batch_size=60, seed=3)
    dm.setup()
    x, y = _all(dm.train_set)
    assert x.shape == (420, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(y.tolist()) == {0, 1, 2, 3}
    again = SyntheticDataModule(num_samples=600, image_shape=(1, 8, 8), num_classes=4, batch_size=60, seed=3)
    again.setup()
    assert torch.equal(_all(again.train_set)[1], y)

    torch.manual_seed(0)
    model = SimpleConv(in_channels=1, num_classes=4, channels=8, image_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        for xb, yb in dm.train_dataloader():
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.mean(losses[-7:]) < 0.6 * np.mean(losses[:7])
    model.eval()
    xv, yv = _all(dm.val_set)
    with torch.no_grad():
        assert float((model(xv).argmax(1) == yv).float().mean()) > 0.8  # it generalizes, not only memorizes
    # pure noise: nothing to learn, but still valid images in [0, 1]
    noisy = SyntheticDataModule(num_samples=50, image_shape=(2, 3, 5), num_classes=3, noise=1.0)
    noisy.setup()
    xn, _ = _all(noisy.train_set)
    assert xn.shape[1:] == (2, 3, 5) and 0 <= float(xn.min()) and float(xn.max()) <= 1


def test_synthetic_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticDataModule(num_classes=1)
    with pytest.raises(ValueError, match="image_shape"):
        SyntheticDataModule(image_shape=(8, 8))
    with pytest.raises(ValueError, match="noise"):
        SyntheticDataModule(noise=1.5)
    with pytest.raises(ValueError, match="mean needs 1 or 3"):
        SyntheticDataModule(mean=[0.5, 0.5], std=[0.2, 0.2])


# --- MNIST -------------------------------------------------------------------------------------------


def test_mnist_reads_generated_idx_files(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path, n_train=20, n_test=10)
    dm = MNISTDataModule(root=tmp_path, batch_size=4, val_fraction=0.25)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 10)
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    x, y = _all(dm.test_set)
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().unsqueeze(1) / 255
    assert x.dtype == torch.float32 and torch.allclose(x, expected)
    assert torch.equal(y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    # train + val together are exactly the training file
    xt = torch.cat([_all(dm.train_set)[0], _all(dm.val_set)[0]])
    all_train = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().unsqueeze(1) / 255
    assert sorted(xt.flatten(1).sum(1).tolist()) == pytest.approx(sorted(all_train.flatten(1).sum(1).tolist()))
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 1, 28, 28) and yb.dtype == torch.long


def test_mnist_missing_folder_message(tmp_path: Path) -> None:
    dm = MNISTDataModule(root=tmp_path / "nowhere")
    for call in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        assert str((tmp_path / "nowhere" / "MNIST" / "raw").resolve()) in msg
        assert "folder does not exist" in msg
        for name in MNIST_FILES:
            assert name in msg
        assert "download=True" in msg and "data.download=true" in msg


def test_mnist_one_missing_file_and_gz_hint(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    data = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-images-idx3-ubyte\)"):
        MNISTDataModule(root=tmp_path).setup()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data))
    with pytest.raises(FileNotFoundError, match=r"Found compressed t10k-images-idx3-ubyte\.gz.*gunzip"):
        MNISTDataModule(root=tmp_path).setup()


def test_mnist_corrupt_files(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x00\x00garbage")
    with pytest.raises(RuntimeError, match=r"train-images-idx3-ubyte.*cannot be read.*download=True"):
        MNISTDataModule(root=tmp_path).setup()
    # a valid idx file with the wrong number of labels
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((20, 28, 28), dtype=np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    with pytest.raises(RuntimeError, match="corrupt: 20 images but 7 labels"):
        MNISTDataModule(root=tmp_path).setup()


# --- CIFAR-10 ----------------------------------------------------------------------------------------


def test_cifar10_reads_generated_pickles(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, per_batch=6)
    dm = CIFAR10DataModule(root=tmp_path, batch_size=5, val_fraction=0.2, verify_checksums=False)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 6)
    assert dm.image_shape == (3, 32, 32) and len(dm.mean) == 3
    x, y = _all(dm.test_set)
    rows = written["test_batch"]["data"]
    # channel-first: row = 1024 red, 1024 green, 1024 blue values, each 32×32 row-major
    expected = torch.from_numpy(rows.reshape(-1, 3, 32, 32)).float() / 255
    assert x.shape == (6, 3, 32, 32) and torch.allclose(x, expected)
    assert float(x[0, 1, 0, 1]) == pytest.approx(rows[0, 1024 + 1] / 255)
    assert y.tolist() == written["test_batch"]["labels"]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (5, 3, 32, 32) and yb.dtype == torch.long


def test_cifar10_checksums_are_verified_by_default(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(RuntimeError) as info:
        CIFAR10DataModule(root=tmp_path).setup()
    msg = str(info.value)
    assert "do not match the official MD5 checksums" in msg
    assert all(name in msg for name in CIFAR_FILES)
    assert "verify_checksums=False" in msg and "download=True" in msg


def test_cifar10_missing_folder_and_archive_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(root=tmp_path).prepare_data()
    msg = str(info.value)
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in msg
    assert all(name in msg for name in CIFAR_FILES)
    assert "download=True" in msg and "data.download=true" in msg
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not really")
    with pytest.raises(FileNotFoundError, match=r"Found .*cifar-10-python\.tar\.gz.*tar xzf"):
        CIFAR10DataModule(root=tmp_path).setup()


def test_cifar10_one_missing_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_3\)"):
        CIFAR10DataModule(root=tmp_path, verify_checksums=False).setup()


def test_cifar10_corrupt_pickle(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02}q\x00(truncated")
    with pytest.raises(RuntimeError, match=r"cannot be read .*not the CIFAR-10 python format"):
        CIFAR10DataModule(root=tmp_path, verify_checksums=False).setup()


def test_cifar10_augmentation_only_on_train(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=tmp_path, verify_checksums=False, augment=True, val_fraction=0.2)
    dm.setup()
    assert dm.train_set.transform is not None and dm.val_set.transform is None
    plain = CIFAR10DataModule(root=tmp_path, verify_checksums=False, augment=False, val_fraction=0.2)
    plain.setup()
    torch.manual_seed(0)
    x_aug = torch.stack([dm.train_set[0][0] for _ in range(8)])
    x_plain = plain.train_set[0][0]
    assert x_aug.shape == (8, 3, 32, 32) and 0 <= float(x_aug.min()) and float(x_aug.max()) <= 1
    assert any(not torch.equal(x, x_plain) for x in x_aug)
    assert torch.equal(dm.test_set[0][0], plain.test_set[0][0])


def test_digits_upsampled_to_32_pixels_for_the_resnet():
    small = DigitsDataModule(batch_size=8)
    large = DigitsDataModule(batch_size=8, image_size=32, image_shape=(1, 32, 32))
    small.setup("fit")
    large.setup("fit")
    (x8, y8), (x32, y32) = small.train_set[5], large.train_set[5]
    assert large.image_shape == (1, 32, 32) and x32.shape == (1, 32, 32) and int(y8) == int(y32)
    assert 0.0 <= float(x32.min()) and float(x32.max()) <= 1.0
    # bilinear upsampling by 4: each 4×4 block's mean stays near the pixel it came from (smoothed at the edges)
    pooled = torch.nn.functional.avg_pool2d(x32, 4)
    assert abs(float(pooled.mean() - x8.mean())) < 0.02
    assert float(torch.corrcoef(torch.stack([pooled.flatten(), x8.flatten()]))[0, 1]) > 0.95
    with pytest.raises(ValueError, match="image_size must be an integer >= 8"):
        DigitsDataModule(image_size=4)
    with pytest.raises(ValueError, match="image_shape"):
        DigitsDataModule(image_size=32, image_shape=(1, 8, 8))
