"""How the selected layers run in training: their input shapes and what their calls fix, recorded by hooks."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from lightning_specclip.tracked_map import Call

__all__ = ["InputShapeRecorder", "call_of"]

log = logging.getLogger(__name__)

_CONV_TRANSPOSE_FORWARDS = (nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward)


def call_of(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Call | str:
    """What a forward call fixes besides the input shape, or a description of arguments the map cannot be
    rebuilt from. A transposed convolution's ``output_size`` (positional or keyword) becomes the
    ``output_padding`` its forward computes from it.

    Args:
        module: the layer called.
        args: the call's positional arguments, its input first.
        kwargs: the call's keyword arguments.

    Returns:
        Call | str: what the call fixes (empty for the input alone), for
        :func:`~lightning_specclip.tracked_map.called_view`; or why the map that runs cannot be rebuilt.

    Example:
        >>> up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
        >>> call_of(up, (torch.zeros(1, 4, 4, 4),), {"output_size": (8, 8)})
        (('output_padding', (1, 1)),)
    """
    rest, extra = args[1:], dict(kwargs)
    if isinstance(module, _ConvTransposeNd) and type(module).forward in _CONV_TRANSPOSE_FORWARDS:
        size = extra.pop("output_size", rest[0] if rest else None)
        if rest[1:] or extra:
            return f"called with arguments {rest[1:]!r} {extra!r} besides its input and output_size"
        if size is None:
            return ()
        m: Any = module  # its private _output_padding is typed for lists, called by its forward with tuples
        dims = len(module.kernel_size)
        # what the layer's forward computes from output_size (and its checks of it)
        computed = m._output_padding(args[0], list(size), m.stride, m.padding, m.kernel_size, dims, m.dilation)
        padding = tuple(int(p) for p in computed)
        return () if padding == tuple(module.output_padding) else (("output_padding", padding),)
    if rest or extra:
        return f"called with arguments besides its input ({len(rest)} positional, keywords {sorted(extra)})"
    return ()


def _drop_compiled_code() -> None:
    """Drop the code ``torch.compile`` cached in this process, if it compiled any since its last reset.

    Compiled code does not guard on forward hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): code
    traced before a hook was registered never calls it, and code traced with another model's hooks calls
    those (a second model of one class, as in cross-validation folds, would reuse the first one's). Dropping the
    cache makes the next call trace the hooks now registered; the price is one recompilation of what ran before.
    """
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")  # not loaded: nothing was compiled
    if convert_frame is not None and vars(convert_frame).get("FRAME_COUNTER", 1):
        log.info("dropping torch.compile's cached code so that compiled models call the input-shape hooks")
        torch.compiler.reset()


class InputShapeRecorder:
    """Record how modules are called, until :meth:`remove`: the per-sample input shape and what the call fixes
    besides it (a transposed convolution's ``output_size``).

    Works in compiled models too: code ``torch.compile`` cached before the recorder existed is dropped (it would
    skip the hooks; see ``torch._dynamo.config.skip_nnmodule_hook_guards``), so the next call recompiles once.

    Args:
        modules: ``(name, module)`` pairs to watch.
        training_only: record only calls made in training mode (``module.training``), so that validation and
            other evaluation-mode forwards do not count.

    Attributes:
        all_calls: ``name → every distinct (input shape without the batch dimension, call)``, in the order first
            seen; the call is ``()`` for a call with the input alone (see :data:`Call`).
        unsupported: ``name → how a module was called`` for calls whose map cannot be rebuilt (arguments
            besides the input that the recorder does not know).

    Example:
        >>> conv = nn.Conv2d(1, 2, 3)
        >>> with InputShapeRecorder([("conv", conv)]) as recorder:
        ...     _ = conv(torch.zeros(5, 1, 8, 8))
        ...     _ = conv(torch.zeros(5, 1, 16, 16))
        >>> recorder.shapes, recorder.all_shapes
        ({'conv': (1, 8, 8)}, {'conv': [(1, 8, 8), (1, 16, 16)]})
        >>> up = nn.ConvTranspose2d(2, 1, 3, stride=2, padding=1)
        >>> with InputShapeRecorder([("up", up)]) as recorder:
        ...     _ = up(torch.zeros(5, 2, 4, 4), output_size=(8, 8))
        >>> recorder.all_calls
        {'up': [((2, 4, 4), (('output_padding', (1, 1)),))]}
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]], *, training_only: bool = False) -> None:
        self.all_calls: dict[str, list[tuple[tuple[int, ...], Call]]] = {}
        self.unsupported: dict[str, str] = {}
        self.training_only = training_only
        modules = list(modules)
        if modules:
            _drop_compiled_code()
        self._handles = [
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, module in modules
        ]

    @property
    def all_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """``name → every distinct input shape seen``, in the order first seen."""
        result: dict[str, list[tuple[int, ...]]] = {}
        for name, calls in self.all_calls.items():
            shapes = result.setdefault(name, [])
            shapes += [shape for shape, _ in calls if shape not in shapes]
        return result

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``name → the first input shape seen``."""
        return {name: calls[0][0] for name, calls in self.all_calls.items()}

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self.training_only and not module.training:
                return
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                call = call_of(module, args, kwargs)
                if isinstance(call, str):
                    self.unsupported.setdefault(name, call)
                    return
                seen = self.all_calls.setdefault(name, [])
                key = (tuple(args[0].shape[1:]), call)
                if key not in seen:
                    seen.append(key)

        return hook

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> InputShapeRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
