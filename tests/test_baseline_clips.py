"""The baseline clips: Gouk et al. (2021) and Miyato et al. (2018), what they get right and where they miss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from lightning_specclip.methods.gouk import gouk_clip_
from lightning_specclip.methods.miyato import miyato_clip_, reshaped_kernel
from lightning_specclip.spectral.exact import dense_singular_values

TARGET = 0.7


def _sigma(module: nn.Module, shape) -> float:
    """Float64 dense ground truth of the layer's spectral norm."""
    return dense_singular_values(copy.deepcopy(module).double(), shape)[0].item()


def _layer(factory, shape, factor: float, seed: int = 0) -> nn.Module:
    """The layer with its weight scaled so that σ₁ = ``factor · TARGET``."""
    torch.manual_seed(seed)
    module = factory()
    with torch.no_grad():
        module.weight.mul_(factor * TARGET / _sigma(module, shape))
    return module


def _bits(t: Tensor) -> Tensor:
    return t.detach().clone().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


ZERO_PADDED = {
    "linear": (lambda: nn.Linear(12, 7), (12,)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, padding=2), (3, 16)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
    "conv2d_stride2": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), (3, 7, 9)),
    "conv2d_dilation2": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (3, 8, 8)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 6, 6)),
    "conv2d_valid": (lambda: nn.Conv2d(3, 4, 3), (3, 8, 8)),
    "conv3d_stride2": (lambda: nn.Conv3d(2, 3, 3, padding=1, stride=2), (2, 5, 4, 4)),
    "convT1d_stride2": (lambda: nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1), (4, 6)),
    "convT2d_stride2": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
}

OTHER_PADDING = {
    mode: (lambda m=mode: nn.Conv2d(3, 4, 3, padding=1, padding_mode=m), (3, 8, 8))
    for mode in ("circular", "reflect", "replicate")
}


# Gouk et al.


@pytest.mark.parametrize("name", list(ZERO_PADDED))
def test_gouk_clip_is_exact_for_zero_padding(name: str) -> None:
    factory, shape = ZERO_PADDED[name]
    module = _layer(factory, shape, 3.0)
    weight, bias = module.weight, module.bias.detach().clone()
    before, after, u = gouk_clip_(module, TARGET, shape, n_iter=300)
    assert module.weight is weight and torch.equal(module.bias, bias)
    assert before == pytest.approx(3.0 * TARGET, rel=2e-3)
    assert after == pytest.approx(TARGET, rel=1e-5)  # the estimate with the same vector, on the new weight
    assert abs(_sigma(module, shape) / TARGET - 1) <= 2e-3  # and the layer is on the target
    assert u.shape == shape and u.norm().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("mode", list(OTHER_PADDING))
def test_gouk_clip_misses_for_non_zero_padding(mode: str) -> None:
    factory, shape = OTHER_PADDING[mode]
    module = _layer(factory, shape, 3.0)
    _, after, _ = gouk_clip_(module, TARGET, shape, n_iter=300)
    assert after == pytest.approx(TARGET, rel=1e-5)  # its own estimate says "done" ...
    assert _sigma(module, shape) > 1.01 * TARGET  # ... but the layer is left above the target


def test_gouk_clip_with_a_persistent_vector_converges_over_calls() -> None:
    """The paper's use: one power iteration per training step, the vector carried from call to call."""
    factory, shape = ZERO_PADDED["conv2d"]
    module = _layer(factory, shape, 2.0)
    u = None
    for _ in range(60):
        _, after, u = gouk_clip_(module, TARGET, shape, n_iter=1, u=u)
    assert after <= TARGET * (1 + 1e-6)
    assert abs(_sigma(module, shape) / TARGET - 1) <= 1e-2


def test_gouk_clip_below_target_and_optimizer_state() -> None:
    factory, shape = ZERO_PADDED["conv2d"]
    module = _layer(factory, shape, 0.5)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module(torch.randn(2, *shape)).sum().backward()
    optimizer.step()
    state = optimizer.state[module.weight]["exp_avg"]
    bits = _bits(module.weight)
    before, after, _ = gouk_clip_(module, TARGET, shape, n_iter=50)
    assert torch.equal(_bits(module.weight), bits)  # below the target: nothing written
    assert before == after < TARGET
    with torch.no_grad():
        module.weight.mul_(10)
    weight = module.weight
    with torch.no_grad():  # also under no_grad, as a callback would call it
        gouk_clip_(module, TARGET, shape, n_iter=200)
    assert module.weight is weight and optimizer.state[weight]["exp_avg"] is state
    assert module.weight.requires_grad and abs(_sigma(module, shape) / TARGET - 1) <= 2e-3
    optimizer.step()


