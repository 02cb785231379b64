"""A training run whose checkpoints are kept as fixtures, so that later versions prove they resume them exactly.

``python tests/resume_fixture.py OUT`` (with the version to freeze on the path) writes into ``OUT``:

- ``lightning_step4.ckpt``: a Lightning checkpoint after 4 of 8 optimizer steps (2 accumulated batches a step,
  FastClip to 0.9 every 3 steps with conv∘BatchNorm compositions, ``k=2``), with the callback's state;
- ``lightning_step8.pt``: the model's ``state_dict`` and the callback's state after the run resumed from it
  ended (the end-of-training clip included);
- ``clipper_step3.pt`` / ``clipper_step6.pt``: a plain loop's model, optimizer and ``SpectralClipper.state_dict()``
  after 3 steps, and the model and clipper state after 3 more steps from them.

``tests/test_checkpoint_compat.py`` resumes both with the version under test and compares bit for bit. Every
ingredient is defined here (not borrowed from other test modules) so that the run stays the same when tests move.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_specclip import SpectralClipCallback, SpectralClipper


def network() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return net


def data(n: int = 32, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n, 1, 8, 8), generator=gen) * 4
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = network()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def callback() -> SpectralClipCallback:
    return SpectralClipCallback(0.9, every_n_steps=3, warmup_iters=20, compose_batchnorm=True, k=2)


def fit(root: Path, ckpt: str | None = None) -> tuple[Classifier, SpectralClipCallback]:
    """The run: 8 optimizer steps; a checkpoint every 4 steps into ``root``; resumed from ``ckpt`` if given."""
    pl.seed_everything(0, workers=True)
    model, clip = Classifier(), callback()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        max_steps=8,
        accumulate_grad_batches=2,
        callbacks=[clip, ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=4)],
        default_root_dir=root,
    )
    trainer.fit(model, data(), ckpt_path=ckpt)
    return model, clip


def plain_steps(net: nn.Module, opt: torch.optim.Optimizer, clipper: SpectralClipper, start: int, steps: int) -> None:
    """``steps`` optimizer steps of a plain loop on batches ``start, start + 1, ...``."""
    batches = list(data(batch_size=8))
    for i in range(start, start + steps):
        x, y = batches[i % len(batches)]
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        clipper.step()


def plain_clipper(net: nn.Module) -> SpectralClipper:
    return SpectralClipper(net, {"3": 0.5, "*": 1.0}, every_n_steps=2, warmup_iters=20, compose_batchnorm=True)


def plain_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    fit(out / "run")
    ckpt = out / "run" / "epoch=0-step=4.ckpt"
    (out / "lightning_step4.ckpt").write_bytes(ckpt.read_bytes())
    model, clip = fit(out / "resume", ckpt=str(ckpt))
    torch.save({"model": model.state_dict(), "callback": clip.state_dict()}, out / "lightning_step8.pt")

    net = network()
    opt, clipper = plain_optimizer(net), plain_clipper(net)
    plain_steps(net, opt, clipper, 0, 3)
    saved: dict[str, Any] = {"model": net.state_dict(), "optimizer": opt.state_dict(), "clipper": clipper.state_dict()}
    torch.save(saved, out / "clipper_step3.pt")
    plain_steps(net, opt, clipper, 3, 3)
    torch.save({"model": net.state_dict(), "clipper": clipper.state_dict()}, out / "clipper_step6.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
