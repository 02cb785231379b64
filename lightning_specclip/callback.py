"""SpectralClipCallback: hold the spectral norm of a model's layers at a target during Lightning training."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import weakref
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
from lightning_specclip.spectral.clip import NotLinearInWeightError, check_clippable, clip_spectral_norm_
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.power import PowerStep
from lightning_specclip.spectral.spectrum import Spectrum, spectrum
from lightning_specclip.targets import (
    LAYER_TYPES,
    PROJECTIONS,
    InputShapeRecorder,
    Selector,
    Target,
    attention_projection,
    find_conv_bn_pairs,
    named_modules,
    select_modules,
)

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


def _shapes_argument(
    input_shapes: Mapping[str, Sequence[int] | Sequence[Sequence[int]]] | None,
) -> dict[str, list[tuple[int, ...]]]:
    """``{glob: shape or [shapes]}`` → ``{glob: [shapes]}``, each shape a tuple of positive sizes."""
    result: dict[str, list[tuple[int, ...]]] = {}
    for pattern, value in (input_shapes or {}).items():
        shapes = [value] if value and all(isinstance(s, int) for s in value) else list(value)
        checked = []
        for shape in shapes:
            if not (
                isinstance(shape, Sequence)
                and shape
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
            ):
                raise MisconfigurationException(
                    f"input_shapes[{pattern!r}] must be an input shape without the batch dimension, e.g. (3, 64, 64), "
                    f"or a list of them; got {value!r}"
                )
            checked.append(tuple(shape))
        result[str(pattern)] = checked
    return result


def _listing(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names) - most} more)"


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
    gradients are skipped), a clip every ``every_n_steps`` steps from ``start_step``, and a last clip after the
    fit's last optimizer step (``clip_on_train_end``), before Lightning saves its final checkpoint, so the
    weights a user keeps satisfy the bound (``max_steps``, ``max_epochs``, and a stop requested with
    ``trainer.should_stop``, e.g. by ``EarlyStopping``: a checkpoint saved then holds the clipped weights).

    Input shapes: a convolution's norm depends on its input size, so every input shape a layer runs at during
    the first *training* batch (sanity-check validation does not count) is its own map, tracked and clipped
    (``"<layer>@CxHxW"`` for the shapes after the first); name further shapes, such as the test resolution,
    with ``input_shapes``. A shape first seen later, or only in evaluation, is not bounded. A ``Linear``'s norm
    is the same at every input shape and needs none. A selected layer that does not run in the first training
    batch (and has no named shape) is skipped with a warning. Frozen layers (no parameter requiring grad) are
    tracked, not clipped, unless ``clip_frozen``; layers that cannot be clipped (not linear in their weight,
    such as a weight-standardized conv) are tracked and reported in :attr:`not_clipped`.

    Under DDP the clipped weights are broadcast from rank 0, so every rank holds bit-identical weights (DDP
    itself never re-broadcasts parameters). Sharded strategies (FSDP, DeepSpeed) are refused. Spectral math
    runs in float32 whatever the precision of the model.

    Args:
        target: the spectral norm to clip to, or a mapping from module-name glob to target (the first
            matching pattern wins; layers matching none are tracked but not clipped).
        modules: module types and/or name globs to act on; default every ``Linear``, ``Conv*d`` and
            ``ConvTranspose*d``, and the query, key and value projections of every ``MultiheadAttention``
            (``<attn>.q_proj``, ``.k_proj``, ``.v_proj``; its ``out_proj`` is a ``Linear``).
        exclude: types and/or name globs to leave out.
        method: ``"fastclip"`` (exact; the default), ``"gouk"``, ``"miyato"``, ``"senderovich"``, ``"gram"``
            (a regularizer), ``"none"`` (track only), or a :class:`~lightning_specclip.methods.ClipMethod`.
        compose_batchnorm: also clip each conv→BatchNorm composition (pairs found by tracing the model with
            ``torch.fx``; module order when it cannot be traced), after the conv alone, as the paper does.
        clip_batchnorm: also clamp every BatchNorm's per-channel gain ``|γ|/√(var+ε)`` to the target.
        input_shapes: more input shapes (without the batch dimension) to bound layers at, by layer-name glob:
            ``{"features.0": (3, 64, 64)}`` or ``{"features.*": [(16, 32, 32), (16, 64, 64)]}``
            (:func:`~lightning_specclip.tracking.input_shapes` gives every layer's shape for a model input).
        clip_frozen: also clip layers none of whose parameters require gradients.
        warmup_iters: solver iterations the first time a layer's spectrum is computed.
        iters_per_step: warm-started solver iterations after each optimizer step.
        track_every_n_steps: do the per-step update only every this many steps (and right before each clip);
            1 is the paper's schedule, more trades tracking resolution for speed on fast accelerators.
        k: how many top singular values to track per layer.
        every_n_steps: clip every this many optimizer steps.
        start_step: first optimizer step at which clipping may happen.
        clip_on_train_end: clip once more after the fit's last optimizer step, before its last checkpoint.
        log_every_n_steps: logging cadence in optimizer steps; default the Trainer's.
        log_histograms: log the tracked values as histograms where the logger supports them (TensorBoard).

    Raises:
        MisconfigurationException: a non-positive or non-finite target, an unknown method, a count below its
            minimum, a malformed input shape, or ``compose_batchnorm`` with a method that cannot clip
            compositions; in ``setup``, a pattern that matches no selected layer, or a layer whose weight is
            parametrized in a way that cannot take a clipped weight (``spectral_norm``); on the first batch, a
            selected module that is not affine in its input.

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
        input_shapes: Mapping[str, Sequence[int] | Sequence[Sequence[int]]] | None = None,
        clip_frozen: bool = False,
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
        self.input_shapes = _shapes_argument(input_shapes)
        self.clip_frozen = clip_frozen
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
        #: every tracked map, one per input shape its layer runs at (known after the first training batch)
        self.targets: list[Target] = []
        #: targets that are tracked but not clipped, with the reason (frozen, not linear in the weight, ...)
        self.not_clipped: dict[str, str] = {}
        self._layers: list[Target] = []  # what setup selected, before input shapes are known
        self._states: dict[str, _State] = {}
        self._operators: dict[str, ImplicitLinear] = {}  # per-step operators, kept while they see the weights
        self._power: PowerStep | None = None  # the per-step update of the standard layers (a CUDA graph on GPUs)
        self._recorder: InputShapeRecorder | None = None
        self._shapes_known = False  # whether this fit's first training batch was seen
        self._model: weakref.ref[nn.Module] | None = None  # the model the state belongs to
        self._last_step = -1
        self._clipped_step = -1  # the optimizer step the weights were last clipped after

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints: several instances with other selections coexist.

        Example:
            >>> SpectralClipCallback(modules=["disc.*"]).state_key
            "SpectralClipCallback{'modules': ['disc.*'], 'exclude': []}"
        """

        def name(selectors: Sequence[Selector] | None) -> list[str] | None:
            if selectors is None:
                return None
            return [s if isinstance(s, str) else f"{s.__module__}.{s.__qualname__}" for s in selectors]

        return self._generate_state_key(modules=name(self.modules), exclude=name(self.exclude))

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse sharded strategies and layers that cannot be clipped, and resolve the layers to act on."""
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(word in strategy for word in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise MisconfigurationException(
                f"SpectralClipCallback does not support the sharded strategy {strategy}: each rank holds only a "
                f"shard of every weight. Use a data-parallel strategy (ddp, ddp_spawn) or a single device."
            )
        if self._model is not None and self._model() is not pl_module:  # a new model: nothing carries over
            self._states, self._last_step, self._clipped_step = {}, -1, -1
        self._model = weakref.ref(pl_module)
        self._operators, self._power = {}, None
        self._layers = self._resolve_layers(pl_module)
        self.targets, self.not_clipped, self._shapes_known = [], {}, False
        names = [t.name for t in self._layers]
        patterns = [("target", p) for p in self.target] if isinstance(self.target, dict) else []
        for group, pattern in [*patterns, *(("input_shapes", p) for p in self.input_shapes)]:
            if not any(self._matches(name, pattern) for name in names):
                raise MisconfigurationException(
                    f"{group} pattern {pattern!r} matches no selected layer; selected: {', '.join(names)}"
                )
        if self.method.name != "none":
            for t in self._layers:
                if not isinstance(t.layer, LAYER_TYPES) or not self.method.supports(t):
                    continue
                try:
                    check_clippable(t.module)
                except ValueError as err:
                    raise MisconfigurationException(
                        f"SpectralClipCallback cannot clip {t.name} ({type(t.layer).__name__}): {err}. Leave it out "
                        f"(exclude=[{t.name.split('+')[0]!r}]), or track it only (method='none')."
                    ) from err

    def _resolve_layers(self, model: nn.Module) -> list[Target]:
        try:
            selected = select_modules(model, self.modules, self.exclude)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        targets = []
        for name, module in selected:
            if isinstance(module, nn.MultiheadAttention):  # its q, k, v maps; out_proj is a Linear of its own
                targets += [Target(f"{name}.{which}", "projection", module, module) for which in PROJECTIONS]
            else:
                targets.append(Target(name, "layer", module, module))
        modules = named_modules(model)
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
    def _matches(name: str, pattern: str) -> bool:
        """Whether a glob names a target: its name, or a layer of it (either side of ``+``, without ``@shape``)."""
        name = name.split("@")[0]
        return any(fnmatch.fnmatchcase(n, pattern) for n in (name, *name.split("+")))

    def target_for(self, target: Target) -> float | None:
        """The clip value of one target (``None`` if the per-layer mapping does not cover it).

        Args:
            target: one of :attr:`targets`.

        Returns:
            float | None: the value to clip to.

        Example:
            >>> from lightning_specclip.targets import Target
            >>> callback = SpectralClipCallback({"head": 0.5, "*": 2.0})
            >>> head = Target("head", "layer", nn.Linear(2, 2), None)
            >>> callback.target_for(head)
            0.5
        """
        if not isinstance(self.target, dict):
            return self.target
        for pattern, value in self.target.items():
            if self._matches(target.name, pattern):
                return value
        return None

    # ------------------------------------------------------------------ input shapes
    def _start_recording(self) -> None:
        layers = {id(t.layer): (t.name.split("+")[0], t.layer) for t in self._layers if t.kind != "projection"}
        self._recorder = InputShapeRecorder(layers.values())

    def _stop_recording(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def _shapes_of(self, layer: Target, recorded: Mapping[str, list[tuple[int, ...]]]) -> list[tuple[int, ...]]:
        """Every input shape a layer is bounded at: those it ran at in the first training batch, and those named
        in ``input_shapes``. A Linear's norm is the same at every shape: it is measured on one input vector."""
        module, name = layer.layer, layer.name.split("+")[0]
        if layer.kind == "batchnorm":  # the clamp of the gains holds at every shape
            return recorded.get(name, [])[:1]
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and module.in_features > 0:
            return [(module.in_features,)]
        shapes = list(recorded.get(name, []))
        for pattern, extra in self.input_shapes.items():
            if self._matches(layer.name, pattern):
                shapes += [s for s in extra if s not in shapes]
        return shapes

    def _assign_shapes(self) -> None:
        """Turn the selected layers into targets, one per input shape, and decide which ones are clipped."""
        assert self._recorder is not None
        recorded = self._recorder.all_shapes
        self._stop_recording()
        self._shapes_known = True
        self.targets, missing = [], []
        for layer in self._layers:
            if layer.kind == "projection":  # built now, on the device and in the dtype the model trains in
                view = attention_projection(layer.layer, layer.name.rsplit(".", 1)[1])
                layer = dataclasses.replace(layer, kind="layer", module=view, layer=view)
            shapes = self._shapes_of(layer, recorded)
            if not shapes:
                missing.append(layer.name)
            for i, shape in enumerate(shapes):
                name = layer.name if i == 0 else f"{layer.name}@{'x'.join(map(str, shape))}"
                self.targets.append(dataclasses.replace(layer, name=name, input_shape=shape))
        if missing:
            rank_zero_warn(
                f"SpectralClipCallback: layers {missing} did not run in the first training batch; they are "
                f"neither tracked nor clipped (name their input shapes with input_shapes= to bound them)"
            )
        for t in self.targets:
            self._check_affine(t)
        self.not_clipped = self._decide_not_clipped()
        self._states = {t.name: self._states.get(t.name) or _State() for t in self.targets}

    @staticmethod
    def _check_affine(target: Target) -> None:
        if target.kind == "batchnorm":
            return
        try:
            ImplicitLinear(target.module, target.input_shape, check_affine=True)
        except ValueError as err:
            raise MisconfigurationException(
                f"SpectralClipCallback: {target.name} ({type(target.layer).__name__}) at input shape "
                f"{target.input_shape} is not a linear map of its input, so it has no spectral norm: {err}. "
                f"Select only layers affine in their input (modules=, exclude=)."
            ) from err

    def _decide_not_clipped(self) -> dict[str, str]:
        reasons: dict[str, str] = {}
        details: dict[str, str] = {}  # reason → what the first layer's check said
        if self.method.name == "none":
            return reasons
        for t in self.targets:
            if self.target_for(t) is None:
                continue
            if not self.method.supports(t):
                reasons[t.name] = f"method {self.method.name!r} cannot clip a {t.kind}"
            elif not self.clip_frozen and not any(p.requires_grad for p in t.layer.parameters()):
                reasons[t.name] = "frozen (requires_grad=False)"
            elif isinstance(t.layer, LAYER_TYPES) and t.kind != "batchnorm":
                try:
                    check_clippable(t.module, t.input_shape)
                except NotLinearInWeightError as err:
                    reasons[t.name] = "not linear in its weight"
                    details.setdefault(reasons[t.name], str(err))
        frozen = [n for n, r in reasons.items() if r.startswith("frozen")]
        if frozen:
            rank_zero_info(
                f"SpectralClipCallback: {len(frozen)} frozen layers (requires_grad=False) are tracked, not clipped: "
                f"{_listing(frozen)}; pass clip_frozen=True to clip them too"
            )
        grouped: dict[str, list[str]] = {}
        for name, reason in reasons.items():
            if name not in frozen:
                grouped.setdefault(reason, []).append(name)
        for reason, names in grouped.items():
            detail = f" ({details[reason]})" if reason in details else ""
            rank_zero_warn(f"SpectralClipCallback: tracked but not clipped, {reason}{detail}: {_listing(names)}")
        return reasons

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count optimizer steps from where this fit starts (0, or the step a checkpoint restored)."""
        self._last_step = trainer.global_step
        if self._clipped_step > self._last_step:
            self._clipped_step = -1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Record the input shapes of the selected layers during the first training batch of the fit."""
        if not self._shapes_known and self._recorder is None and self._layers:
            self._start_recording()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After a real optimizer step: track the spectra, clip on schedule and before the fit ends, log."""
        if self._recorder is not None:
            self._assign_shapes()
        step = trainer.global_step
        if step != self._last_step:  # an optimizer step happened (not only gradient accumulation)
            self._last_step = step
            final = self.clip_on_train_end and self._fit_ends(trainer, batch_idx)
            clip_now = final or self._clip_due(step)
            if clip_now or step % self.track_every_n_steps == 0:
                self._track_all()
            if clip_now:
                self._clip_all(trainer, final=final)
            every = self.log_every_n_steps or trainer.log_every_n_steps
            if step % every == 0:
                self._log(trainer, step)
        elif self.clip_on_train_end and self._dirty and self._fit_ends(trainer, batch_idx):
            self._track_all()
            self._clip_all(trainer, final=True)
        sigmas = [self._states[t.name].values[0] for t in self.targets if self._states[t.name].values is not None]
        if sigmas:  # a tensor: no wait for the device here
            pl_module.log("spectral/max_sigma", torch.stack(sigmas).max(), prog_bar=True, logger=False, on_step=True)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the gradient of the method's penalty (the ``gram`` regularizer) to the weights' gradients."""
        if type(self.method).penalty is ClipMethod.penalty:
            return
        if self._recorder is not None:  # the first batch's forward has just recorded the input shapes
            self._assign_shapes()
        for t in self.targets:
            value = self.target_for(t)
            penalty = None if value is None or t.name in self.not_clipped else self.method.penalty(t, value)
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

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint saved as the fit stops (early stopping, a time limit) holds clipped weights.

        Another callback may ask the fit to stop after this one's last hook ran; the weights are then clipped
        here, and the checkpoint's copy of them (taken just before this hook) is replaced by the clipped ones.
        """
        if not (self.clip_on_train_end and trainer.should_stop and self._dirty and self.targets):
            return
        self._track_all()
        self._clip_all(trainer, final=True)
        weights = trainer.strategy.lightning_module_state_dict()
        saved = checkpoint.get("state_dict", {})
        saved.update({name: value for name, value in weights.items() if name in saved})
        if self.state_key in checkpoint.get("callbacks", {}):
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Adopt the state of a checkpoint written with another selection (``modules``, ``exclude``).

        A callback's state is stored under :attr:`state_key`, which names the selection. When the checkpoint
        holds exactly one state of this class under another key and the trainer has one such callback, that
        state is the one to resume from: it is merged by target (see :meth:`load_state_dict`).
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = type(self).__qualname__
        ours = [key for key in states if isinstance(key, str) and key.startswith(prefix)]
        siblings = [c for c in trainer.callbacks if isinstance(c, SpectralClipCallback)]
        if len(ours) == 1 and len(siblings) == 1:
            rank_zero_info(f"SpectralClipCallback: resuming from the state saved as {ours[0]!r} (another selection)")
            self.load_state_dict(states[ours[0]])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clip if the weights moved since the last clip (a stop this callback did not foresee); print a summary."""
        self._stop_recording()
        if self.clip_on_train_end and self._dirty and trainer.global_step > 0 and self.targets:
            self._track_all()
            self._clip_all(trainer, final=True)
        rank_zero_info(self.summary())

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the shape hooks if the fit dies during the first batch (a hooked model cannot be pickled)."""
        self._stop_recording()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the shape hooks and let go of the operators (they reference the model's weights)."""
        self._stop_recording()
        self._operators, self._power = {}, None

    # ------------------------------------------------------------------ work
    def _clip_due(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0

    @property
    def _dirty(self) -> bool:
        """Whether an optimizer step moved the weights since they were last clipped."""
        return self._last_step > 0 and self._clipped_step != self._last_step

    @staticmethod
    def _fit_ends(trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether the fit stops after this batch: ``max_steps`` reached, the last batch of the last epoch, or a
        stop requested (``trainer.should_stop``: early stopping, a time limit)."""
        if trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            return True
        if trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.current_epoch + 1 < trainer.max_epochs:
            return False
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches

    @staticmethod
    def _finite(target: Target) -> bool:
        return all(torch.isfinite(p).all() for p in target.module.parameters())

    def _k(self, target: Target) -> int:
        return min(self.k, math.prod(target.input_shape))

    def _operator(self, target: Target) -> tuple[ImplicitLinear, bool]:
        """The target's operator and whether it reads the live weights; only such a one is kept across steps
        (in float32 models; other dtypes are read through converted copies, made anew each time)."""
        A = self._operators.get(target.name)
        if A is not None and A.op is target.module and A.live:
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
                check_affine=False,  # probed once, when the input shape became known
                left=False,
            )
        state.right, state.values = result.right, result.values
        self.method.step(target, state.method)

    def _drop_non_finite(self) -> None:
        """Forget tracked spectra that are not finite (the weights were, for a while): they are measured anew."""
        states = [s for s in self._states.values() if s.values is not None]
        if not states:
            return
        finite = torch.stack([torch.isfinite(s.values).all() & torch.isfinite(s.right).all() for s in states])
        for state, ok in zip(states, finite.tolist(), strict=True):
            if not ok:
                state.right = state.values = None

    def _clip_all(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Clip every target above its value, then make sure every map of every clipped layer holds its bound.

        A layer can be several maps (one per input shape, and its composition with a BatchNorm): clipping one
        moves the others. An exact method (FastClip) therefore checks them all afterwards, clips again those
        still above their value, and in a last pass rescales the weight (which lowers every map of the layer
        by the same factor) so that each one lands at or below its value. The last clip of a fit (``final``)
        also measures to convergence the maps it does not clip, so that the summary reports measured norms.
        """
        self._drop_non_finite()
        for t in self.targets:  # measure anew what was dropped (or never measured), where the weights allow
            if self._states[t.name].values is None:
                self._track(t, converge=True)
        due = []
        for t in self.targets:
            value = self.target_for(t)
            if value is None or t.name in self.not_clipped or not self.method.supports(t):
                continue
            if not self._finite(t):
                rank_zero_warn(f"SpectralClipCallback: {t.name} has non-finite weights; not clipped")
                self._states[t.name].right = self._states[t.name].values = None
                continue
            due.append((t, value))
        exact, tol = self.method.exact, self.method.tol
        changed: set[str] = set()
        pending = due
        for attempt in range(3 if exact else 1):
            self._clip_pass(trainer, pending, changed, rescale=attempt == 2)
            if not exact:
                break
            pending = [(t, v) for t, v in due if self._sigma(t) > v * (1 + tol / 2)]
            if not pending:
                break
        for name in changed:
            self._states[name].clips += 1
        if final:  # the per-step estimates of maps nobody clipped can lag behind: measure them
            clipped = {t.name for t, _ in due}
            for t in self.targets:
                if t.name not in clipped:
                    self._track(t, converge=True)
        self._clipped_step = self._last_step

    def _sigma(self, target: Target) -> float:
        values = self._states[target.name].values
        return math.inf if values is None else float(values[0])

    def _clip_pass(
        self, trainer: pl.Trainer, due: Sequence[tuple[Target, float]], changed: set[str], rescale: bool
    ) -> None:
        moved_params: set[int] = set()  # parameters some clip moved
        fresh: dict[str, Spectrum] = {}  # spectra the clips measured on the weights they wrote
        for t, value in due:
            state = self._states[t.name]
            if t.kind == "batchnorm":
                result = self.method.clip_batchnorm_(t, value)
            elif rescale:  # the last resort of an exact method: scale the weight onto the target
                result = clip_spectral_norm_(
                    t.module, value, t.input_shape, spectrum=state.right, max_rounds=0, tol=self.method.tol
                )
            else:
                result = self.method.clip_(t, value, state.method, state.right)
            if result is None or not result.changed:
                if result is not None and result.spectrum is not None and result.spectrum.right.shape[0] >= self._k(t):
                    fresh[t.name] = result.spectrum
                continue
            changed.add(t.name)
            self._broadcast(trainer, t)
            moved = {id(p) for p in t.module.parameters()}
            moved_params |= moved
            for other in self.targets:  # a spectrum measured before this clip is stale if the clip moved it
                if other.name in fresh and any(id(p) in moved for p in other.module.parameters()):
                    del fresh[other.name]
            if result.spectrum is not None and result.spectrum.right.shape[0] >= self._k(t):
                fresh[t.name] = result.spectrum
        # Re-measure every other map whose weights moved (clipping a conv∘BN composition also moves the conv, a
        # layer run at two input sizes is two maps): a clip can hand the top of the spectrum to another direction,
        # which one warm iteration would miss.
        for t in self.targets:
            if t.name in fresh:
                state = self._states[t.name]
                state.right = fresh[t.name].right[: self._k(t)]
                state.values = fresh[t.name].values[: self._k(t)]
            elif any(id(p) in moved_params for p in t.module.parameters()):
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
        """A table of every target: kind, input shape, tracked spectral norm, target, clips that changed the
        weights, and why a map is not clipped (frozen, not linear in its weight, ...).

        Returns:
            str: the table, one line per target.

        Example:
            >>> print(SpectralClipCallback(1.0).summary())  # before fit: no targets yet
            Spectral norms (SpectralClipCallback, method=fastclip)
            layer  kind  input shape  sigma  target  clips  note
        """
        rows = [("layer", "kind", "input shape", "sigma", "target", "clips", "note")]
        for t in self.targets:
            state = self._states.get(t.name, _State())
            sigma = f"{float(state.values[0]):.4f}" if state.values is not None else "-"
            value = None if self.method.name == "none" or t.name in self.not_clipped else self.target_for(t)
            rows.append(
                (
                    t.name,
                    t.kind,
                    str(t.input_shape),
                    sigma,
                    "-" if value is None else f"{value:g}",
                    str(state.clips),
                    self.not_clipped.get(t.name, ""),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        table = "\n".join(lines)
        return f"Spectral norms (SpectralClipCallback, method={self.method.name})\n{table}"

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: counters, tracked vectors and values, method state.

        Spectra that are not finite (the weights were not, for a while) are left out: a resumed run measures
        those layers anew.

        Returns:
            dict[str, Any]: the callback state.

        Example:
            >>> SpectralClipCallback(1.0).state_dict()
            {'last_step': -1, 'clipped_step': -1, 'targets': {}}
        """
        self._drop_non_finite()

        def copy(t: Tensor | None) -> Tensor | None:  # the per-step update overwrites its vectors in place
            return None if t is None else t.clone()

        return {
            "last_step": self._last_step,
            "clipped_step": self._clipped_step,
            "targets": {
                name: {"right": copy(s.right), "values": copy(s.values), "clips": s.clips, "method": dict(s.method)}
                for name, s in self._states.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, merged by target: a target this fit does not have any more is
        dropped, a new one starts fresh, a non-finite spectrum is measured anew.

        Args:
            state_dict: the saved callback state.

        Example:
            >>> callback = SpectralClipCallback(1.0)
            >>> callback.load_state_dict({"last_step": 4, "clipped_step": 4, "targets": {}})
            >>> callback.sigmas
            {}
        """
        self._last_step = state_dict["last_step"]
        self._clipped_step = state_dict.get("clipped_step", -1)
        loaded = {
            name: _State(s["right"], s["values"], s["clips"], dict(s["method"]))
            for name, s in state_dict["targets"].items()
        }
        if self._shapes_known:  # the targets of this fit are known: keep theirs only
            loaded = {t.name: loaded.get(t.name) or _State() for t in self.targets}
        self._states = loaded
        self._drop_non_finite()
