"""SpectralClipper: hold the spectral norm of a model's layers at a target in any PyTorch training loop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_specclip.clip_event import ClipEvent, ClipReport
from lightning_specclip.maps import MapSet
from lightning_specclip.methods import ClipMethod
from lightning_specclip.options import ClipperOptions, _count, check_options
from lightning_specclip.rank_zero import warn
from lightning_specclip.spectral.operator import no_autocast
from lightning_specclip.tracked_map import TrackedMap
from lightning_specclip.tracker import Tracker

__all__ = ["SpectralClipper", "check_options"]


class SpectralClipper:
    r"""Track and clip the spectral norm of every selected layer of a model, in any training loop.

    Create it for the model, call :meth:`step` after every optimizer step (or pass ``optimizer=`` and it
    steps itself), and :meth:`clip` before you save the weights you keep. For each selected layer it keeps
    the top singular values of the layer as the linear map it really is (convolutions with their padding,
    stride and input size; see :func:`~lightning_specclip.spectrum`), warm-started from the previous step's
    vectors, and on schedule clips the layers whose norm exceeds the target with the chosen method. Weights are
    edited in place under ``torch.no_grad()``, so optimizers and compiled graphs keep their references. Pure
    PyTorch: :class:`~lightning_specclip.SpectralClipCallback` drives one of these from a Lightning ``Trainer``.

    The schedule and every option are those of :class:`~lightning_specclip.ClipperOptions` (read as attributes
    too: ``clipper.k`` is ``clipper.options.k``); override :meth:`should_clip` for another schedule. A clip is one
    :class:`~lightning_specclip.ClipEvent`: an exact method (FastClip) clips again what a clip of another map of
    the same layer pushed above its target, finally by rescaling, and what moved is measured to convergence.

    Input shapes: every way a layer runs in training mode before the first :meth:`step` is its own map (see
    :class:`~lightning_specclip.maps.MapSet`); a layer it cannot bound is in :attr:`not_clipped`, with the reason.

    When a ``torch.distributed`` process group is running (DDP, Fabric), clipped weights are broadcast from
    rank 0 so every rank holds bit-identical weights (data-parallel training never re-broadcasts parameters);
    every rank must call :meth:`step` and :meth:`clip` alike. Spectral math runs in float32 whatever the
    dtype of the model, and outside any autocast region the step or clip is called from (a step inside
    ``optimizer.step()`` under ``torch.autocast``, a Lightning hook under ``precision="bf16-mixed"``).

    Args:
        model: the model whose layers are controlled (inside a ``DistributedDataParallel`` or Fabric wrapper
            the layers keep the model's own names).
        target: the spectral norm to clip to, or a mapping from module-name glob to target (see
            :class:`~lightning_specclip.ClipperOptions`); default 1.0 (or the target of ``options``).
        optimizer: step automatically right after every ``optimizer.step()`` (see :meth:`attach`): a GAN's
            discriminator is then clipped after its own step, before the generator trains against it.
        options: the options as one object; ``target`` and ``**kwargs`` then replace those they name.
        **kwargs: the other options by name (the fields of :class:`~lightning_specclip.ClipperOptions`).

    Attributes:
        options: the checked options.
        tracker: the tracked spectra and the per-step update (:class:`~lightning_specclip.tracker.Tracker`).
        map_set: the selected layers and their maps (:class:`~lightning_specclip.maps.MapSet`).

    Raises:
        ValueError: what :class:`~lightning_specclip.ClipperOptions` refuses, a pattern that matches no selected
            layer, or a layer whose weight is parametrized in a way that cannot take a clipped weight
            (``spectral_norm``); at the first step, a selected module that is not affine in its input.
        TypeError: an option :class:`~lightning_specclip.ClipperOptions` does not have.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> clipper = SpectralClipper(model, target=1.0, every_n_steps=2, warmup_iters=20)
        >>> for _ in range(4):
        ...     model(torch.randn(8, 1, 8, 8)).square().mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     clipper.step()
        >>> clipper.clip()
        >>> all(sigma <= 1.01 for sigma in clipper.sigmas.values())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        target: float | Mapping[str, float] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        options: ClipperOptions | None = None,
        **kwargs: Any,
    ) -> None:
        self.options = ClipperOptions.of(options, target, **kwargs)
        self.map_set = MapSet(model, self.options)
        self.tracker = Tracker(self.options)
        self._num_steps = 0
        self._clipped_step = -1  # the step the weights were last clipped after
        self._penalized = False  # whether penalize() ran since the last step (methods with a penalty)
        self._handles: list[RemovableHandle] = []
        if optimizer is not None:
            self.attach(optimizer)

    def __getattr__(self, name: str) -> Any:
        """An option read as an attribute (``clipper.k`` is ``clipper.options.k``), as before they were one object."""
        options = self.__dict__.get("options")
        if options is None or name not in ClipperOptions.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(options, name)

    @property
    def method(self) -> ClipMethod:
        """The clip method (:class:`~lightning_specclip.ClipMethod`).

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3)), method="gouk").method.name
            'gouk'
        """
        return self.options.clip_method

    @property
    def maps(self) -> list[TrackedMap]:
        """Every tracked map, one per way its layer runs (known at the first step).

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).maps  # before the first step
            []
        """
        return self.map_set.maps

    @property
    def not_clipped(self) -> dict[str, str]:
        """Maps and selected layers that are not clipped, with the reason: layers the clipper cannot bound (neither
        tracked nor clipped) and maps tracked only (frozen, not linear in the weight, a kind the method cannot clip).

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).not_clipped
            {}
        """
        return self.map_set.not_clipped

    def target_of(self, tracked: TrackedMap) -> float | None:
        """The target one map is clipped to (``None`` if the per-layer mapping does not cover it).

        Args:
            tracked: one of :attr:`maps`.

        Returns:
            float | None: the spectral norm to clip to.

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
            >>> clipper = SpectralClipper(model, {"1": 0.5, "*": 2.0})
            >>> [clipper.target_of(m) for m in clipper.map_set.layers]
            [2.0, 0.5]
        """
        return self.map_set.target_of(tracked)

    def _ensure_maps(self) -> None:
        """At the first step: the maps from the calls recorded since creation, and a state for each."""
        if self.map_set.build():
            self.tracker.adopt(self.maps)

    # ------------------------------------------------------------------ the training-loop API
    @property
    def num_steps(self) -> int:
        """Optimizer steps counted so far (by :meth:`step`); a loop that counts its own may set it.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).num_steps
            0
        """
        return self._num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self._num_steps = _count("num_steps", value, 0)
        if self._clipped_step > value:  # a clip "after" a step that has not happened in this count
            self._clipped_step = -1

    @property
    def dirty(self) -> bool:
        """Whether an optimizer step moved the weights since they were last clipped.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).dirty
            False
        """
        return self._num_steps > 0 and self._clipped_step != self._num_steps

    def should_clip(self, step: int) -> bool:
        """Whether to clip after optimizer step ``step`` (counted from 1); override for another schedule.

        Args:
            step: the step just taken.

        Returns:
            bool: ``True`` every ``every_n_steps`` steps from ``start_step``.

        Example:
            >>> clipper = SpectralClipper(nn.Sequential(nn.Linear(3, 3)), every_n_steps=10, start_step=5)
            >>> [s for s in range(1, 40) if clipper.should_clip(s)]
            [5, 15, 25, 35]
        """
        start, every = self.options.start_step, self.options.every_n_steps
        return step >= start and (step - start) % every == 0

    def step(self, *, final: bool = False) -> None:
        """Count one optimizer step: track the spectra, and clip if :meth:`should_clip` says so.

        Call it right after ``optimizer.step()`` (the weights it reads are those the step wrote). The first
        call fixes the maps from the input shapes seen in training mode since the clipper was created.

        Args:
            final: the last step of training: clip whatever the schedule, and measure every map (also those
                not clipped) to convergence, as :meth:`clip` does.

        Raises:
            ValueError: at the first step, a selected module that is not affine in its input.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> clipper = SpectralClipper(model, target=0.1, every_n_steps=1)
            >>> clipper.step()  # (after an optimizer step) the first step, and a clip step
            >>> round(torch.linalg.matrix_norm(model[0].weight.detach().double(), 2).item(), 3)
            0.1
        """
        with no_autocast():
            self._ensure_maps()
            if self.method.penalizes and not self._penalized and self._num_steps == 0:
                warn(
                    f"method {self.method.name!r} is a regularizer: call penalize() after backward() and before "
                    f"optimizer.step(), or it has no effect"
                )
            self._penalized = False
            self._num_steps += 1
            clip_now = final or self.should_clip(self._num_steps)
            if clip_now or self._num_steps % self.options.track_every_n_steps == 0:
                self.track()
            if clip_now:
                self.clip_event(final=final)

    def clip(self) -> None:
        """Clip every map above its target now and measure every map to convergence (e.g. before saving).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> with torch.no_grad():
            ...     _ = model[0].weight.mul_(10)
            >>> clipper = SpectralClipper(model, target=1.0)
            >>> clipper.clip()
            >>> round(torch.linalg.matrix_norm(model[0].weight.detach().double(), 2).item(), 3)
            1.0
            >>> {name: round(sigma, 3) for name, sigma in clipper.sigmas.items()}
            {'0': 1.0}
        """
        self.track()
        self.clip_event(final=True)

    def track(self) -> None:
        """One tracking pass, off the schedule: the per-step update of every map (the warm-up of those not
        measured yet); :meth:`step` runs one at every tracked step. It counts no step.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> clipper = SpectralClipper(model)
            >>> clipper.track()
            >>> list(clipper.sigmas), clipper.num_steps
            (['0'], 0)
        """
        with no_autocast():
            self._ensure_maps()
            self.tracker.track_all(self.maps)

    def clip_event(self, *, final: bool = False) -> ClipReport:
        """One clip event, off the schedule: every map above its target clipped (:class:`ClipEvent`); :meth:`step`
        runs one at every step :meth:`should_clip` accepts, after a tracking pass (:meth:`track`).

        Args:
            final: also measure every map no clip measured to convergence (as :meth:`clip` does).

        Returns:
            ClipReport: what the event did.

        Example:
            >>> clipper = SpectralClipper(nn.Sequential(nn.Linear(4, 4)), target=0.01)
            >>> clipper.track()
            >>> sorted(clipper.clip_event().changed)
            ['0']
        """
        with no_autocast():
            self._ensure_maps()
            event = ClipEvent(self.tracker, self.maps)
            report = event.run(event.due(self.target_of, self.not_clipped), final=final)
        self._clipped_step = self._num_steps
        return report

    def penalize(self) -> None:
        """Add the gradient of the method's penalty (the ``gram`` regularizer) to the weights' gradients.

        Call it after ``backward()`` and before ``optimizer.step()``; it does nothing for methods without a
        penalty (every clipping method).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> clipper = SpectralClipper(model, target=0.1, method="gram")
            >>> clipper.penalize()
            >>> bool(model[0].weight.grad.abs().sum() > 0)
            True
        """
        self._penalized = True
        if not self.method.penalizes:
            return
        with no_autocast():
            self._ensure_maps()
            for m in self.maps:
                target = self.target_of(m)
                if target is not None and m.name not in self.not_clipped:
                    self.method.penalize_(m, target)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call :meth:`step` right after every ``optimizer.step()`` (``Optimizer.register_step_post_hook``).

        A step an optimizer skips (a mixed-precision ``GradScaler`` that found inf gradients) is not counted.

        Args:
            optimizer: the optimizer whose steps drive the clipper.

        Returns:
            RemovableHandle: removes the hook (:meth:`remove` removes it too).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> clipper = SpectralClipper(model, 0.1, every_n_steps=1)
            >>> handle = clipper.attach(opt)  # the same as SpectralClipper(model, 0.1, optimizer=opt, ...)
            >>> model(torch.randn(2, 4)).sum().backward()
            >>> opt.step()
            >>> clipper.num_steps, round(torch.linalg.matrix_norm(model[0].weight.detach(), 2).item(), 3)
            (1, 0.1)
        """
        handle = optimizer.register_step_post_hook(lambda *_: self.step())
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook the clipper put on the model and optimizers, and let go of its operators.

        Example:
            >>> clipper = SpectralClipper(nn.Sequential(nn.Linear(3, 3)))
            >>> clipper.remove()
        """
        self.map_set.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.tracker.release()

    # ------------------------------------------------------------------ what it knows
    @property
    def spectra(self) -> dict[str, Tensor]:
        """The tracked top-``k`` singular values of every map measured so far (tensors on the model's device).

        Returns:
            dict[str, Tensor]: ``{map name: values}``, largest first.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).spectra  # nothing measured before the first step
            {}
        """
        states = self.tracker.states
        return {m.name: values for m in self.maps if (values := states[m.name].values) is not None}

    @property
    def sigmas(self) -> dict[str, float]:
        """The tracked spectral norm σ₁ of every map measured so far, by map name.

        Between clips these come from one warm-started iteration per step (close, from below); right after a
        clip, and after :meth:`clip` or a final :meth:`step`, every map whose weights moved is measured to
        convergence.

        Returns:
            dict[str, float]: ``{map name: σ₁}``.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).sigmas
            {}
        """
        return {name: float(values[0]) for name, values in self.spectra.items()}

    @property
    def clips(self) -> dict[str, int]:
        """How many clips changed the weights of each map.

        Returns:
            dict[str, int]: ``{map name: count}``.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).clips
            {}
        """
        return {name: state.clips for name, state in self.tracker.states.items()}

    def summary(self) -> str:
        """A table of every map: kind, input shape, tracked spectral norm, target, clips that changed the
        weights, and why a map is not clipped (frozen, not linear in its weight, ...).

        Returns:
            str: the table, one line per map.

        Example:
            >>> print(SpectralClipper(nn.Sequential(nn.Linear(3, 3))).summary())  # before the first step: no maps yet
            Spectral norms (method=fastclip)
            layer  kind  input shape  sigma  target  clips  note
        """
        return self.map_set.summary(self.tracker.states)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: step counters, tracked vectors and values, method state.

        Spectra that are not finite (the weights were not, for a while) are left out: a resumed run measures
        those maps anew.

        Returns:
            dict[str, Any]: the clipper's state.

        Example:
            >>> SpectralClipper(nn.Sequential(nn.Linear(3, 3))).state_dict()
            {'num_steps': 0, 'clipped_step': -1, 'maps': {}}
        """
        return {"num_steps": self._num_steps, "clipped_step": self._clipped_step, "maps": self.tracker.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, merged by map: a map this model does not have any more is
        dropped, a new one starts fresh, a non-finite spectrum is measured anew.

        Args:
            state_dict: the saved state.

        Example:
            >>> clipper = SpectralClipper(nn.Sequential(nn.Linear(3, 3)))
            >>> clipper.load_state_dict({"num_steps": 4, "clipped_step": 4, "maps": {}})
            >>> clipper.num_steps, clipper.dirty
            (4, False)
        """
        self._num_steps = state_dict["num_steps"]
        self._clipped_step = state_dict["clipped_step"]
        known = self.maps if self.map_set.recorder is None else None  # the maps are known: keep theirs only
        self.tracker.load_state_dict(state_dict["maps"], known)
