"""Gouk et al. (2021) (``methods/gouk.py``): the power-iteration estimator on the zero-padded layer and its
adjoint, and the clip — exact for zero padding, a miss for other paddings.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BASELINE_TARGET, OTHER_PADDING_LAYERS, ZERO_PADDED_LAYERS, baseline_layer, raw_bits, seeded
from torch import nn

from lightning_specclip.methods.gouk import gouk_clip_, gouk_sigma, operator_pair
from lightning_specclip.spectral.exact import dense_matrix, dense_singular_values
from lightning_specclip.tracking import ground_truth_sigma

ESTIMATED = {
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
@pytest.mark.parametrize("name", list(ESTIMATED))
def test_gouk_operator_is_the_zero_padded_layer_and_its_adjoint(name: str) -> None:
    factory, shape = ESTIMATED[name]
    module = seeded(factory).double()
    forward, adjoint = operator_pair(module, shape)
    matrix = dense_matrix(module, shape)
    n, m = matrix.shape[1], matrix.shape[0]
    out_shape = forward(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:]
    cols = forward(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, m).T
    rows = adjoint(torch.eye(m, dtype=torch.float64).reshape(m, *out_shape)).reshape(m, n)
    torch.testing.assert_close(cols, matrix, rtol=0, atol=1e-12)
    torch.testing.assert_close(rows, matrix, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", list(ESTIMATED))
def test_gouk_converges_to_dense_sigma_for_zero_padding(name: str) -> None:
    factory, shape = ESTIMATED[name]
    module = seeded(factory)
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
    module = seeded(lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode))
    shape = (4, 6, 6)
    truth = dense_singular_values(module, shape)[0].item()
    zero_padded = seeded(lambda: nn.Conv2d(4, 4, 3, padding=1))
    assert torch.equal(zero_padded.weight, module.weight)
    zero_truth = dense_singular_values(zero_padded, shape)[0].item()
    sigma, _ = gouk_sigma(module, shape, n_iter=3000)
    # it converges to the zero-padded operator's σ₁, not to the layer's
    assert abs(sigma / zero_truth - 1) < 1e-4
    gap = abs(sigma / truth - 1)
    assert gap > 1e-2, f"{mode}: Gouk {sigma:.6f} vs true {truth:.6f} (gap {gap:.2e})"


def test_gouk_warm_start_continues_the_iteration() -> None:
    module = seeded(lambda: nn.Conv2d(3, 4, 3, padding=1))
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
    module = seeded(lambda: nn.Conv2d(3, 4, 3, padding=1))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    a = gouk_sigma(module, (3, 8, 8), n_iter=5, seed=7)
    b = gouk_sigma(module, (3, 8, 8), n_iter=5, seed=7)
    c = gouk_sigma(module, (3, 8, 8), n_iter=5, seed=8)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[0] != c[0]
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    assert module.weight.grad is None and not a[1].requires_grad


def test_gouk_dtypes() -> None:
    module = seeded(lambda: nn.Conv2d(3, 4, 3, padding=1))
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


@pytest.mark.parametrize("name", list(ZERO_PADDED_LAYERS))
def test_gouk_clip_is_exact_for_zero_padding(name: str) -> None:
    factory, shape = ZERO_PADDED_LAYERS[name]
    module = baseline_layer(factory, shape, 3.0)
    weight, bias = module.weight, module.bias.detach().clone()
    before, after, u = gouk_clip_(module, BASELINE_TARGET, shape, n_iter=300)
    assert module.weight is weight and torch.equal(module.bias, bias)
    assert before == pytest.approx(3.0 * BASELINE_TARGET, rel=2e-3)
    assert after == pytest.approx(BASELINE_TARGET, rel=1e-5)  # the estimate with the same vector, on the new weight
    assert abs(ground_truth_sigma(module, shape) / BASELINE_TARGET - 1) <= 2e-3  # and the layer is on the target
    assert u.shape == shape and u.norm().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("mode", list(OTHER_PADDING_LAYERS))
def test_gouk_clip_misses_for_non_zero_padding(mode: str) -> None:
    factory, shape = OTHER_PADDING_LAYERS[mode]
    module = baseline_layer(factory, shape, 3.0)
    _, after, _ = gouk_clip_(module, BASELINE_TARGET, shape, n_iter=300)
    assert after == pytest.approx(BASELINE_TARGET, rel=1e-5)  # its own estimate says "done" ...
    assert ground_truth_sigma(module, shape) > 1.01 * BASELINE_TARGET  # ... but the layer is left above the target


def test_gouk_clip_with_a_persistent_vector_converges_over_calls() -> None:
    """The paper's use: one power iteration per training step, the vector carried from call to call."""
    factory, shape = ZERO_PADDED_LAYERS["conv2d"]
    module = baseline_layer(factory, shape, 2.0)
    u = None
    for _ in range(60):
        _, after, u = gouk_clip_(module, BASELINE_TARGET, shape, n_iter=1, u=u)
    assert after <= BASELINE_TARGET * (1 + 1e-6)
    assert abs(ground_truth_sigma(module, shape) / BASELINE_TARGET - 1) <= 1e-2


