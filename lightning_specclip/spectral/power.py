"""The per-step update of a training loop: one warm-started power step for many layers, as one CUDA graph."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_specclip.spectral.conv import CONVS, adjoint_kernel, plain_conv, stride_one_adjoint_padding
from lightning_specclip.spectral.operator import ImplicitLinear, no_autocast

__all__ = ["Grams", "PowerStep"]

#: on a CPU, convolutions with at most this many (input, output) channel pairs run grouped (see _group_key)
_GROUPED_MAX_CHANNELS = 64 * 64


def _group_key(A: ImplicitLinear) -> tuple | None:
    """Operators with one key run their products together as one grouped convolution (``None``: alone).

    Plain zero-padded convolutions of one geometry and input shape with at most 64·64 channel pairs: there a
    batch-1 convolution runs far below a CPU's speed, and one grouped convolution of several layers runs them
    faster; wider layers ran as fast alone, or faster (oneDNN on x86).
    """
    m = plain_conv(A)
    if m is None or m.in_channels * m.out_channels // m.groups > _GROUPED_MAX_CHANNELS:
        return None
    return (type(m), m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
            A.input_shape, A.dtype)  # fmt: skip


class Grams:
    """``(AᵀA x, A x)`` for one batch-1 vector per operator; several same-geometry convolutions as one grouped one.

    Plain zero-padded convolutions call their two kernels directly (the forward and ``aten.convolution_backward``
    for the input gradient): the same kernels as :meth:`ImplicitLinear.gram`, without its per-call work. With
    ``group``, those of one geometry run side by side as one grouped convolution (their inputs stacked along the
    channels, their weights along the output channels: one convolution with G times the groups, whose output and
    input gradient are the layers' ones side by side), which can pay where batch-1 convolutions of narrow layers
    run far below a CPU's speed (``experiments/bench_products.py`` times both).

    With ``fixed`` weights (one measurement's many calls), the adjoint of a stride-1 convolution runs as a forward
    convolution with the kernel flipped and its channels swapped, made once: on a CPU that kernel is faster than
    the input-gradient one (2.21 against 2.45 ms for the 21 maps of ResNet-18 width 16).

    Args:
        operators: the operators, all on one device.
        group: run plain zero-padded convolutions of one geometry and input shape as one grouped convolution.
        fixed: the operators' weights do not change between calls (one measurement): stack them, and flip the
            kernels of stride-1 convolutions, once.

    Example:
        >>> convs = [torch.nn.Conv2d(2, 2, 3, padding=1) for _ in range(3)]
        >>> grams = Grams([ImplicitLinear(c, (2, 5, 5)) for c in convs], group=True)
        >>> grams.groups
        [[0, 1, 2]]
        >>> x = [torch.randn(1, 2, 5, 5) for _ in convs]
        >>> g, y = grams(x)[1]
        >>> torch.allclose(y, convs[1](x[1]) - convs[1].bias.view(1, 2, 1, 1), atol=1e-6)
        True
    """

    def __init__(self, operators: Sequence[ImplicitLinear], *, group: bool, fixed: bool = False) -> None:
        self.operators = list(operators)
        together: dict[tuple, list[int]] = {}
        self.groups: list[list[int]] = []
        for i, A in enumerate(self.operators):
            key = _group_key(A) if group else None
            if key is None:
                self.groups.append([i])
            else:
                together.setdefault(key, []).append(i)
        self.groups += together.values()
        # The convolution of each group whose products run as direct kernel calls (None: through the operator).
        self._convs = [plain_conv(self.operators[g[0]]) for g in self.groups]
        #: per group, whether its products run as direct kernel calls (False: through the operator's ``gram``)
        self.direct = [m is not None for m in self._convs]
        self._weights = {j: self._weight(g) for j, g in enumerate(self.groups) if self.direct[j]} if fixed else None
        #: group -> (flipped kernel, padding) where the adjoint runs as a forward convolution (``fixed`` weights only)
        self.adjoints: dict[int, tuple[Tensor, list[int]]] = {}
        for j, weight in (self._weights or {}).items():
            m = self._convs[j]
            assert m is not None
            padding = stride_one_adjoint_padding(m)
            if padding is not None:
                self.adjoints[j] = (adjoint_kernel(weight, len(self.groups[j]) * m.groups), padding)

    def _weight(self, group: list[int]) -> Tensor:
        weights = [self.operators[i].tensors["weight"] for i in group]
        return torch.cat(weights) if len(weights) > 1 else weights[0]

    def __call__(self, vectors: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """The products.

        Args:
            vectors: one ``(1, *input_shape)`` vector per operator, in order.

        Returns:
            list[tuple[Tensor, Tensor]]: ``(AᵀA x, A x)`` per operator, in order.
        """
        out: list[tuple[Tensor, Tensor]] = [None] * len(self.operators)  # type: ignore[list-item]
        for j, group in enumerate(self.groups):
            m = self._convs[j]
            if m is None:
                out[group[0]] = self.operators[group[0]].gram(vectors[group[0]])
                continue
            weight = self._weights[j] if self._weights is not None else self._weight(group)
            x = torch.cat([vectors[i] for i in group], dim=1) if len(group) > 1 else vectors[group[0]]
            groups = len(group) * m.groups
            y = CONVS[type(m)](x, weight, None, m.stride, m.padding, m.dilation, groups)
            if j in self.adjoints:
                flipped, padding = self.adjoints[j]
                g = CONVS[type(m)](y, flipped, None, 1, padding, m.dilation, groups)
            else:
                zeros = (0,) * len(m.kernel_size)
                mask = (True, False, False)
                g = torch.ops.aten.convolution_backward(
                    y, x, weight, None, m.stride, m.padding, m.dilation, False, zeros, groups, mask
                )[0]
            if len(group) == 1:
                out[group[0]] = (g, y)
                continue
            for i, gi, yi in zip(group, g.split(m.in_channels, 1), y.split(m.out_channels, 1), strict=True):
                out[i] = (gi, yi)
        return out


class PowerStep:
    """One power step ``v ← AᵀA v / ‖AᵀA v‖`` for each of several operators, run again after every training step.

    This is the paper's per-step tracking: after each optimizer step every layer's top right singular vector
    moves by one power iteration from where the previous step left it, and ``σ₁`` is read as the Rayleigh
    quotient ``√(vᵀAᵀA v / vᵀv)`` of the incoming vector (a lower bound that tightens as ``v`` converges).

    Plain zero-padded convolutions call their two kernels directly. ``group=True`` runs those of one geometry and
    input shape (up to 64·64 channel pairs) as one grouped convolution instead; on an x86 CPU with oneDNN that
    was slower right after a training step (3.7 against 3.0 ms for ResNet-18 width 16,
    ``experiments/bench_products.py``), so it is off by default.

    The work per layer is a handful of tiny kernels, so on a GPU the host that launches them is the
    bottleneck, not the device. On a CUDA device the steps of all the operators are therefore captured once
    as a CUDA graph and replayed: one launch per training step instead of about ten per layer. The graph
    reads the weights where they are stored, so in-place updates (optimizer steps, clips) are seen; an
    operator that is no longer :attr:`~ImplicitLinear.live` needs a new ``PowerStep``. Elsewhere, or if the
    capture fails (with a warning), the same steps run eagerly.

    Args:
        operators: operators with a closed form (:attr:`ImplicitLinear.closed_form`), all on one device.
        graph: capture a CUDA graph; default: when the operators are on a CUDA device.
        group: run convolutions of one geometry as one grouped convolution.

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

    def __init__(self, operators: Sequence[ImplicitLinear], *, graph: bool | None = None, group: bool = False) -> None:
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
        #: the products of one step (which operators run grouped: ``grams.groups``)
        self.grams = Grams(self.operators, group=group)
        self.vectors = [A.zeros(1) for A in self.operators]  # the graph's inputs and outputs, updated in place
        self.values = [torch.zeros(1, dtype=A.dtype, device=A.device) for A in self.operators]
        self._graph: torch.cuda.CUDAGraph | None = None

    @no_autocast()
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
                    self._graph = self.capture()
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
        products = self.grams(self.vectors)
        grams, images = [g for g, _ in products], [y for _, y in products]
        image_norms = torch.stack(torch._foreach_norm(images))
        vector_norms = torch.stack(torch._foreach_norm(self.vectors))
        torch._foreach_copy_(self.values, list((image_norms / vector_norms.clamp_min(tiny)).view(-1, 1).unbind()))
        gram_norms = torch._foreach_clamp_min(torch._foreach_norm(grams), tiny)
        torch._foreach_copy_(self.vectors, torch._foreach_div(grams, gram_norms))

    def capture(self) -> torch.cuda.CUDAGraph:
        """Capture one step as a CUDA graph (called on the first step when ``graph``; a ``RuntimeError`` from it
        makes the step run eagerly from then on, with a warning).

        Returns:
            torch.cuda.CUDAGraph: the captured step; the vectors are left as they were before the warm-up step.
        """
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
