"""Spectral-norm estimate of Miyato, Kataoka, Koyama and Yoshida (2018), "Spectral normalization for
generative adversarial networks" — what ``torch.nn.utils.parametrizations.spectral_norm`` computes.

Power iteration on the kernel reshaped to a matrix ``W_mat`` of shape ``(weight.shape[dim], -1)``
(``(out_channels, in_channels/groups · k_1 ⋯ k_d)`` for a convolution, ``dim=0``; PyTorch uses ``dim=1`` for
transposed convolutions). For a ``Linear`` layer ``W_mat`` is the weight and the estimate converges to the
exact spectral norm. For a convolution it is **not** the spectral norm of the layer ``A`` (the operator on
inputs of a given size). With ``K = k_1 ⋯ k_d`` kernel taps:

* zero or circular padding, any stride, dilation and groups: ``‖A‖₂ ≤ √K · ‖W_mat‖₂``. The convolution is
  ``W_mat`` applied to the im2col patches of the (padded) input, and im2col puts each input value into at
  most ``K`` patch slots, so its norm is at most ``√K`` (with groups, each group's block of rows is a
  sub-matrix of ``W_mat``). Reflect/replicate padding copies border values into the padding too, which can
  add to that factor.
* circular padding, stride 1, ``groups=1``, input larger than the dilated kernel (``n_j > d_j (k_j − 1)``):
  ``‖W_mat‖₂ ≤ ‖A‖₂ ≤ √K · ‖W_mat‖₂``. The layer is block diagonal in the Fourier basis with blocks
  ``P(ω) = Σⱼ Wⱼ e^{−i⟨ω, j⟩}`` (``Wⱼ`` the ``c_out × c_in`` matrix of tap ``j``), ``‖A‖₂ = maxω ‖P(ω)‖₂``,
  and the mean of ``P(ω)P(ω)ᴴ`` over the frequencies is ``Σⱼ WⱼWⱼᵀ = W_mat W_matᵀ``. Both ends are
  attained: the upper one when every tap holds the same rank-one matrix, the lower one by a kernel with a
  single non-zero tap.
* zero padding: the upper bound holds and the lower one nearly does on large inputs, but on a small input
  the border drops taps and ``‖A‖₂`` can fall below ``‖W_mat‖₂`` without bound (a kernel whose centre tap
  is zero has ``‖A‖₂ = 0`` on a 1×1 input with ``padding=1``).
* ``ConvTranspose`` (``dim=1``, as PyTorch): at stride 1 it is a convolution whose kernel has the channels
  swapped and the taps flipped, whose reshaped kernel is ``reshaped_kernel(weight, dim=1)`` up to a column
  permutation, so the statements above apply; at any stride ``‖A‖₂ ≤ √K · ‖reshaped_kernel(weight, 0)‖₂``
  (``A`` is the adjoint of a zero-padded convolution with that kernel).

So Miyato's σ can underestimate a convolution's spectral norm by up to a factor ``√K`` (3 for a 3×3
kernel) — typically 1.5–2 for random kernels — and, for zero padding on small inputs, overestimate it;
dividing the weight by it does not give a layer of spectral norm 1.
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import Tensor
from torch.nn.modules.conv import _ConvTransposeNd

from lightning_specclip.methods.base import ClipMethod, measured_result
from lightning_specclip.spectral.clip import ClipResult, _positive_finite
from lightning_specclip.targets import TrackedMap

__all__ = ["Miyato", "miyato_clip_", "miyato_sigma", "reshaped_kernel"]


def reshaped_kernel(weight: Tensor, dim: int = 0) -> Tensor:
    """The matrix Miyato's method (and PyTorch's ``spectral_norm``) iterates on: ``weight`` with ``dim`` first,
    flattened to ``(weight.shape[dim], -1)``.

    Args:
        weight: a ``Linear`` weight ``(out, in)`` or a convolution kernel ``(c_out, c_in / groups, k...)``.
        dim: the dimension that becomes the rows (``0``; ``1`` for ``ConvTranspose`` weights in PyTorch).

    Returns:
        Tensor: the reshaped matrix (a view or copy of ``weight``, same dtype).

    Raises:
        ValueError: ``weight`` has fewer than 2 dimensions or ``dim`` is out of range.

    Example:
        >>> reshaped_kernel(torch.zeros(8, 3, 3, 3)).shape
        torch.Size([8, 27])
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"dim={dim} is out of range for a weight of {weight.dim()} dimensions")
    w = weight.movedim(dim, 0) if dim % weight.dim() != 0 else weight
    return w.reshape(w.shape[0], -1)


