"""The baseline spectral-norm estimators: Gouk et al. (2021) and Miyato et al. (2018)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from lightning_specclip.methods.gouk import gouk_sigma, operator_pair
from lightning_specclip.methods.miyato import miyato_sigma, reshaped_kernel
from lightning_specclip.spectral.exact import dense_matrix, dense_singular_values


def _seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


ZERO_PADDED = {
    "linear": (lambda: nn.Linear(12, 7), (12,)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, padding=2), (3, 16)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
    "conv2d_stride2_odd": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), (3, 7, 9)),
    "conv2d_dilation2": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (3, 8, 8)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 6, 6)),
    "conv2d_same_even": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (3, 6, 6)),
    "conv2d_valid": (lambda: nn.Conv2d(3, 4, 3), (3, 8, 8)),
    "conv3d_stride2": (lambda: nn.Conv3d(2, 3, 3, padding=1, stride=2), (2, 5, 4, 4)),
    "convT1d_stride2": (lambda: nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1), (4, 6)),
    "convT2d_stride2": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", list(ZERO_PADDED))
def test_gouk_operator_is_the_zero_padded_layer_and_its_adjoint(name: str) -> None:
    factory, shape = ZERO_PADDED[name]
    module = _seeded(factory).double()
    forward, adjoint = operator_pair(module, shape)
    matrix = dense_matrix(module, shape)
    n, m = matrix.shape[1], matrix.shape[0]
    out_shape = forward(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:]
    cols = forward(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, m).T
    rows = adjoint(torch.eye(m, dtype=torch.float64).reshape(m, *out_shape)).reshape(m, n)
    torch.testing.assert_close(cols, matrix, rtol=0, atol=1e-12)
    torch.testing.assert_close(rows, matrix, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", list(ZERO_PADDED))
def test_gouk_converges_to_dense_sigma_for_zero_padding(name: str) -> None:
    factory, shape = ZERO_PADDED[name]
    module = _seeded(factory)
    truth = dense_singular_values(module, shape)[0].item()
    sigma, u = gouk_sigma(module, shape, n_iter=3000)
    assert abs(sigma / truth - 1) < 1e-4
    assert u.shape == torch.Size(shape) and u.dtype == torch.float32
    assert abs(u.norm().item() - 1) < 1e-5
    # power iteration approaches σ₁ from below: ‖A u‖ ≤ σ₁ for every unit u
    early, _ = gouk_sigma(module, shape, n_iter=1)
    assert early <= truth * (1 + 1e-6)


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_gouk_is_wrong_for_non_zero_padding(mode: str) -> None:
    module = _seeded(lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode))
    shape = (4, 6, 6)
    truth = dense_singular_values(module, shape)[0].item()
    zero_padded = _seeded(lambda: nn.Conv2d(4, 4, 3, padding=1))
    assert torch.equal(zero_padded.weight, module.weight)
    zero_truth = dense_singular_values(zero_padded, shape)[0].item()
    sigma, _ = gouk_sigma(module, shape, n_iter=3000)
    # it converges to the zero-padded operator's σ₁, not to the layer's
    assert abs(sigma / zero_truth - 1) < 1e-4
    gap = abs(sigma / truth - 1)
    assert gap > 1e-2, f"{mode}: Gouk {sigma:.6f} vs true {truth:.6f} (gap {gap:.2e})"


def test_gouk_warm_start_continues_the_iteration() -> None:
    module = _seeded(lambda: nn.Conv2d(3, 4, 3, padding=1))
    shape = (3, 8, 8)
    truth = dense_singular_values(module, shape)[0].item()
    sigma_10, u_10 = gouk_sigma(module, shape, n_iter=10, seed=3)
    u = None
    for step in range(10):
        sigma, u = gouk_sigma(module, shape, n_iter=1, u=u, seed=3)
        assert step > 0 or sigma < sigma_10
    assert sigma == pytest.approx(sigma_10, rel=1e-6)
    torch.testing.assert_close(u, u_10, rtol=0, atol=1e-5)
    # a warm start from a converged vector stays converged after one iteration
    converged, u_conv = gouk_sigma(module, shape, n_iter=3000)
    warm, _ = gouk_sigma(module, shape, n_iter=1, u=u_conv)
    cold, _ = gouk_sigma(module, shape, n_iter=1, seed=1)
    assert warm >= converged * (1 - 1e-6)  # power iteration never decreases ‖A u‖
    assert abs(warm / truth - 1) < 1e-4 < 1e-2 < abs(cold / truth - 1)


def test_gouk_is_deterministic_and_side_effect_free() -> None:
    module = _seeded(lambda: nn.Conv2d(3, 4, 3, padding=1))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    a = gouk_sigma(module, (3, 8, 8), n_iter=5, seed=7)
    b = gouk_sigma(module, (3, 8, 8), n_iter=5, seed=7)
    c = gouk_sigma(module, (3, 8, 8), n_iter=5, seed=8)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[0] != c[0]
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    assert module.weight.grad is None and not a[1].requires_grad


def test_gouk_dtypes() -> None:
    module = _seeded(lambda: nn.Conv2d(3, 4, 3, padding=1))
    shape = (3, 8, 8)
    s32, u32 = gouk_sigma(module, shape, n_iter=20)
    s64, u64 = gouk_sigma(module.double(), shape, n_iter=20)
    assert u64.dtype == torch.float64 and s64 == pytest.approx(s32, rel=1e-5)
    s16, u16 = gouk_sigma(module.to(torch.bfloat16), shape, n_iter=20)
    assert u16.dtype == torch.float32
    rounded = module.float()  # the bf16-rounded weights, in float32
    assert s16 == pytest.approx(gouk_sigma(rounded, shape, n_iter=20)[0], rel=1e-5)


def test_gouk_bad_inputs() -> None:
    with pytest.raises(TypeError, match="Conv2d.*ConvTranspose1d.*got BatchNorm2d"):
        gouk_sigma(nn.BatchNorm2d(3), (3, 4, 4))
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"input_shape=\(4, 8, 8\)"):
        gouk_sigma(conv, (4, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        gouk_sigma(nn.Conv2d(3, 4, 5), (3, 3, 3))
    with pytest.raises(ValueError, match="in_features"):
        gouk_sigma(nn.Linear(3, 4), (5,))
    with pytest.raises(ValueError, match="u must have shape"):
        gouk_sigma(conv, (3, 8, 8), u=torch.ones(3))
    with pytest.raises(ValueError, match="non-zero"):
        gouk_sigma(conv, (3, 8, 8), u=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="n_iter"):
        gouk_sigma(conv, (3, 8, 8), n_iter=-1)


# Miyato et al.: power iteration on the reshaped kernel


@pytest.mark.parametrize(
    ("shape", "dim"), [((7, 12), 0), ((8, 3, 3, 3), 0), ((6, 2, 5), 0), ((4, 3, 2, 2, 2), 0), ((4, 5, 3, 3), 1)]
)
def test_miyato_equals_svd_of_reshaped_kernel(shape: tuple[int, ...], dim: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape)
    mat = weight.movedim(dim, 0).reshape(shape[dim], -1).double()
    torch.testing.assert_close(reshaped_kernel(weight, dim).double(), mat)
    svd = torch.linalg.svdvals(mat)
    sigma, u = miyato_sigma(weight, n_iter=500, dim=dim)
    assert sigma == pytest.approx(svd[0].item(), rel=1e-5)
    assert u.shape == (shape[dim],) and abs(u.norm().item() - 1) < 1e-5
    # u is the top left singular vector of the reshaped kernel
    assert (mat.T @ u.double()).norm().item() == pytest.approx(svd[0].item(), rel=1e-5)


def test_miyato_matches_torch_spectral_norm_step() -> None:
    torch.manual_seed(0)
    layer = spectral_norm(nn.Conv2d(3, 8, 3), n_power_iterations=1)
    param = layer.parametrizations.weight
    original = param.original.detach().clone()
    u0 = torch.nn.functional.normalize(torch.randn(8), dim=0)
    with torch.no_grad():  # a consistent state: _v = normalize(W_matᵀ _u)
        param[0]._u.copy_(u0)
        param[0]._v.copy_(torch.nn.functional.normalize(original.reshape(8, -1).T @ u0, dim=0))
    layer.train()
    normalized = layer.weight.detach()  # one power iteration from u0, then W / σ
    torch_sigma = (original / normalized).flatten()[0].item()
    sigma, u = miyato_sigma(original, n_iter=1, u=u0)
    assert sigma == pytest.approx(torch_sigma, rel=1e-5)
    torch.testing.assert_close(u, param[0]._u, rtol=0, atol=1e-6)


def test_miyato_warm_start_continues_the_iteration() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3)
    sigma_5, u_5 = miyato_sigma(weight, n_iter=5, seed=2)
    u = None
    for _ in range(5):
        sigma, u = miyato_sigma(weight, n_iter=1, u=u, seed=2)
    assert sigma == pytest.approx(sigma_5, rel=1e-6)
    torch.testing.assert_close(u, u_5, rtol=0, atol=1e-6)
    exact = torch.linalg.svdvals(weight.reshape(16, -1))[0].item()
    _, u_conv = miyato_sigma(weight, n_iter=500)
    warm, _ = miyato_sigma(weight, n_iter=1, u=u_conv)
    assert warm == pytest.approx(exact, rel=1e-6)


def test_miyato_relation_to_the_conv_operator_norm() -> None:
    """‖W_mat‖ ≤ ‖A‖ ≤ √K ‖W_mat‖ for circular stride-1 convs; the upper bound for zero padding."""
    shape = (4, 8, 8)
    for seed in range(3):
        for mode in ("circular", "zeros"):
            conv = _seeded(lambda mode=mode: nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode), seed).double()
            truth = dense_singular_values(conv, shape)[0].item()
            sigma, _ = miyato_sigma(conv.weight, n_iter=500)
            assert truth <= 3 * sigma * (1 + 1e-9)
            if mode == "circular":
                assert sigma <= truth * (1 + 1e-9)
            assert truth / sigma > 1.2  # the gap is real for random kernels
    # the upper bound √K is attained: every tap holds the same rank-one matrix
    conv = nn.Conv2d(4, 5, 3, padding=1, padding_mode="circular", bias=False).double()
    with torch.no_grad():
        rank_one = torch.randn(5, 1, dtype=torch.float64) @ torch.randn(1, 4, dtype=torch.float64)
        conv.weight.copy_(rank_one[:, :, None, None].expand(5, 4, 3, 3))
    sigma, _ = miyato_sigma(conv.weight, n_iter=50)
    assert dense_singular_values(conv, shape)[0].item() == pytest.approx(math.sqrt(9) * sigma, rel=1e-9)
    # a linear layer: exact
    lin = _seeded(lambda: nn.Linear(10, 6))
    assert miyato_sigma(lin.weight, n_iter=500)[0] == pytest.approx(
        dense_singular_values(lin, (10,))[0].item(), rel=1e-5
    )


def test_miyato_deterministic_dtypes_and_bad_inputs() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, requires_grad=True)
    a, b = miyato_sigma(weight, seed=1), miyato_sigma(weight, seed=1)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and not a[1].requires_grad and weight.grad is None
    assert miyato_sigma(weight.double(), n_iter=3)[1].dtype == torch.float64
    s16, u16 = miyato_sigma(weight.to(torch.bfloat16), n_iter=30)
    assert u16.dtype == torch.float32
    assert s16 == pytest.approx(miyato_sigma(weight.to(torch.bfloat16).float(), n_iter=30)[0], rel=1e-6)
    with pytest.raises(ValueError, match="n_iter"):
        miyato_sigma(weight, n_iter=0)
    with pytest.raises(ValueError, match="6 entries"):
        miyato_sigma(weight, u=torch.ones(5))
    with pytest.raises(ValueError, match="non-zero"):
        miyato_sigma(weight, u=torch.zeros(6))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        miyato_sigma(torch.ones(3))
    with pytest.raises(ValueError, match="out of range"):
        miyato_sigma(weight, dim=4)
