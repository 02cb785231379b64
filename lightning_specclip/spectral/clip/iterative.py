"""FastClip for any map that is linear in one weight: least-squares rounds on a block of singular vectors, then an
exact rescale.

The paper's FastClip moves the weights so that the layer maps its top right singular vector ``v`` to
``(c/σ)·A v``. Here that idea is made robust for convolutions, where the published fixed-step gradient update
diverges:

* every round takes a *block* of the top right singular vectors ``V`` (all those above the target among them) and
  solves the least-squares problem ``min_Δ ‖A_{W+Δ} V − T‖`` for the weight change ``Δ``, where ``T`` maps each
  ``vᵢ`` to ``min(σᵢ, c)·uᵢ``. The problem is linear in ``Δ`` and is solved by conjugate gradients on the normal
  equations (CGLS, started from ``Δ = 0`` and stopped early, so it returns a small change); its residual never
  grows, so a round cannot diverge.
* rounds repeat (with warm-started spectra) until ``σ₁`` is within ``tol`` of the target. Whatever is left after
  ``max_rounds`` is removed by scaling the weight by ``c/σ₁`` (the map is linear in the weight), so the result
  always lands on the target; ``ClipResult.rescaled`` says when this fallback ran.

What is written is decided by gap-free measurements (:class:`~.base.Certify` requests, answered by
:func:`~.lockstep.run_clips`), and written only as the clip's last act.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator

import torch
from torch import Tensor, nn

from lightning_specclip.spectral.clip.base import Certify, ClipResult, ClipSettings, Steps, clip_values, within, write
from lightning_specclip.spectral.closed_form import linear_part
from lightning_specclip.spectral.conv import plain_conv, weight_products
from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.spectrum import Spectrum, spectrum

__all__ = ["cgls", "clip_iterative", "gain", "weight_change_products"]


def weight_change_products(A: ImplicitLinear, param: str, right: Tensor) -> tuple[Callable[[Tensor], Tensor], ...]:
    """``Δ ↦ A_Δ V`` (the map is linear in the weight) and its adjoint: for a plain zero-padded convolution's weight
    the kernels called directly (:func:`~lightning_specclip.spectral.conv.weight_products`); otherwise through
    ``torch.func.vjp``.

    Args:
        A: the operator; its tensors are the module's (or the overrides it was built with).
        param: the name of the weight ``Δ`` replaces.
        right: the vectors ``V``, ``(k, *A.input_shape)``.

    Returns:
        tuple[Callable, Callable]: ``apply(Δ) = A_Δ V`` (shape ``(k, *A.output_shape)``) and its adjoint
        ``adjoint(R)`` (the shape of the weight).

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> A = ImplicitLinear(conv, (2, 5, 5))
        >>> V = torch.randn(1, 2, 5, 5)
        >>> apply, adjoint = weight_change_products(A, "weight", V)
        >>> torch.allclose(apply(conv.weight.detach()), conv(V) - conv.bias.view(1, 3, 1, 1), atol=1e-5)
        True
        >>> adjoint(torch.randn(1, 3, 5, 5)).shape
        torch.Size([3, 2, 3, 3])
    """
    conv = plain_conv(A) if param == "weight" else None
    if conv is not None:
        return weight_products(conv, A.tensors[param], right)
    tensors = A.tensors

    def apply(delta: Tensor) -> Tensor:
        return A.apply(right, {**tensors, param: delta})

    vjp = torch.func.vjp(apply, torch.zeros_like(tensors[param]))[1]
    return apply, lambda r: vjp(r)[0]


def cgls(A: ImplicitLinear, param: str, right: Tensor, rhs: Tensor, iters: int, atol: float) -> Tensor:
    """Least-squares weight change ``Δ`` with ``A_Δ V ≈ rhs`` (the map is linear in the weight), by CGLS from
    ``Δ = 0``.

    Stops after ``iters`` iterations, as soon as ``‖A_Δ V − rhs‖ ≤ atol`` (the images of ``V`` are then within
    ``atol`` of where they should go: more accuracy would be rounding on top of the final check's tolerance, and
    stopping early keeps ``Δ`` small and on the top of the spectrum — for a convolution with more output positions
    than taps the exact solution is the rescale of the whole weight, ``A_{εW} v = εσu``, which moves every singular
    value: solved exactly, the step moved the rest of the spectrum three times as much in ``bench_clip.py``), or
    once the solution is reached to rounding, with 100 machine epsilons
    ``ε``: the gradient ``‖Aᵀr‖`` below ``ε·‖A‖·‖r‖`` (a least-squares solution; ``‖A‖`` estimated from below by
    the largest ``‖A d‖/‖d‖`` of the search directions) or below ``ε`` times its start (a consistent system
    solved). Past that point more iterations only amplify the rounding: without these tests the iterates drifted
    off the solution, by orders of magnitude in float32 within a hundred iterations.

    Args:
        A: the operator, linear in ``param``.
        param: the name of the weight that changes.
        right: the vectors ``V``, ``(k, *A.input_shape)``.
        rhs: where their images should move, ``(k, *A.output_shape)``.
        iters: the most CGLS iterations.
        atol: stop once ``‖A_Δ V − rhs‖ ≤ atol``.

    Returns:
        Tensor: the weight change ``Δ`` (the shape and dtype of the weight).

    Example:
        >>> A = ImplicitLinear(nn.Linear(3, 2).double(), (3,), dtype=torch.float64)
        >>> V, R = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
        >>> delta = cgls(A, "weight", V, R, iters=50, atol=0.0)
        >>> torch.allclose(V @ delta.T, R)  # two vectors, six unknowns: a consistent system
        True
    """
    apply, adjoint = weight_change_products(A, param, right)

    def squared(t: Tensor) -> float:
        return float(torch.linalg.vecdot(t.flatten(), t.flatten()))

    delta = torch.zeros_like(A.tensors[param])
    limit = (100 * torch.finfo(delta.dtype).eps) ** 2
    residual = rhs.clone()
    grad = adjoint(residual)
    direction = grad.clone()
    gamma = squared(grad)
    solved = limit * gamma  # the gradient at rounding relative to its start
    scale = 0.0  # the largest ‖A d‖²/‖d‖² so far
    for _ in range(iters):
        if gamma <= 0:
            break
        image = apply(direction)
        denom = squared(image)
        if denom <= 0:
            break
        step = gamma / denom
        delta.add_(direction, alpha=step)
        residual.add_(image, alpha=-step)
        left = squared(residual)
        if left <= atol**2:
            break
        scale = max(scale, denom / max(squared(direction), math.ulp(0.0)))
        grad = adjoint(residual)
        gamma_new = squared(grad)
        if gamma_new <= max(limit * scale * left, solved):
            break
        direction = torch.add(grad, direction, alpha=gamma_new / gamma)
        gamma = gamma_new
    return delta


def gain(A: ImplicitLinear, vector: Tensor) -> Spectrum:
    """The Rayleigh–Ritz step of one vector ``v``: the value ``‖A v‖`` (``v`` normalized), and ``A v`` normalized as
    its left vector, from one product.

    Args:
        A: the operator.
        vector: ``v``, any nonzero vector of ``A.input_shape`` elements.

    Returns:
        Spectrum: one value ``‖A v‖/‖v‖``, the right vector ``v/‖v‖`` ``(1, *A.input_shape)`` and the left vector
        ``A v/‖A v‖``.

    Example:
        >>> layer = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.diag(torch.tensor([3.0, 1.0])))
        >>> gain(ImplicitLinear(layer, (2,)), torch.tensor([2.0, 0.0])).values
        tensor([3.])
    """
    tiny = torch.finfo(A.dtype).tiny
    right = vector.detach().to(A.device, A.dtype).reshape(1, *A.input_shape)
    right = right / torch.linalg.vector_norm(right).clamp_min(tiny)
    image = A.matvec(right)
    value = torch.linalg.vector_norm(image).reshape(1)
    residuals = torch.full((1,), math.nan, dtype=torch.float64)
    return Spectrum(value, right, image / value.clamp_min(tiny), 1, 1, False, residuals, "subspace")


class _Working:
    """One iterative clip's working state: the weight being moved (a float32/float64 copy), the operator that reads
    it, and how its spectra are measured."""

    def __init__(self, module: nn.Module, param: str, settings: ClipSettings) -> None:
        assert settings.input_shape is not None  # the caller defaults it or refuses the module
        self.settings = settings
        self.param = param
        self.weight = module.get_parameter(param)
        self.dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.work = self.weight.detach().to(self.dtype).clone()
        self.A = ImplicitLinear(module, settings.input_shape, dtype=self.dtype, overrides={param: self.work})
        if linear_part(module) is None:  # standard layers are linear in their weight by construction
            self.A.check_linear_in(param)
        self.block = max(1, min(settings.block_size, self.A.in_features))
        # random vectors beside a block of k > 1, which converges faster with them
        self.extra = min(4, self.A.in_features - self.block)
        init = settings.warm.right if isinstance(settings.warm, Spectrum) else settings.warm
        self.init = None if init is None else init.reshape(-1, *self.A.input_shape)[: self.block]
        # What is written is decided by measurements that find σ₁ whatever the spectrum: gap-free Lanczos from a
        # random vector (within `certain` relative, with probability ≥ 1 − GAP_FREE_FAILURE). A measurement stopped by
        # a residual test can settle on a singular value below σ₁ when many crowd there, and one started from warm
        # vectors can stay on them while another singular value is above the target; nothing either returns would
        # show it. The decisions leave a margin of tol/4 on the target, and `certain` is what keeps the result within
        # tol of it.
        self.certain = 0.75 * settings.tol / (1 + settings.tol)

    def measure(self, start: Tensor | None, seed: int, k: int, iters: int | None = None) -> Spectrum:
        """Directions for the least-squares rounds: a residual test (``‖AᵀA v − σ²v‖ ≤ tol·σ₁²``) is enough."""
        size = k + self.extra if start is None and k > 1 else k  # a warm block needs no random vectors beside it
        return spectrum(self.A, k=k, init=start, block_size=size, tol=self.settings.tol, max_iters=iters, seed=seed)

    def first(self) -> Spectrum:
        """The spectrum the first round moves. A warm start (the tracked vectors of a training loop) is used as it
        is: one Rayleigh–Ritz step gives the values and images, as the paper's FastClip moves its tracked vector."""
        if self.init is None:
            return self.measure(None, self.settings.seed, self.block)
        if self.block == 1:
            return gain(self.A, self.init)
        return self.measure(self.init, self.settings.seed, self.block, iters=1)

    def rounds(self, current: Spectrum) -> tuple[Spectrum, int, bool]:
        """Least-squares rounds while σ₁ is above the target (or, in set mode, away from it).

        Returns:
            tuple[Spectrum, int, bool]: the last spectrum, the rounds run, and whether that spectrum was measured
            on the present working weight.
        """
        s, A = self.settings, self.A
        target = s.target
        rounds = 0
        fresh = True
        while rounds < s.max_rounds and not within(current.sigma, target, "set", s.tol / 4):
            if current.sigma < target and s.mode == "clip":  # overshot below: the rescale lifts it back
                break
            assert current.left is not None  # measured with its left vectors
            new_values = clip_values(current.values, target, s.mode)
            shape = (-1, *[1] * len(A.output_shape))
            rhs = (new_values - current.values).view(shape) * current.left
            moving = new_values != current.values
            delta = cgls(A, self.param, current.right[moving], rhs[moving], s.cg_iters, atol=s.tol / 8 * target)
            if not torch.isfinite(delta).all():
                raise RuntimeError("the least-squares step produced non-finite values; the module was left unchanged")
            self.work.add_(delta)
            rounds += 1
            fresh = rounds < s.max_rounds
            if not fresh:  # the last round: the final check measures its result
                break
            current = self.measure(current.right, s.seed + rounds, self.block)  # directions: the final check decides
        return current, rounds, fresh

    def finish(self, final: Spectrum) -> tuple[Spectrum, bool]:
        """Land on the target and write: the final spectrum of what is written, and whether it was rescaled.

        The map is linear in the weight: scaling it lands σ₁ on the target from either side (and scales the whole
        spectrum by the same factor, same singular vectors, so the warm start below is the answer).
        """
        s = self.settings
        target = s.target
        rescaled = not within(final.sigma, target, "set", s.tol / 4)
        factor = target / final.sigma if rescaled else 1.0
        if rescaled:
            self.work.mul_(factor)
        candidate = self.work.to(self.weight.dtype)
        if not torch.isfinite(candidate).all():
            raise RuntimeError("clipping produced non-finite weights; the module was left unchanged")
        if self.weight.dtype != self.dtype:  # rounding to the module's dtype moves the norm: measure what is written
            self.work.copy_(candidate.to(self.dtype))
            final = spectrum(self.A, k=1, init=final.right[:1], tol=s.tol / 10, seed=s.seed)
        elif rescaled:  # A(f·W) = f·A(W): the same singular vectors and f times the values
            # (rounding the product to float32 moves σ₁ by ~1e-7 relative, far inside the tol/4 margin)
            final = dataclasses.replace(final, values=final.values * factor)
        write(self.weight, candidate)
        return final, rescaled