def miyato_sigma(
    weight: Tensor, n_iter: int = 1, u: Tensor | None = None, *, dim: int = 0, seed: int = 0
) -> tuple[float, Tensor]:
    """Estimate ``‖W_mat‖₂`` of the reshaped kernel by power iteration, as PyTorch's ``spectral_norm`` does.

    Starting from the unit vector ``u`` in the output dimension (``weight.shape[dim]`` entries; random from
    ``seed`` when not given), repeat ``n_iter`` times ``v ← normalize(W_matᵀ u)``, ``u ← normalize(W_mat v)``;
    the estimate is ``σ = uᵀ W_mat v`` with ``v = normalize(W_matᵀ u)`` for the final ``u``, i.e.
    ``‖W_matᵀ u‖`` — exactly the ``u`` and ``σ`` that ``spectral_norm`` produces from the buffers
    ``_u = u`` and ``_v = normalize(W_matᵀ u)`` with ``n_power_iterations = n_iter``. It converges to the
    largest singular value of ``W_mat``, which is the spectral norm of a ``Linear`` layer but only
    approximates a convolution's, within a factor ``√K`` for ``K`` kernel taps (see the module docstring for
    the exact relation). No gradients, float32 math (float64 for a float64 weight), deterministic for a
    given ``seed``. Pass the returned ``u`` back to warm-start, as ``spectral_norm`` keeps its ``_u`` buffer.

    Args:
        weight: a ``Linear`` weight or a convolution kernel.
        n_iter: power iterations (``≥ 1``).
        u: warm start, ``weight.shape[dim]`` entries; normalised before use.
        dim: the output dimension of ``weight`` (``0``; ``1`` for ``ConvTranspose`` weights).
        seed: seed of the random start when ``u`` is ``None``.

    Returns:
        tuple[float, Tensor]: the estimate ``uᵀ W_mat v`` and the new unit vector ``u`` (1-D, compute dtype).

    Raises:
        ValueError: ``n_iter < 1``, bad ``weight``/``dim`` (see :func:`reshaped_kernel`), or ``u`` of the wrong
            size, zero or non-finite.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> w = torch.randn(8, 3, 3, 3)
        >>> sigma, u = miyato_sigma(w, n_iter=100)
        >>> abs(sigma / torch.linalg.matrix_norm(w.reshape(8, -1), ord=2).item() - 1) < 1e-5
        True
        >>> sigma, u = miyato_sigma(w, n_iter=1, u=u)  # warm start: one step per call
    """
    if not (isinstance(n_iter, int) and n_iter >= 1):
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        mat = reshaped_kernel(weight.detach(), dim).to(dtype)
        rows = mat.shape[0]
        if u is None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            u = torch.randn(rows, generator=gen).to(mat.device, dtype)  # same start for every dtype
        else:
            if u.numel() != rows:
                raise ValueError(f"u must have {rows} entries (weight.shape[{dim}]), got shape {tuple(u.shape)}")
            u = u.detach().reshape(rows).to(mat.device, dtype)
        norm = u.norm()
        if not (torch.isfinite(norm) and norm > 0):
            raise ValueError("u must be a finite non-zero vector")
        u = u / norm
        eps = 1e-12  # the eps of torch.nn.utils.parametrizations.spectral_norm's normalisation
        for _ in range(n_iter):
            v = mat.T @ u
            v = v / v.norm().clamp_min(eps)
            u = mat @ v
            u = u / u.norm().clamp_min(eps)
        sigma = float((mat.T @ u).norm())  # = uᵀ W_mat v with v = normalize(W_matᵀ u), PyTorch's σ
    return sigma, u


# Clipping with the estimate


