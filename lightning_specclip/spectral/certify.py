"""One recipe for "a certified σ₁", its constants named once.

A measurement that a decision rests on must find σ₁ whatever the spectrum. A residual test alone can stop on a
singular value below σ₁ when many crowd there, and a start from warm vectors alone can stay on them while another
value rises above; neither would show it. The recipe:

* maps of at most :data:`DENSE_LIMIT` inputs can be measured exactly from their dense matrix (ground truths,
  :func:`~lightning_specclip.tracking.ground_truth_sigma`);
* above, :func:`certified_spectra`: gap-free Lanczos from a random vector (σ₁ within :data:`GAP_FREE_TOL` relative,
  with probability ``≥ 1 −`` :data:`~lightning_specclip.spectral.spectrum.GAP_FREE_FAILURE` whatever the spectrum;
  every map in lock-step), then Krylov from its vector (and warm vectors, for ``k > 1``) to a residual of
  :data:`REFINE_TOL`; both values are lower bounds on σ₁, and the larger is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_specclip.spectral.operator import ImplicitLinear
from lightning_specclip.spectral.spectrum import Spectrum, gap_free_spectra, spectrum

__all__ = ["DENSE_LIMIT", "GAP_FREE_TOL", "REFINE_TOL", "certified_spectra"]

#: maps with at most this many inputs are measured from their dense matrix (a float64 eigensolver on its Gram matrix)
DENSE_LIMIT = 2048
#: relative accuracy of the gap-free Lanczos that starts every certified measurement (σ₁ within 0.75%)
GAP_FREE_TOL = 0.0075
#: residual to which Krylov refines a certified measurement (σ to ~1e-6 where σ₁ stands apart)
REFINE_TOL = 1e-3


def certified_spectra(
    operators: Sequence[ImplicitLinear],
    *,
    k: int | Sequence[int] = 1,
    warm: Sequence[Tensor | None] | None = None,
    max_iters: int | None = None,
) -> list[Spectrum]:
    """Measure maps anew so that σ₁ is found whatever the spectrum: gap-free Lanczos from a random vector
    (:data:`GAP_FREE_TOL`, all the maps in lock-step, seed 0), then Krylov from its vector, with the first ``k − 1``
    warm vectors beside it, to a residual of :data:`REFINE_TOL`; of the two lower bounds on σ₁ the larger is kept.

    Args:
        operators: the maps.
        k: how many singular values to measure (for all maps, or one per map).
        warm: per map, vectors ``(j, *input_shape)`` to start the refinement from beside the gap-free vector (used
            only where ``k > 1``), or ``None``.
        max_iters: most Krylov iterations of the refinement (the :func:`~lightning_specclip.spectrum` default if
            ``None``).

    Returns:
        list[Spectrum]: one spectrum per map, in order, without left vectors; ``values[0]`` is the larger of the
        gap-free and the refined σ₁.

    Raises:
        ValueError: ``k`` or ``warm`` not one per map.

    Example:
        >>> convs = [torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)]
        >>> found = certified_spectra([ImplicitLinear(c, (3, 16, 16)) for c in convs], k=2)
        >>> [tuple(s.values.shape) for s in found]
        [(2,), (2,)]
    """
    ks = [k] * len(operators) if isinstance(k, int) else list(k)
    warms = [None] * len(operators) if warm is None else list(warm)
    if len(ks) != len(operators) or len(warms) != len(operators):
        raise ValueError(f"need one k and one warm start per operator ({len(operators)})")
    results = []
    found_all = gap_free_spectra(operators, GAP_FREE_TOL, left=False)
    for A, found, k_i, warm_i in zip(operators, found_all, ks, warms, strict=True):
        start = (
            found.right if warm_i is None or k_i == 1 else torch.cat([found.right, warm_i[: k_i - 1].to(found.right)])
        )
        result = spectrum(A, k=k_i, init=start, max_iters=max_iters, tol=REFINE_TOL, left=False)
        if result.values[0] < found.values[0]:  # both are lower bounds on σ₁: keep the better one
            result = dataclasses.replace(result, values=torch.cat([found.values, result.values[1:]]))
        results.append(result)
    return results