def test_gouk_clip_below_target_and_optimizer_state() -> None:
    factory, shape = ZERO_PADDED_LAYERS["conv2d"]
    module = baseline_layer(factory, shape, 0.5)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module(torch.randn(2, *shape)).sum().backward()
    optimizer.step()
    state = optimizer.state[module.weight]["exp_avg"]
    bits = raw_bits(module.weight)
    before, after, _ = gouk_clip_(module, BASELINE_TARGET, shape, n_iter=50)
    assert torch.equal(raw_bits(module.weight), bits)  # below the target: nothing written
    assert before == after < BASELINE_TARGET
    with torch.no_grad():
        module.weight.mul_(10)
    weight = module.weight
    with torch.no_grad():  # also under no_grad, as a callback would call it
        gouk_clip_(module, BASELINE_TARGET, shape, n_iter=200)
    assert module.weight is weight and optimizer.state[weight]["exp_avg"] is state
    assert module.weight.requires_grad and abs(ground_truth_sigma(module, shape) / BASELINE_TARGET - 1) <= 2e-3
    optimizer.step()


def test_gouk_clip_bf16() -> None:
    factory, shape = ZERO_PADDED_LAYERS["conv2d"]
    module = baseline_layer(factory, shape, 3.0).to(torch.bfloat16)
    _, after, _ = gouk_clip_(module, BASELINE_TARGET, shape, n_iter=200)
    assert module.weight.dtype == torch.bfloat16 and torch.isfinite(module.weight).all()
    assert after == pytest.approx(BASELINE_TARGET, rel=1.5e-2)
    assert abs(ground_truth_sigma(module, shape) / BASELINE_TARGET - 1) <= 1.5e-2


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan, math.inf, "x"])
def test_gouk_clip_bad_target(target) -> None:
    with pytest.raises(ValueError, match="target must be a positive finite number"):
        gouk_clip_(nn.Conv2d(2, 2, 3, padding=1), target, (2, 4, 4))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_gouk_clip_non_finite_weight_is_refused_unchanged(value: float) -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = value
    bits = raw_bits(conv.weight)
    with pytest.raises(ValueError, match="NaN or inf"):
        gouk_clip_(conv, 0.1, (2, 4, 4))
    assert torch.equal(raw_bits(conv.weight), bits)


def test_gouk_clip_unsupported_layer_and_shape() -> None:
    with pytest.raises(TypeError, match="supports"):
        gouk_clip_(nn.BatchNorm2d(2), 1.0, (2, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        gouk_clip_(nn.Conv2d(2, 2, 3), 1.0, (3, 4, 4))