def miyato_clip_(
    module: torch.nn.Module,
    target: float,
    n_iter: int = 1,
    u: Tensor | None = None,
    *,
    dim: int | None = None,
    seed: int = 0,
) -> tuple[float, float, Tensor]:
    """Clip as Miyato et al. (2018): ``σ = ‖W_mat‖₂`` of the reshaped kernel, then ``W ← W / max(1, σ/target)``.

    ``σ`` is :func:`miyato_sigma` (power iteration on ``W_mat = reshaped_kernel(weight, dim)``). This is the
    division that ``torch.nn.utils.parametrizations.spectral_norm`` performs (there by ``σ`` itself, here only
    when ``σ > target``), done once in place instead of at every forward pass.

    What it controls, with ``A`` the layer on inputs of a given size, ``A'`` the clipped layer and ``K`` the
    number of kernel taps (``k_1 ⋯ k_d``):

    * ``Linear``: ``‖A‖₂ = ‖W_mat‖₂``; exact once the power iteration has converged (from below: with few
      iterations the layer stays a little above ``target``).
    * convolutions with zero or circular padding, any stride, dilation and groups: only the bound
      ``‖A'‖₂ ≤ √K · ‖W'_mat‖₂ ≤ √K · target`` (``√K = 3`` for a 3×3 kernel), see the module docstring.
    * circular padding, stride 1, ``groups=1``: ``target ≤ ‖A'‖₂ ≤ √K · target`` after a clip that acted,
      i.e. the layer is **under-clipped**, typically by 1.5–2× for random kernels: the reshaped-kernel norm
      is a lower bound of the layer's norm there. With zero padding on large inputs it is nearly so too; on
      small inputs the border drops taps and the layer can end below ``target`` (over-clipped).
    * reflect/replicate padding: border values are copied, which can add to the ``√K`` factor.
    * ``ConvTranspose`` (``dim=1`` by default, as PyTorch): the statements for stride 1 apply; at any stride
      ``‖A'‖₂ ≤ √K · ‖reshaped_kernel(weight', 0)‖₂``.
    * every singular value is divided by the same factor, so the spectrum below ``target`` moves too.

    So dividing by ``√K · σ`` instead would give a certified (and loose, over-clipping) ``‖A'‖₂ ≤ target`` for
    zero and circular padding; this function does what the paper and PyTorch do.

    The weight is edited in place under ``torch.no_grad()`` (same ``Parameter``), computed in float32 (float64
    for a float64 weight) and written in its dtype; the bias is not touched; nothing is written when
    ``σ ≤ target``.

    Args:
        module: a module with a ``weight`` of at least 2 dimensions (``Linear``, ``Conv*d``, ``ConvTranspose*d``).
        target: the clip value (``> 0``, finite).
        n_iter: power iterations (``≥ 1``).
        u: warm start, ``weight.shape[dim]`` entries (e.g. the ``u`` returned by the previous call).
        dim: the output dimension of the weight; default ``1`` for ``ConvTranspose*d``, else ``0``.
        seed: seed of the random start when ``u`` is ``None``.

    Returns:
        tuple[float, float, Tensor]: the estimate before clipping, ``‖W'_matᵀ u‖`` of the written weight with
        the same vector (``min(σ, target)`` up to rounding), and the vector ``u`` to pass back next time.

    Raises:
        TypeError: ``module`` has no tensor ``weight``.
        ValueError: ``target`` not positive and finite, the weight holds NaN or inf (nothing is written), or a
            bad ``n_iter``/``u``/``dim`` (see :func:`miyato_sigma`).
        RuntimeError: the estimate is not finite (overflow); nothing is written.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> lin = torch.nn.Linear(6, 4)
        >>> before, after, u = miyato_clip_(lin, 0.1, n_iter=100)
        >>> round(after, 6), abs(torch.linalg.matrix_norm(lin.weight, ord=2).item() - 0.1) < 1e-5
        (0.1, True)
    """
    target = _positive_finite(target)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise TypeError(
            f"miyato_clip_ needs a module with a weight of at least 2 dimensions (Linear, Conv*d, "
            f"ConvTranspose*d), got {type(module).__name__}"
        )
    if dim is None:
        dim = 1 if isinstance(module, torch.nn.modules.conv._ConvTransposeNd) else 0
    if not torch.isfinite(weight.detach()).all():
        raise ValueError("the layer's weight holds NaN or inf; refusing to clip it (the weight was not modified)")
    before, u = miyato_sigma(weight, n_iter, u, dim=dim, seed=seed)
    if not _isfinite(before):
        raise RuntimeError(f"the spectral-norm estimate is not finite ({before}); the weight was not modified")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        if before > target:
            scaled = weight.detach().to(dtype) * (target / before)
            if not torch.isfinite(scaled).all():
                raise RuntimeError("clipping produced non-finite weights; the weight was not modified")
            weight.copy_(scaled.to(weight.dtype))
        after = float((reshaped_kernel(weight.detach(), dim).to(dtype).T @ u).norm())
    return before, after, u


def _isfinite(value: float) -> bool:
    return abs(value) < float("inf")  # False for inf and NaN


class Miyato(ClipMethod):
    """Miyato et al. (2018) as a clip method: power iteration on the reshaped kernel, divide the weight.

    The reshaped-kernel norm is not the norm of a convolution (see :func:`miyato_clip_`), so convolutions end
    up over- or under-clipped; for Linear layers it is exact (up to the power iteration).

    Args:
        n_iter_clip: extra power iterations right before each clip.

    Example:
        >>> Miyato().name
        'miyato'
    """

    name: ClassVar[str] = "miyato"

    def __init__(self, n_iter_clip: int = 1) -> None:
        self.n_iter_clip = n_iter_clip

    def step(self, tracked: TrackedMap, state: dict[str, Tensor]) -> None:
        """One power iteration on the reshaped kernel, warm-started from ``state["u"]``.

        Args:
            tracked: a layer tracked.
            state: holds ``"u"``.
        """
        _, state["u"] = miyato_sigma(
            cast(Tensor, tracked.module.weight),
            1,
            state.get("u"),
            dim=1 if isinstance(tracked.module, _ConvTransposeNd) else 0,
        )

    def clip_(self, tracked: TrackedMap, value: float, state: dict[str, Tensor], init: Tensor | None) -> ClipResult:
        """``W ← W / max(1, σ/value)`` with the reshaped-kernel estimate ``σ``.

        Args:
            tracked: a layer tracked.
            value: the clip value.
            state: holds ``"u"``.
            init: the tracked top right singular vectors: a warm start for measuring the written layer.

        Returns:
            ClipResult: ``before`` is the reshaped-kernel estimate before the clip, ``estimate`` that estimate
            after it, and ``after`` (with ``spectrum``) the layer's true spectral norm measured on the written
            weights (for a convolution typically off the target); ``changed`` whether the weight was divided.
        """
        before, estimate, state["u"] = miyato_clip_(tracked.module, value, self.n_iter_clip, state.get("u"))
        return measured_result(tracked, value, before, estimate, before > value, init)
