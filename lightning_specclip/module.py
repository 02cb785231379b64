"""ImageClassifier: the LightningModule the experiments train, test and attack."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_specclip.attacks import RobustAccuracy

__all__ = ["ImageClassifier"]

#: builds an attack on a model, called as ``factory(model=net)`` (a ``functools.partial`` of a torchattacks class)
AttackFactory = Callable[..., Any]


class ImageClassifier(pl.LightningModule):
    """Train an image classifier with cross-entropy; test its clean and adversarial accuracy.

    Clean accuracy and one robust accuracy per attack are torchmetrics metrics (counts summed over ranks),
    so the test numbers are right under DDP. Attacks are built on the model when testing starts (after it
    is on its device) and run with gradients enabled; Lightning's test loop must not use inference mode
    (``Trainer(inference_mode=False)``).

    Args:
        net: the network; takes inputs in ``[0, 1]`` and returns logits.
        num_classes: number of classes.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay.
        optimizer: ``"sgd"`` or ``"adam"``.
        cosine_epochs: if set, a cosine learning-rate schedule over this many epochs.
        attacks: attack name → factory that builds the attack on the model (e.g. a torchattacks class with
            its arguments bound).
        attack_batches: attack only the first this many test batches (``None``: all).

    Raises:
        ValueError: an unknown optimizer.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> module = ImageClassifier(net, num_classes=10)
        >>> module(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        cosine_epochs: int | None = None,
        attacks: Mapping[str, AttackFactory] | None = None,
        attack_batches: int | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {optimizer!r}; allowed: sgd, adam")
        self.save_hyperparameters(ignore=["net", "attacks"])
        self.net = net
        self.attack_factories = dict(attacks or {})
        self.attack_batches = attack_batches
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.robust_acc = MetricCollection({name: RobustAccuracy() for name in self.attack_factories})
        self._attacks: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images in ``[0, 1]``."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch."""
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Validation loss and accuracy."""
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_test_start(self) -> None:
        """Build the attacks on the model, now on its device."""
        self._attacks = {name: factory(model=self.net) for name, factory in self.attack_factories.items()}

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean accuracy, and accuracy under each attack (on the first ``attack_batches`` batches)."""
        x, y = batch
        self.test_acc.update(self(x), y)
        self.log("test/acc", self.test_acc)
        if self.attack_batches is not None and batch_idx >= self.attack_batches:
            return
        for name, attack in self._attacks.items():
            with torch.inference_mode(False), torch.enable_grad():
                adversarial = attack(x.clone(), y)
            with torch.no_grad():
                self.robust_acc[name].update(self(adversarial), y)
            self.log(f"test/robust_acc/{name}", self.robust_acc[name])

    def configure_optimizers(self) -> Any:
        """SGD (or Adam) with an optional cosine schedule."""
        hp: Any = self.hparams  # an AttributeDict of the arguments saved by save_hyperparameters
        opt: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if not hp.cosine_epochs:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, hp.cosine_epochs)}