def test_gouk_clip_bf16() -> None:
    factory, shape = ZERO_PADDED["conv2d"]
    module = _layer(factory, shape, 3.0).to(torch.bfloat16)
    _, after, _ = gouk_clip_(module, TARGET, shape, n_iter=200)
    assert module.weight.dtype == torch.bfloat16 and torch.isfinite(module.weight).all()
    assert after == pytest.approx(TARGET, rel=1.5e-2)
    assert abs(_sigma(module, shape) / TARGET - 1) <= 1.5e-2


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan, math.inf, "x"])
def test_gouk_clip_bad_target(target) -> None:
    with pytest.raises(ValueError, match="target must be a positive finite number"):
        gouk_clip_(nn.Conv2d(2, 2, 3, padding=1), target, (2, 4, 4))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_gouk_clip_non_finite_weight_is_refused_unchanged(value: float) -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = value
    bits = _bits(conv.weight)
    with pytest.raises(ValueError, match="NaN or inf"):
        gouk_clip_(conv, 0.1, (2, 4, 4))
    assert torch.equal(_bits(conv.weight), bits)


def test_gouk_clip_unsupported_layer_and_shape() -> None:
    with pytest.raises(TypeError, match="supports"):
        gouk_clip_(nn.BatchNorm2d(2), 1.0, (2, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        gouk_clip_(nn.Conv2d(2, 2, 3), 1.0, (3, 4, 4))


# Miyato et al.


def test_miyato_clip_is_exact_for_linear() -> None:
    factory, shape = ZERO_PADDED["linear"]
    module = _layer(factory, shape, 3.0)
    before, after, u = miyato_clip_(module, TARGET, n_iter=200)
    assert before == pytest.approx(3.0 * TARGET, rel=1e-5) and after == pytest.approx(TARGET, rel=1e-5)
    assert _sigma(module, shape) == pytest.approx(TARGET, rel=1e-5)
    assert u.shape == (7,)


CONVS = {k: v for k, v in ZERO_PADDED.items() if k != "linear"} | OTHER_PADDING


@pytest.mark.parametrize("name", list(CONVS))
def test_miyato_clip_bounds_only_the_reshaped_kernel(name: str) -> None:
    factory, shape = CONVS[name]
    module = _layer(factory, shape, 3.0)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    _, after, _ = miyato_clip_(module, TARGET, n_iter=300)
    dim = 1 if transposed else 0  # PyTorch's spectral_norm convention
    assert after == pytest.approx(TARGET, rel=1e-5)
    assert torch.linalg.matrix_norm(reshaped_kernel(module.weight.double(), dim), ord=2).item() == pytest.approx(
        TARGET, rel=1e-4
    )
    sigma = _sigma(module, shape)
    assert abs(sigma / TARGET - 1) > 1e-2  # a convolution is not on the target
    taps = math.prod(module.weight.shape[2:])
    if module.padding_mode in ("zeros", "circular") and not transposed:
        assert sigma <= math.sqrt(taps) * TARGET * (1 + 1e-4)  # the documented upper bound
    if module.padding_mode == "circular":  # stride 1, groups 1: the reshaped kernel is a lower bound
        assert sigma >= TARGET


def test_miyato_clip_can_also_over_clip() -> None:
    """Zero padding on a small input drops taps at the border: the layer can end below the target."""
    factory, shape = ZERO_PADDED["convT1d_stride2"]
    module = _layer(factory, shape, 3.0)
    miyato_clip_(module, TARGET, n_iter=300)
    assert _sigma(module, shape) < 0.99 * TARGET


def test_miyato_clip_below_target_warm_start_and_parameters() -> None:
    factory, shape = CONVS["conv2d"]
    module = _layer(factory, shape, 0.3)
    bits = _bits(module.weight)
    before, after, u = miyato_clip_(module, TARGET, n_iter=50)
    assert torch.equal(_bits(module.weight), bits) and before == pytest.approx(after, rel=1e-6)
    with torch.no_grad():
        module.weight.mul_(20)
    weight = module.weight
    with torch.no_grad():
        _, after, u = miyato_clip_(module, TARGET, n_iter=1, u=u)  # warm start: one step is enough here
    assert module.weight is weight and after == pytest.approx(TARGET, rel=1e-3)


def test_miyato_clip_bf16() -> None:
    factory, shape = ZERO_PADDED["linear"]
    module = _layer(factory, shape, 3.0).to(torch.bfloat16)
    _, after, _ = miyato_clip_(module, TARGET, n_iter=100)
    assert module.weight.dtype == torch.bfloat16 and torch.isfinite(module.weight).all()
    assert after == pytest.approx(TARGET, rel=1.5e-2) and _sigma(module, shape) == pytest.approx(TARGET, rel=1.5e-2)


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
    bits = _bits(lin.weight)
    with pytest.raises(ValueError, match="NaN or inf"):
        miyato_clip_(lin, 0.1)
    assert torch.equal(_bits(lin.weight), bits)
