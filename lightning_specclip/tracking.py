"""Measure a whole model's spectral norms (ground truth), and record them over training."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_specclip.spectral.certify import DENSE_LIMIT
from lightning_specclip.spectral.clip import batchnorm_scale
from lightning_specclip.spectral.exact import dense_spectral_norm, lanczos_singular_values
from lightning_specclip.spectral.operator import eval_mode
from lightning_specclip.spectral.spectrum import spectrum
from lightning_specclip.targets import (
    LAYER_TYPES,
    Call,
    InputShapeRecorder,
    called_view,
    find_conv_bn_pairs,
    named_modules,
    select_modules,
)

__all__ = [
    "EpochTimer",
    "SpectralHistory",
    "batchnorm_gains",
    "composition_norms",
    "ground_truth_sigma",
    "input_shapes",
    "spectral_norms",
]


def input_shapes(model: nn.Module, example: Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of every Linear/conv layer, from one forward pass in eval mode.

    Args:
        model: the model.
        example: a batch the model accepts (one sample is enough).

    Returns:
        dict[str, tuple[int, ...]]: layer name → input shape without the batch dimension.

    Example:
        >>> input_shapes(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3)), torch.zeros(1, 1, 8, 8))
        {'0': (1, 8, 8), '2': (72,)}
    """
    return {name: shape for name, (shape, _) in _first_calls(model, example).items()}


def _first_calls(model: nn.Module, example: Tensor) -> dict[str, tuple[tuple[int, ...], Call]]:
    """How every Linear/conv layer is first called on ``example`` (eval mode): its input shape and what the call
    fixes besides it (a transposed convolution's ``output_size=``)."""
    layers = select_modules(model, list(LAYER_TYPES))
    with InputShapeRecorder(layers) as recorder, eval_mode(model), torch.no_grad():
        model(example)
    return {name: calls[0] for name, calls in recorder.all_calls.items()}


def ground_truth_sigma(module: nn.Module, shape: tuple[int, ...]) -> float:
    """The spectral norm of a module's linear map at one input shape, in float64: from the dense matrix up to
    ``DENSE_LIMIT`` inputs (:func:`~lightning_specclip.spectral.exact.dense_spectral_norm`), ARPACK (tol 1e-8)
    above.

    Args:
        module: a layer, a ``Sequential`` of a conv and its BatchNorm, or any affine module.
        shape: the shape of one input without the batch dimension.

    Returns:
        float: σ₁.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> _ = layer.weight.data.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> ground_truth_sigma(layer, (2,))
        3.0
    """
    if math.prod(shape) <= DENSE_LIMIT:
        return dense_spectral_norm(module, shape)
    return float(lanczos_singular_values(module, shape, k=1, tol=1e-8).values[0])


def spectral_norms(model: nn.Module, example: Tensor) -> dict[str, dict[str, float]]:
    """Ground-truth spectral norms of every layer, conv∘BatchNorm composition and BatchNorm of a model.

    Layers and compositions are measured as the linear maps they are as called on the inputs they receive for
    ``example`` (a transposed convolution with its ``output_size=``; dense SVD for small ones, ARPACK otherwise,
    in float64); BatchNorm by its largest
    per-channel gain ``|γ|/√(var+ε)`` (running statistics).

    Args:
        model: the model.
        example: a batch the model accepts.

    Returns:
        dict[str, dict[str, float]]: ``{"layers": …, "compositions": …, "batchnorms": …}``, each name → σ.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3))
        >>> sorted(spectral_norms(model, torch.zeros(1, 1, 8, 8))["compositions"])
        ['0+1']
    """
    calls = _first_calls(model, example)
    modules = named_modules(model)
    layers = {
        name: ground_truth_sigma(called_view(modules[name], call), shape) for name, (shape, call) in calls.items()
    }
    compositions = composition_norms(model, {name: shape for name, (shape, _) in calls.items()}, calls)
    batchnorms = batchnorm_gains(model)
    return {"layers": layers, "compositions": compositions, "batchnorms": batchnorms}


def composition_norms(
    model: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    calls: dict[str, tuple[tuple[int, ...], Call]] | None = None,
) -> dict[str, float]:
    """Ground-truth spectral norm of every conv∘BatchNorm composition (BatchNorm's running statistics), at the
    conv's input shape.

    Args:
        model: the model.
        shapes: each layer's input shape, as :func:`input_shapes` gives them; convs not in it are left out.
        calls: each layer's ``(input shape, call)`` where the call fixes more than the shape (a transposed
            convolution's ``output_size=``); the conv then runs as so called.

    Returns:
        dict[str, float]: ``"conv+bn"`` → σ.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        >>> list(composition_norms(model, {"0": (1, 6, 6)}))
        ['0+1']
    """
    modules = named_modules(model)
    return {
        f"{conv}+{bn}": ground_truth_sigma(
            nn.Sequential(called_view(modules[conv], (calls or {}).get(conv, ((), ()))[1]), modules[bn]), shapes[conv]
        )
        for conv, bn in find_conv_bn_pairs(model)
        if conv in shapes
    }


