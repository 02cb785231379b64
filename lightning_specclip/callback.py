"""SpectralClipCallback: a :class:`~lightning_specclip.SpectralClipper` driven by a Lightning ``Trainer``."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger  # none imports its package
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_specclip.clipper import SpectralClipper
from lightning_specclip.options import ClipperOptions
from lightning_specclip.selection import Selector
from lightning_specclip.tracked_map import TrackedMap

__all__ = ["SpectralClipCallback"]


@contextmanager
def _misconfiguration() -> Iterator[None]:
    """What the clipper refuses (``ValueError``) is a misconfiguration of the callback to Lightning."""
    try:
        yield
    except ValueError as err:
        raise MisconfigurationException(f"SpectralClipCallback: {err}") from err


class SpectralClipCallback(Callback):
    r"""Track and clip the spectral norm of every selected layer while a Lightning ``Trainer`` trains.

    Add it to the ``Trainer`` you already have; the model needs no change. It runs a
    :class:`~lightning_specclip.SpectralClipper` on the ``LightningModule`` (every option below but the first
    four is the clipper's; its docstring says what each does): the clipper counts each optimizer step (steps
    that only accumulate gradients are skipped), tracks the spectra, and clips on schedule. The callback adds
    what a ``Trainer`` needs: a last clip after the fit's last optimizer step (``clip_on_train_end``), before
    Lightning saves its final checkpoint (``max_steps``, ``max_epochs``, and a stop requested with
    ``trainer.should_stop``, e.g. by ``EarlyStopping``: a checkpoint saved then holds the clipped weights);
    the tracked norms in ``trainer.loggers`` (``spectral/<layer>/sigma``) and on the progress bar
    (``spectral/max_sigma``, updated on the logging schedule and after each clip); its state in checkpoints, for
    an exact resume; and the refusal of sharded strategies (FSDP, DeepSpeed: each rank holds a shard of every
    weight). Under DDP the clipper broadcasts the clipped weights from rank 0, so every rank holds bit-identical
    weights.

    Input shapes are those the layers run at in training mode before the first optimizer step (the first
    training batch; sanity-check validation does not count); see :class:`~lightning_specclip.SpectralClipper`.

    Args:
        target: the spectral norm to clip to, or a mapping from module-name glob to target; default 1.0 (or the
            target of ``options``).
        optimizer: the index (in ``trainer.optimizers``) of the optimizer whose steps drive the clipper, for
            manual optimization: with a GAN's ``optimizer=0`` and ``modules=["discriminator"]`` the
            discriminator is clipped right after its own steps, before the generator's step. Default: every
            optimizer step of the ``Trainer`` (``trainer.global_step``).
        clip_on_train_end: clip once more after the fit's last optimizer step, before its last checkpoint.
        log_every_n_steps: logging cadence in clipper steps; default the Trainer's.
        log_histograms: log the tracked values as histograms where the logger supports them (TensorBoard,
            Weights & Biases): ``spectral/sigma_per_layer``, and with ``k > 1`` ``spectral/<layer>/spectrum``.
        options: the clipper's options as one object; ``target`` and ``**kwargs`` then replace those they name.
        **kwargs: the clipper's other options by name (the fields of :class:`~lightning_specclip.ClipperOptions`).

    Attributes:
        options: the clipper's options, checked (:class:`~lightning_specclip.ClipperOptions`).
        clipper: the clipper of the current (or last) fit; ``None`` before the first.

    Raises:
        MisconfigurationException: what the clipper refuses (a non-positive target, an unknown method, a
            malformed input shape, ...), or a bad ``optimizer`` index; in ``setup``, a sharded strategy, a
            pattern that matches no selected layer or a layer that cannot take a clipped weight; at the first
            step, a selected module that is not affine in its input.
        TypeError: an option the clipper does not have.

    Example:
        >>> import lightning.pytorch as pl
        >>> callback = SpectralClipCallback(target=1.0, every_n_steps=100)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        target: float | Mapping[str, float] | None = None,
        *,
        optimizer: int | None = None,
        clip_on_train_end: bool = True,
        log_every_n_steps: int | None = None,
        log_histograms: bool = True,
        options: ClipperOptions | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self.options = ClipperOptions.of(options, target, **kwargs)
        except TypeError as err:
            raise TypeError(f"SpectralClipCallback: {err} (the options are those of SpectralClipper)") from err
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        for name, value, minimum in (("optimizer", optimizer, 0), ("log_every_n_steps", log_every_n_steps, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise MisconfigurationException(f"{name} must be None or an integer >= {minimum}, got {value!r}")
        self.optimizer = optimizer
        self.clip_on_train_end = clip_on_train_end
        self.log_every_n_steps = log_every_n_steps
        self.log_histograms = log_histograms
        self.clipper: SpectralClipper | None = None
        self._model: weakref.ref[nn.Module] | None = None  # the model the clipper's state belongs to
        self._loaded: dict[str, Any] | None = None  # a state loaded before the clipper exists
        self._logged_step = -1

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

        selection = {"modules": name(self.options.modules), "exclude": name(self.options.exclude)}
        return self._generate_state_key(**selection)

    # ------------------------------------------------------------------ what the clipper knows
    @property
    def maps(self) -> list[TrackedMap]:
        """Every tracked map (see :attr:`SpectralClipper.maps`); empty before the first optimizer step.

        Example:
            >>> SpectralClipCallback(1.0).maps
            []
        """
        return self.clipper.maps if self.clipper is not None else []

    @property
    def not_clipped(self) -> dict[str, str]:
        """Maps tracked but not clipped, with the reason (see :attr:`SpectralClipper.not_clipped`).

        Example:
            >>> SpectralClipCallback(1.0).not_clipped
            {}
        """
        return self.clipper.not_clipped if self.clipper is not None else {}

    @property
    def sigmas(self) -> dict[str, float]:
        """The tracked spectral norm of every map (see :attr:`SpectralClipper.sigmas`).

        Example:
            >>> SpectralClipCallback(1.0).sigmas  # nothing measured before fit
            {}
        """
        return self.clipper.sigmas if self.clipper is not None else {}

    def summary(self) -> str:
        """The clipper's table of every map (see :meth:`SpectralClipper.summary`).

        Returns:
            str: the table.

        Example:
            >>> print(SpectralClipCallback(1.0).summary())
            Spectral norms (method=fastclip): nothing tracked before the first fit
        """
        if self.clipper is None:
            return f"Spectral norms (method={self.options.clip_method.name}): nothing tracked before the first fit"
        return self.clipper.summary()

    @property
    def _fit_clipper(self) -> SpectralClipper:
        """The clipper of the fit that runs (made in ``setup``)."""
        if self.clipper is None:
            raise RuntimeError("SpectralClipCallback: no clipper before setup(stage='fit')")
        return self.clipper

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse sharded strategies; make the clipper of this fit (the state carries over for the same model)."""
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(word in strategy for word in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise MisconfigurationException(
                f"SpectralClipCallback does not support the sharded strategy {strategy}: each rank holds only a "
                f"shard of every weight. Use a data-parallel strategy (ddp, ddp_spawn) or a single device."
            )
        state, self._loaded = self._loaded, None
        if self.clipper is not None:
            self.clipper.remove()
            if state is None and self._model is not None and self._model() is pl_module:
                state = self.clipper.state_dict()
        self.clipper = None
        with _misconfiguration():
            self.clipper = SpectralClipper(pl_module, options=self.options)
        if state is not None:
            self.clipper.load_state_dict(state)
        self._model = weakref.ref(pl_module)
        self._logged_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count steps from where this fit starts, or hook the clipper onto the optimizer that drives it."""
        if self.optimizer is None:
            self._fit_clipper.num_steps = trainer.global_step
        elif self.optimizer >= len(trainer.optimizers):
            raise MisconfigurationException(
                f"SpectralClipCallback(optimizer={self.optimizer}): the model has {len(trainer.optimizers)} optimizers"
            )
        else:
            self._fit_clipper.attach(trainer.optimizers[self.optimizer])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the method's penalty gradient (``gram``) before the step of the optimizer that drives the clipper."""
        if self.optimizer is None or optimizer is trainer.optimizers[self.optimizer]:
            with _misconfiguration():
                self._fit_clipper.penalize()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimizer step: step the clipper (clipping on schedule, and before the fit ends); log."""
        clipper = self._fit_clipper
        ends = self.clip_on_train_end and self._fit_ends(trainer, batch_idx)
        with _misconfiguration():
            if self.optimizer is None and trainer.global_step > clipper.num_steps:
                clipper.num_steps = trainer.global_step - 1
                clipper.step(final=ends)
            elif ends and clipper.dirty:
                clipper.clip()
        every = self.log_every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]  # set at runtime
        scheduled = clipper.num_steps % every == 0
        due = scheduled or not clipper.dirty  # on the logging schedule, or just clipped
        if clipper.num_steps != self._logged_step and scheduled:
            self._logged_step = clipper.num_steps
            self._log(trainer)
        values = clipper.spectra.values()
        # The progress bar's σ follows the same schedule: a `log` call costs about as much as the per-step update.
        if values and (due or "spectral/max_sigma" not in trainer.progress_bar_metrics):
            top = torch.stack([v[0] for v in values]).max()  # a tensor: no wait for the device here
            pl_module.log("spectral/max_sigma", top, prog_bar=True, logger=False, on_step=True)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint saved as the fit stops (early stopping, a time limit) holds clipped weights.

        Another callback may ask the fit to stop after this one's last hook ran; the weights are then clipped
        here, and the checkpoint's copy of them (taken just before this hook) is replaced by the clipped ones.
        """
        clipper = self.clipper
        if not (self.clip_on_train_end and trainer.should_stop and clipper is not None and clipper.dirty):
            return
        clipper.clip()
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
        state is the one to resume from: it is merged by map (see :meth:`SpectralClipper.load_state_dict`).
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = type(self).__qualname__
        ours = [key for key in states if isinstance(key, str) and key.startswith(prefix)]
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set at runtime by the callback connector
        siblings = [c for c in callbacks if isinstance(c, SpectralClipCallback)]
        if len(ours) == 1 and len(siblings) == 1:
            rank_zero_info(f"SpectralClipCallback: resuming from the state saved as {ours[0]!r} (another selection)")
            self.load_state_dict(states[ours[0]])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clip if the weights moved since the last clip (a stop this callback did not foresee); print a summary."""
        clipper = self._fit_clipper
        if self.clip_on_train_end and clipper.dirty and clipper.maps:
            clipper.clip()
        rank_zero_info(self.summary())

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the clipper's hooks if the fit dies (a hooked model cannot be pickled)."""
        if self.clipper is not None:
            self.clipper.remove()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the clipper's hooks and let go of its operators (they reference the model's weights)."""
        if self.clipper is not None:
            self.clipper.remove()

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

    def _log(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        spectra = self._fit_clipper.spectra
        metrics: dict[str, float] = {}
        for name, values in spectra.items():
            metrics[f"spectral/{name}/sigma"] = float(values[0])
            for i in range(1, values.numel()):
                metrics[f"spectral/{name}/sigma_{i + 1}"] = float(values[i])
        if not metrics:
            return
        step = trainer.global_step
        histograms = self._histograms(trainer.loggers, metrics, spectra) if self.log_histograms else {}
        for logger in trainer.loggers:
            if histograms and isinstance(logger, WandbLogger):
                import wandb  # only where a WandbLogger is in use (it needs the package)

                # In the scalars' row, at their `trainer/global_step` (the logger's step metric): wandb's own step
                # counts log calls, so `experiment.log(..., step=global_step)` lands in other steps' rows or is dropped.
                media = {k: wandb.Histogram(v.tolist()) for k, v in histograms.items()}
                logger.log_metrics({**metrics, **media}, step)  # type: ignore[dict-item]  # wandb takes media as values
                continue
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                for tag, values in histograms.items():
                    logger.experiment.add_histogram(tag, values, step)

    def _histograms(
        self, loggers: Sequence[Logger], metrics: dict[str, float], spectra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The histograms logged with the scalars, as CPU tensors; none when no logger takes histograms."""
        if not any(isinstance(logger, TensorBoardLogger | WandbLogger) for logger in loggers):
            return {}
        histograms = {"spectral/sigma_per_layer": torch.tensor([v for k, v in metrics.items() if k.endswith("/sigma")])}
        if self.options.k > 1:
            histograms.update({f"spectral/{name}/spectrum": v.detach().float().cpu() for name, v in spectra.items()})
        return histograms

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The clipper's state (see :meth:`SpectralClipper.state_dict`), saved in checkpoints.

        Returns:
            dict[str, Any]: the state; empty before the first fit.

        Example:
            >>> SpectralClipCallback(1.0).state_dict()
            {}
        """
        if self.clipper is None:
            return dict(self._loaded or {})
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved state, merged by map (see :meth:`SpectralClipper.load_state_dict`).

        Args:
            state_dict: the saved state.

        Example:
            >>> callback = SpectralClipCallback(1.0)
            >>> callback.load_state_dict({"num_steps": 4, "clipped_step": 4, "maps": {}})
            >>> callback.state_dict()["num_steps"]
            4
        """
        if self.clipper is None:
            self._loaded = dict(state_dict)
        else:
            self.clipper.load_state_dict(state_dict)