def _confirmed(state: _Working, current: Spectrum) -> Generator[Certify, Spectrum, Spectrum | ClipResult]:
    """In clip mode, a map that looks within the target is measured gap-free before nothing is written: the result
    of a no-op, or the spectrum to move when it is above after all."""
    s = state.settings
    target = s.target
    if not (s.mode == "clip" and current.sigma <= target * (1 + s.tol / 4)):
        return current
    confirmed = yield Certify(state.A, state.certain, s.seed, left=True)  # (its images, for a round if above)
    if confirmed.sigma <= target * (1 + s.tol / 4):
        return ClipResult(confirmed.sigma, confirmed.sigma, target, 0, True, False, confirmed, changed=False)
    return confirmed if state.block == 1 else state.measure(confirmed.right, s.seed, state.block)


def clip_iterative(module: nn.Module, param: str, settings: ClipSettings) -> Steps:
    """Clip the map of ``module`` by moving its weight ``param``: least-squares rounds, then the exact rescale.

    A generator (see :class:`~.base.Certify`): the gap-free measurements it decides on are answered by the caller,
    alone or in lock-step with other clips'; the weight is written only as its last act.

    Args:
        module: the module (its weight an ordinary parameter).
        param: the name of the weight to move.
        settings: the clip's settings (``input_shape`` given, ``target`` checked; ``warm`` starts the rounds).

    Returns:
        Steps: the clip in progress; its return value is the :class:`~.base.ClipResult`.
    """
    state = _Working(module, param, settings)
    s, target = settings, settings.target
    current = yield from _confirmed(state, state.first())
    if isinstance(current, ClipResult):
        return current
    before = current.sigma
    if s.mode == "set" and before == 0.0 and (yield Certify(state.A, state.certain, s.seed)).sigma == 0.0:
        raise ValueError("the layer's linear map is zero: its spectral norm cannot be set")
    current, rounds, fresh = state.rounds(current)
    final = yield Certify(state.A, state.certain, s.seed + rounds + 1)
    if fresh and current.sigma > final.sigma:
        final = current
    final, rescaled = state.finish(final)
    converged = within(final.sigma, target, s.mode, s.tol)
    return ClipResult(before, final.sigma, target, rounds, converged, rescaled, final, changed=True)
