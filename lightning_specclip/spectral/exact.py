"""Ground truths for the spectra of implicitly linear layers.

* :func:`dense_matrix` / :func:`dense_singular_values`: the operator's matrix built column by column from
  its action on the standard basis, then a full SVD in float64. Exact for any affine op; small ops only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_specclip.spectral.operator import ImplicitLinear, Op

__all__ = ["dense_matrix", "dense_singular_values"]


def _as_operator(op: Op | ImplicitLinear, input_shape: Sequence[int] | None) -> ImplicitLinear:
    if isinstance(op, ImplicitLinear):
        return op
    if input_shape is None:
        raise ValueError("input_shape is required (the shape of one input, without the batch dimension)")
    return ImplicitLinear(op, input_shape, dtype=torch.float64, check_affine=False)


def dense_matrix(
    op: Op | ImplicitLinear, input_shape: Sequence[int] | None = None, *, chunk: int = 1024
) -> Tensor:
    """Form the matrix of ``x ↦ op(x) − op(0)`` on inputs of ``input_shape`` (float64 unless given an operator).

    Args:
        op: a module, a callable on batches, or an :class:`ImplicitLinear`.
        input_shape: the shape of one input without the batch dimension (not needed for an operator).
        chunk: basis vectors pushed through ``op`` per call.

    Returns:
        Tensor: ``(out_features, in_features)``, column ``j`` is ``A eⱼ``.

    Raises:
        ValueError: ``input_shape`` missing or not accepted by ``op``.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> torch.allclose(dense_matrix(lin, (3,)), lin.weight.double())
        True
    """
    A = _as_operator(op, input_shape)
    n = A.in_features
    cols = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        basis = torch.zeros((stop - start, n), dtype=A.dtype, device=A.device)
        basis[:, start:stop] = torch.eye(stop - start, dtype=A.dtype, device=A.device)
        cols.append(A.matvec(basis.reshape(-1, *A.input_shape)).reshape(stop - start, -1))
    return torch.cat(cols).T


def dense_singular_values(op: Op | ImplicitLinear, input_shape: Sequence[int] | None = None) -> Tensor:
    """All singular values of ``x ↦ op(x) − op(0)``, descending, from a dense float64 SVD.

    Args:
        op: a module, a callable on batches, or an :class:`ImplicitLinear`.
        input_shape: the shape of one input without the batch dimension (not needed for an operator).

    Returns:
        Tensor: ``min(out_features, in_features)`` singular values, float64, descending.

    Raises:
        ValueError: ``input_shape`` missing or not accepted by ``op``.

    Example:
        >>> conv = torch.nn.Conv1d(1, 1, 3, padding=1, bias=False)
        >>> dense_singular_values(conv, (1, 8)).shape
        torch.Size([8])
    """
    return torch.linalg.svdvals(dense_matrix(op, input_shape))