def batchnorm_gains(model: nn.Module) -> dict[str, float]:
    """Largest gain ``max |γ|/√(running_var+ε)`` of every BatchNorm with running statistics.

    Args:
        model: the model.

    Returns:
        dict[str, float]: BatchNorm name → its largest gain.

    Example:
        >>> batchnorm_gains(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, eps=0.0)))
        {'1': 1.0}
    """
    return {
        name: float(batchnorm_scale(m).abs().max())
        for name, m in named_modules(model).items()
        if isinstance(m, _BatchNorm) and m.running_var is not None
    }


class SpectralHistory(Callback):
    """Record the spectral norm of every layer, conv∘BN composition and BatchNorm every few optimizer steps.

    The paper's BatchNorm figure (σ of a conv, its BN and their composition over training) is drawn from
    this history. Values are computed with :func:`~lightning_specclip.spectrum` warm-started from the last
    record, so they are accurate estimates, not the clipping methods' own.

    Args:
        every_n_steps: record every this many optimizer steps (and at step 0, and when training ends).
        iters: Krylov iterations per record after the first.
        save_to: a JSON file that global rank 0 writes the history to when training ends, so that it outlives
            strategies that train in worker processes (``ddp_spawn``); ``None``: kept in memory only.

    Attributes:
        history: ``{"step": [...], "sigma": {name: [...]}}``.

    Example:
        >>> SpectralHistory(every_n_steps=10).history
        {'step': [], 'sigma': {}}
    """

    def __init__(self, every_n_steps: int = 10, iters: int = 20, save_to: str | Path | None = None) -> None:
        if every_n_steps < 1 or iters < 1:
            raise ValueError(f"every_n_steps and iters must be >= 1, got {every_n_steps}, {iters}")
        self.every_n_steps = every_n_steps
        self.iters = iters
        self.save_to = None if save_to is None else Path(save_to)
        self.history: dict[str, Any] = {"step": [], "sigma": {}}
        self._ops: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
        self._batchnorms: dict[str, _BatchNorm] = {}
        self._vectors: dict[str, Tensor] = {}
        self._last = -1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Find the layers and their input shapes on the first batch, and record step 0."""
        if self._ops or self._batchnorms:
            return
        shapes = input_shapes(pl_module, batch[0][:1])
        modules = named_modules(pl_module)
        self._ops = {name: (modules[name], shape) for name, shape in shapes.items()}
        for conv, bn in find_conv_bn_pairs(pl_module):
            if conv in shapes:
                self._ops[f"{conv}+{bn}"] = (nn.Sequential(modules[conv], modules[bn]), shapes[conv])
        self._batchnorms = {n: m for n, m in modules.items() if isinstance(m, _BatchNorm) and m.running_var is not None}
        self._record(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record after every ``every_n_steps``-th optimizer step."""
        step = trainer.global_step
        if step != self._last and step % self.every_n_steps == 0:
            self._record(step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the final weights too (after a clip at the end of training, when that callback runs first)."""
        if self._ops or self._batchnorms:
            self._record(trainer.global_step)
        if self.save_to is not None and trainer.is_global_zero:
            self.save_to.parent.mkdir(parents=True, exist_ok=True)
            self.save_to.write_text(json.dumps(self.history))

    def _record(self, step: int) -> None:
        self._last = step
        self.history["step"].append(step)
        sigma = self.history["sigma"]
        for name, (module, shape) in self._ops.items():
            init = self._vectors.get(name)
            result = spectrum(
                module, shape, init=init, max_iters=self.iters if init is not None else 200, check_affine=False
            )
            self._vectors[name] = result.right
            sigma.setdefault(name, []).append(result.sigma)
        for name, bn in self._batchnorms.items():
            sigma.setdefault(name, []).append(float(batchnorm_scale(bn).abs().max()))


class EpochTimer(Callback):
    """Wall time of each training epoch (validation excluded).

    Attributes:
        times: seconds per finished training epoch.

    Example:
        >>> import lightning.pytorch as pl
        >>> timer = EpochTimer()
        >>> trainer = pl.Trainer(callbacks=[timer], logger=False, enable_checkpointing=False)
        >>> timer.times
        []
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the epoch's time."""
        self.times.append(time.perf_counter() - self._start)
