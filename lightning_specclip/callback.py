"""SpectralClipCallback: hold the spectral norm of a model's layers at a target during Lightning training."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_specclip.methods import METHODS, ClipMethod
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.power import PowerStep
from lightning_specclip.spectral.spectrum import Spectrum, spectrum
from lightning_specclip.targets import InputShapeRecorder, Selector, Target, find_conv_bn_pairs, select_modules

__all__ = ["SpectralClipCallback"]


@dataclass
class _State:
    """What the callback keeps per target (saved in checkpoints)."""

    right: Tensor | None = None
    values: Tensor | None = None
    clips: int = 0
    method: dict[str, Tensor] = field(default_factory=dict)


def _positive(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise MisconfigurationException(f"{name} must be a positive finite number, got {value!r}") from err
    if not (math.isfinite(value) and value > 0):
        raise MisconfigurationException(f"{name} must be a positive finite number, got {value!r}")
    return value


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MisconfigurationException(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class SpectralClipCallback(Callback):
    r"""Track and clip the spectral norm of every selected layer while a Lightning ``Trainer`` trains.

    Add it to the ``Trainer`` you already have; the model needs no change. For each selected layer the
    callback computes the top singular values of the layer as the linear map it really is (convolutions with
    their padding, stride and input size; see :func:`~lightning_specclip.spectrum`), warm-starting from the
    previous step's vectors, logs them, and every ``every_n_steps`` optimizer steps clips the layers whose
    norm exceeds the target with the chosen method. Weights are edited in place under ``torch.no_grad()``, so
    optimizers and compiled graphs keep their references.

    Schedule (the paper's): ``warmup_iters`` solver iterations the first time a layer is seen, then
    ``iters_per_step`` warm-started iterations after every optimizer step (steps that only accumulate
    gradients are skipped), a clip every ``every_n_steps`` steps from ``start_step``, and a last clip when
    training ends (``clip_on_train_end``) so the final weights satisfy the bound.

    Input shapes are captured from the first training batch with forward hooks; a selected layer that never
    runs is skipped with a warning. Under DDP the clipped weights are broadcast from rank 0, so every rank
    holds bit-identical weights (DDP itself never re-broadcasts parameters). Sharded strategies (FSDP,
    DeepSpeed) are refused. Spectral math runs in float32 whatever the precision of the model.

    Args:
        target: the spectral norm to clip to, or a mapping from module-name glob to target (the first
            matching pattern wins; layers matching none are tracked but not clipped).
        modules: module types and/or name globs to act on; default every ``Linear``, ``Conv*d`` and
            ``ConvTranspose*d``.
        exclude: types and/or name globs to leave out.
        method: ``"fastclip"`` (exact; the default), ``"gouk"``, ``"miyato"``, ``"senderovich"``, ``"gram"``
            (a regularizer), ``"none"`` (track only), or a :class:`~lightning_specclip.methods.ClipMethod`.
        compose_batchnorm: also clip each conv→BatchNorm composition (pairs found by tracing the model with
            ``torch.fx``; module order when it cannot be traced), after the conv alone, as the paper does.
        clip_batchnorm: also clamp every BatchNorm's per-channel gain ``|γ|/√(var+ε)`` to the target.
        warmup_iters: solver iterations the first time a layer's spectrum is computed.
        iters_per_step: warm-started solver iterations after each optimizer step.
        track_every_n_steps: do the per-step update only every this many steps (and right before each clip);
            1 is the paper's schedule, more trades tracking resolution for speed on fast accelerators.
        k: how many top singular values to track per layer.
        every_n_steps: clip every this many optimizer steps.
        start_step: first optimizer step at which clipping may happen.
        clip_on_train_end: clip once more when training ends.
        log_every_n_steps: logging cadence in optimizer steps; default the Trainer's.
        log_histograms: log the tracked values as histograms where the logger supports them (TensorBoard).

    Raises:
        MisconfigurationException: a non-positive or non-finite target, an unknown method, a count below its
            minimum, or ``compose_batchnorm`` with a method that cannot clip compositions.

    Example:
        >>> import lightning.pytorch as pl
        >>> callback = SpectralClipCallback(target=1.0, every_n_steps=100)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        target: float | Mapping[str, float] = 1.0,
        *,
        modules: Sequence[Selector] | None = None,
        exclude: Sequence[Selector] = (),
        method: str | ClipMethod = "fastclip",
        compose_batchnorm: bool = False,
        clip_batchnorm: bool = False,
        warmup_iters: int = 100,
        iters_per_step: int = 1,
        track_every_n_steps: int = 1,
        k: int = 1,
        every_n_steps: int = 100,
        start_step: int = 0,
        clip_on_train_end: bool = True,
        log_every_n_steps: int | None = None,
        log_histograms: bool = True,
    ) -> None:
        if isinstance(target, Mapping):
            if not target:
                raise MisconfigurationException("target mapping is empty; give at least one pattern: value")
            self.target: float | dict[str, float] = {str(p): _positive(f"target[{p!r}]", v) for p, v in target.items()}
        else:
            self.target = _positive("target", target)
        if isinstance(method, str):
            if method not in METHODS:
                raise MisconfigurationException(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
            method = METHODS[method]()
        elif not isinstance(method, ClipMethod):
            raise MisconfigurationException(
                f"method must be one of {', '.join(METHODS)} or a ClipMethod, got {type(method).__name__}"
            )
        if compose_batchnorm and "composition" not in method.kinds:
            allowed = [n for n, cls in METHODS.items() if "composition" in cls.kinds]
            raise MisconfigurationException(
                f"method {method.name!r} cannot clip conv∘BatchNorm compositions; with compose_batchnorm=True "
                f"use one of: {', '.join(allowed)}"
            )
        self.method = method
        self.modules = list(modules) if modules is not None else None
        self.exclude = list(exclude)
        self.compose_batchnorm = compose_batchnorm
        self.clip_batchnorm = clip_batchnorm
        self.warmup_iters = _count("warmup_iters", warmup_iters, 1)
        self.iters_per_step = _count("iters_per_step", iters_per_step, 1)
        self.track_every_n_steps = _count("track_every_n_steps", track_every_n_steps, 1)
        self.k = _count("k", k, 1)
        self.every_n_steps = _count("every_n_steps", every_n_steps, 1)
        self.start_step = _count("start_step", start_step, 0)
        self.clip_on_train_end = clip_on_train_end
        self.log_every_n_steps = (
            None if log_every_n_steps is None else _count("log_every_n_steps", log_every_n_steps, 1)
        )
        self.log_histograms = log_histograms
        self.targets: list[Target] = []
        self._states: dict[str, _State] = {}
        self._operators: dict[str, ImplicitLinear] = {}  # per-step operators, kept while they see the weights
        self._power: PowerStep | None = None  # the per-step update of the standard layers (a CUDA graph on GPUs)
        self._recorder: InputShapeRecorder | None = None
        self._last_step = -1

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse sharded strategies, resolve the targets, and start recording their input shapes."""
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(word in strategy for word in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise MisconfigurationException(
                f"SpectralClipCallback does not support the sharded strategy {strategy}: each rank holds only a "
                f"shard of every weight. Use a data-parallel strategy (ddp, ddp_spawn) or a single device."
            )
        self.targets = self._resolve_targets(pl_module)
        if isinstance(self.target, dict):
            for pattern in self.target:
                if not any(self._matches(t, pattern) for t in self.targets):
                    raise MisconfigurationException(
                        f"target pattern {pattern!r} matches no selected layer; selected: "
                        f"{', '.join(t.name for t in self.targets)}"
                    )
        for t in self.targets:
            self._states.setdefault(t.name, _State())
        layers = {id(t.layer): (t.name.split("+")[0], t.layer) for t in self.targets}
        self._recorder = InputShapeRecorder(layers.values())

    def _resolve_targets(self, model: nn.Module) -> list[Target]:
        try:
            selected = select_modules(model, self.modules, self.exclude)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        targets = [Target(name, "layer", module, module) for name, module in selected]
        unsupported = [t.name for t in targets if not self.method.supports(t)]
        if unsupported:
            rank_zero_warn(f"method {self.method.name!r} cannot clip {unsupported}; they are tracked only")
        modules = dict(model.named_modules())
        if self.compose_batchnorm:
            for conv_name, bn_name in find_conv_bn_pairs(model):
                conv, bn = modules[conv_name], modules[bn_name]
                targets.append(Target(f"{conv_name}+{bn_name}", "composition", nn.Sequential(conv, bn), conv))
        if self.clip_batchnorm:
            for name, module in modules.items():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    targets.append(Target(name, "batchnorm", module, module))
        return targets

    @staticmethod
    def _matches(target: Target, pattern: str) -> bool:
        names = [target.name, *target.name.split("+")]
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)

    def target_for(self, target: Target) -> float | None:
        """The clip value of one target (``None`` if the per-layer mapping does not cover it).

        Args:
            target: one of :attr:`targets`.

        Returns:
            float | None: the value to clip to.
        """
        if not isinstance(self.target, dict):
            return self.target
        for pattern, value in self.target.items():
            if self._matches(target, pattern):
                return value
        return None

    def _assign_shapes(self) -> None:
        assert self._recorder is not None
        shapes = self._recorder.shapes
        self._recorder.remove()
        self._recorder = None
        for t in self.targets:
            layer_name = t.name.split("+")[0]
            t.input_shape = shapes.get(layer_name)
        missing = [t.name for t in self.targets if t.input_shape is None]
        if missing:
            rank_zero_warn(f"SpectralClipCallback: layers {missing} did not run in the first training batch; skipped")
        self.targets = [t for t in self.targets if t.input_shape is not None]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count optimizer steps from where this fit starts (0, or the step a checkpoint restored)."""
        self._last_step = trainer.global_step

    # ------------------------------------------------------------------ per step
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After a real optimizer step: track the spectra, clip on schedule, log."""
        if self._recorder is not None:
            self._assign_shapes()
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step happened (gradient accumulation)
            return
        self._last_step = step
        clip_now = self._clip_due(step)
        if clip_now or step % self.track_every_n_steps == 0:
            self._track_all()
        if clip_now:
            self._clip_all(trainer)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step % every == 0:
            self._log(trainer, step)
        sigmas = [s.values[0] for s in self._states.values() if s.values is not None]
        if sigmas:  # a tensor: no wait for the device here
            pl_module.log("spectral/max_sigma", torch.stack(sigmas).max(), prog_bar=True, logger=False, on_step=True)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the gradient of the method's penalty (the ``gram`` regularizer) to the weights' gradients."""
        if self._recorder is not None:  # the first batch's forward has just recorded the input shapes
            self._assign_shapes()
        for t in self.targets:
            value = self.target_for(t)
            penalty = None if value is None else self.method.penalty(t, value)
            if penalty is None:
                continue
            params = [p for p in t.module.parameters() if p.requires_grad]
            grads = torch.autograd.grad(penalty, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = g.to(p.dtype)
                    else:
                        p.grad.add_(g.to(p.grad.dtype))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clip a last time, so that the final weights satisfy the bound, and print a summary table."""
        if self._recorder is not None:  # training ended before any batch
            self._assign_shapes()
        step = trainer.global_step
        # Nothing to do if the scheduled clip of this very step already ran (no optimizer step since).
        already = self._last_step == step and self._clip_due(step)
        if self.clip_on_train_end and step > 0 and not already:
            self._track_all()
            self._clip_all(trainer)
        rank_zero_info(self.summary())

    # ------------------------------------------------------------------ work
    def _clip_due(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0

    @staticmethod
    def _finite(target: Target) -> bool:
        return all(torch.isfinite(p).all() for p in target.module.parameters())

    def _k(self, target: Target) -> int:
        return min(self.k, math.prod(target.input_shape) - 1)

    def _operator(self, target: Target) -> tuple[ImplicitLinear, bool]:
        """The target's operator and whether it reads the live weights; only such a one is kept across steps
        (in float32 models; other dtypes are read through converted copies, made anew each time)."""
        A = self._operators.get(target.name)
        if A is not None and A.live:
            return A, True
        A = ImplicitLinear(target.module, target.input_shape, check_affine=False)
        live = A.live
        if live:
            self._operators[target.name] = A
        else:
            self._operators.pop(target.name, None)
        return A, live

    def _warm(self, target: Target) -> bool:
        right = self._states[target.name].right
        return right is not None and right.shape[1:] == target.input_shape

    def _track_all(self) -> None:
        """The per-step update of every target; one power step each for the warm single-vector standard layers
        together (:class:`~lightning_specclip.spectral.PowerStep`: one CUDA graph replay on GPUs)."""
        together: list[tuple[Target, ImplicitLinear]] = []
        for t in self.targets:
            A, live = self._operator(t) if self._warm(t) and self._k(t) == 1 else (None, False)
            if A is not None and live and A.closed_form:
                together.append((t, A))
            else:
                self._track(t, operator=A)
        if not together:
            return
        operators = [A for _, A in together]
        if self._power is None or self._power.operators != operators:  # by identity: an operator was rebuilt
            self._power = PowerStep(operators)
        values, vectors = self._power([self._states[t.name].right for t, _ in together])
        for (t, _), value, vector in zip(together, values, vectors, strict=True):
            state = self._states[t.name]
            state.right, state.values = vector, value
            self.method.step(t, state.method)

    def _track(self, target: Target, *, converge: bool = False, operator: ImplicitLinear | None = None) -> None:
        state = self._states[target.name]
        k = self._k(target)
        warm = self._warm(target)
        if warm and not converge:  # the paper's per-step update: warm-started subspace iterations (one AᵀA block each)
            result = spectrum(
                operator if operator is not None else self._operator(target)[0],
                k=k,
                method="subspace",
                init=state.right,
                max_iters=self.iters_per_step,
                tol=1e-12,
                check_affine=False,
                left=False,
            )
        elif not self._finite(target):  # nothing to measure; the clip step warns about it
            return
        else:  # warm-up, or re-measuring after a clip: Krylov (from the tracked vectors if any) until converged
            init = state.right if warm else None
            result = spectrum(
                target.module,
                target.input_shape,
                k=k,
                init=init,
                max_iters=self.warmup_iters,
                tol=1e-3,  # on the residual; the Ritz value errs by ~tol²/gap (σ to ~1e-6)
                left=False,
            )
        state.right, state.values = result.right, result.values
        self.method.step(target, state.method)

    def _clip_all(self, trainer: pl.Trainer) -> None:
        changed: set[int] = set()  # parameters some clip moved
        fresh: dict[str, Spectrum] = {}  # spectra the clips measured on the weights they wrote
        for t in self.targets:
            value = self.target_for(t)
            state = self._states[t.name]
            if value is None or not self.method.supports(t):
                continue
            if not self._finite(t):
                rank_zero_warn(f"SpectralClipCallback: {t.name} has non-finite weights; not clipped")
                state.right = None  # start the spectrum afresh once the weights are finite again
                continue
            if t.kind == "batchnorm":
                result = self.method.clip_batchnorm_(t, value)
            else:
                result = self.method.clip_(t, value, state.method, state.right)
            if result is None:
                continue
            state.clips += 1
            self._broadcast(trainer, t)
            moved = {id(p) for p in t.module.parameters()}
            changed |= moved
            for other in self.targets:  # a spectrum measured before this clip is stale if the clip moved it
                if other.name in fresh and any(id(p) in moved for p in other.module.parameters()):
                    del fresh[other.name]
            if result.spectrum is not None and result.spectrum.right.shape[0] >= self._k(t):
                fresh[t.name] = result.spectrum
        # Re-measure every other map whose weights moved (clipping a conv∘BN composition also moves the conv):
        # a clip can hand the top of the spectrum to another direction, which one warm iteration would miss.
        for t in self.targets:
            if t.name in fresh:
                state = self._states[t.name]
                state.right = fresh[t.name].right[: self._k(t)]
                state.values = fresh[t.name].values[: self._k(t)]
            elif any(id(p) in changed for p in t.module.parameters()):
                self._track(t, converge=True)

    @staticmethod
    def _broadcast(trainer: pl.Trainer, target: Target) -> None:
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        with torch.no_grad():
            for p in target.module.parameters():
                torch.distributed.broadcast(p.data, src=0)

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: pl.Trainer, step: int) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics: dict[str, float] = {}
        for t in self.targets:
            values = self._states[t.name].values
            if values is None:
                continue
            metrics[f"spectral/{t.name}/sigma"] = float(values[0])
            for i in range(1, values.numel()):
                metrics[f"spectral/{t.name}/sigma_{i + 1}"] = float(values[i])
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.log_histograms and isinstance(logger, TensorBoardLogger):
                sigmas = torch.tensor([v for k, v in metrics.items() if k.endswith("/sigma")])
                logger.experiment.add_histogram("spectral/sigma_per_layer", sigmas, step)
                if self.k > 1:
                    for t in self.targets:
                        values = self._states[t.name].values
                        if values is not None:
                            logger.experiment.add_histogram(f"spectral/{t.name}/spectrum", values.cpu(), step)

    @property
    def sigmas(self) -> dict[str, float]:
        """The tracked spectral norm σ₁ of every target measured so far, by target name.

        Between clips these come from one warm-started iteration per step (close, from below); right after a
        clip, and at the end of training, every map whose weights moved is measured to convergence.

        Returns:
            dict[str, float]: ``{target name: σ₁}``.

        Example:
            >>> callback = SpectralClipCallback(1.0)
            >>> callback.sigmas  # nothing measured before fit
            {}
        """
        return {
            t.name: float(self._states[t.name].values[0])
            for t in self.targets
            if t.name in self._states and self._states[t.name].values is not None
        }

    def summary(self) -> str:
        """A table of every target: kind, input shape, tracked spectral norm, target and clips so far.

        Returns:
            str: the table, one line per target.
        """
        rows = [("layer", "kind", "input shape", "sigma", "target", "clips")]
        for t in self.targets:
            state = self._states.get(t.name, _State())
            sigma = f"{float(state.values[0]):.4f}" if state.values is not None else "-"
            value = None if self.method.name == "none" else self.target_for(t)
            rows.append(
                (t.name, t.kind, str(t.input_shape), sigma, "-" if value is None else f"{value:g}", str(state.clips))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        table = "\n".join(lines)
        return f"Spectral norms (SpectralClipCallback, method={self.method.name})\n{table}"

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: counters, tracked vectors and values, method state.

        Returns:
            dict[str, Any]: the callback state.
        """

        def copy(t: Tensor | None) -> Tensor | None:  # the per-step update overwrites its vectors in place
            return None if t is None else t.clone()

        return {
            "last_step": self._last_step,
            "targets": {
                name: {"right": copy(s.right), "values": copy(s.values), "clips": s.clips, "method": dict(s.method)}
                for name, s in self._states.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Args:
            state_dict: the saved callback state.
        """
        self._last_step = state_dict["last_step"]
        self._states = {
            name: _State(s["right"], s["values"], s["clips"], dict(s["method"]))
            for name, s in state_dict["targets"].items()
        }
