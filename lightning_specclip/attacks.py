"""Adversarial evaluation: a torchattacks factory, a robust-accuracy Metric, and an evaluation loop.

Every attack works on inputs in ``[0, 1]`` and needs a model whose ``forward`` returns logits; the
package's models normalize inside (their ``mean``/``std`` arguments), so nothing else is needed. Attacks
need input gradients: :func:`evaluate_under_attack` enables them even inside ``torch.no_grad()`` or
``torch.inference_mode()`` (Lightning's test loop), runs the model in eval mode and restores every
submodule's mode afterwards.

The Hydra configs in ``conf/attack/`` instantiate the torchattacks classes directly (``_target_``) with the
same defaults as :func:`build_attack`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_specclip.spectral import eval_mode

__all__ = [
    "ATTACK_DEFAULTS",
    "ATTACK_NAMES",
    "RobustAccuracy",
    "build_attack",
    "evaluate_under_attack",
    "robust_accuracy",
]

#: name → (torchattacks class name, default keyword arguments). ε values are for inputs in [0, 1]:
#: 8/255 in L∞ and 0.5 in L2 are the standard CIFAR-10 budgets.
ATTACK_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fgsm": ("FGSM", {"eps": 8 / 255}),
    "pgd": ("PGD", {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "random_start": True}),
    "pgd_l2": ("PGDL2", {"eps": 0.5, "alpha": 0.1, "steps": 10, "random_start": True}),
    "cw": ("CW", {"c": 1.0, "kappa": 0.0, "steps": 50, "lr": 0.01}),
    "autoattack": (
        "AutoAttack",
        {"norm": "Linf", "eps": 8 / 255, "version": "standard", "n_classes": 10, "seed": 0},
    ),
}
#: Every name :func:`build_attack` accepts.
ATTACK_NAMES: tuple[str, ...] = ("none", *ATTACK_DEFAULTS)


def build_attack(name: str, model: nn.Module, **kwargs: Any) -> Any:
    """Build a torchattacks attack on ``model`` by name, with defaults for inputs in ``[0, 1]``.

    ============== ====================== ===========================================================
    name           torchattacks class     defaults
    ============== ====================== ===========================================================
    ``fgsm``       ``FGSM``               ``eps=8/255``
    ``pgd``        ``PGD`` (L∞)           ``eps=8/255, alpha=2/255, steps=10, random_start=True``
    ``pgd_l2``     ``PGDL2``              ``eps=0.5, alpha=0.1, steps=10, random_start=True``
    ``cw``         ``CW`` (L2)            ``c=1, kappa=0, steps=50, lr=0.01``
    ``autoattack`` ``AutoAttack``         ``norm="Linf", eps=8/255, version="standard", n_classes=10, seed=0``
    ``none``       —                      returns ``None`` (no attack; keyword arguments are ignored)
    ============== ====================== ===========================================================

    Build the attack after the model is on its device (torchattacks records the device of the model's
    parameters). For MNIST-like data, larger budgets (e.g. ``eps=0.3``) are customary; set
    ``n_classes`` for AutoAttack when the data have other than 10 classes.

    Args:
        name: one of :data:`ATTACK_NAMES`.
        model: the model to attack; its ``forward`` must return logits for inputs in ``[0, 1]``.
        **kwargs: keyword arguments of the torchattacks class, overriding the defaults.

    Returns:
        The ``torchattacks.Attack``, or ``None`` for ``"none"``.

    Raises:
        ValueError: if ``name`` is unknown (the message lists the allowed names).
        TypeError: if a keyword argument is not accepted by the attack (the message lists those that are).

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> attack = build_attack("pgd", model, eps=0.1, steps=5)
        >>> type(attack).__name__, attack.eps, attack.steps
        ('PGD', 0.1, 5)
        >>> build_attack("none", model) is None
        True
    """
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; allowed names: {', '.join(ATTACK_NAMES)}")
    if name == "none":
        return None
    import torchattacks

    class_name, defaults = ATTACK_DEFAULTS[name]
    cls = getattr(torchattacks, class_name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"attack {name!r} ({class_name}) got unexpected argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted)}"
        )
    return cls(model, **{**defaults, **kwargs})


def _correct_total(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if preds.ndim == target.ndim + 1:
        preds = preds.argmax(dim=1)
    if preds.shape != target.shape:
        raise ValueError(
            f"preds must be logits (N, C) or labels (N,) matching target {tuple(target.shape)}, "
            f"got {tuple(preds.shape)}"
        )
    return (preds == target).sum(), torch.tensor(target.numel(), device=target.device)


def robust_accuracy(preds: Tensor, target: Tensor) -> Tensor:
    """Fraction of adversarial inputs still classified correctly (functional form of :class:`RobustAccuracy`).

    Args:
        preds: the model's logits ``(N, C)`` (or scores; argmax is taken) or predicted labels ``(N,)`` on
            the adversarial inputs.
        target: true labels ``(N,)``.

    Returns:
        A float scalar tensor in ``[0, 1]``; NaN when ``N == 0``.

    Raises:
        ValueError: if the shapes do not match.

    Example:
        >>> robust_accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        tensor(0.5000)
    """
    correct, total = _correct_total(preds, target)
    return correct.float() / total if total > 0 else torch.tensor(float("nan"))


class RobustAccuracy(Metric):
    """Accuracy on adversarial inputs, accumulated over batches and summed over processes.

    It is plain accuracy, fed with predictions on attacked inputs: one Metric per quantity, so clean and
    robust accuracy (one instance per attack) are logged and synchronized separately. The states
    ``correct`` and ``total`` are counts reduced with ``sum``, so under DDP ``compute`` returns the
    accuracy over the union of all ranks' samples (not a mean of per-rank accuracies).

    Args:
        **kwargs: forwarded to :class:`torchmetrics.Metric` (``sync_on_compute``, ``dist_sync_fn``, …).

    Example:
        >>> metric = RobustAccuracy()
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> metric.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
        >>> metric.compute()
        tensor(0.7500)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count the correct predictions of a batch.

        Args:
            preds: logits ``(N, C)`` or labels ``(N,)`` on the adversarial inputs.
            target: true labels ``(N,)``.

        Raises:
            ValueError: if the shapes do not match.
        """
        correct, total = _correct_total(preds, target)
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        """Return ``correct / total`` over everything seen (on all ranks); NaN before any sample.

        Returns:
            A float scalar tensor in ``[0, 1]``, or NaN if no sample was counted.
        """
        if self.total == 0:
            return torch.tensor(float("nan"), device=self.total.device)
        return self.correct.float() / self.total


@contextmanager
def _no_param_grads(model: nn.Module) -> Iterator[None]:
    """Stop gradients to the parameters (attacks only need input gradients; CW would fill ``.grad``)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def evaluate_under_attack(
    model: nn.Module,
    attack: Any,
    dataloader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str,
    max_batches: int | None = None,
    sync: bool = True,
) -> float:
    """Accuracy of ``model`` on the adversarial versions of a loader's inputs (clean accuracy if no attack).

    The attack runs with gradients enabled — inside ``torch.inference_mode(False)`` and
    ``torch.enable_grad()``, so it works from a Lightning test hook or under ``no_grad`` — on cloned inputs,
    with the model in eval mode (BatchNorm uses running statistics). Afterwards every submodule's training
    flag and every parameter's ``requires_grad`` are restored, and no ``.grad`` is left on the parameters.
    Under DDP, give each rank its shard of the data and call this on every rank: the result is the accuracy
    over all ranks' samples (with ``sync=False`` each rank gets its own, and ranks may call it alone).

    Args:
        model: the model, already on ``device``; its forward returns logits for inputs in ``[0, 1]``.
        attack: a torchattacks attack built on ``model`` (after it was moved to ``device``), or ``None``.
        dataloader: yields ``(inputs, targets)`` with inputs in ``[0, 1]``.
        device: where to put the inputs.
        max_batches: stop after this many batches (``None`` for all), e.g. for a slow AutoAttack.
        sync: when ``torch.distributed`` is initialized, sum the counts over all ranks (every rank must call).

    Returns:
        The fraction of inputs classified correctly after the attack, in ``[0, 1]`` (NaN if no sample).

    Raises:
        ValueError: if an input batch is outside ``[0, 1]`` or the model is not on ``device``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> loader = [(torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,)))]
        >>> acc = evaluate_under_attack(model, build_attack("fgsm", model, eps=0.1), loader, "cpu")
        >>> 0.0 <= acc <= 1.0
        True
    """
    device = torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(f"the model is on {param.device} but device={device}; move it before building the attack")
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model), _no_param_grads(model):
        metric = RobustAccuracy(sync_on_compute=sync).to(device)  # states must not be inference tensors
        for i, (inputs, targets) in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            inputs = inputs.to(device).clone()
            targets = targets.to(device).clone()
            if inputs.numel() and (float(inputs.min()) < 0.0 or float(inputs.max()) > 1.0):
                raise ValueError(
                    f"attack inputs must be in [0, 1], got values in [{float(inputs.min()):.3g}, "
                    f"{float(inputs.max()):.3g}]; normalize inside the model (mean/std), not in the data"
                )
            adversarial = attack(inputs, targets) if attack is not None else inputs
            with torch.no_grad():
                metric.update(model(adversarial), targets)
        return float(metric.compute())
