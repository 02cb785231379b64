"""``spectrum()`` against the dense float64 SVD for every layer kind (``k`` up to the input dimension), plus its
contract (issue 2)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import random_batchnorm
from torch import Tensor, nn

from lightning_specclip import Spectrum, spectrum
from lightning_specclip.spectral.exact import dense_matrix, dense_singular_values
from lightning_specclip.spectral.spectrum import GAP_FREE_DENSE_MAX, SOLVERS, gap_free_steps

Factory = Callable[[], nn.Module | Callable[[Tensor], Tensor]]


def _bn(bn: nn.Module) -> nn.Module:
    return random_batchnorm(bn, batches_tracked=7)


def _conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), _bn(nn.BatchNorm2d(6))).train()


def _affine_function(x: Tensor) -> Tensor:
    return 3 * x.flip(-1) + 1


def _mixed_affine(x: Tensor) -> Tensor:
    """An affine function with a spread spectrum: scale, shift, a fixed channel mix, a bias."""
    gen = torch.Generator().manual_seed(5)
    mix = torch.randn(x.shape[-1], x.shape[-1], generator=gen).to(x.dtype)  # the same numbers in every dtype
    return 2 * (x @ mix) + x.roll(1, dims=-1) - 0.5


PADDING_MODES = ("zeros", "circular", "reflect", "replicate")

# name -> (factory, input_shape); small shapes keep the dense SVD cheap (≤ 256 columns)
KINDS: dict[str, tuple[Factory, tuple[int, ...]]] = {
    "linear": (lambda: nn.Linear(20, 12), (20,)),
    "linear_tall": (lambda: nn.Linear(12, 20), (12,)),
    "linear_on_sequence": (lambda: nn.Linear(6, 5), (3, 6)),
    **{f"conv1d_{m}": (lambda m=m: nn.Conv1d(4, 5, 3, padding=1, padding_mode=m), (4, 16)) for m in PADDING_MODES},
    **{f"conv2d_{m}": (lambda m=m: nn.Conv2d(4, 5, 3, padding=1, padding_mode=m), (4, 8, 8)) for m in PADDING_MODES},
    **{f"conv3d_{m}": (lambda m=m: nn.Conv3d(3, 4, 3, padding=1, padding_mode=m), (3, 4, 4, 4)) for m in PADDING_MODES},
    **{
        f"conv2d_stride2_{m}": (lambda m=m: nn.Conv2d(4, 6, 3, padding=1, stride=2, padding_mode=m), (4, 8, 8))
        for m in PADDING_MODES
    },
    "conv1d_stride2": (lambda: nn.Conv1d(4, 5, 3, padding=1, stride=2), (4, 17)),
    "conv3d_stride2": (lambda: nn.Conv3d(3, 4, 3, padding=1, stride=2), (3, 4, 4, 4)),
    "conv2d_dilation2": (lambda: nn.Conv2d(4, 5, 3, padding=2, dilation=2), (4, 8, 8)),
    "conv2d_dilation2_circular": (
        lambda: nn.Conv2d(4, 5, 3, padding=2, dilation=2, padding_mode="circular"),
        (4, 8, 8),
    ),
    "conv1d_dilation2_reflect": (lambda: nn.Conv1d(4, 5, 3, padding=2, dilation=2, padding_mode="reflect"), (4, 16)),
    "conv2d_groups2": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 8, 8)),
    "conv2d_depthwise_reflect": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"), (4, 8, 8)),
    "conv2d_no_padding": (lambda: nn.Conv2d(4, 5, 3), (4, 8, 8)),
    "conv1d_no_padding": (lambda: nn.Conv1d(4, 5, 3), (4, 16)),
    "conv2d_kernel1": (lambda: nn.Conv2d(4, 5, 1), (4, 8, 8)),
    "conv2d_kernel5_zeros": (lambda: nn.Conv2d(4, 5, 5, padding=2), (4, 8, 8)),
    "conv2d_kernel5_circular": (lambda: nn.Conv2d(4, 5, 5, padding=2, padding_mode="circular"), (4, 8, 8)),
    "conv2d_kernel5_reflect": (lambda: nn.Conv2d(4, 5, 5, padding=2, padding_mode="reflect"), (4, 8, 8)),
    "conv2d_rectangular_input": (lambda: nn.Conv2d(4, 5, 3, padding=1, padding_mode="replicate"), (4, 6, 10)),
    "conv2d_no_bias": (lambda: nn.Conv2d(4, 5, 3, padding=1, bias=False), (4, 8, 8)),
    "convT1d_stride2": (lambda: nn.ConvTranspose1d(4, 5, 4, stride=2, padding=1), (4, 16)),
    "convT2d_stride2": (lambda: nn.ConvTranspose2d(4, 5, 3, stride=2, padding=1, output_padding=1), (4, 6, 6)),
    "convT2d_stride1": (lambda: nn.ConvTranspose2d(4, 5, 3, padding=1), (4, 8, 8)),
    "bn1d_features": (lambda: _bn(nn.BatchNorm1d(12)), (12,)),
    "bn1d_sequence": (lambda: _bn(nn.BatchNorm1d(6)), (6, 10)),
    "bn2d": (lambda: _bn(nn.BatchNorm2d(4)), (4, 5, 5)),
    "conv_bn": (_conv_bn, (4, 8, 8)),
    "conv_conv_sequential": (
        lambda: nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(5, 4, 3, padding=1, padding_mode="circular")),
        (4, 6, 6),
    ),
    "affine_function_flip": (lambda: _affine_function, (4, 5)),
    "affine_function_mixed": (lambda: _mixed_affine, (3, 8)),
}


def _build(name: str, seed: int = 0) -> tuple[nn.Module | Callable[[Tensor], Tensor], tuple[int, ...]]:
    factory, shape = KINDS[name]
    torch.manual_seed(seed)
    return factory(), shape


def _rel(a: Tensor, b: Tensor) -> Tensor:
    return (a.double().cpu() - b.double().cpu()).abs() / b.double().cpu().abs()


def _check_against_dense(s: Spectrum, matrix: Tensor, k: int, top1: float = 1e-4, topk: float = 1e-3) -> None:
    truth = torch.linalg.svdvals(matrix)[:k]
    assert s.values.shape == (k,)
    assert bool((s.values[:-1] >= s.values[1:]).all()), f"values not descending: {s.values}"
    assert _rel(s.values[:1], truth[:1]).item() <= top1, f"top-1 {s.values[0]:.8f} vs {truth[0]:.8f}"
    assert _rel(s.values, truth).max().item() <= topk, f"top-{k} {s.values} vs {truth}"
    v1 = s.right[0].reshape(-1).double().cpu()
    assert abs(v1.norm().item() - 1) <= 1e-5
    gain = (matrix @ v1).norm() / truth[0]
    assert abs(gain.item() - 1) <= top1, f"‖A v₁‖/σ₁ = {gain.item():.8f}"


@pytest.mark.parametrize("name", list(KINDS))
def test_default_matches_dense_svd(name: str) -> None:
    op, shape = _build(name)
    matrix = dense_matrix(op, shape)
    s = spectrum(op, shape, k=4)
    assert s.converged and s.solver == "krylov"
    assert s.right.shape == (4, *shape)
    assert s.values.dtype == torch.float32
    _check_against_dense(s, matrix, k=4)
    # the left vectors come free: uᵢ = A vᵢ / σᵢ
    u1 = s.left[0].reshape(-1).double()
    torch.testing.assert_close(u1, matrix @ s.right[0].reshape(-1).double() / s.values[0].double(), atol=1e-5, rtol=0)


def test_dense_matrix_is_exact_for_linear() -> None:
    """The ground truth itself: for a Linear layer the dense matrix is the weight."""
    lin, shape = _build("linear")
    torch.testing.assert_close(dense_matrix(lin, shape), lin.weight.double())
    truth = torch.linalg.svdvals(lin.weight.double())
    torch.testing.assert_close(dense_singular_values(lin, shape), truth)


@pytest.mark.parametrize(
    "name",
    ["linear", "conv2d_reflect", "conv2d_stride2_zeros", "bn2d", pytest.param("conv_bn", marks=pytest.mark.slow)],
)
def test_power_qr_matches_dense_svd(name: str) -> None:
    op, shape = _build(name)
    matrix = dense_matrix(op, shape)
    s = spectrum(op, shape, k=4, solver="power_qr", tol=1e-9, max_iters=20000)
    assert s.solver == "power_qr"
    _check_against_dense(s, matrix, k=4)


def test_power_qr_needs_more_work_than_default() -> None:
    op, shape = _build("conv2d_zeros")
    default = spectrum(op, shape, k=1, tol=1e-6)
    published = spectrum(op, shape, k=1, solver="power_qr", tol=1e-9, max_iters=20000)
    assert published.matvecs > 3 * default.matvecs


def test_warm_start_after_a_small_update_needs_fewer_matvecs() -> None:
    op, shape = _build("conv2d_reflect")
    previous = spectrum(op, shape, k=4, tol=1e-6)
    with torch.no_grad():  # a training step's worth of change
        op.weight.add_(1e-3 * torch.randn_like(op.weight))
    cold = spectrum(op, shape, k=4, tol=1e-6)
    warm = spectrum(op, shape, k=4, tol=1e-6, init=previous.right)
    assert warm.converged and cold.converged
    assert warm.matvecs < cold.matvecs, (warm.matvecs, cold.matvecs)
    _check_against_dense(warm, dense_matrix(op, shape), k=4)


def test_warm_start_from_the_answer_converges_at_once() -> None:
    op, shape = _build("conv2d_zeros")
    first = spectrum(op, shape, k=2, tol=1e-6)
    again = spectrum(op, shape, k=2, tol=1e-4, init=first.right)
    assert again.iters == 1 and again.matvecs == 2
    torch.testing.assert_close(again.values, first.values, rtol=1e-5, atol=0)


def test_power_qr_warm_start_continues_the_iteration() -> None:
    """PowerQR's state is X alone: 30 + 30 warm-started iterations equal 60 in one call (k=1 exactly; for k > 1
    the returned vectors are sorted by value, which reorders the columns, so only the subspace carries over)."""
    op, shape = _build("conv2d_circular")
    whole = spectrum(op, shape, k=1, solver="power_qr", tol=1e-30, max_iters=60)
    half = spectrum(op, shape, k=1, solver="power_qr", tol=1e-30, max_iters=30)
    rest = spectrum(op, shape, k=1, solver="power_qr", tol=1e-30, max_iters=30, init=half.right)
    assert whole.iters == 60 and half.iters + rest.iters == 60
    torch.testing.assert_close(rest.values, whole.values, rtol=1e-6, atol=0)
    assert abs((rest.right.flatten() @ whole.right.flatten()).item()) == pytest.approx(1, abs=1e-6)
    # k = 2: the same subspace (the iteration is subspace iteration on I + AᵀA)
    whole = spectrum(op, shape, k=2, solver="power_qr", tol=1e-30, max_iters=60)
    half = spectrum(op, shape, k=2, solver="power_qr", tol=1e-30, max_iters=30)
    rest = spectrum(op, shape, k=2, solver="power_qr", tol=1e-30, max_iters=30, init=half.right)
    a, b = rest.right.flatten(1).double(), whole.right.flatten(1).double()
    torch.testing.assert_close(a.T @ a, b.T @ b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["conv2d_reflect", "conv_bn", "convT2d_stride2"])
def test_float64_module(name: str) -> None:
    op, shape = _build(name)
    op = op.double()
    s = spectrum(op, shape, k=4, tol=1e-10)
    assert s.values.dtype == torch.float64 and s.right.dtype == torch.float64
    _check_against_dense(s, dense_matrix(op, shape), k=4, top1=1e-9, topk=1e-7)


@pytest.mark.parametrize("name", ["conv2d_circular", "conv_bn", "linear", "bn2d"])
def test_bfloat16_module_math_in_float32(name: str) -> None:
    op, shape = _build(name)
    low = copy.deepcopy(op).to(torch.bfloat16)
    rounded = copy.deepcopy(low).float()  # the same bf16-rounded numbers, held in float32
    s = spectrum(low, shape, k=4)
    assert s.values.dtype == torch.float32 and s.right.dtype == torch.float32
    reference = spectrum(rounded, shape, k=4)
    torch.testing.assert_close(s.values, reference.values, rtol=1e-5, atol=0)
    _check_against_dense(s, dense_matrix(rounded, shape), k=4)
    # and the module was not touched
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("solver", ["krylov", "power_qr"])
def test_no_side_effects(solver: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        _bn(nn.BatchNorm2d(6)),
        nn.Dropout(0.5),
        nn.Sequential(nn.Conv2d(6, 4, 1), _bn(nn.BatchNorm2d(4))),
    )
    model.train()
    model[1].eval()  # mixed modes must come back exactly as they were
    model[3].eval()
    model[3][1].train()
    flags = {name: m.training for name, m in model.named_modules()}
    before = _snapshot(model)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    s = spectrum(model, (4, 6, 6), k=2, solver=solver, max_iters=200)
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key
    assert model[1].num_batches_tracked.item() == 7
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert not s.values.requires_grad and not s.right.requires_grad and not s.left.requires_grad
    # Dropout was the identity (eval mode) and BN used running statistics: the map is affine and matches
    assert abs(s.sigma / dense_singular_values(model, (4, 6, 6))[0].item() - 1) < 1e-3


def test_works_inside_no_grad() -> None:
    op, shape = _build("conv_bn")
    outside = spectrum(op, shape, k=2)
    with torch.no_grad():
        inside = spectrum(op, shape, k=2)
        inside_qr = spectrum(op, shape, k=1, solver="power_qr", max_iters=5)
    torch.testing.assert_close(inside.values, outside.values, rtol=0, atol=0)
    assert inside_qr.matvecs == 5
    assert torch.is_grad_enabled()


def test_works_inside_inference_mode() -> None:
    op, shape = _build("conv2d_zeros")
    with torch.inference_mode():
        s = spectrum(op, shape, k=1)
    assert s.converged


def test_deterministic_for_a_seed() -> None:
    op, shape = _build("conv2d_circular")
    a, b = spectrum(op, shape, k=3, seed=4), spectrum(op, shape, k=3, seed=4)
    assert torch.equal(a.values, b.values) and torch.equal(a.right, b.right) and a.matvecs == b.matvecs


def test_values_always_has_k_entries() -> None:
    torch.manual_seed(0)
    s = spectrum(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6), k=4, block_size=1, max_iters=2)
    assert s.values.shape == (4,) and s.right.shape == (4, 3, 6, 6)
    assert not s.converged


def test_block_size_below_k_still_finds_top_k() -> None:
    op, shape = _build("conv2d_replicate")
    s = spectrum(op, shape, k=3, block_size=1, max_iters=300)
    assert s.converged
    _check_against_dense(s, dense_matrix(op, shape), k=3)


def test_block_size_above_k() -> None:
    op, shape = _build("conv2d_replicate")
    s = spectrum(op, shape, k=2, block_size=4)
    assert s.converged and s.values.shape == (2,)
    _check_against_dense(s, dense_matrix(op, shape), k=2)


# bad inputs


def test_refuses_non_affine_op() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="probe"):
        spectrum(nn.Sequential(nn.Linear(5, 5), nn.ReLU()), (5,))
    with pytest.raises(ValueError, match="probe"):
        spectrum(lambda x: x**2, (5,))


def test_refuses_wrong_input_shape() -> None:
    conv = nn.Conv2d(4, 5, 3, padding=1)
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        spectrum(conv, (3, 8, 8))
    with pytest.raises(ValueError, match=r"\(7,\)"):
        spectrum(nn.Linear(5, 3), (7,))
    with pytest.raises(ValueError, match="input_shape"):
        spectrum(conv, ())


@pytest.mark.parametrize("k", [0, 6])
def test_refuses_k_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match=r"k must be.*<= 5"):
        spectrum(nn.Linear(5, 3), (5,), k=k)


def test_refuses_unknown_solver() -> None:
    with pytest.raises(ValueError, match="unknown solver 'arnoldi'") as info:
        spectrum(nn.Linear(5, 3), (5,), solver="arnoldi")
    assert all(m in str(info.value) for m in SOLVERS)


def test_refuses_bad_tol_iters_and_init() -> None:
    lin = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="tol"):
        spectrum(lin, (5,), tol=0)
    with pytest.raises(ValueError, match="max_iters"):
        spectrum(lin, (5,), max_iters=0)
    with pytest.raises(ValueError, match="init"):
        spectrum(lin, (5,), init=torch.ones(1, 4))
    with pytest.raises(ValueError, match="non-finite"):
        spectrum(lin, (5,), init=torch.full((1, 5), float("nan")))


# The gap-free solver: σ₁ whatever the spectrum


def _diagonal_conv(values: Tensor) -> nn.Conv2d:
    """A depthwise 5×5 convolution (padding 2) on 1×1 inputs: the map ``diag(values)``, as in EfficientNet's last
    stages on small images (only the centre tap ever meets the input)."""
    n = values.numel()
    conv = nn.Conv2d(n, n, 5, padding=2, groups=n, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, 2, 2] = values
    return conv


def _crowded(n: int = 1152) -> Tensor:
    """|N(0, 1)| values: many singular values crowd just below the largest one."""
    return torch.randn(n, generator=torch.Generator().manual_seed(5)).abs()


def test_gap_free_finds_sigma_where_a_residual_test_stops_below_it() -> None:
    values = _crowded()
    conv, shape, true = _diagonal_conv(values), (values.numel(), 1, 1), float(values.max())
    # The failure the solver exists for: a residual test stops on a Ritz pair among the crowd below σ₁.
    stopped = [spectrum(conv, shape, block_size=1, tol=1e-2, seed=s, left=False).sigma for s in range(40)]
    assert min(stopped) < 0.99 * true
    steps = gap_free_steps(values.numel(), 0.0075)
    for seed in range(40):
        found = spectrum(conv, shape, solver="gap_free", tol=0.0075, seed=seed, left=False)
        assert (1 - 0.0075) * true <= found.sigma <= true * (1 + 1e-6), seed
        assert found.iters == steps and found.matvecs == steps + 1  # and the gain of the Ritz vector
        assert found.converged and found.solver == "gap_free"


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_gap_free_is_exact_on_small_maps(padding_mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    shape = (3, 7, 7)  # 147 inputs: at most GAP_FREE_DENSE_MAX, measured from the dense AᵀA
    truth = dense_singular_values(conv, shape)
    found = spectrum(conv, shape, solver="gap_free", tol=0.0075)
    assert found.iters == 1 and found.matvecs == 147
    torch.testing.assert_close(found.values.double(), truth[:1], rtol=1e-5, atol=1e-6)
    u = found.left.reshape(-1).double()
    v = found.right.reshape(-1).double()
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-5) and float(u.norm()) == pytest.approx(1.0, abs=1e-5)
    assert gap_free_steps(147, 0.0075) < 147 < GAP_FREE_DENSE_MAX  # Lanczos would not span the space here


def test_gap_free_refuses_what_would_void_its_guarantee() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.raises(ValueError, match="needs k=1 and no init"):
        spectrum(conv, (2, 8, 8), solver="gap_free", k=2, tol=0.01)
    with pytest.raises(ValueError, match="needs k=1 and no init"):
        spectrum(conv, (2, 8, 8), solver="gap_free", init=torch.randn(1, 2, 8, 8), tol=0.01)
    with pytest.raises(ValueError, match="relative accuracy below 1"):
        spectrum(conv, (2, 8, 8), solver="gap_free", tol=1.5)
    with pytest.raises(ValueError, match=r"needs \d+ steps"):
        spectrum(conv, (2, 8, 8), solver="gap_free", tol=0.01, max_iters=3)
    with pytest.raises(ValueError, match="tol, failure in"):
        gap_free_steps(100, 0.01, failure=0.0)


def test_gap_free_steps_grow_with_accuracy_confidence_and_size() -> None:
    assert gap_free_steps(16384, 0.01) < gap_free_steps(16384, 0.005)
    assert gap_free_steps(16384, 0.01, failure=1e-2) < gap_free_steps(16384, 0.01, failure=1e-4)
    assert gap_free_steps(1024, 0.01) < gap_free_steps(1 << 20, 0.01)


@pytest.mark.parametrize("seed", range(5))
def test_gap_free_past_an_invariant_subspace_stays_exact(seed: int) -> None:
    """A map of rank 10 on 600 inputs: the Krylov space is invariant after 10 steps and the remaining steps must add
    nothing (normalized rounding noise is not orthogonal to the basis and gave Ritz values above σ₁)."""
    torch.manual_seed(seed)
    lin = nn.Linear(600, 10)
    truth = float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2))
    found = spectrum(lin, (600,), solver="gap_free", tol=0.0075, seed=seed)
    assert found.iters == gap_free_steps(600, 0.0075) > 10  # Lanczos steps past the invariant subspace
    assert found.sigma == pytest.approx(truth, rel=1e-5)


@pytest.mark.parametrize("solver", ["krylov", "power_qr", "subspace"])
@pytest.mark.parametrize(("features", "outputs", "k"), [(1, 5, 1), (3, 4, 3)])
def test_k_up_to_the_input_dimension(solver: str, features: int, outputs: int, k: int) -> None:
    torch.manual_seed(0)  # the weights are made here, not at collection time: the same in every test ordering
    module, shape = nn.Linear(features, outputs), (features,)
    truth = torch.linalg.svdvals(module.weight.detach().double())
    s = spectrum(module, shape, k=k, solver=solver, tol=1e-7)
    assert s.values.shape == (k,) and s.right.shape == (k, *shape)
    # PowerQR stops when the values change by less than tol in one iteration, not on a residual: looser
    rtol, atol = (1e-4, 1e-5) if solver == "power_qr" else (1e-5, 1e-6)
    torch.testing.assert_close(s.values.double(), truth[:k], rtol=rtol, atol=atol)


def test_k_equal_to_n_for_a_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, padding=1)
    truth = dense_singular_values(conv, (2, 3))
    for solver in ("krylov", "power_qr", "subspace"):
        s = spectrum(conv, (2, 3), k=6, solver=solver, tol=1e-7)
        torch.testing.assert_close(s.values.double(), truth, rtol=1e-4, atol=1e-5)
