"""The per-step update of a training loop: one warm-started power step for many layers, as one CUDA graph."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_specclip.spectral.operator import ImplicitLinear

__all__ = ["PowerStep"]


class PowerStep:
    """One power step ``v ← AᵀA v / ‖AᵀA v‖`` for each of several operators, run again after every training step.

    This is the paper's per-step tracking: after each optimizer step every layer's top right singular vector
    moves by one power iteration from where the previous step left it, and ``σ₁`` is read as the Rayleigh
    quotient ``√(vᵀAᵀA v / vᵀv)`` of the incoming vector (a lower bound that tightens as ``v`` converges).

    The work per layer is a handful of tiny kernels, so on a GPU the host that launches them is the
    bottleneck, not the device. On a CUDA device the steps of all the operators are therefore captured once
    as a CUDA graph and replayed: one launch per training step instead of about ten per layer. The graph
    reads the weights where they are stored, so in-place updates (optimizer steps, clips) are seen; an
    operator that is no longer :attr:`~ImplicitLinear.live` needs a new ``PowerStep``. Elsewhere, or if the
    capture fails (with a warning), the same steps run eagerly.

    Args:
        operators: operators with a closed form (:attr:`ImplicitLinear.closed_form`), all on one device.
        graph: capture a CUDA graph; default: when the operators are on a CUDA device.

    Raises:
        ValueError: no operators, an operator without a closed form, operators on several devices, or
            ``graph=True`` off CUDA.

    Example:
        >>> lin = torch.nn.Linear(6, 4)
        >>> step = PowerStep([ImplicitLinear(lin, (6,))])
        >>> v = torch.randn(1, 6)
        >>> for _ in range(200):
        ...     values, (v,) = step([v])
        >>> exact = torch.linalg.matrix_norm(lin.weight.detach(), 2)
        >>> bool(torch.isclose(values[0], exact, rtol=1e-4))
        True
    """

    def __init__(self, operators: Sequence[ImplicitLinear], *, graph: bool | None = None) -> None:
        self.operators = list(operators)
        if not self.operators:
            raise ValueError("PowerStep needs at least one operator")
        open_form = [repr(A) for A in self.operators if not A.closed_form]
        if open_form:
            raise ValueError(f"PowerStep needs operators with a closed form (standard layers); got {open_form}")
        devices = {A.device for A in self.operators}
        if len(devices) > 1:
            raise ValueError(f"PowerStep needs all operators on one device; got {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.graph = self.device.type == "cuda" if graph is None else graph
        if self.graph and self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs operators on a CUDA device; they are on {self.device}")
        self.vectors = [A.zeros(1) for A in self.operators]  # the graph's inputs and outputs, updated in place
        self.values = [torch.zeros(1, dtype=A.dtype, device=A.device) for A in self.operators]
        self._graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, vectors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Run one step from ``vectors``.

        Args:
            vectors: one ``(1, *input_shape)`` vector per operator (need not be unit). Passing back the
                vectors the previous call returned costs no copy.

        Returns:
            tuple[list[Tensor], list[Tensor]]: per operator, ``σ₁`` of the incoming vector as a ``(1,)``
            tensor, and the next unit vector ``(1, *input_shape)``. These are this object's buffers: the next
            call overwrites them.

        Raises:
            ValueError: not one vector per operator, or a vector of the wrong size.
        """
        if len(vectors) != len(self.operators):
            raise ValueError(f"need one vector per operator ({len(self.operators)}); got {len(vectors)}")
        with torch.no_grad():
            for buffer, v in zip(self.vectors, vectors, strict=True):
                if v is not buffer:
                    if v.numel() != buffer.numel():
                        raise ValueError(f"a vector of {v.numel()} values for an operator of {buffer.numel()} inputs")
                    buffer.copy_(v.reshape(buffer.shape))
            if self.graph and self._graph is None:
                try:
                    self._graph = self._capture()
                except RuntimeError as err:
                    warnings.warn(
                        f"PowerStep: a CUDA graph could not be captured ({err}); running eagerly", stacklevel=2
                    )
                    self.graph = False
            if self._graph is not None:
                self._graph.replay()
            else:
                self._run()
        return list(self.values), list(self.vectors)

    def _run(self) -> None:
        # The products run per operator; everything else is a handful of multi-tensor (foreach) ops for all of
        # them together. σ₁ of the incoming x is ‖A x‖/‖x‖ (= √(xᵀAᵀA x / xᵀx), read off the forward product).
        tiny = torch.finfo(self.vectors[0].dtype).tiny
        products = [A.gram(x) for A, x in zip(self.operators, self.vectors, strict=True)]
        grams, images = [g for g, _ in products], [y for _, y in products]
        image_norms = torch.stack(torch._foreach_norm(images))
        vector_norms = torch.stack(torch._foreach_norm(self.vectors))
        torch._foreach_copy_(self.values, list((image_norms / vector_norms.clamp_min(tiny)).view(-1, 1).unbind()))
        gram_norms = torch._foreach_clamp_min(torch._foreach_norm(grams), tiny)
        torch._foreach_copy_(self.vectors, torch._foreach_div(grams, gram_norms))

    def _capture(self) -> torch.cuda.CUDAGraph:
        saved = [x.clone() for x in self.vectors]
        try:
            with torch.cuda.device(self.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._run()  # once outside the capture: cuDNN chooses its algorithms and workspaces here
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._run()
        finally:
            for x, v in zip(self.vectors, saved, strict=True):  # the warm-up step must not count
                x.copy_(v)
        return graph
