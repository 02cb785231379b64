"""``PowerStep``: the per-step power update of many layers at once (eager here; the CUDA graph in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_specclip import ImplicitLinear, spectrum
from lightning_specclip.spectral import PowerStep
from lightning_specclip.spectral.exact import dense_singular_values

LAYERS = [
    (lambda: nn.Linear(9, 5), (9,)),
    (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 7, 7)),
    (lambda: nn.ConvTranspose1d(3, 2, 4, stride=2, padding=1), (3, 6)),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3).eval()), (2, 6, 6)),
]


def _layers() -> list[tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return [(factory(), shape) for factory, shape in LAYERS]


def test_one_step_is_the_subspace_iteration_of_spectrum() -> None:
    layers = _layers()
    operators = [ImplicitLinear(m, shape) for m, shape in layers]
    starts = [torch.randn(1, *shape) for _, shape in layers]
    starts = [v / v.norm() for v in starts]
    values, vectors = PowerStep(operators)(starts)
    for A, v, value, vector in zip(operators, starts, values, vectors, strict=True):
        s = spectrum(A, solver="subspace", init=v, max_iters=1, left=False)
        torch.testing.assert_close(value, s.values, rtol=1e-5, atol=0.0)
        torch.testing.assert_close(vector, s.right, rtol=1e-4, atol=1e-6)
        assert vector.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_repeated_steps_converge_to_the_ground_truth_and_follow_in_place_updates() -> None:
    layers = _layers()
    step = PowerStep([ImplicitLinear(m, shape) for m, shape in layers])
    vectors = [torch.randn(1, *shape) for _, shape in layers]  # not unit: the quotient does not need it
    for _ in range(400):
        values, vectors = step(vectors)
    for (m, shape), value in zip(layers, values, strict=True):
        assert value.item() == pytest.approx(dense_singular_values(m, shape)[0].item(), rel=1e-3)
    with torch.no_grad():  # what an optimizer step or a clip does to a weight
        layers[1][0].weight.mul_(0.5)
    for _ in range(2):
        values, vectors = step(vectors)
    assert values[1].item() == pytest.approx(dense_singular_values(*layers[1])[0].item(), rel=1e-3)


def test_returned_vectors_are_the_buffers_and_other_vectors_are_copied_in() -> None:
    lin = nn.Linear(4, 3)
    step = PowerStep([ImplicitLinear(lin, (4,))])
    v = torch.randn(1, 4)
    kept = v.clone()
    _, (out,) = step([v])
    assert torch.equal(v, kept)  # the caller's tensor is left alone
    _, (again,) = step([out])
    assert again is out


def test_bad_input_is_refused() -> None:
    circular = ImplicitLinear(nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular"), (1, 8))
    with pytest.raises(ValueError, match="closed form"):
        PowerStep([circular])
    with pytest.raises(ValueError, match="at least one"):
        PowerStep([])
    lin = ImplicitLinear(nn.Linear(4, 3), (4,))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            PowerStep([lin], graph=True)
    step = PowerStep([lin])
    with pytest.raises(ValueError, match="one vector per operator"):
        step([])
    with pytest.raises(ValueError, match="5 values"):
        step([torch.randn(1, 5)])


def test_a_failed_capture_warns_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = nn.Linear(5, 3)
    step = PowerStep([ImplicitLinear(lin, (5,))])
    v = torch.randn(1, 5)
    expected_values, expected_vectors = PowerStep([ImplicitLinear(lin, (5,))])([v])

    def fail() -> None:
        raise RuntimeError("capture refused")

    monkeypatch.setattr(step, "capture", fail)
    step.graph = True  # as on a GPU
    with pytest.warns(UserWarning, match="capture refused"):
        values, vectors = step([v])
    assert not step.graph
    torch.testing.assert_close(values, expected_values)
    torch.testing.assert_close(vectors, expected_vectors)


def test_layers_of_one_geometry_run_as_one_grouped_convolution_with_the_same_results() -> None:
    torch.manual_seed(0)
    same = [nn.Conv2d(4, 6, 3, stride=2, padding=1) for _ in range(3)]  # one geometry: grouped
    other = [nn.Conv2d(4, 6, 3, padding=1), nn.Conv1d(4, 6, 3, padding=1), nn.Conv1d(4, 6, 3, padding=1)]
    wide = [nn.Conv2d(128, 64, 1) for _ in range(2)]  # more than 64·64 channel pairs: alone
    layers = [(m, (4, 9, 9)) for m in [*same, other[0]]] + [(m, (4, 11)) for m in other[1:]]
    layers += [(m, (128, 3, 3)) for m in wide]
    operators = [ImplicitLinear(m, shape) for m, shape in layers]
    assert sorted(map(len, PowerStep(operators).grams.groups)) == [1] * 8  # by default every layer alone
    step = PowerStep(operators, group=True)
    assert sorted(map(len, step.grams.groups)) == [1, 1, 1, 2, 3]  # the 3 alike, the 2 Conv1d, the rest alone
    starts = [torch.randn(1, *shape) for _, shape in layers]
    values, vectors = step(starts)
    for A, v, value, vector in zip(operators, starts, values, vectors, strict=True):
        g, y = A.gram(v)  # the layer alone
        torch.testing.assert_close(value, y.norm().view(1) / v.norm(), rtol=1e-5, atol=0.0)
        torch.testing.assert_close(vector, g / g.norm(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the grouped weights are read where they live: in-place updates are seen
        same[1].weight.mul_(3.0)
    again, _ = step([v / v.norm() for v in starts])
    _, y = operators[1].gram(starts[1] / starts[1].norm())
    torch.testing.assert_close(again[1], y.norm().view(1), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("group", [False, True])
def test_fixed_products_are_the_autograd_ones_for_every_geometry(group: bool) -> None:
    """A measurement's products (``Grams(fixed=True)``) run a stride-1 convolution's adjoint as a forward
    convolution of the flipped, channel-swapped kernel: ``AᵀA x`` and ``A x`` are autograd's for dilated, grouped,
    depthwise, rectangular, 1-D and 3-D kernels, padding larger than the kernel (kept on the input-gradient
    kernel) and strided ones, alone and grouped."""
    from lightning_specclip.spectral.power import Grams

    torch.manual_seed(0)
    layers = [
        (nn.Conv2d(4, 6, 3, padding=2, dilation=2), (4, 9, 9)),
        (nn.Conv2d(4, 6, 3, padding=2, dilation=2), (4, 9, 9)),  # the same geometry: grouped with the one above
        (nn.Conv2d(4, 6, (3, 5), padding=(0, 1), groups=2), (4, 8, 9)),
        (nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 7, 7)),
        (nn.Conv2d(3, 3, 3, padding=3), (3, 6, 6)),  # padding > dilation·(k − 1): no flipped form
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 9, 9)),
        (nn.Conv1d(3, 4, 5, padding=4, dilation=2), (3, 11)),
        (nn.Conv3d(2, 3, 3, padding=(1, 0, 1)), (2, 5, 5, 5)),
    ]
    ops = [ImplicitLinear(conv, shape) for conv, shape in layers]
    grams = Grams(ops, group=group, fixed=True)
    assert len(grams.adjoints) == (5 if group else 6)  # all but the padded and the strided one (the pair: one)
    xs = [torch.randn(1, *A.input_shape) for A in ops]
    for A, x, (g, y) in zip(ops, xs, grams(xs), strict=True):
        want_g, want_y = A.gram(x)
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-4)
