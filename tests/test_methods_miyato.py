"""Miyato et al. (2018) (``methods/miyato.py``): the estimator on the reshaped kernel (torch's ``spectral_norm`` step)
and the clip — exact for ``Linear``, bounding only the reshaped kernel of a convolution.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BASELINE_TARGET, OTHER_PADDING_LAYERS, ZERO_PADDED_LAYERS, baseline_layer, raw_bits, seeded
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from lightning_specclip.methods.miyato import miyato_clip_, miyato_sigma, reshaped_kernel
from lightning_specclip.spectral.exact import dense_singular_values
from lightning_specclip.tracking import ground_truth_sigma


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
            conv = seeded(lambda mode=mode: nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode), seed).double()
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
    lin = seeded(lambda: nn.Linear(10, 6))
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


def test_miyato_clip_is_exact_for_linear() -> None:
    factory, shape = ZERO_PADDED_LAYERS["linear"]
    module = baseline_layer(factory, shape, 3.0)
    before, after, u = miyato_clip_(module, BASELINE_TARGET, n_iter=200)
    assert before == pytest.approx(3.0 * BASELINE_TARGET, rel=1e-5) and after == pytest.approx(
        BASELINE_TARGET, rel=1e-5
    )
    assert ground_truth_sigma(module, shape) == pytest.approx(BASELINE_TARGET, rel=1e-5)
    assert u.shape == (7,)


CONVS = {k: v for k, v in ZERO_PADDED_LAYERS.items() if k != "linear"} | OTHER_PADDING_LAYERS


@pytest.mark.parametrize("name", list(CONVS))
def test_miyato_clip_bounds_only_the_reshaped_kernel(name: str) -> None:
    factory, shape = CONVS[name]
    module = baseline_layer(factory, shape, 3.0)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    _, after, _ = miyato_clip_(module, BASELINE_TARGET, n_iter=300)
    dim = 1 if transposed else 0  # PyTorch's spectral_norm convention
    assert after == pytest.approx(BASELINE_TARGET, rel=1e-5)
    assert torch.linalg.matrix_norm(reshaped_kernel(module.weight.double(), dim), ord=2).item() == pytest.approx(
        BASELINE_TARGET, rel=1e-4
    )
    sigma = ground_truth_sigma(module, shape)
    assert abs(sigma / BASELINE_TARGET - 1) > 1e-2  # a convolution is not on the target
    taps = math.prod(module.weight.shape[2:])
    if module.padding_mode in ("zeros", "circular") and not transposed:
        assert sigma <= math.sqrt(taps) * BASELINE_TARGET * (1 + 1e-4)  # the documented upper bound
    if module.padding_mode == "circular":  # stride 1, groups 1: the reshaped kernel is a lower bound
        assert sigma >= BASELINE_TARGET


def test_miyato_clip_can_also_over_clip() -> None:
    """Zero padding on a small input drops taps at the border: the layer can end below the target."""
    factory, shape = ZERO_PADDED_LAYERS["convT1d_stride2"]
    module = baseline_layer(factory, shape, 3.0)
    miyato_clip_(module, BASELINE_TARGET, n_iter=300)
    assert ground_truth_sigma(module, shape) < 0.99 * BASELINE_TARGET


def test_miyato_clip_below_target_warm_start_and_parameters() -> None:
    factory, shape = CONVS["conv2d"]
    module = baseline_layer(factory, shape, 0.3)
    bits = raw_bits(module.weight)
    before, after, u = miyato_clip_(module, BASELINE_TARGET, n_iter=50)
    assert torch.equal(raw_bits(module.weight), bits) and before == pytest.approx(after, rel=1e-6)
    with torch.no_grad():
        module.weight.mul_(20)
    weight = module.weight
    with torch.no_grad():
        _, after, u = miyato_clip_(module, BASELINE_TARGET, n_iter=1, u=u)  # warm start: one step is enough here
    assert module.weight is weight and after == pytest.approx(BASELINE_TARGET, rel=1e-3)


def test_miyato_clip_bf16() -> None:
    factory, shape = ZERO_PADDED_LAYERS["linear"]
    module = baseline_layer(factory, shape, 3.0).to(torch.bfloat16)
    _, after, _ = miyato_clip_(module, BASELINE_TARGET, n_iter=100)
    assert module.weight.dtype == torch.bfloat16 and torch.isfinite(module.weight).all()
    assert after == pytest.approx(BASELINE_TARGET, rel=1.5e-2) and ground_truth_sigma(module, shape) == pytest.approx(
        BASELINE_TARGET, rel=1.5e-2
    )


@pytest.mark.parametrize("target", [0.0, -2.0, math.nan, math.inf])
def test_miyato_clip_bad_target(target) -> None:
    with pytest.raises(ValueError, match="target must be a positive finite number"):
        miyato_clip_(nn.Linear(3, 3), target)


def test_miyato_clip_bad_module_and_non_finite_weight() -> None:
    with pytest.raises(TypeError, match="weight of at least 2 dimensions"):
        miyato_clip_(nn.BatchNorm1d(3), 1.0)
    with pytest.raises(TypeError, match="weight of at least 2 dimensions"):
        miyato_clip_(nn.ReLU(), 1.0)
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight[1, 1] = math.nan
    bits = raw_bits(lin.weight)
    with pytest.raises(ValueError, match="NaN or inf"):
        miyato_clip_(lin, 0.1)
    assert torch.equal(raw_bits(lin.weight), bits)
