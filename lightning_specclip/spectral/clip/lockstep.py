"""Clips run to the end, their measurements in lock-step: :func:`clip_spectral_norm_` and
:func:`clip_spectral_norms_`, and the path each module takes (BatchNorm clamp, dense SVD, least-squares rounds,
write-through of a parametrized weight).

Every path is a generator (:data:`~.base.Steps`) that yields the gap-free measurements it decides on
(:class:`~.base.Certify`); :func:`run_clips` answers those that several clips ask for at one time together
(:func:`~lightning_specclip.spectral.spectrum.gap_free_spectra`), and each clip writes its module only as its last
act, after the result was verified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_specclip.spectral.clip.base import (
    Certify,
    Clippable,
    ClipResult,
    ClipSettings,
    Steps,
    as_module,
    check_finite,
    check_settings,
    default_param,
    layer_and_bn,
)
from lightning_specclip.spectral.clip.dense import clip_batchnorm, clip_dense, is_dense
from lightning_specclip.spectral.clip.iterative import clip_iterative
from lightning_specclip.spectral.clip.parametrized import (
    plain_copy,
    reparametrization,
    reparametrization_problem,
    write_through,
)
from lightning_specclip.spectral.operator import no_autocast
from lightning_specclip.spectral.spectrum import Spectrum, gap_free_spectra

__all__ = ["clip_spectral_norm_", "clip_spectral_norms_", "run_clips"]


def run_clips(clips: Sequence[Steps]) -> list[ClipResult]:
    """Run clips to the end, answering the measurements they ask for at one time together, in lock-step.

    If one raises, the others are closed where they are (each writes its module only as its last act) and the error
    propagates.

    Args:
        clips: the clips in progress (fresh generators).

    Returns:
        list[ClipResult]: what each clip returned, in order.
    """
    results: dict[int, ClipResult] = {}
    asked: dict[int, Certify] = {}

    def advance(i: int, answer: Spectrum | None) -> None:
        try:
            asked[i] = clips[i].send(answer)  # type: ignore[arg-type]  # None starts a generator
        except StopIteration as stop:
            results[i] = stop.value

    try:
        for i in range(len(clips)):
            advance(i, None)
        while asked:
            batch, by_tol = list(asked.items()), dict[float, list[tuple[int, Certify]]]()
            asked.clear()
            for i, request in batch:
                by_tol.setdefault(request.tol, []).append((i, request))
            for tol, requests in by_tol.items():
                answers = gap_free_spectra(
                    [r.A for _, r in requests],
                    tol,
                    seeds=[r.seed for _, r in requests],
                    left=[r.left for _, r in requests],
                )
                for (i, _), answer in zip(requests, answers, strict=True):
                    advance(i, answer)
    finally:
        for clip in clips:
            clip.close()
    return [results[i] for i in range(len(clips))]


@no_autocast()
def clip_spectral_norm_(
    module: Clippable,
    target: float,
    input_shape: Sequence[int] | None = None,
    *,
    mode: str = "clip",
    spectrum: Spectrum | Tensor | None = None,
    tol: float = 1e-2,
    max_rounds: int = 6,
    block_size: int = 8,
    cg_iters: int = 10,
    param: str | None = None,
    seed: int = 0,
) -> ClipResult:
    """Clip (or set) the spectral norm of ``x ↦ module(x) − module(0)`` to ``target``, in place.

    The weights are changed in place (same ``Parameter`` objects, so optimizers keep their state), under no
    autograd, with all math in float32 (float64 for float64 modules). What is exact for what:

    * ``Linear`` and ``Sequential(Linear, BatchNorm1d)``: exact (SVD of the composed matrix, every singular
      value above the target set to it, the rest untouched).
    * ``BatchNorm*d``: exact (``γᵢ`` clamped so that ``|γᵢ|/√(varᵢ+ε) ≤ target``; Gouk et al. 2021).
    * convolutions of any dimension, padding mode, stride, dilation and groups, transposed convolutions, and
      ``Sequential(conv, BatchNorm)`` / ``(conv, bn)`` pairs (the composition with the BatchNorm's running
      statistics; only the conv weight moves): block least-squares rounds (FastClip), then an exact scaling
      if the rounds did not land on the target. ``after`` is within ``tol`` of ``target`` on return.
    * any other module that is linear in one weight: the same, naming the weight with ``param``. A module
      that is not a standard class is first probed for linearity in that weight
      (:meth:`~lightning_specclip.ImplicitLinear.check_linear_in`) and refused with
      :class:`NotLinearInWeightError` if it is not (e.g. a convolution that standardizes its weight).
    * layers whose weight is parametrized (``torch.nn.utils.parametrizations.weight_norm``, the legacy
      ``torch.nn.utils.weight_norm``), alone or before a BatchNorm: clipped through the parametrization (a plain
      copy with the computed weight is clipped, the result is assigned back through ``right_inverse`` and read
      back to check it; the originals are restored exactly if it does not match). Parametrizations that cannot
      represent an arbitrary weight (``spectral_norm``, new or legacy) are refused (see :func:`check_clippable`).

    Every path measures ``after`` on exactly the weights it writes, before writing them. A clip whose map is
    already within tolerance (``σ ≤ target·(1 + tol/4)`` in clip mode) writes nothing (``changed=False``).

    Args:
        module: the layer, a ``Sequential(layer, batchnorm)``, or a ``(layer, batchnorm)`` pair.
        target: the spectral norm to clip to (``> 0``).
        input_shape: shape of one input without the batch dimension (required for convolutions: their
            spectrum depends on it; ignored for plain dense layers and BatchNorm; ``(in_features,)`` by default
            for other ``Linear`` layers).
        mode: ``"clip"`` lowers a norm above ``target`` to it and leaves a smaller one alone; ``"set"``
            makes the norm equal to ``target`` from either side.
        spectrum: a :class:`~lightning_specclip.Spectrum` (or just its ``.right`` vectors, ``(j, *input_shape)``)
            from :func:`~lightning_specclip.spectrum` or a previous result, to warm-start the least-squares rounds
            from (the first round moves them as they are, after one Rayleigh–Ritz step; the measurements that
            decide what is written always start from random vectors).
        tol: relative tolerance on the final norm.
        max_rounds: least-squares rounds before the exact-scaling fallback.
        block_size: singular vectors handled per round.
        cg_iters: conjugate-gradient iterations per round.
        param: name of the weight to move, for modules other than the supported ones.
        seed: seed of the random starting vectors (results are deterministic for a seed).

    Returns:
        ClipResult: norms before and after (measured), rounds, whether it converged, needed the fallback, and
        changed the weights.

    Raises:
        ValueError: ``target`` or ``tol`` not positive and finite; unknown ``mode``; non-finite weights;
            missing ``input_shape`` for a convolution; a BatchNorm without running statistics or weight; a
            parametrization that cannot represent an arbitrary weight (nothing is changed, buffers included).
        NotLinearInWeightError: the module is not linear in the weight to move (a ``ValueError``).
        TypeError: an unsupported module without ``param``.
        RuntimeError: the computation produced non-finite values, the SVD failed in float32 and float64, or a
            parametrization did not give the clipped weight back (the weights are then left unchanged).

    Example:
        >>> conv = nn.Conv2d(4, 4, 3, padding=1)
        >>> result = clip_spectral_norm_(conv, 0.5, (4, 8, 8))
        >>> result.converged, round(result.after, 2), result.changed
        (True, 0.5, True)
        >>> clip_spectral_norm_(conv, 1.0, (4, 8, 8)).changed  # already below the target: nothing written
        False
    """
    settings = ClipSettings(target, input_shape, mode, spectrum, tol, max_rounds, block_size, cg_iters, param, seed)
    with torch.inference_mode(False):  # autograd is needed even inside Lightning's validation/test loops
        return run_clips([_clip(module, settings)])[0]


@no_autocast()
def clip_spectral_norms_(
    modules: Sequence[Clippable],
    targets: float | Sequence[float],
    input_shapes: Sequence[Sequence[int] | None],
    *,
    mode: str = "clip",
    spectra: Sequence[Spectrum | Tensor | None] | None = None,
    tol: float = 1e-2,
    max_rounds: int = 6,
    block_size: int = 8,
    cg_iters: int = 10,
    seed: int = 0,
) -> list[ClipResult]:
    """:func:`clip_spectral_norm_` of several layers at once, their measurements in lock-step.

    Each layer is clipped exactly as :func:`clip_spectral_norm_` would (same decisions, same seeds, the same
    guarantee on what is written), but the measurements that decide (gap-free Lanczos from random vectors) run
    for all the layers together (:func:`~lightning_specclip.spectral.spectrum.gap_free_spectra`): a few kernels
    per Lanczos step for all of them instead of a few dozen per layer, the cost of clipping a whole network.

    Args:
        modules: the layers (each as :func:`clip_spectral_norm_` takes it); no parameter may belong to two.
        targets: the spectral norm to clip each to (one for all, or one per layer).
        input_shapes: each layer's input shape (``None`` where :func:`clip_spectral_norm_` needs none).
        mode: ``"clip"`` or ``"set"``, for all.
        spectra: each layer's warm start (or ``None``), as ``spectrum=`` of :func:`clip_spectral_norm_`.
        tol: relative tolerance on each final norm.
        max_rounds: least-squares rounds per layer before the exact-scaling fallback.
        block_size: singular vectors handled per round.
        cg_iters: conjugate-gradient iterations per round.
        seed: seed of the random starting vectors (each layer's are those :func:`clip_spectral_norm_` uses).

    Returns:
        list[ClipResult]: per layer, in order, what :func:`clip_spectral_norm_` returns.

    Raises:
        ValueError: lists of different lengths, a parameter shared by two layers (clip them one after the
            other), or anything :func:`clip_spectral_norm_` raises for a layer. If one layer fails, the layers
            whose clip had finished are written and the others are left unchanged.
        NotLinearInWeightError: as :func:`clip_spectral_norm_`.
        TypeError: as :func:`clip_spectral_norm_`.
        RuntimeError: as :func:`clip_spectral_norm_`.

    Example:
        >>> convs = [nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)]
        >>> results = clip_spectral_norms_(convs, 0.5, [(4, 8, 8)] * 3)
        >>> [round(r.after, 2) for r in results]
        [0.5, 0.5, 0.5]
    """
    count = len(modules)
    targets = [targets] * count if isinstance(targets, float | int) else list(targets)
    spectra = [None] * count if spectra is None else list(spectra)
    if not len(targets) == len(input_shapes) == len(spectra) == count:
        raise ValueError(
            f"need one target, input shape and spectrum per module ({count}); got {len(targets)}, "
            f"{len(input_shapes)} and {len(spectra)}"
        )
    owner: dict[int, int] = {}
    for i, module in enumerate(modules):
        for p in as_module(module).parameters():
            j = owner.setdefault(id(p), i)
            if j != i:
                raise ValueError(f"modules {j} and {i} share a parameter: clip them one after the other")
    with torch.inference_mode(False):
        return run_clips(
            [
                _clip(m, ClipSettings(c, shape, mode, warm, tol, max_rounds, block_size, cg_iters, None, seed))
                for m, c, shape, warm in zip(modules, targets, input_shapes, spectra, strict=True)
            ]
        )


def _clip(module: Clippable, settings: ClipSettings) -> Steps:
    """One module's clip: checks, then the path its kind takes."""
    settings = dataclasses.replace(settings, target=check_settings(settings))
    module = as_module(module)
    check_finite(module)
    if isinstance(module, _BatchNorm):
        return clip_batchnorm(module, settings.target, settings.mode, settings.tol)
    pair = layer_and_bn(module) if settings.param is None else None
    if pair is None:
        return (yield from _clip_plain(module, settings))
    layer, bn = pair
    problem = reparametrization_problem(layer)
    if problem is not None:
        raise ValueError(f"cannot clip {type(layer).__name__}: {problem}")
    if reparametrization(layer) is None:
        return (yield from _clip_plain(module, settings))
    # Clip a plain copy holding the computed weight, then write it back through the parametrization.
    plain_layer = plain_copy(layer)
    plain = plain_layer if bn is None else nn.Sequential(plain_layer, bn)
    result = yield from _clip_plain(plain, settings)
    if not result.changed:
        return result
    new = plain_layer.get_parameter("weight").detach()
    return write_through(module, layer, bn, new, result, is_dense(plain_layer), settings)


def _clip_plain(module: nn.Module, settings: ClipSettings) -> Steps:
    """Clip a module whose weight is an ordinary parameter (no parametrization)."""
    pair = layer_and_bn(module)
    if settings.param is None and pair is not None and isinstance(pair[0], nn.Linear) and is_dense(pair[0]):
        return clip_dense(pair[0], pair[1], settings.target, settings.mode, settings.tol)
    param = default_param(module, settings.param)
    if settings.input_shape is None and pair is not None and isinstance(pair[0], nn.Linear):
        settings = dataclasses.replace(settings, input_shape=(pair[0].in_features,))
    if settings.input_shape is None:
        raise ValueError(
            f"input_shape is required to clip {type(module).__name__}: the spectrum of a convolution depends "
            f"on the input size (pass the shape of one input without the batch dimension, e.g. (C, H, W))"
        )
    return (yield from clip_iterative(module, param, settings))
